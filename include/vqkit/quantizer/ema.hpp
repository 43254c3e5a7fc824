// vqkit/quantizer/ema.hpp - exponential-moving-average codebook updates.
//
// State (K codes of dimension D):  N_k cluster sizes (K),  M_k running sums (K x D).
// One step with the batch's counts n_k and sums s_k (see cluster_stats.hpp):
//   N_k <- g N_k + (1 - g) n_k
//   M_k <- g M_k + (1 - g) s_k
//   Ntot = sum_k N_k,  Nhat_k = (N_k + eps) / (Ntot + K eps) * Ntot   (Laplace smoothing)
//   e_k  = M_k / Nhat_k
// Invariant: whenever the state is (re)initialised it is consistent,
// M_k = N_k e_k, so a code that no batch picks keeps its place (up to the
// tiny Laplace term) instead of being divided by ~eps and flung to a huge
// norm, which is what happens to the seed's quantizer (N = 0, M = e).
// ema_reset() and ema_reset_code() are the only ways to (re)initialise, and
// both set e, N and M together.
#pragma once

#include <cmath>
#include <cstdint>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"

namespace vqkit {

struct EmaOptions {
  double decay = 0.99;  ///< g, in (0, 1): the decay once the warm-up is over
  double eps = 1e-5;    ///< Laplace smoothing, > 0
  /// Decay warm-up (0 steps: off, the constant decay of the seed). Over the
  /// first warmup_steps training steps the EMA's memory 1 / (1 - g_t) grows
  /// linearly from that of warmup_decay to that of decay, so the codes keep
  /// up with an encoder that moves fast early in training (issue 16,
  /// docs/monitoring.md).
  double warmup_decay = 0.8;
  std::int64_t warmup_steps = 0;

  /// g_t at 0-based training step t.
  double decay_at(std::int64_t t) const {
    if (t >= warmup_steps || warmup_decay >= decay) return decay;
    const double m0 = 1.0 / (1.0 - warmup_decay), m1 = 1.0 / (1.0 - decay);
    return 1.0 - 1.0 / (m0 + (m1 - m0) * double(t) / double(warmup_steps));
  }

  /// The field list (core/config_fields.hpp).
  template <class Self, class F>
  static void visit_fields(Self& o, F&& f, const char* prefix = "") {
    detail::visit_field(f, {prefix, "decay"}, o.decay, FieldRange::open(0, 1));
    detail::visit_field(f, {prefix, "eps"}, o.eps, FieldRange::above(0));
    detail::visit_field(f, {prefix, "warmup_decay"}, o.warmup_decay, FieldRange::open(0, 1));
    detail::visit_field(f, {prefix, "warmup_steps"}, o.warmup_steps, FieldRange::at_least(0));
  }
  void validate(const char* where, const char* prefix = "") const {
    visit_fields(*this, detail::field_checker(where), prefix);
  }
};

template <class T>
struct EmaState {
  Vector<T> cluster_size;  ///< N_k (K)
  RowMatrix<T> embed_sum;  ///< M_k (K x D)
};

/// Consistent (re)initialisation of every code: N_k = counts_k, M_k = counts_k e_k.
template <class T>
void ema_reset(EmaState<T>& st, ConstMatrixRef<T> codes, ConstVectorRef<T> counts) {
  VQKIT_REQUIRE(counts.size() == codes.rows(), "ema_reset", "counts has size ", counts.size(),
                ", expected K=", codes.rows());
  VQKIT_REQUIRE((counts.array() > T(0)).all(), "ema_reset",
                "every initial cluster size must be > 0, got min ", counts.minCoeff());
  st.cluster_size = counts;
  st.embed_sum = counts.asDiagonal() * codes;
}

/// Consistent reset of one code: e_k = value, N_k = count, M_k = count * value.
template <class T>
void ema_reset_code(EmaState<T>& st, MatrixRef<T> codes, Index k,
                    const Eigen::Ref<const Eigen::Matrix<T, 1, Eigen::Dynamic>>& value, T count) {
  VQKIT_REQUIRE(k >= 0 && k < codes.rows(), "ema_reset_code", "code ", k, " out of range [0, ",
                codes.rows(), ")");
  VQKIT_REQUIRE(count > T(0), "ema_reset_code", "count must be > 0, got ", count);
  codes.row(k) = value;
  st.cluster_size[k] = count;
  st.embed_sum.row(k) = count * value;
}

/// One EMA step from a batch's statistics; rewrites every code from the state.
template <class T>
void ema_update(const cpu& be, EmaState<T>& st, const ClusterStats<T>& batch,
                const EmaOptions& opt, MatrixRef<T> codes) {
  constexpr const char* where = "ema_update";
  opt.validate(where);
  const Index K = codes.rows(), D = codes.cols();
  VQKIT_REQUIRE(st.cluster_size.size() == K && st.embed_sum.rows() == K && st.embed_sum.cols() == D,
                where, "state is ", st.cluster_size.size(), " / ", st.embed_sum.rows(), "x",
                st.embed_sum.cols(), ", expected K=", K, ", D=", D);
  VQKIT_REQUIRE(batch.counts.size() == K && batch.sums.rows() == K && batch.sums.cols() == D,
                where, "batch statistics are ", batch.sums.rows(), "x", batch.sums.cols(),
                ", expected ", K, "x", D);
  const T g = T(opt.decay), h = T(1) - T(opt.decay);
  st.cluster_size = g * st.cluster_size + h * batch.counts;
  double total = 0;
  for (Index k = 0; k < K; ++k) total += double(st.cluster_size[k]);
  const double scale = total / (total + double(K) * opt.eps);
  parallel_for(be, K, [&](Index k) {
    st.embed_sum.row(k) = g * st.embed_sum.row(k) + h * batch.sums.row(k);
    const T nhat = T((double(st.cluster_size[k]) + opt.eps) * scale);
    codes.row(k) = st.embed_sum.row(k) / nhat;
  });
}

}  // namespace vqkit
