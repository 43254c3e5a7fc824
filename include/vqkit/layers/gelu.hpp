// vqkit/layers/gelu.hpp - GELU activation, the EXACT (erf) variant:
// PyTorch's nn.GELU() with its default approximate='none', not the tanh
// approximation used by GPT-2 / llm.c.
//
// Shapes: x (N, C) -> y (N, C), elementwise, any N and C; no parameters.
//
// forward:   y = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
//            computed as 0.5 * x * erfc(-x / sqrt(2)), the same function,
//            which keeps full relative precision for large negative x
//            (1 + erf(...) would cancel there).
// backward:  dy = dL/dy (N, C), the forward input x kept in Context:
//            dx = dy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2*pi)
//            dx is overwritten; there are no parameter gradients.
//
// Every check happens before the first write, so a call that throws
// vqkit::error leaves the outputs untouched.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/parameter.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class Gelu {
  static_assert(std::is_floating_point_v<T>, "Gelu<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned copy of the input).
  struct Context {
    RowMatrix<T> input;  // x (N, C)
  };

  explicit Gelu(Backend backend = {}) : backend_(std::move(backend)) {}

  /// Phi(x) * x, elementwise on a scalar.
  static T value(T x) { return T(0.5) * x * std::erfc(-x * kInvSqrt2); }
  /// d/dx [x * Phi(x)] = Phi(x) + x * phi(x).
  static T derivative(T x) {
    return T(0.5) * std::erfc(-x * kInvSqrt2) + x * kInvSqrt2Pi * std::exp(T(-0.5) * x * x);
  }

  /// x: (N, C). Resizes and fills y (N, C); y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y) const {
    Context ctx;
    forward(x, y, ctx);
    return ctx;
  }

  /// The same into a context whose buffer is reused.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Context& ctx) const {
    ctx.input = x;  // copied first, so y may alias x
    y.resize(ctx.input.rows(), ctx.input.cols());
    y = ctx.input.unaryExpr([](T v) { return value(v); });
  }

  /// dy: (N, C), the shape of the forward input. If dx is given, overwrites
  /// it with dL/dx (N, C); dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.input.rows() && dy.cols() == ctx.input.cols(),
                  "Gelu::backward", "dy is ", dy.rows(), "x", dy.cols(), ", expected ",
                  ctx.input.rows(), "x", ctx.input.cols(), " (the forward input's shape)");
    if (dx == nullptr) return;
    dx->resize(dy.rows(), dy.cols());
    dx->array() = dy.array() * ctx.input.unaryExpr([](T v) { return derivative(v); }).array();
  }

  /// No parameters: always empty.
  ParameterList<T> parameters(const std::string& /*prefix*/ = "") { return {}; }
  void zero_grad() {}

  const Backend& backend() const { return backend_; }

 private:
  static constexpr T kInvSqrt2 = T(0.70710678118654752440084436210484903928);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267793994605993438186848);
  Backend backend_;
};

}  // namespace vqkit
