// vqkit/layers/residual_vq.hpp - residual vector quantization (SoundStream,
// EnCodec, DAC; faiss::ResidualQuantizer for retrieval codes).
//
// Q levels, each a VectorQuantizer with its own codebook, quantize what the
// previous levels left over:
//   r_0 = x,  q_l = VQ_l(r_l),  r_{l+1} = r_l - q_l,  out = sum_l q_l.
// Each level is a whole VectorQuantizer: its own EMA (or gradient) codebook,
// memory bank of *its* residuals, k-means init and refine over that bank,
// dead-code policy, metrics and health; level l's config is `level` with
// seed + l. Nothing of VectorQuantizer is repeated here.
//
// Gradients (straight-through over the whole stack, with the residuals'
// earlier codes held constant, r_l = x - sum_{m<l} sg(q_m)):
//   dx = dout + sum_l commitment_weight * 2 (r_l - q_l) / s
// and, in gradient-update mode, each level's codebook gradient from its own
// codebook term.
//
// Quantize dropout (SoundStream's bitrate scalability): in training, each
// batch runs a random number of levels in [dropout_min_levels, Q] (drawn from
// the layer's own Rng, seeded); the levels above it do not run, learn or
// count. Eval always runs every level.
//
// Indices are an N x Q IndexMatrix, -1 for a level that did not run or a
// padded row. A row mask (core/row_mask.hpp) is passed to every level.
// Input checks (shape, finiteness of the real rows, mask length) come before
// any level runs, so a rejected batch changes nothing. Not built: one
// codebook shared by all levels (its EMA update would see Q batches a step).
#pragma once

#include <cstdint>
#include <vector>

#include "vqkit/core/random.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/layers/quantizer_surface.hpp"
#include "vqkit/layers/vector_quantizer.hpp"

namespace vqkit {

struct ResidualVQConfig {
  Index levels = 8;                 ///< Q
  VectorQuantizerConfig level;      ///< every level's config (level l: seed + l)
  bool quantize_dropout = false;    ///< training only
  Index dropout_min_levels = 1;     ///< fewest levels a dropout batch runs
  std::uint64_t seed = 0;           ///< the dropout draws

  void validate() const {
    constexpr const char* where = "ResidualVQConfig";
    VQKIT_REQUIRE(levels >= 1, where, "levels must be >= 1, got ", levels);
    VQKIT_REQUIRE(dropout_min_levels >= 1 && dropout_min_levels <= levels, where,
                  "dropout_min_levels must lie in [1, levels=", levels, "], got ", dropout_min_levels);
    VQKIT_REQUIRE(level.non_finite == NonFinitePolicy::reject, where,
                  "level.non_finite must be reject (the residual stack checks its input once)");
    level.validate();
  }
};

template <class T, class Backend = cpu>
class ResidualVQ : public detail::QuantizerSurface<ResidualVQ<T, Backend>, T> {
 public:
  static constexpr const char* name = "ResidualVQ::forward";
  using Level = VectorQuantizer<T, Backend>;
  struct Context {
    std::vector<typename Level::Context> level;  ///< the levels that ran, in order
    IndexMatrix indices;                          ///< N x Q, -1 where no level ran or padding
    Index active = 0;                             ///< levels run in this batch
    double loss = 0;                              ///< sum of the levels' loss.total
  };

  explicit ResidualVQ(const ResidualVQConfig& cfg, Backend backend = {})
      : cfg_((cfg.validate(), cfg)), rng_(cfg.seed) {
    levels_.reserve(std::size_t(cfg.levels));
    for (Index l = 0; l < cfg.levels; ++l) {
      VectorQuantizerConfig c = cfg.level;
      c.seed = cfg.level.seed + std::uint64_t(l);
      levels_.emplace_back(c, backend);
    }
  }

  const ResidualVQConfig& config() const { return cfg_; }
  Index dim() const { return cfg_.level.dim; }
  Index num_levels() const { return cfg_.levels; }
  Level& level(Index l) { return levels_.at(std::size_t(l)); }
  const Level& level(Index l) const { return levels_.at(std::size_t(l)); }
  void train(bool on = true) {
    training_ = on;
    for (auto& q : levels_) q.train(on);
  }
  void eval() { train(false); }
  bool is_training() const { return training_; }

  // forward(x, out, ctx), forward(x, mask, out, ctx), forward(x, out): see
  // quantizer_surface.hpp.

  /// See the file comment. dout with 0 rows: the commitment terms alone.
  void backward(const Context& ctx, ConstMatrixRef<T> dout, RowMatrix<T>* dx) {
    const Index N = ctx.indices.rows();
    VQKIT_REQUIRE(dout.rows() == 0 || (dout.rows() == N && dout.cols() == dim()),
                  "ResidualVQ::backward", "dout is ", dout.rows(), "x", dout.cols(), ", expected ",
                  N, "x", dim());
    const RowMatrix<T> none(0, dim());
    for (std::size_t l = 0; l < ctx.level.size(); ++l) {
      levels_[l].backward(ctx.level[l], none, dx ? &grad_ : nullptr);
      if (!dx) continue;
      if (l == 0) {
        *dx = grad_;
        if (dout.rows() == 0) continue;
        for (Index i = 0; i < N; ++i)  // straight through, padded rows excluded
          if (ctx.indices(i, 0) >= 0) dx->row(i) += dout.row(i);
      } else {
        *dx += grad_;
      }
    }
  }

  /// N x Q indices of every level (eval semantics, no state change).
  IndexMatrix encode(ConstMatrixRef<T> x) const {
    detail::require_batch(x, dim(), "ResidualVQ::encode", "x");
    detail::require_finite(x, "ResidualVQ::encode", "x");
    IndexMatrix idx(x.rows(), num_levels());
    RowMatrix<T> r = x, q;
    IndexVector col;
    for (Index l = 0; l < num_levels(); ++l) {
      levels_[std::size_t(l)].encode(r, col);
      levels_[std::size_t(l)].decode(col, q);
      r -= q;
      idx.col(l) = col;
    }
    return idx;
  }

  /// sum over levels of their codes; -1 entries add nothing.
  RowMatrix<T> decode(const IndexMatrix& indices) const {
    VQKIT_REQUIRE(indices.cols() == num_levels(), "ResidualVQ::decode", "indices have ",
                  indices.cols(), " columns, expected one per level (", num_levels(), ")");
    std::vector<RowMatrix<T>> parts(static_cast<std::size_t>(num_levels()));
    for (Index l = 0; l < num_levels(); ++l)  // every level checks its column before any sum
      levels_[std::size_t(l)].decode(IndexVector(indices.col(l)), parts[std::size_t(l)]);
    RowMatrix<T> out = RowMatrix<T>::Zero(indices.rows(), dim());
    for (const auto& p : parts) out += p;
    return out;
  }

  /// The worst health verdict of the levels that ran.
  static Health health(const Context& ctx) { return detail::worst_health(ctx.level); }

  struct State {
    std::vector<typename Level::State> levels;
    Rng::State rng{};
    bool training = true;
  };
  State state() const {
    State s;
    for (const auto& q : levels_) s.levels.push_back(q.state());
    s.rng = rng_.state();
    s.training = training_;
    return s;
  }
  /// Restores every level (each checked by its own set_state; a bad level
  /// throws before any level changes).
  void set_state(State s) {
    detail::set_states_all_or_nothing(levels_, std::move(s.levels), "ResidualVQ::set_state");
    rng_.set_state(s.rng);
    training_ = s.training;
  }

 private:
  friend class detail::QuantizerSurface<ResidualVQ<T, Backend>, T>;

  void run(ConstMatrixRef<T> x, const RowMask* mask, RowMatrix<T>& out, Context& ctx) {
    constexpr const char* where = "ResidualVQ::forward";
    detail::require_batch(x, dim(), where, "x");
    const Index N = x.rows();
    detail::require_finite_rows<T>(x, mask, where, "x");
    ctx.active = num_levels();
    if (training_ && cfg_.quantize_dropout)
      ctx.active = cfg_.dropout_min_levels +
                   Index(rng_.below(std::uint64_t(num_levels() - cfg_.dropout_min_levels + 1)));
    ctx.level.resize(std::size_t(ctx.active));
    ctx.indices.setConstant(N, num_levels(), -1);
    ctx.loss = 0;
    residual_ = x;
    out.setZero(N, dim());
    for (Index l = 0; l < ctx.active; ++l) {
      auto& c = ctx.level[std::size_t(l)];
      if (mask)
        levels_[std::size_t(l)].forward(residual_, *mask, q_, c);
      else
        levels_[std::size_t(l)].forward(residual_, q_, c);
      out += q_;
      residual_ -= q_;
      ctx.indices.col(l) = c.indices;
      ctx.loss += c.loss.total;
    }
  }

  ResidualVQConfig cfg_;
  std::vector<Level> levels_;
  Rng rng_;
  bool training_ = true;
  RowMatrix<T> residual_, q_, grad_;  ///< a step's buffers (reused)
};

}  // namespace vqkit
