// vqkit/layers/recon_loss.hpp - the tokenizer's reconstruction losses, each
// returning the loss value and (optionally) its gradient.
//
//   l1_loss(pred, target, dpred)                      depth loss
//   surface_loss(weights, h, depth_gt, dweights, eps) rendering-weight concentration
//   bce_with_logits(logits, targets, dlogits, pos_weight)   occupancy loss
// T is given explicitly, as for vq_loss: l1_loss<float>(pred, target, &g).
// Each also takes a backend first (l1_loss<T>(cpu{2}, ...)); the overloads
// without one use cpu{}.
//
// Shapes: pred/target, logits/targets are any (N, M) matrices of equal shape
// (a Vector binds as an (N, 1) column); weights and h are (R, S) (R rays, S
// samples); depth_gt is (R). A gradient output, when not null, is overwritten
// with dLoss/dinput of the returned loss value, in the input's shape.
//
// L1 (mean reduction, PyTorch's F.l1_loss):
//   L = (1/n) sum |pred - target|,  n = number of entries
//   dL/dpred = sign(pred - target) / n          (0 where pred == target)
//
// Surface concentration (CoPilot4D): pushes the rendering weight of samples
// farther than eps from the true surface to zero.
//   L = (1/R) sum_r sum_i 1(|h[r,i] - depth_gt[r]| > eps) * w[r,i]^2
//   i.e. a sum over the samples of each ray, then the mean over the rays.
//   dL/dw[r,i] = (2/R) * 1(|h[r,i] - depth_gt[r]| > eps) * w[r,i]
//   eps defaults to 0.4 (metres). No gradient flows to h or depth_gt (the
//   indicator is piecewise constant).
//
// Binary cross-entropy with logits (mean reduction, PyTorch's
// F.binary_cross_entropy_with_logits with a scalar pos_weight p > 0):
//   l(x, y) = p * y * softplus(-x) + (1 - y) * softplus(x)
//           = -[p * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x))]
//   softplus(z) = max(z, 0) + log1p(exp(-|z|))          (stable for any finite x)
//   L = (1/n) sum l,  dL/dx = (-(p * y) * sigmoid(-x) + (1 - y) * sigmoid(x)) / n
//   Targets must lie in [0, 1] (soft targets allowed).
//
// The sums are taken in fixed blocks of entries whose partial sums are added
// in block order, so values and gradients are bit-identical for every thread
// count. Every check happens before the first write: shape mismatches,
// non-finite inputs, targets outside [0, 1], eps < 0 or pos_weight <= 0 throw
// vqkit::error and leave the gradient output untouched.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/blocked_sum.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

namespace detail {

template <class T>
T softplus(T z) {
  return std::max(z, T(0)) + std::log1p(std::exp(-std::abs(z)));
}

template <class T>
T sigmoid(T z) {
  if (z >= T(0)) return T(1) / (T(1) + std::exp(-z));
  const T e = std::exp(z);
  return e / (T(1) + e);
}

template <class T>
void require_same_shape(const ConstMatrixRef<T>& a, const ConstMatrixRef<T>& b, const char* where,
                        const char* an, const char* bn) {
  VQKIT_REQUIRE(a.rows() == b.rows() && a.cols() == b.cols(), where, bn, " is ", b.rows(), "x",
                b.cols(), ", expected the shape of ", an, " ", a.rows(), "x", a.cols());
  VQKIT_REQUIRE(a.size() > 0, where, an, " is empty");
}

}  // namespace detail

/// Mean absolute error; dpred (same shape as pred) overwritten when not null.
template <class T>
T l1_loss(const cpu& be, ConstMatrixRef<T> pred, ConstMatrixRef<T> target, RowMatrix<T>* dpred) {
  const char* where = "l1_loss";
  detail::require_same_shape<T>(pred, target, where, "pred", "target");
  detail::require_finite(pred, where, "pred");
  detail::require_finite(target, where, "target");
  const Index n = pred.size(), cols = pred.cols();
  const double sum = detail::blocked_sum(be, n, [&](Index i) {
    return std::abs(static_cast<double>(pred(i / cols, i % cols)) -
                    static_cast<double>(target(i / cols, i % cols)));
  });
  if (dpred != nullptr) {
    const T inv = T(1) / static_cast<T>(n);
    RowMatrix<T> g = ((pred - target).array().sign() * inv).matrix();
    *dpred = std::move(g);
  }
  return static_cast<T>(sum / static_cast<double>(n));
}

/// Surface-concentration term; dweights (R, S) overwritten when not null.
template <class T>
T surface_loss(const cpu& be, ConstMatrixRef<T> weights, ConstMatrixRef<T> h,
               ConstVectorRef<T> depth_gt, RowMatrix<T>* dweights, T eps = T(0.4)) {
  const char* where = "surface_loss";
  detail::require_same_shape<T>(weights, h, where, "weights", "h");
  VQKIT_REQUIRE(depth_gt.size() == weights.rows(), where, "depth_gt has ", depth_gt.size(),
                " entries, expected one per ray (R=", weights.rows(), ")");
  VQKIT_REQUIRE(std::isfinite(eps) && eps >= T(0), where, "eps must be finite and >= 0, got eps=",
                eps);
  detail::require_finite(weights, where, "weights");
  detail::require_finite(h, where, "h");
  detail::require_finite(depth_gt, where, "depth_gt");
  const Index R = weights.rows(), S = weights.cols();
  auto far = [&](Index r, Index i) { return std::abs(h(r, i) - depth_gt[r]) > eps; };
  const double sum = detail::blocked_sum(be, R * S, [&](Index e) {
    const Index r = e / S, i = e % S;
    const double w = static_cast<double>(weights(r, i));
    return far(r, i) ? w * w : 0.0;
  });
  if (dweights != nullptr) {
    RowMatrix<T> g(R, S);
    const T scale = T(2) / static_cast<T>(R);
    for (Index r = 0; r < R; ++r)
      for (Index i = 0; i < S; ++i) g(r, i) = far(r, i) ? scale * weights(r, i) : T(0);
    *dweights = std::move(g);
  }
  return static_cast<T>(sum / static_cast<double>(R));
}

/// Binary cross-entropy on logits; dlogits overwritten when not null.
template <class T>
T bce_with_logits(const cpu& be, ConstMatrixRef<T> logits, ConstMatrixRef<T> targets,
                  RowMatrix<T>* dlogits, T pos_weight = T(1)) {
  const char* where = "bce_with_logits";
  detail::require_same_shape<T>(logits, targets, where, "logits", "targets");
  VQKIT_REQUIRE(std::isfinite(pos_weight) && pos_weight > T(0), where,
                "pos_weight must be finite and > 0, got pos_weight=", pos_weight);
  detail::require_finite(logits, where, "logits");
  for (Index r = 0; r < targets.rows(); ++r)
    for (Index c = 0; c < targets.cols(); ++c)
      VQKIT_REQUIRE(targets(r, c) >= T(0) && targets(r, c) <= T(1), where, "targets(", r, ", ",
                    c, ") = ", targets(r, c), " is outside [0, 1]");
  const Index n = logits.size(), cols = logits.cols();
  const double pw = static_cast<double>(pos_weight);
  const double sum = detail::blocked_sum(be, n, [&](Index i) {
    const double x = static_cast<double>(logits(i / cols, i % cols));
    const double y = static_cast<double>(targets(i / cols, i % cols));
    return pw * y * detail::softplus(-x) + (1.0 - y) * detail::softplus(x);
  });
  if (dlogits != nullptr) {
    RowMatrix<T> g(logits.rows(), cols);
    const T inv = T(1) / static_cast<T>(n);
#pragma omp parallel for schedule(static) num_threads(be.num_threads()) if (n >= 4096)
    for (Index r = 0; r < logits.rows(); ++r)
      for (Index c = 0; c < cols; ++c) {
        const T x = logits(r, c), y = targets(r, c);
        g(r, c) = (-(pos_weight * y) * detail::sigmoid(-x) + (T(1) - y) * detail::sigmoid(x)) * inv;
      }
    *dlogits = std::move(g);
  }
  return static_cast<T>(sum / static_cast<double>(n));
}

template <class T>
T l1_loss(ConstMatrixRef<T> pred, ConstMatrixRef<T> target, RowMatrix<T>* dpred) {
  return l1_loss<T>(cpu{}, pred, target, dpred);
}
template <class T>
T surface_loss(ConstMatrixRef<T> weights, ConstMatrixRef<T> h, ConstVectorRef<T> depth_gt,
               RowMatrix<T>* dweights, T eps = T(0.4)) {
  return surface_loss<T>(cpu{}, weights, h, depth_gt, dweights, eps);
}
template <class T>
T bce_with_logits(ConstMatrixRef<T> logits, ConstMatrixRef<T> targets, RowMatrix<T>* dlogits,
                  T pos_weight = T(1)) {
  return bce_with_logits<T>(cpu{}, logits, targets, dlogits, pos_weight);
}

}  // namespace vqkit
