// vqkit/layers/linear.hpp - fully connected layer, y = x W^T + b
// (PyTorch's nn.Linear, same layout and initialisation).
//
// Shapes (N samples, C = in_features, OC = out_features; all row-major):
//   x       (N, C)    one sample per row
//   weight  (OC, C)   as in PyTorch
//   bias    (1, OC)   empty (0 x 0) when constructed with bias = false
//   y       (N, OC)
//
// forward:   y[n,o] = sum_c x[n,c] * weight[o,c] + bias[o]
//            y (N,OC) = x (N,C) * weight^T (C,OC)            one GEMM
//                       + bias broadcast over the N rows
// backward:  given dy = dL/dy (N,OC) and the forward input x kept in Context:
//            dweight (OC,C) += dy^T (OC,N) * x (N,C)         one GEMM
//            dbias   (1,OC) += sum over rows n of dy[n,:]
//            dx      (N,C)   = dy (N,OC) * weight (OC,C)     one GEMM
//            Parameter gradients accumulate (+=); dx is overwritten.
//
// The three GEMMs run through vqkit::gemm (core/gemm.hpp) on the backend's
// threads: the results are the same bits for any thread count, and a call
// with a reused Context makes no heap allocation.
//
// Initialisation (PyTorch's default): every weight and bias entry is drawn
// uniform(-k, k) with k = 1/sqrt(in_features), weight first in row-major
// order, then bias, from the caller's vqkit::Rng.
//
// Every check happens before the first write, so a call that throws
// vqkit::error leaves the layer, the Rng and the outputs untouched.
#pragma once

#include <cmath>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/gemm.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class Linear {
  static_assert(std::is_floating_point_v<T>, "Linear<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned copy of the input).
  struct Context {
    RowMatrix<T> input;  // x (N, C)
  };

  Linear(Index in_features, Index out_features, Rng& rng, bool bias = true,
         Backend backend = {})
      : backend_(std::move(backend)), in_(in_features), out_(out_features), has_bias_(bias) {
    VQKIT_REQUIRE(in_features >= 1, "Linear", "in_features must be >= 1, got in_features=",
                  in_features);
    VQKIT_REQUIRE(out_features >= 1, "Linear", "out_features must be >= 1, got out_features=",
                  out_features);
    const double k = 1.0 / std::sqrt(static_cast<double>(in_features));
    weight.resize(out_, in_);
    for (Index i = 0; i < weight.size(); ++i)
      weight.data()[i] = static_cast<T>((2.0 * rng.uniform() - 1.0) * k);
    weight_grad = RowMatrix<T>::Zero(out_, in_);
    if (has_bias_) {
      this->bias.resize(1, out_);
      for (Index i = 0; i < out_; ++i)
        this->bias.data()[i] = static_cast<T>((2.0 * rng.uniform() - 1.0) * k);
      bias_grad = RowMatrix<T>::Zero(1, out_);
    }
  }

  /// x: (N, C). Resizes and fills y (N, OC); y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y) const {
    Context ctx;
    forward(x, y, ctx);
    return ctx;
  }

  /// The same into a context whose buffer is reused: no heap allocation
  /// once ctx and y have held a batch of this size.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Context& ctx) const {
    check_state("Linear::forward");
    VQKIT_REQUIRE(x.cols() == in_, "Linear::forward", "x has ", x.cols(),
                  " columns, expected in_features=", in_);
    detail::copy_rows(backend_, x, ctx.input);  // copied first, so y may alias x
    y.resize(ctx.input.rows(), out_);
    // (N,C) x (C,OC) + bias
    gemm<T>(backend_, Op::none, ctx.input, Op::transpose, weight, y, false,
            has_bias_ ? bias.data() : nullptr);
  }

  /// dy: (N, OC). Accumulates weight_grad / bias_grad; if dx is given,
  /// overwrites it with dL/dx (N, C). dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    check_state("Linear::backward");
    VQKIT_REQUIRE(ctx.input.cols() == in_, "Linear::backward", "context input has ",
                  ctx.input.cols(), " columns, expected in_features=", in_);
    VQKIT_REQUIRE(dy.rows() == ctx.input.rows() && dy.cols() == out_, "Linear::backward",
                  "dy is ", dy.rows(), "x", dy.cols(), ", expected ", ctx.input.rows(), "x",
                  out_, " (N from the forward input, out_features=", out_, ")");
    gemm<T>(backend_, Op::transpose, dy, Op::none, ctx.input, weight_grad, true);  // (OC,N) x (N,C)
    if (has_bias_) {  // rows in order (each thread a range of columns)
      detail::parallel_column_ranges(backend_, dy.rows(), out_, [&](Index c0, Index w) {
        auto bg = bias_grad.row(0).segment(c0, w);
        for (Index n = 0; n < dy.rows(); ++n) bg += dy.row(n).segment(c0, w);
      });
    }
    if (dx != nullptr) {
      if (detail::storage_overlaps(*dx, dy)) {
        RowMatrix<T> tmp(dy.rows(), in_);
        gemm<T>(backend_, Op::none, dy, Op::none, weight, tmp, false);
        *dx = std::move(tmp);
      } else {
        dx->resize(dy.rows(), in_);
        gemm<T>(backend_, Op::none, dy, Op::none, weight, *dx, false);  // (N,OC) x (OC,C)
      }
    }
  }

  /// "weight" {OC, C} (weight decay), "bias" {OC} (no weight decay, only
  /// when the layer has one); names prefixed with `prefix`.
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    list.push_back({prefix + "weight", &weight, &weight_grad, {out_, in_}, true});
    if (has_bias_) list.push_back({prefix + "bias", &bias, &bias_grad, {out_}, false});
    return list;
  }

  void zero_grad() {
    weight_grad.setZero();
    bias_grad.setZero();
  }

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  bool has_bias() const { return has_bias_; }
  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
  Index in_;
  Index out_;
  bool has_bias_;

 public:
  RowMatrix<T> weight;       // (OC, C)
  RowMatrix<T> bias;         // (1, OC), or 0 x 0 without bias
  RowMatrix<T> weight_grad;  // (OC, C)
  RowMatrix<T> bias_grad;    // (1, OC), or 0 x 0 without bias

 private:
  // The public tensors may have been replaced (e.g. by a checkpoint load);
  // refuse to run on inconsistent shapes rather than read out of bounds.
  void check_state(const char* where) const {
    VQKIT_REQUIRE(weight.rows() == out_ && weight.cols() == in_, where, "weight is ",
                  weight.rows(), "x", weight.cols(), ", expected ", out_, "x", in_);
    VQKIT_REQUIRE(weight_grad.rows() == out_ && weight_grad.cols() == in_, where,
                  "weight_grad is ", weight_grad.rows(), "x", weight_grad.cols(), ", expected ",
                  out_, "x", in_);
    const Index br = has_bias_ ? 1 : 0, bc = has_bias_ ? out_ : 0;
    VQKIT_REQUIRE(bias.rows() == br && bias.cols() == bc, where, "bias is ", bias.rows(), "x",
                  bias.cols(), ", expected ", br, "x", bc);
    VQKIT_REQUIRE(bias_grad.rows() == br && bias_grad.cols() == bc, where, "bias_grad is ",
                  bias_grad.rows(), "x", bias_grad.cols(), ", expected ", br, "x", bc);
  }
};

}  // namespace vqkit
