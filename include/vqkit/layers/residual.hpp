// vqkit/layers/residual.hpp - residual connection around any layer,
// y = x + f(x), where f is a layer with the standard contract whose output
// has the shape of its input (a Swin block's "x + attn(norm1(x))" is
// Residual<of a composite norm1 -> attn>).
//
// Shapes: x (N, C) -> f(x) (N, C) -> y (N, C).
//
// forward:   y = x + f(x)
// backward:  dL/dx = dy + J_f(x)^T dy: dy is fanned out to both branches,
//            f.backward(dy) accumulates f's parameter gradients and yields
//            df, then dx = dy + df (overwritten).
//
// Extra inputs of f (a MapShape, indices, ...) are passed through: they come
// after y, as for every layer: residual.forward(x, y, shape) calls
// body.forward(x, fx, shape).
//
// Parameters are those of the body with the caller's prefix and no name of
// its own, as in PyTorch, where "x + self.mlp(x)" adds no module.
//
// Checks: f's output must have x's shape (checked after f's const forward,
// before y is written); dy must have the forward input's shape (checked
// before the body's backward runs). A call that throws vqkit::error leaves
// the body's parameters and gradients and the outputs unchanged, provided
// the body keeps the same contract.
#pragma once

#include <string>
#include <utility>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

namespace detail {
template <class P>
struct parameter_scalar;
template <class T>
struct parameter_scalar<ParameterList<T>> {
  using type = T;
};
}  // namespace detail

/// The scalar type T of a layer, read off its parameters() list.
template <class Layer>
using layer_scalar_t =
    typename detail::parameter_scalar<decltype(std::declval<Layer&>().parameters())>::type;

template <class Layer>
class Residual {
 public:
  using T = layer_scalar_t<Layer>;

  /// What backward needs: the body's context and the input shape.
  struct Context {
    typename Layer::Context body;
    Index rows = 0;
    Index cols = 0;
  };

  explicit Residual(Layer body_layer) : body(std::move(body_layer)) {}
  /// Builds the body in place from its constructor arguments.
  template <class... Args>
  explicit Residual(std::in_place_t, Args&&... args) : body(std::forward<Args>(args)...) {}

  /// x: (N, C). Resizes and fills y = x + body(x) (N, C); y may be the same
  /// matrix as x. `extra` are passed on to body.forward after its output.
  template <class... Extra>
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Extra&&... extra) const {
    Context ctx;
    RowMatrix<T> fx;
    ctx.body = body.forward(x, fx, std::forward<Extra>(extra)...);
    VQKIT_REQUIRE(fx.rows() == x.rows() && fx.cols() == x.cols(), "Residual::forward",
                  "the body maps ", x.rows(), "x", x.cols(), " to ", fx.rows(), "x", fx.cols(),
                  ", expected the input's shape");
    ctx.rows = x.rows();
    ctx.cols = x.cols();
    fx += x;  // reads x before y is written, so y may alias x
    y = std::move(fx);
    return ctx;
  }

  /// dy: (N, C). Accumulates the body's parameter gradients; if dx is given,
  /// overwrites it with dy + body's dx. dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.rows && dy.cols() == ctx.cols, "Residual::backward",
                  "dy is ", dy.rows(), "x", dy.cols(), ", expected ", ctx.rows, "x", ctx.cols,
                  " (the forward input's shape)");
    if (dx == nullptr) {
      body.backward(ctx.body, dy, nullptr);
      return;
    }
    RowMatrix<T> d;
    body.backward(ctx.body, dy, &d);
    d += dy;  // dy is read before dx is written, so dx may alias dy
    *dx = std::move(d);
  }

  /// The body's parameters, prefixed with `prefix` only.
  ParameterList<T> parameters(const std::string& prefix = "") { return body.parameters(prefix); }
  void zero_grad() { body.zero_grad(); }

  Layer body;
};

}  // namespace vqkit
