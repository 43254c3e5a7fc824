// vqkit/layers/mlp.hpp - two-layer perceptron, Linear -> activation -> Linear
// (the Mlp of timm / Swin without dropout), activation ReLU or exact GELU.
//
// Shapes (N samples, C = in, Hd = hidden, OC = out; all row-major):
//   x            (N, C)
//   fc1.weight   (Hd, C),  fc1.bias (1, Hd)
//   fc2.weight   (OC, Hd), fc2.bias (1, OC)
//   y            (N, OC)
//
// forward:   h = x fc1.weight^T + fc1.bias          (N, Hd)   Linear
//            a = act(h)                             (N, Hd)   Relu or Gelu
//            y = a fc2.weight^T + fc2.bias          (N, OC)   Linear
// backward:  da = dy fc2.weight,  dfc2.weight += dy^T a,  dfc2.bias += sum_n dy
//            dh = da * act'(h)
//            dx = dh fc1.weight,  dfc1.weight += dh^T x,  dfc1.bias += sum_n dh
//            Parameter gradients accumulate (+=); dx is overwritten.
//
// Parameters (PyTorch names, prefixed by the caller): "fc1.weight" {Hd, C},
// "fc1.bias" {Hd}, "fc2.weight" {OC, Hd}, "fc2.bias" {OC}; weight decay on
// the weights only.
//
// Initialisation: fc1 then fc2, each as Linear (PyTorch's nn.Linear default),
// from the caller's Rng.
//
// Every check happens before the first write (the shapes of x and dy are
// checked up front), so a call that throws vqkit::error leaves the layer, its
// gradients and the outputs unchanged.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/activations.hpp"
#include "vqkit/layers/gelu.hpp"
#include "vqkit/layers/linear.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

/// The hidden activation of an Mlp.
enum class Activation { relu, gelu };

template <class T, class Backend = cpu>
class Mlp {
  static_assert(std::is_floating_point_v<T>, "Mlp<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned). Only the context of the
  /// chosen activation is filled.
  struct Context {
    typename Linear<T, Backend>::Context fc1;
    typename Relu<T, Backend>::Context relu;
    typename Gelu<T, Backend>::Context gelu;
    typename Linear<T, Backend>::Context fc2;
  };

  Mlp(Index in_features, Index hidden_features, Index out_features, Rng& rng,
      Activation activation = Activation::gelu, Backend backend = {})
      : fc1(checked(in_features, hidden_features, out_features, activation), hidden_features,
            rng, true, backend),
        fc2(hidden_features, out_features, rng, true, backend),
        relu_(backend),
        gelu_(backend),
        activation_(activation),
        backend_(std::move(backend)) {}

  /// x: (N, in). Resizes and fills y (N, out); y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y) const {
    VQKIT_REQUIRE(x.cols() == fc1.in_features(), "Mlp::forward", "x has ", x.cols(),
                  " columns, expected in_features=", fc1.in_features());
    Context ctx;
    forward(x, y, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused (no allocation of the
  /// activations once ctx has held a batch of this size).
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Context& ctx) const {
    VQKIT_REQUIRE(x.cols() == fc1.in_features(), "Mlp::forward", "x has ", x.cols(),
                  " columns, expected in_features=", fc1.in_features());
    // Each layer writes straight into the next one's context (its input
    // copy), which then copies nothing.
    if (activation_ == Activation::relu) {
      fc1.forward(x, ctx.relu.input, ctx.fc1);
      relu_.forward(ctx.relu.input, ctx.fc2.input, ctx.relu);
    } else {
      fc1.forward(x, ctx.gelu.input, ctx.fc1);
      gelu_.forward(ctx.gelu.input, ctx.fc2.input, ctx.gelu);
    }
    fc2.forward(ctx.fc2.input, y, ctx.fc2);
  }

  /// dy: (N, out). Accumulates the parameter gradients; if dx is given,
  /// overwrites it with dL/dx (N, in). dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const Index n = ctx.fc1.input.rows();
    VQKIT_REQUIRE(dy.rows() == n && dy.cols() == fc2.out_features(), "Mlp::backward", "dy is ",
                  dy.rows(), "x", dy.cols(), ", expected ", n, "x", fc2.out_features(),
                  " (N from the forward input, out_features=", fc2.out_features(), ")");
    const auto& act_in =
        activation_ == Activation::relu ? ctx.relu.input : ctx.gelu.input;
    VQKIT_REQUIRE(act_in.rows() == n && act_in.cols() == fc1.out_features() &&
                      ctx.fc2.input.rows() == n,
                  "Mlp::backward", "context does not match this layer (activation context is ",
                  act_in.rows(), "x", act_in.cols(), ", expected ", n, "x",
                  fc1.out_features(), ")");
    VQKIT_REQUIRE(ctx.fc1.input.cols() == fc1.in_features(), "Mlp::backward",
                  "context input has ", ctx.fc1.input.cols(), " columns, expected in_features=",
                  fc1.in_features());
    check_parameters("Mlp::backward");
    RowMatrix<T>& d = grad_scratch_;  // (N, hidden), reused across calls
    fc2.backward(ctx.fc2, dy, &d);
    if (activation_ == Activation::relu)
      relu_.backward(ctx.relu, d, &d);
    else
      gelu_.backward(ctx.gelu, d, &d);
    fc1.backward(ctx.fc1, d, dx);
  }

  /// "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", prefixed with `prefix`.
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    append_parameters(list, fc1.parameters(), prefix + "fc1.");
    append_parameters(list, fc2.parameters(), prefix + "fc2.");
    return list;
  }

  void zero_grad() {
    fc1.zero_grad();
    fc2.zero_grad();
  }

  Index in_features() const { return fc1.in_features(); }
  Index hidden_features() const { return fc1.out_features(); }
  Index out_features() const { return fc2.out_features(); }
  Activation activation() const { return activation_; }
  const Backend& backend() const { return backend_; }

  Linear<T, Backend> fc1;  // (in -> hidden)
  Linear<T, Backend> fc2;  // (hidden -> out)

 private:
  RowMatrix<T> grad_scratch_;
  Relu<T, Backend> relu_;
  Gelu<T, Backend> gelu_;
  Activation activation_;
  Backend backend_;

  // The public tensors may have been replaced (e.g. by a checkpoint load):
  // every value and gradient must have its listed shape, checked before
  // fc2's gradients are touched.
  void check_parameters(const char* where) {
    for (const auto& p : parameters()) {
      const Index r = p.shape.size() == 2 ? p.shape[0] : 1;
      const Index c = p.shape.back();
      VQKIT_REQUIRE(p.value->rows() == r && p.value->cols() == c && p.grad->rows() == r &&
                        p.grad->cols() == c,
                    where, p.name, " is ", p.value->rows(), "x", p.value->cols(), " (gradient ",
                    p.grad->rows(), "x", p.grad->cols(), "), expected ", r, "x", c);
    }
  }

  // Validates the configuration before any parameter is drawn.
  static Index checked(Index in, Index hidden, Index out, Activation a) {
    VQKIT_REQUIRE(in >= 1 && hidden >= 1 && out >= 1, "Mlp",
                  "sizes must be >= 1, got in=", in, " hidden=", hidden, " out=", out);
    VQKIT_REQUIRE(a == Activation::relu || a == Activation::gelu, "Mlp",
                  "unknown activation=", static_cast<int>(a));
    return in;
  }
};

}  // namespace vqkit
