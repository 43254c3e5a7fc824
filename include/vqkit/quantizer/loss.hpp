// vqkit/quantizer/loss.hpp - the VQ loss terms and their gradients.
//
// With x the encoder output (N x D), q the selected codes (q_i = e_{a_i}) and
// sg the stop-gradient:
//   codebook term    L_cb = codebook_weight   * ||sg[x] - q||^2  (moves codes)
//   commitment term  L_cm = commitment_weight * ||x - sg[q]||^2  (moves the encoder)
// Defaults are the CoPilot4D paper's: codebook_weight 0.25, commitment_weight
// 1.0. (The original VQ-VAE has it the other way round; the names say which
// term a weight multiplies, so nothing hinges on a convention.)
//
// Reduction of ||.||^2 over the N x D residual r = x - q:
//   Reduction::mean          sum(r^2) / (N*D)   - PyTorch's F.mse_loss, the default
//   Reduction::sum_over_dim  sum(r^2) / N       - the paper's ||.||^2 per vector, averaged over N
//
// Gradients (straight-through estimator: forward output q, backward identity):
//   dL/dx   = dL/dq_out + commitment_weight * 2 r / s
//   dL/de_k = codebook_weight * 2 * sum_{i : a_i = k} (-r_i) / s   (gradient-update mode only)
// with s = N*D or N. Under EMA updates the codebook term gets no gradient at
// all; it is still reported, for monitoring.
#pragma once

#include <cmath>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

enum class Reduction { mean, sum_over_dim };

inline const char* to_string(Reduction r) { return r == Reduction::mean ? "mean" : "sum_over_dim"; }

struct LossOptions {
  double codebook_weight = 0.25;
  double commitment_weight = 1.0;
  Reduction reduction = Reduction::mean;

  /// The field list (core/config_fields.hpp).
  template <class Self, class F>
  static void visit_fields(Self& o, F&& f, const char* prefix = "") {
    detail::visit_field(f, {prefix, "codebook_weight"}, o.codebook_weight, FieldRange::at_least(0));
    detail::visit_field(f, {prefix, "commitment_weight"}, o.commitment_weight,
                        FieldRange::at_least(0));
    detail::visit_field(f, {prefix, "reduction"}, o.reduction, FieldRange::unrestricted());
  }
  void validate(const char* where, const char* prefix = "") const {
    visit_fields(*this, detail::field_checker(where), prefix);
  }
  /// The divisor s of the reduction.
  double scale(Index N, Index D) const {
    return reduction == Reduction::mean ? double(N) * double(D) : double(N);
  }
};

struct VqLoss {
  double distortion = 0;  ///< ||x - q||^2 under the reduction, unweighted
  double codebook = 0;    ///< codebook_weight * distortion
  double commitment = 0;  ///< commitment_weight * distortion
  double total = 0;       ///< codebook + commitment
};

/// Loss terms from the residual r = x - q.
template <class T>
VqLoss vq_loss(const cpu&, ConstMatrixRef<T> residual, const LossOptions& opt) {
  VqLoss l;
  const double sq = residual.template cast<double>().squaredNorm();
  l.distortion = sq / opt.scale(residual.rows(), residual.cols());
  l.codebook = opt.codebook_weight * l.distortion;
  l.commitment = opt.commitment_weight * l.distortion;
  l.total = l.codebook + l.commitment;
  return l;
}

/// dx = dq + commitment gradient; dq may be empty (0 rows) for "no upstream gradient".
template <class T>
void vq_input_grad(const cpu&, ConstMatrixRef<T> residual, ConstMatrixRef<T> dq, const LossOptions& opt,
                   RowMatrix<T>& dx) {
  const T c = T(2.0 * opt.commitment_weight / opt.scale(residual.rows(), residual.cols()));
  if (dq.rows() == 0)
    dx = c * residual;
  else
    dx = dq + c * residual;
}

/// How the gradient of the quantized output reaches x (the encoder output):
///   straight_through  dx = dq (VQ-VAE's estimator);
///   rotation          the rotation trick (Fifty et al. 2024): the forward
///     output q is written q = sg(lambda R) x, with lambda = |q| / |x| and R
///     the rotation in the plane of x and q that takes x^ = x/|x| to
///     q^ = q/|q|, R = I - 2 r r^T + 2 q^ x^T, r = (x^ + q^) / |x^ + q^|;
///     so dx = lambda R^T dq = lambda (dq - 2 r (r.dq) + 2 x^ (q^.dq)). It
///     keeps the angle between dq and x that dq has to q. Rows where x or q
///     is zero, or q points exactly against x (no unique rotation), fall
///     back to straight-through.
enum class GradientEstimator { straight_through, rotation };

inline const char* to_string(GradientEstimator g) {
  return g == GradientEstimator::straight_through ? "straight_through" : "rotation";
}

/// out = the rotation trick's gradient for every row (x = residual + q).
template <class T>
void rotation_trick_grad(ConstMatrixRef<T> residual, ConstMatrixRef<T> q, ConstMatrixRef<T> dq,
                         RowMatrix<T>& out) {
  const Index N = dq.rows(), D = dq.cols();
  out.resize(N, D);
  for (Index i = 0; i < N; ++i) {
    double xx = 0, qq = 0;
    for (Index j = 0; j < D; ++j) {
      const double x = double(residual(i, j)) + double(q(i, j));
      xx += x * x;
      qq += double(q(i, j)) * double(q(i, j));
    }
    const double nx = std::sqrt(xx), nq = std::sqrt(qq);
    double ss = 0, rg = 0, qg = 0;
    for (Index j = 0; j < D; ++j) {
      const double xh = nx > 0 ? (double(residual(i, j)) + double(q(i, j))) / nx : 0.0;
      const double qh = nq > 0 ? double(q(i, j)) / nq : 0.0;
      ss += (xh + qh) * (xh + qh);
      rg += (xh + qh) * double(dq(i, j));
      qg += qh * double(dq(i, j));
    }
    if (!(nx > 0) || !(nq > 0) || !(ss > 1e-24)) {  // no unique rotation: straight-through
      out.row(i) = dq.row(i);
      continue;
    }
    const double lambda = nq / nx;
    for (Index j = 0; j < D; ++j) {
      const double xh = (double(residual(i, j)) + double(q(i, j))) / nx, qh = double(q(i, j)) / nq;
      // r (r.g) = (x^ + q^)((x^ + q^).g) / |x^ + q^|^2
      out(i, j) = T(lambda * (double(dq(i, j)) - 2.0 * (xh + qh) * rg / ss + 2.0 * xh * qg));
    }
  }
}

/// Accumulates the codebook term's gradient into dcodes (K x D).
template <class T>
void vq_codebook_grad(const cpu&, ConstMatrixRef<T> residual, const Eigen::Ref<const IndexVector>& idx,
                      const LossOptions& opt, MatrixRef<T> dcodes) {
  const T c = T(-2.0 * opt.codebook_weight / opt.scale(residual.rows(), residual.cols()));
  for (Index i = 0; i < residual.rows(); ++i) dcodes.row(idx[i]) += c * residual.row(i);
}

}  // namespace vqkit
