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
// float evaluates erfc in double, in blocks of 256 values that Eigen
// vectorises (its exp): erfc(z) = t exp(-z^2 - 1.26551223 + t P(t)), t =
// 1 / (1 + z/2), P the degree-8 Chebyshev fit of Numerical Recipes' erfcc
// (relative error < 1.2e-7 for every z >= 0), erfc(-z) = 2 - erfc(z). So
// float results stay within ~2 ulp of the exact values, tail included,
// without a scalar libm call per value (which took ~10% of a QuantizerBlock
// step). Blocks run on the backend's threads; each value is computed alone,
// so the bits do not depend on the thread count. double keeps std::erfc.
//
// Every check happens before the first write, so a call that throws
// vqkit::error leaves the outputs untouched.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

namespace detail {

/// GELU on n <= 256 floats: out = gelu(x), or, with Derivative, out =
/// dy * gelu'(x). The arithmetic is double (see the header comment).
template <bool Derivative>
void gelu_block(const float* x, const float* dy, float* out, Index n) {
  using A = Eigen::Array<double, Eigen::Dynamic, 1, Eigen::ColMajor, 256, 1>;  // on the stack
  const A v = Eigen::Map<const Eigen::ArrayXf>(x, n).cast<double>();
  const A z = v.abs() * 0.70710678118654752440;
  const A t = 1.0 / (1.0 + 0.5 * z);
  const A p =
      -1.26551223 +
      t * (1.00002368 +
           t * (0.37409196 +
                t * (0.09678418 +
                     t * (-0.18628806 +
                          t * (0.27886807 +
                               t * (-1.13520398 +
                                    t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
  const A e = t * (p - z * z).exp();                 // erfc(|x| / sqrt 2)
  const A c = (v >= 0.0).select(2.0 - e, e);         // erfc(-x / sqrt 2) = 2 Phi(x)
  Eigen::Map<Eigen::ArrayXf> o(out, n);
  if constexpr (Derivative) {
    const A d = 0.5 * c + v * 0.39894228040143267794 * (-0.5 * v * v).exp();
    o = (Eigen::Map<const Eigen::ArrayXf>(dy, n).cast<double>() * d).cast<float>();
  } else {
    o = (0.5 * v * c).cast<float>();
  }
}

/// gelu_block over n values in blocks of 256, on be's threads from 64K values.
template <bool Derivative>
void gelu_float(const cpu& be, const float* x, const float* dy, float* out, Index n) {
  constexpr Index B = 256;
  const Index blocks = (n + B - 1) / B;
  const auto run = [&](Index b) {
    const Index o = b * B;
    gelu_block<Derivative>(x + o, Derivative ? dy + o : nullptr, out + o, std::min(B, n - o));
  };
  if (n >= (Index(1) << 16)) parallel_for(be, blocks, run);
  else
    for (Index b = 0; b < blocks; ++b) run(b);
}

}  // namespace detail

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
    detail::copy_rows(backend_, x, ctx.input);  // copied first, so y may alias x
    y.resize(ctx.input.rows(), ctx.input.cols());
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Backend, cpu>)
      detail::gelu_float<false>(backend_, ctx.input.data(), nullptr, y.data(), y.size());
    else
      y = ctx.input.unaryExpr([](T v) { return value(v); });
  }

  /// dy: (N, C), the shape of the forward input. If dx is given, overwrites
  /// it with dL/dx (N, C); dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.input.rows() && dy.cols() == ctx.input.cols(),
                  "Gelu::backward", "dy is ", dy.rows(), "x", dy.cols(), ", expected ",
                  ctx.input.rows(), "x", ctx.input.cols(), " (the forward input's shape)");
    if (dx == nullptr) return;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Backend, cpu>) {
      if (dy.outerStride() == dy.cols()) {  // contiguous: dx may alias dy, element by element
        dx->resize(dy.rows(), dy.cols());
        detail::gelu_float<true>(backend_, ctx.input.data(), dy.data(), dx->data(), dx->size());
        return;
      }
    }
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
