// vqkit/layers/lfq.hpp - lookup-free quantization (Yu et al. 2023, MAGVIT-v2).
//
// Each of the D dimensions is quantized to its sign: q_j = +s if z_j > 0
// else -s (s = codebook_scale), so the implicit codebook is {-s, +s}^D,
// K = 2^D codes. Index bits are the signs, the first dimension most
// significant: index = sum_j [z_j > 0] 2^(D-1-j). Output q, straight-through.
//
// Loss (N rows, temperature T, code c in {-s, s}^D): the soft assignment
//   P_i(c) = softmax_c(2 z_i . c / T)    (= softmax of -|z_i - c|^2 / T)
// factorises over the bits: bit j of row i is 1 with p_ij = sigmoid(u_ij),
// u_ij = 4 s z_ij / T. With H the entropy in nats:
//   per_sample_entropy = mean_i H(P_i) = mean_i sum_j H_b(p_ij)
//   codebook_entropy   = H(mean_i P_i)          (O(N K) for the sum over K)
//   entropy            = per_sample_entropy - diversity_gamma * codebook_entropy
//   commitment         = mean over the N x D entries of (z - sg(q))^2
//   total              = entropy_weight * entropy + commitment_weight * commitment
// Minimising the first term makes each row confident, maximising the second
// spreads the batch over the codes. The gradients are exact (derived in
// docs/quantizers.md); dz = dout + d total / dz, with dout passed straight
// through the sign. The codebook entropy costs O(N K D) per step, so D is
// capped at 20 while entropy_weight > 0 (at 30 otherwise).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>

#include "vqkit/core/check.hpp"
#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/quantizer_surface.hpp"
#include "vqkit/quantizer/implicit_codebook.hpp"

namespace vqkit {

struct LfqConfig {
  Index dim = 10;                  ///< D: bits per code, K = 2^D
  double codebook_scale = 1.0;     ///< s
  double temperature = 0.01;       ///< T of the soft assignment (MAGVIT-v2 code: 1/100)
  double entropy_weight = 0.1;
  double diversity_gamma = 1.0;
  double commitment_weight = 0.25;
  std::int64_t usage_window = 10;

  Index codebook_size() const { return Index(1) << dim; }

  /// The field list (core/config_fields.hpp): validation, checkpoint keys.
  template <class Self, class F>
  static void visit_fields(Self& c, F&& f) {
    using R = FieldRange;
    detail::visit_field(f, {"", "dim"}, c.dim, R::closed(1, 30));  // <= 20 with entropy: below
    detail::visit_field(f, {"", "codebook_scale"}, c.codebook_scale, R::above(0));
    detail::visit_field(f, {"", "temperature"}, c.temperature, R::above(0));
    detail::visit_field(f, {"", "entropy_weight"}, c.entropy_weight, R::at_least(0));
    detail::visit_field(f, {"", "diversity_gamma"}, c.diversity_gamma, R::at_least(0));
    detail::visit_field(f, {"", "commitment_weight"}, c.commitment_weight, R::at_least(0));
    detail::visit_field(f, {"", "usage_window"}, c.usage_window, R::at_least(1));
  }

  void validate() const {
    constexpr const char* where = "LfqConfig";
    visit_fields(*this, detail::field_checker(where));
    // The entropy term sums over all 2^dim codes.
    VQKIT_REQUIRE(entropy_weight == 0 || dim <= 20, where,
                  "dim must lie in [1, 20] when entropy_weight > 0 (it sums over all 2^dim codes), got dim=",
                  dim, " with entropy_weight=", entropy_weight);
  }
};

struct LfqLoss {
  double per_sample_entropy = 0, codebook_entropy = 0;
  double entropy = 0;     ///< per_sample_entropy - diversity_gamma * codebook_entropy
  double commitment = 0;  ///< mean (z - q)^2, unweighted
  double total = 0;       ///< entropy_weight * entropy + commitment_weight * commitment
};

template <class T>
class LFQ : public detail::GridQuantizer<LFQ<T>, T> {
 public:
  static constexpr const char* name = "LFQ::forward";
  static constexpr const char* set_reducer_name = "LFQ::set_reducer";
  static constexpr const char* state_name = "LFQ::set_state";
  struct Context {
    IndexVector indices;  ///< N, -1 for padded rows
    RowMatrix<T> grad;    ///< N x D: d loss.total / d z (zero on padded rows)
    LfqLoss loss;
    CodebookMetrics metrics;
    bool training = false;
  };

  explicit LFQ(const LfqConfig& cfg)
      : detail::GridQuantizer<LFQ<T>, T>((cfg.validate(), cfg.codebook_size()), cfg.usage_window),
        cfg_(cfg) {}

  const LfqConfig& config() const { return cfg_; }
  Index dim() const { return cfg_.dim; }
  Index codebook_size() const { return cfg_.codebook_size(); }
  // train, eval, is_training, step, usage, state, set_state, set_reducer:
  // GridQuantizer. Under a reducer the usage metrics and state count the
  // whole batch and the codebook entropy is the whole batch's; the
  // per-sample entropy, the commitment loss and every gradient are this
  // rank's means over its own real rows n_r (rank r's gradient is n / n_r
  // times one process's for the same rows: averaging the ranks' parameter
  // gradients reproduces one process when the slices are equal).

  // forward(z, out, ctx), forward(z, mask, out, ctx), forward(z, out): see
  // quantizer_surface.hpp.

  /// dx = dout (straight through the sign) + d loss.total / dz; padded rows
  /// get zero. dout with 0 rows: the loss gradient alone.
  void backward(const Context& ctx, ConstMatrixRef<T> dout, RowMatrix<T>* dx) const {
    const Index N = ctx.grad.rows();
    VQKIT_REQUIRE(dout.rows() == 0 || (dout.rows() == N && dout.cols() == dim()), "LFQ::backward",
                  "dout is ", dout.rows(), "x", dout.cols(), ", expected ", N, "x", dim());
    if (!dx) return;
    *dx = ctx.grad;
    if (dout.rows() == 0) return;
    for (Index i = 0; i < N; ++i)
      if (ctx.indices[i] >= 0) dx->row(i) += dout.row(i);
  }

  IndexVector encode(ConstMatrixRef<T> z) const {
    detail::require_batch(z, dim(), "LFQ::encode", "z");
    detail::require_finite(z, "LFQ::encode", "z");
    IndexVector idx(z.rows());
    for (Index i = 0; i < z.rows(); ++i) idx[i] = index_of(z.row(i));
    return idx;
  }

  /// Codes of indices; -1 gives a zero row, any other index outside [0, K) throws.
  RowMatrix<T> decode(const IndexVector& indices) const {
    const Index K = codebook_size(), D = dim();
    for (Index i = 0; i < indices.size(); ++i)
      VQKIT_REQUIRE(indices[i] >= -1 && indices[i] < K, "LFQ::decode", "index ", indices[i],
                    " at position ", i, " is outside [0, ", K, ")");
    RowMatrix<T> out = RowMatrix<T>::Zero(indices.size(), D);
    const T s = T(cfg_.codebook_scale);
    for (Index i = 0; i < indices.size(); ++i) {
      if (indices[i] < 0) continue;
      for (Index j = 0; j < D; ++j) out(i, j) = (indices[i] >> (D - 1 - j)) & 1 ? s : -s;
    }
    return out;
  }

 private:
  friend class detail::QuantizerSurface<LFQ<T>, T>;
  using detail::GridQuantizer<LFQ<T>, T>::book_;

  template <class Row>
  std::int64_t index_of(const Row& r) const {
    std::int64_t index = 0;
    for (Index j = 0; j < dim(); ++j) index = (index << 1) | (r[j] > T(0) ? 1 : 0);
    return index;
  }

  /// probs_ = P_i over the K codes of one row from its bit probabilities p1
  /// (bit j set with p1[j], independently), by doubling: O(K).
  void row_probs(const double* p1) {
    probs_[0] = 1.0;
    Index n = 1;
    for (Index j = 0; j < dim(); ++j) {
      for (Index m = n - 1; m >= 0; --m) {  // (backwards: in place)
        const double e = probs_[m];
        probs_[2 * m + 1] = e * p1[j];
        probs_[2 * m] = e * (1.0 - p1[j]);
      }
      n *= 2;
    }
  }

  void run(ConstMatrixRef<T> z, const RowMask* mask, RowMatrix<T>& out, Context& ctx) {
    // the whole batch's real rows (over every rank under a reducer)
    const Index n_all = this->check_input(z, mask, true, "z");
    const Index N = z.rows(), D = dim();
    const double s = cfg_.codebook_scale, c = 4.0 * s / cfg_.temperature;
    auto real = [&](Index i) { return !mask || (*mask)[i]; };
    Index n = 0;  // this rank's real rows
    for (Index i = 0; i < N; ++i) n += real(i) ? 1 : 0;

    out.setZero(N, D);
    ctx.indices.setConstant(N, -1);
    ctx.grad.setZero(N, D);
    ctx.loss = LfqLoss{};
    ctx.training = book_.training();
    book_.begin();
    double commit = 0;
    for (Index i = 0; i < N; ++i) {
      if (!real(i)) continue;
      for (Index j = 0; j < D; ++j) {
        out(i, j) = z(i, j) > T(0) ? T(s) : T(-s);
        const double r = double(z(i, j)) - double(out(i, j));
        commit += r * r;
      }
      ctx.indices[i] = index_of(z.row(i));
      book_.count(ctx.indices[i]);
    }
    if (n_all > 0) {  // (the same on every rank: a rank without real rows still reduces)
      const double denom = double(std::max<Index>(n, 1)) * double(D);
      ctx.loss.commitment = commit / denom;
      for (Index i = 0; i < N; ++i)
        if (real(i))
          for (Index j = 0; j < D; ++j)
            ctx.grad(i, j) = T(cfg_.commitment_weight * 2.0 * (double(z(i, j)) - double(out(i, j))) / denom);
      if (cfg_.entropy_weight > 0) entropy_terms(z, real, n, n_all, c, ctx);
      ctx.loss.entropy = ctx.loss.per_sample_entropy - cfg_.diversity_gamma * ctx.loss.codebook_entropy;
      ctx.loss.total = cfg_.entropy_weight * ctx.loss.entropy + cfg_.commitment_weight * ctx.loss.commitment;
    }
    ctx.metrics = book_.finish(this->step_reducer());
  }

  /// The two entropies and entropy_weight times their gradient, added to
  /// ctx.grad. n: this rank's real rows, n_all: the whole batch's (equal
  /// without a reducer). The codebook entropy is that of the whole batch's
  /// mean distribution A (its sum over the rows all-reduced under a
  /// reducer); the per-sample entropy and every gradient are this rank's
  /// means over its n rows, like every other loss under a reducer.
  template <class Real>
  void entropy_terms(ConstMatrixRef<T> z, const Real& real, Index n, Index n_all, double c,
                     Context& ctx) {
    const Index N = z.rows(), D = dim(), K = codebook_size();
    auto sigmoid = [](double u) {
      return u >= 0 ? 1.0 / (1.0 + std::exp(-u)) : std::exp(u) / (1.0 + std::exp(u));
    };
    auto softplus = [](double u) { return std::max(u, 0.0) + std::log1p(std::exp(-std::abs(u))); };
    p1_.resize(D);
    probs_.resize(K);
    avg_.setZero(K);
    double per_sample = 0;
    for (Index i = 0; i < N; ++i) {
      if (!real(i)) continue;
      for (Index j = 0; j < D; ++j) {
        const double u = c * double(z(i, j));
        p1_[j] = sigmoid(u);
        per_sample += softplus(u) - p1_[j] * u;  // H_b(sigmoid(u))
        // d H_b / d z = -p (1 - p) u c; the mean over rows and the weight:
        ctx.grad(i, j) += T(cfg_.entropy_weight * (-p1_[j] * sigmoid(-u) * u * c) / double(n));
      }
      row_probs(p1_.data());
      avg_ += probs_;
    }
    if (Reducer* r = this->step_reducer())
      r->all_reduce_sum(std::span<double>(avg_.data(), std::size_t(K)));
    avg_ /= double(n_all);
    double H = 0;
    log_avg_.resize(K);
    for (Index k = 0; k < K; ++k) {
      log_avg_[k] = avg_[k] > 0 ? std::log(avg_[k]) : 0.0;  // (avg 0: every P_i(k) is 0)
      H -= avg_[k] * log_avg_[k];
    }
    ctx.loss.per_sample_entropy = n > 0 ? per_sample / double(n) : 0.0;
    ctx.loss.codebook_entropy = H;
    if (cfg_.diversity_gamma == 0 || n == 0) return;
    // d H(avg) / d z_ij = -(c / n) [sum_{k: bit j of k} log avg_k P_i(k) - p_ij sum_k log avg_k P_i(k)]
    const double w = cfg_.entropy_weight * cfg_.diversity_gamma * c / double(n);
    bits_.resize(D);
    for (Index i = 0; i < N; ++i) {
      if (!real(i)) continue;
      for (Index j = 0; j < D; ++j) p1_[j] = sigmoid(c * double(z(i, j)));
      row_probs(p1_.data());
      double all = 0;
      bits_.setZero();
      for (Index k = 0; k < K; ++k) {
        const double v = log_avg_[k] * probs_[k];
        all += v;
        for (Index j = 0; j < D; ++j)
          if ((k >> (D - 1 - j)) & 1) bits_[j] += v;
      }
      // the loss has -gamma * H(avg): gradient +w [ ... ]
      for (Index j = 0; j < D; ++j) ctx.grad(i, j) += T(w * (bits_[j] - p1_[j] * all));
    }
  }

  LfqConfig cfg_;
  Vector<double> avg_, log_avg_, probs_, bits_;  ///< a step's scratch (reused)
  std::vector<double> p1_;
};

}  // namespace vqkit
