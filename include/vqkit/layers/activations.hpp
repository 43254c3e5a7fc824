// vqkit/layers/activations.hpp - elementwise activations without parameters:
// Relu (PyTorch's nn.ReLU) and Sigmoid (nn.Sigmoid). GELU, the exact erf
// variant, is in gelu.hpp.
//
// Shapes: x (N, C) -> y (N, C), elementwise, any N and C; no parameters.
//
// Relu
//   forward:   y = max(x, 0)
//   backward:  dx = dy * 1[x > 0]          (0 at x == 0, as PyTorch)
//   Context keeps the forward input x.
//
// Sigmoid
//   forward:   y = 1 / (1 + exp(-x)), evaluated as 1 / (1 + exp(-x)) for
//              x >= 0 and exp(x) / (1 + exp(x)) for x < 0, so neither branch
//              overflows and small outputs keep full relative precision.
//   backward:  dx = dy * y * (1 - y)
//   Context keeps the forward output y (all backward needs).
//
// Both: dy must have the forward input's shape; dx is overwritten (it may be
// the same matrix as dy, and y may be the same matrix as x); there are no
// parameter gradients. Every check happens before the first write, so a call
// that throws vqkit::error leaves the outputs untouched.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class Relu {
  static_assert(std::is_floating_point_v<T>, "Relu<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned copy of the input).
  struct Context {
    RowMatrix<T> input;  // x (N, C)
  };

  explicit Relu(Backend backend = {}) : backend_(std::move(backend)) {}

  static T value(T x) { return x > T(0) ? x : T(0); }
  static T derivative(T x) { return x > T(0) ? T(1) : T(0); }

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
    detail::parallel_rows(backend_, y.rows(), y.cols(), [&](Index i) {
      y.row(i) = ctx.input.row(i).unaryExpr([](T v) { return value(v); });
    });
  }

  /// dy: (N, C), the forward input's shape. If dx is given, overwrites it
  /// with dL/dx (N, C); dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.input.rows() && dy.cols() == ctx.input.cols(),
                  "Relu::backward", "dy is ", dy.rows(), "x", dy.cols(), ", expected ",
                  ctx.input.rows(), "x", ctx.input.cols(), " (the forward input's shape)");
    if (dx == nullptr) return;
    if (dx->rows() != dy.rows() || dx->cols() != dy.cols()) dx->resize(dy.rows(), dy.cols());
    // element by element: dx may be dy
    detail::parallel_rows(backend_, dy.rows(), dy.cols(), [&](Index i) {
      dx->row(i).array() =
          dy.row(i).array() * ctx.input.row(i).unaryExpr([](T v) { return derivative(v); }).array();
    });
  }

  /// No parameters: always empty.
  ParameterList<T> parameters(const std::string& /*prefix*/ = "") { return {}; }
  void zero_grad() {}

  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
};

template <class T, class Backend = cpu>
class Sigmoid {
  static_assert(std::is_floating_point_v<T>, "Sigmoid<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned copy of the output).
  struct Context {
    RowMatrix<T> output;  // y (N, C)
  };

  explicit Sigmoid(Backend backend = {}) : backend_(std::move(backend)) {}

  static T value(T x) {
    if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
    const T e = std::exp(x);
    return e / (T(1) + e);
  }

  /// x: (N, C). Resizes and fills y (N, C); y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y) const {
    Context ctx;
    forward(x, y, ctx);
    return ctx;
  }

  /// The same into a context whose buffer is reused.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Context& ctx) const {
    ctx.output = x.unaryExpr([](T v) { return value(v); });  // evaluated before y is touched
    y = ctx.output;
  }

  /// dy: (N, C), the forward input's shape. If dx is given, overwrites it
  /// with dL/dx = dy * y * (1 - y); dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.output.rows() && dy.cols() == ctx.output.cols(),
                  "Sigmoid::backward", "dy is ", dy.rows(), "x", dy.cols(), ", expected ",
                  ctx.output.rows(), "x", ctx.output.cols(), " (the forward input's shape)");
    if (dx == nullptr) return;
    if (dx->rows() != dy.rows() || dx->cols() != dy.cols()) dx->resize(dy.rows(), dy.cols());
    // element by element: dx may be dy
    dx->array() = dy.array() * ctx.output.array() * (T(1) - ctx.output.array());
  }

  /// No parameters: always empty.
  ParameterList<T> parameters(const std::string& /*prefix*/ = "") { return {}; }
  void zero_grad() {}

  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
};

}  // namespace vqkit
