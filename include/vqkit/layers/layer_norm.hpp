// vqkit/layers/layer_norm.hpp - layer normalisation over the last dimension
// (PyTorch's nn.LayerNorm(dim, eps), elementwise_affine=True).
//
// Shapes (N samples, C = dim; all row-major):
//   x      (N, C)    one sample per row, each row normalised on its own
//   weight (1, C)    gamma, initialised to ones
//   bias   (1, C)    beta, initialised to zeros
//   y      (N, C)
//   mean   (N)       kept in Context
//   rstd   (N)       kept in Context
//
// forward, for each row n:
//   mean[n] = (1/C) sum_c x[n,c]
//   var[n]  = (1/C) sum_c (x[n,c] - mean[n])^2       biased, like PyTorch
//   rstd[n] = 1 / sqrt(var[n] + eps)
//   xhat    = (x[n,:] - mean[n]) * rstd[n]           (C)
//   y[n,:]  = xhat * weight + bias                   (C), elementwise
//
// backward, given dy = dL/dy (N, C), for each row n (xhat recomputed):
//   dbias   (C) += dy[n,:]
//   dweight (C) += dy[n,:] * xhat
//   dxhat   (C)  = dy[n,:] * weight
//   dx[n,:] (C)  = rstd[n] * (dxhat - mean_c(dxhat) - xhat * mean_c(dxhat * xhat))
//   Parameter gradients accumulate (+=); dx is overwritten.
//
// Every check happens before the first write, so a call that throws
// vqkit::error leaves the layer and the outputs untouched.
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
class LayerNorm {
  static_assert(std::is_floating_point_v<T>, "LayerNorm<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned).
  struct Context {
    RowMatrix<T> input;  // x    (N, C)
    Vector<T> mean;      // mean (N)
    Vector<T> rstd;      // rstd (N)
  };

  explicit LayerNorm(Index dim, T eps = T(1e-5), Backend backend = {})
      : backend_(std::move(backend)), dim_(dim), eps_(eps) {
    VQKIT_REQUIRE(dim >= 1, "LayerNorm", "dim must be >= 1, got dim=", dim);
    VQKIT_REQUIRE(eps > T(0), "LayerNorm", "eps must be > 0, got eps=", eps);
    weight = RowMatrix<T>::Ones(1, dim_);
    bias = RowMatrix<T>::Zero(1, dim_);
    weight_grad = RowMatrix<T>::Zero(1, dim_);
    bias_grad = RowMatrix<T>::Zero(1, dim_);
  }

  /// x: (N, C). Resizes and fills y (N, C); y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y) const {
    Context ctx;
    forward(x, y, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused (no allocation once
  /// they have the batch's size).
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Context& ctx) const {
    check_state("LayerNorm::forward");
    VQKIT_REQUIRE(x.cols() == dim_, "LayerNorm::forward", "x has ", x.cols(),
                  " columns, expected dim=", dim_);
    detail::copy_rows(backend_, x, ctx.input);  // copied first, so y may alias x
    const RowMatrix<T>& in = ctx.input;
    const Index n = in.rows();
    ctx.mean.resize(n);
    ctx.rstd.resize(n);
    y.resize(n, dim_);
    // Rows are independent: any split over threads gives the same bits.
    detail::parallel_rows(backend_, n, dim_, [&](Index i) {
      const T m = in.row(i).mean();
      const T r = T(1) / std::sqrt((in.row(i).array() - m).square().mean() + eps_);
      ctx.mean[i] = m;
      ctx.rstd[i] = r;
      y.row(i).array() = ((in.row(i).array() - m) * r) * weight.row(0).array() + bias.row(0).array();
    });
  }

  /// dy: (N, C). Accumulates weight_grad / bias_grad; if dx is given,
  /// overwrites it with dL/dx (N, C). dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    check_state("LayerNorm::backward");
    const Index n = ctx.input.rows();
    VQKIT_REQUIRE(ctx.input.cols() == dim_, "LayerNorm::backward", "context input has ",
                  ctx.input.cols(), " columns, expected dim=", dim_);
    VQKIT_REQUIRE(ctx.mean.size() == n && ctx.rstd.size() == n, "LayerNorm::backward",
                  "context mean/rstd have ", ctx.mean.size(), "/", ctx.rstd.size(),
                  " entries, expected N=", n);
    VQKIT_REQUIRE(dy.rows() == n && dy.cols() == dim_, "LayerNorm::backward", "dy is ",
                  dy.rows(), "x", dy.cols(), ", expected ", n, "x", dim_,
                  " (N from the forward input, dim=", dim_, ")");
    // xhat (N, C), recomputed from the saved statistics (into the layer's
    // scratch: no allocation once it has the batch's size).
    RowMatrix<T>& xhat = xhat_;
    xhat.resize(n, dim_);
    // Rows are independent, and each column sums its rows in order, whatever
    // the split over threads: the same bits for any thread count.
    detail::parallel_rows(backend_, n, dim_, [&](Index i) {
      xhat.row(i).array() = (ctx.input.row(i).array() - ctx.mean[i]) * ctx.rstd[i];
    });
    detail::parallel_column_ranges(backend_, n, dim_, [&](Index c0, Index w) {
      auto wg = weight_grad.row(0).segment(c0, w).array();
      auto bg = bias_grad.row(0).segment(c0, w).array();
      for (Index i = 0; i < n; ++i) {
        wg += dy.row(i).segment(c0, w).array() * xhat.row(i).segment(c0, w).array();
        bg += dy.row(i).segment(c0, w).array();
      }
    });
    if (dx == nullptr) return;
    dx->resize(n, dim_);  // after the sums above, so dx may alias dy
    detail::parallel_rows(backend_, n, dim_, [&](Index i) {
      const auto dxhat = dy.row(i).array() * weight.row(0).array();
      const T m1 = dxhat.mean();                          // mean_c(dxhat)
      const T m2 = (dxhat * xhat.row(i).array()).mean();  // mean_c(dxhat * xhat)
      dx->row(i).array() = (dxhat - xhat.row(i).array() * m2 - m1) * ctx.rstd[i];
    });
  }

  /// "weight" {C} and "bias" {C}, both without weight decay; names prefixed
  /// with `prefix`.
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    list.push_back({prefix + "weight", &weight, &weight_grad, {dim_}, false});
    list.push_back({prefix + "bias", &bias, &bias_grad, {dim_}, false});
    return list;
  }

  void zero_grad() {
    weight_grad.setZero();
    bias_grad.setZero();
  }

  Index dim() const { return dim_; }
  Index in_features() const { return dim_; }
  Index out_features() const { return dim_; }
  T eps() const { return eps_; }
  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
  Index dim_;
  T eps_;

 public:
  RowMatrix<T> weight;       // gamma (1, C)
  RowMatrix<T> bias;         // beta  (1, C)
  RowMatrix<T> weight_grad;  // (1, C)
  RowMatrix<T> bias_grad;    // (1, C)

 private:
  // The public tensors may have been replaced (e.g. by a checkpoint load);
  // refuse to run on inconsistent shapes rather than read out of bounds.
  void check_state(const char* where) const {
    const RowMatrix<T>* tensors[] = {&weight, &bias, &weight_grad, &bias_grad};
    const char* names[] = {"weight", "bias", "weight_grad", "bias_grad"};
    for (int i = 0; i < 4; ++i)
      VQKIT_REQUIRE(tensors[i]->rows() == 1 && tensors[i]->cols() == dim_, where, names[i],
                    " is ", tensors[i]->rows(), "x", tensors[i]->cols(), ", expected 1x", dim_);
  }

  // backward's scratch, kept between calls (no state).
  RowMatrix<T> xhat_;
};

}  // namespace vqkit
