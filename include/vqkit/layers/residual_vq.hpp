// vqkit/layers/residual_vq.hpp - residual vector quantization (SoundStream,
// EnCodec, DAC; faiss::ResidualQuantizer for retrieval codes).
//
// Q levels quantize what the previous levels left over:
//   r_0 = x,  q_l = VQ_l(r_l),  r_{l+1} = r_l - q_l,  out = sum_l q_l.
// Separate codebooks (shared = false, the default): each level is a whole
// VectorQuantizer, with its own EMA (or gradient) codebook, memory bank of
// *its* residuals, k-means init and refine over that bank, dead-code policy,
// metrics and health; level l's config is `level` with seed + l.
// One shared codebook (shared = true, as vector-quantize-pytorch's
// shared_codebook): one VectorQuantizer (config `level`) quantizes every
// level's residuals, a forward call per level, so each level's batch is a
// step of it: the EMA update, usage counters, dead-code clock and memory
// bank advance Q times per batch (dead_after, usage_window and the EMA
// warm-up count level calls), level l+1 searches the codes level l's update
// moved, and the bank mixes the residuals of every level, so its k-means
// fits all their scales. Q codes then cost one codebook's memory.
// Nothing of VectorQuantizer is repeated here.
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
// any level runs, so a rejected batch changes nothing.
//
// Data parallel (set_reducer, docs/distributed.md): every level is attached
// to the reducer; a training step checks every rank's slice together, then
// each level's step is that of one process given the whole batch's
// residuals, so every rank holds the same stack.
#pragma once

#include <cstdint>
#include <vector>

#include "vqkit/core/random.hpp"
#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/layers/quantizer_surface.hpp"
#include "vqkit/layers/vector_quantizer.hpp"

namespace vqkit {

struct ResidualVQConfig {
  Index levels = 8;                 ///< Q
  VectorQuantizerConfig level;      ///< every level's config (level l: seed + l; shared: as is)
  bool shared = false;              ///< one codebook for every level
  bool quantize_dropout = false;    ///< training only
  Index dropout_min_levels = 1;     ///< fewest levels a dropout batch runs
  std::uint64_t seed = 0;           ///< the dropout draws

  /// The field list of the stack's own fields (core/config_fields.hpp):
  /// validation, checkpoint keys. `level` has its own (VectorQuantizerConfig),
  /// stored with each level's checkpoint.
  template <class Self, class F>
  static void visit_fields(Self& c, F&& f) {
    using R = FieldRange;
    detail::visit_field(f, {"", "levels"}, c.levels, R::at_least(1));
    detail::visit_field(f, {"", "quantize_dropout"}, c.quantize_dropout, R::unrestricted());
    detail::visit_field(f, {"", "dropout_min_levels"}, c.dropout_min_levels, R::at_least(1));
    detail::visit_field(f, {"", "seed"}, c.seed, R::unrestricted());
    detail::visit_field(f, {"", "shared"}, c.shared, R::unrestricted());
  }

  /// Its nested config, by name (the JSON object "level").
  template <class Self, class F>
  static void visit_parts(Self& c, F&& f) {
    f("level", c.level);
  }

  void validate() const {
    constexpr const char* where = "ResidualVQConfig";
    visit_fields(*this, detail::field_checker(where));
    VQKIT_REQUIRE(dropout_min_levels <= levels, where,
                  "dropout_min_levels must lie in [1, levels=", levels, "], got dropout_min_levels=",
                  dropout_min_levels);
    VQKIT_REQUIRE(level.non_finite == NonFinitePolicy::reject, where,
                  "level.non_finite must be reject (the residual stack checks its input once)");
    level.validate();
  }
};

template <class T, class Backend = cpu>
class ResidualVQ : public detail::CompositeQuantizer<ResidualVQ<T, Backend>, T> {
 public:
  static constexpr const char* name = "ResidualVQ::forward";
  static constexpr const char* set_reducer_name = "ResidualVQ::set_reducer";
  using Level = VectorQuantizer<T, Backend>;
  struct Context {
    std::vector<typename Level::Context> level;  ///< the levels that ran, in order
    IndexMatrix indices;                          ///< N x Q, -1 where no level ran or padding
    Index active = 0;                             ///< levels run in this batch
    double loss = 0;                              ///< sum of the levels' loss.total
  };

  explicit ResidualVQ(const ResidualVQConfig& cfg, Backend backend = {})
      : cfg_((cfg.validate(), cfg)), rng_(cfg.seed) {
    levels_.reserve(std::size_t(codebooks()));
    for (Index l = 0; l < codebooks(); ++l) {
      VectorQuantizerConfig c = cfg.level;
      c.seed = cfg.level.seed + std::uint64_t(l);
      levels_.emplace_back(c, backend);
    }
  }

  const ResidualVQConfig& config() const { return cfg_; }
  const Backend& backend() const { return levels_.front().backend(); }
  Index dim() const { return cfg_.level.dim; }
  Index num_levels() const { return cfg_.levels; }
  /// Distinct codebooks: Q, or 1 when shared.
  Index codebooks() const { return cfg_.shared ? 1 : cfg_.levels; }
  /// Level l's quantizer (shared: the one quantizer of every level).
  Level& level(Index l) { return levels_.at(slot(l)); }
  const Level& level(Index l) const { return levels_.at(slot(l)); }
  void train(bool on = true) {
    training_ = on;
    for (auto& q : levels_) q.train(on);
  }
  void eval() { train(false); }
  bool is_training() const { return training_; }

  // forward(x, out, ctx), forward(x, mask, out, ctx), forward(x, out), and
  // data-parallel training (set_reducer, sync_memory_bank): see
  // quantizer_surface.hpp. Under a reducer the dropout draws agree on every
  // rank (the same Rng state, compared when attaching).

  /// What set_reducer compares across ranks: the config, the dropout Rng,
  /// the training flag and every level's fingerprint.
  std::uint64_t fingerprint() const { return this->fingerprint_with(rng_.state(), training_); }

  /// See the file comment. dout with 0 rows: the commitment terms alone.
  void backward(const Context& ctx, ConstMatrixRef<T> dout, RowMatrix<T>* dx) {
    const Index N = ctx.indices.rows();
    VQKIT_REQUIRE(dout.rows() == 0 || (dout.rows() == N && dout.cols() == dim()),
                  "ResidualVQ::backward", "dout is ", dout.rows(), "x", dout.cols(), ", expected ",
                  N, "x", dim());
    const RowMatrix<T> none(0, dim());
    for (std::size_t l = 0; l < ctx.level.size(); ++l) {
      level(Index(l)).backward(ctx.level[l], none, dx ? &grad_ : nullptr);
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
      level(l).encode(r, col);
      level(l).decode(col, q);
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
      level(l).decode(IndexVector(indices.col(l)), parts[std::size_t(l)]);
    RowMatrix<T> out = RowMatrix<T>::Zero(indices.rows(), dim());
    for (const auto& p : parts) out += p;
    return out;
  }

  /// The worst health verdict of the levels that ran.
  static Health health(const Context& ctx) { return detail::worst_health(ctx.level); }

  struct State {
    std::vector<typename Level::State> levels;  ///< one per codebook (shared: one)
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
  friend class detail::CompositeQuantizer<ResidualVQ<T, Backend>, T>;
  std::vector<Level>& parts() { return levels_; }
  const std::vector<Level>& parts() const { return levels_; }

  void run(ConstMatrixRef<T> x, const RowMask* mask, RowMatrix<T>& out, Context& ctx) {
    this->check_input(x, mask, true);  // (before any level runs or the dropout draw)
    const Index N = x.rows();
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
        level(l).forward(residual_, *mask, q_, c);
      else
        level(l).forward(residual_, q_, c);
      out += q_;
      residual_ -= q_;
      ctx.indices.col(l) = c.indices;
      ctx.loss += c.loss.total;
    }
  }

  std::size_t slot(Index l) const {
    VQKIT_REQUIRE(l >= 0 && l < cfg_.levels, "ResidualVQ::level", "level ", l, " is outside [0, ",
                  cfg_.levels, ")");
    return cfg_.shared ? 0 : std::size_t(l);
  }

  ResidualVQConfig cfg_;
  std::vector<Level> levels_;  ///< codebooks() quantizers
  Rng rng_;
  bool training_ = true;
  RowMatrix<T> residual_, q_, grad_;  ///< a step's buffers (reused)
};

}  // namespace vqkit
