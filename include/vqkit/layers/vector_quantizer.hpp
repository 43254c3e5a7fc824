// vqkit/layers/vector_quantizer.hpp - the quantizer layer.
//
//   forward:  x (N x D) -> quantized (N x D), indices (N), loss terms, metrics
//   backward: dL/dquantized (N x D) -> dL/dx (N x D)  [straight-through + commitment]
//
// It composes the primitives: nearest_code, cluster_stats, ema_update,
// normalized_init, kmeans, MemoryBank, UsageTracker and the dead-code
// policies, vq_loss and its gradients. One training step (train mode) does,
// in this order:
//   1. validate x (shape, non-empty, finite); nothing has changed if it throws;
//   2. push x into the memory bank; if the data-driven init is pending and
//      the bank holds init_min_rows rows, run k-means over the bank and
//      re-initialise codes and EMA state (until then the normalised init
//      serves, so a first batch smaller than the codebook is fine); when the
//      bank first fills up, run it once more over the whole bank
//      (refine_init): k-means on few rows per code overfits them, and on
//      fresh data the codes of larger clusters, being closer to the mean,
//      take over (see docs/design.md, "hubness");
//   3. search, gather quantized = e_a, residual r = x - q, loss terms;
//   4. EMA mode: measure the codes' lag behind the batch (lag_fraction),
//      then update N, M and the codes from the batch with the step's decay
//      (EmaOptions::decay_at; the returned quantized and loss use the codes
//      from before the update);
//   5. record usage; step += 1; compute metrics;
//   6. apply the dead-code policy (after the EMA update, so a reset code
//      is not overwritten by this step's update): kmeans_reinit's clock and
//      health trigger, then the replacement of idle (replace_after) or, for
//      replace, small codes from the newest bank rows (replace_from_steps).
// In eval mode forward changes nothing at all.
//
// EMA state starts consistent (N_k = 1, M_k = e_k after the normalised init;
// N_k = c_k, M_k = c_k e_k after k-means, with c_k the cluster's row count
// scaled to rows per step), see ema.hpp.
//
// Data-parallel training: set_reducer() attaches a Reducer (one slice of
// every batch per rank); a training step then all-reduces what must agree
// and every rank holds the same codebook as one process that sees the whole
// batch (distributed/data_parallel.hpp, docs/distributed.md). Without a
// reducer (or with one of size 1) none of that runs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/distributed/batch_sync.hpp"
#include "vqkit/distributed/reducer.hpp"
#include "vqkit/core/parameter.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/dead_codes.hpp"
#include "vqkit/quantizer/ema.hpp"
#include "vqkit/quantizer/init.hpp"
#include "vqkit/quantizer/kmeans.hpp"
#include "vqkit/quantizer/loss.hpp"
#include "vqkit/quantizer/memory_bank.hpp"
#include "vqkit/quantizer/metrics.hpp"
#include "vqkit/quantizer/nearest_code.hpp"

namespace vqkit {

enum class CodebookUpdate { ema, gradient };
/// What forward does with a batch holding NaN or Inf: reject it (throw
/// vqkit::error, the default) or skip it (return an empty context with
/// skipped = true, count it in skipped_batches() in train mode, change nothing
/// else; in eval mode nothing at all changes).
enum class NonFinitePolicy { reject, skip };
enum class InitMethod { kmeans, normalized };

inline const char* to_string(CodebookUpdate u) { return u == CodebookUpdate::ema ? "ema" : "gradient"; }
inline const char* to_string(InitMethod m) { return m == InitMethod::kmeans ? "kmeans" : "normalized"; }

struct VectorQuantizerConfig {
  Index codebook_size = 1024;  ///< K
  Index dim = 64;              ///< D, the code dimension
  Metric metric = Metric::l2;
  CodebookUpdate update = CodebookUpdate::ema;
  EmaOptions ema;
  LossOptions loss;
  DeadCodeOptions dead;
  InitMethod init = InitMethod::kmeans;  ///< data-driven (k-means over the bank) or normalised only
  int kmeans_iterations = 10;
  double kmeans_min_cluster_fraction = 0.5;  ///< see KMeansOptions::min_cluster_fraction
  Index memory_bank_size = 0;      ///< rows; 0 means 20 * codebook_size
  Index init_min_rows = 0;         ///< bank rows the k-means init waits for; 0 means 2 * codebook_size
  bool refine_init = true;         ///< re-run the k-means init once the bank first fills
  std::int64_t usage_window = 10;  ///< steps, for window usage
  NonFinitePolicy non_finite = NonFinitePolicy::reject;
  std::uint64_t seed = 0;
  SearchOptions search;  ///< tile sizes; its metric field is ignored (`metric` above rules)
  /// Arithmetic of the float searches: Precision::bf16_rerank gives the same
  /// indices and distances as fp32, bit for bit, faster at large D where the
  /// CPU has AVX512-BF16 (elsewhere fp32 runs). Saved in checkpoints.
  Precision search_precision = Precision::fp32;
  /// How dq reaches dx in backward: straight-through or the rotation trick
  /// (quantizer/loss.hpp). Saved in checkpoints.
  GradientEstimator gradient_estimator = GradientEstimator::straight_through;

  Index bank_rows() const { return memory_bank_size > 0 ? memory_bank_size : 20 * codebook_size; }
  /// Two rows per code at least: a k-means on one row per code fits each
  /// code onto a single row (zero loss on that batch, low usage on the next).
  Index init_rows() const { return init_min_rows > 0 ? init_min_rows : 2 * codebook_size; }

  /// The config's field list, written once: calls f(key, field, range) (or
  /// f(key, field)) for every field in declaration order, nested ones keyed
  /// "ema.decay", ... (core/config_fields.hpp). The validation messages
  /// below, the checkpoint keys (io/checkpoint.hpp), the data-parallel
  /// fingerprint (distributed/data_parallel.hpp) and the JSON form
  /// (io/config_json.hpp) all come from it; a static_assert in checkpoint.hpp
  /// fails when a field is added to the struct but not here.
  template <class Self, class F>
  static void visit_fields(Self& c, F&& f) {
    using R = FieldRange;
    detail::visit_field(f, {"", "codebook_size"}, c.codebook_size, R::at_least(1));
    detail::visit_field(f, {"", "dim"}, c.dim, R::at_least(1));
    detail::visit_field(f, {"", "metric"}, c.metric, R::unrestricted());
    detail::visit_field(f, {"", "update"}, c.update, R::unrestricted());
    EmaOptions::visit_fields(c.ema, f, "ema.");
    LossOptions::visit_fields(c.loss, f, "loss.");
    DeadCodeOptions::visit_fields(c.dead, f, "dead.");
    detail::visit_field(f, {"", "init"}, c.init, R::unrestricted());
    detail::visit_field(f, {"", "kmeans_iterations"}, c.kmeans_iterations, R::at_least(0));
    detail::visit_field(f, {"", "kmeans_min_cluster_fraction"}, c.kmeans_min_cluster_fraction,
                        R::closed(0, 1));
    detail::visit_field(f, {"", "memory_bank_size"}, c.memory_bank_size, R::at_least(0));
    detail::visit_field(f, {"", "init_min_rows"}, c.init_min_rows, R::at_least(0));
    detail::visit_field(f, {"", "refine_init"}, c.refine_init, R::unrestricted());
    detail::visit_field(f, {"", "usage_window"}, c.usage_window, R::at_least(1));
    detail::visit_field(f, {"", "non_finite"}, c.non_finite, R::unrestricted());
    detail::visit_field(f, {"", "seed"}, c.seed, R::unrestricted());
    SearchOptions::visit_fields(c.search, f, "search.");
    detail::visit_field(f, {"", "search_precision"}, c.search_precision, R::unrestricted());
    detail::visit_field(f, {"", "gradient_estimator"}, c.gradient_estimator, R::unrestricted());
  }

  /// Every field in its range (the messages name the key and the value),
  /// then the checks that tie fields together.
  void validate() const {
    constexpr const char* where = "VectorQuantizerConfig";
    visit_fields(*this, detail::field_checker(where));
    // bank_rows() defaults to 20 * K: keep that product in range.
    VQKIT_REQUIRE(codebook_size <= std::numeric_limits<Index>::max() / 20, where,
                  "codebook_size is too large, got codebook_size=", codebook_size);
    VQKIT_REQUIRE(init_rows() >= codebook_size, where, "init_min_rows (", init_rows(),
                  ") must be >= codebook_size (", codebook_size, ") for k-means");
    VQKIT_REQUIRE(bank_rows() >= init_rows() || init == InitMethod::normalized, where,
                  "memory_bank_size (", bank_rows(), ") must be >= init_min_rows (", init_rows(),
                  ")");
    VQKIT_REQUIRE(bank_rows() >= codebook_size || dead.policy != DeadCodePolicy::kmeans_reinit,
                  where, "memory_bank_size (", bank_rows(),
                  ") must be >= codebook_size for the kmeans_reinit policy");
  }
};

/// VectorQuantizerConfig's field list (VectorQuantizerConfig::visit_fields);
/// Config is VectorQuantizerConfig or const VectorQuantizerConfig.
template <class Config, class F>
void visit_config(Config& c, F&& f) {
  VectorQuantizerConfig::visit_fields(c, f);
}

template <class T, class Backend = cpu>
class VectorQuantizer {
 public:
  /// Everything a forward produced; backward needs indices and residual.
  struct Context {
    IndexVector indices;   ///< N: chosen code per row
    RowMatrix<T> residual; ///< N x D: x - q
    VqLoss loss;
    CodebookMetrics metrics;
    bool training = false;
    bool data_initialized = false;  ///< a k-means init (first or refining) ran in this step
    bool reinitialized = false;     ///< the kmeans_reinit policy fired in this step
    Index replaced = 0;             ///< codes replaced by the replace policy in this step
    bool skipped = false;           ///< non-finite batch skipped (NonFinitePolicy::skip)
    /// Masked forward only: the real rows' numbers (ascending); `indices`
    /// then has one entry per batch row (-1 for padding) and `residual` one
    /// row per real row, in this order. Empty after an unmasked forward.
    IndexVector kept;
    bool masked = false;
    /// The forward's output rows (one per real row), kept for the rotation
    /// trick's backward; empty under straight-through.
    RowMatrix<T> rotation_q;
  };

  explicit VectorQuantizer(const VectorQuantizerConfig& cfg, Backend backend = {})
      : cfg_((cfg.validate(), cfg)),
        backend_(backend),
        rng_(cfg.seed),
        codes_(normalized_init<T>(cfg.codebook_size, cfg.dim, rng_)),
        grad_(RowMatrix<T>::Zero(cfg.codebook_size, cfg.dim)),
        bank_(cfg.bank_rows(), cfg.dim),
        usage_(cfg.codebook_size),
        data_initialized_(cfg.init == InitMethod::normalized),
        init_refined_(cfg.init == InitMethod::normalized || !cfg.refine_init),
        dead_(cfg.codebook_size) {
    ema_reset<T>(ema_, codes_, Vector<T>::Ones(cfg.codebook_size));
  }

  const VectorQuantizerConfig& config() const { return cfg_; }
  Index codebook_size() const { return cfg_.codebook_size; }
  Index dim() const { return cfg_.dim; }

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// See the file comment for the order of a training step.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& quantized) {
    Context ctx;
    forward(x, quantized, ctx);
    return ctx;
  }

  /// The same, reusing ctx's buffers (indices, residual) and the layer's own
  /// workspaces: once a step of the same batch size has run, a steady
  /// training or eval step (float, on a CPU with AVX-512F; no k-means init,
  /// re-init or replacement in that step, no reducer) makes no heap
  /// allocation (tests/test_no_alloc.cpp). ctx is overwritten whole.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& quantized, Context& ctx) {
    constexpr const char* where = "VectorQuantizer::forward";
    // Under a reducer every rank's slice is checked together (a collective):
    // if one is rejected every rank throws, if one is non-finite all skip.
    const bool all_finite =
        training_ ? sync_.begin_step(x, cfg_.dim, cfg_.non_finite == NonFinitePolicy::reject, where)
                  : true;
    detail::require_batch(x, cfg_.dim, where, "x");
    // A rejected batch leaves ctx untouched, like the layer.
    if (cfg_.non_finite == NonFinitePolicy::reject) detail::require_finite(x, where, "x");
    run_step(x, all_finite, quantized, ctx);
  }

 private:
  /// The step after the batch's checks (and, under a reducer, begin_step).
  /// x may have 0 rows only under a reducer: a rank whose masked slice has
  /// no real row still takes part in the step's collectives.
  void run_step(ConstMatrixRef<T> x, bool all_finite, RowMatrix<T>& quantized, Context& ctx) {
    ctx.loss = VqLoss{};
    ctx.metrics = CodebookMetrics{};
    ctx.training = training_;
    ctx.data_initialized = ctx.reinitialized = ctx.skipped = ctx.masked = false;
    ctx.kept.resize(0);
    ctx.replaced = 0;
    if (cfg_.non_finite == NonFinitePolicy::skip && !(all_finite && detail::all_finite(x))) {
      if (training_) ++skipped_;  // eval mode changes nothing, not even this count
      ctx.skipped = true;
      ctx.indices.resize(0);
      ctx.residual.resize(0, cfg_.dim);
      quantized.resize(0, cfg_.dim);
      return;
    }
    const Index N = x.rows(), K = cfg_.codebook_size;
    Index rows = N;  // rows of the whole batch (over every rank)
    double staleness = 0;
    if (training_) {
      // (under a reducer the bank is incomplete here)
      if (!sync_.distributed()) staleness = bank_staleness(x);
      rows = sync_.push(x, bank_, rng_);
      const bool first = !data_initialized_ && bank_size() >= cfg_.init_rows();
      const bool refine = data_initialized_ && !init_refined_ && bank_full();
      if (first || refine) {
        reinit_from_bank(rows);
        data_initialized_ = true;
        init_refined_ = bank_full() || !cfg_.refine_init;
        ctx.data_initialized = true;
      }
    }

    ctx.indices.resize(N);
    SearchOptions search = cfg_.search;
    search.metric = cfg_.metric;
    SearchMode mode;
    mode.precision = cfg_.search_precision;
    mode.workspace = &search_ws_;  // (the CPU kernel's scratch; other backends ignore it)
    if (N > 0) nearest_code<T>(backend_, codes_, x, ctx.indices, nullptr, search, nullptr, mode);
    quantized.resize(N, cfg_.dim);
    for (Index i = 0; i < N; ++i) quantized.row(i) = codes_.row(ctx.indices[i]);
    ctx.residual.resize(N, cfg_.dim);
    ctx.residual.noalias() = x - quantized;
    if (cfg_.gradient_estimator == GradientEstimator::rotation)
      ctx.rotation_q = quantized;
    else
      ctx.rotation_q.resize(0, cfg_.dim);
    if (N > 0) ctx.loss = vq_loss<T>(backend_, ctx.residual, cfg_.loss);  // (else 0: no rows)

    Vector<T>& counts = stats_.counts;
    double lag = 0;
    if (training_ && cfg_.update == CodebookUpdate::ema) {
      if (N == 0) {  // (a rank without real rows: it adds nothing to the reduction)
        stats_.counts.setZero(K);
        stats_.sums.setZero(K, cfg_.dim);
      } else if constexpr (std::is_same_v<Backend, cpu>)
        cluster_stats<T>(backend_, x, ctx.indices, K, stats_, stats_ws_);
      else
        stats_ = cluster_stats<T>(backend_, x, ctx.indices, K);
      sync_.reduce(stats_);  // the whole batch's counts and sums
      lag = lag_fraction(ctx.indices, ctx.residual);
      EmaOptions ema = cfg_.ema;
      ema.decay = cfg_.ema.decay_at(step_);
      ema_update<T>(backend_, ema_, stats_, ema, codes_);
    } else {
      if constexpr (std::is_same_v<Backend, cpu>)
        cluster_counts<T>(backend_, ctx.indices, K, counts);
      else
        counts = cluster_counts<T>(backend_, ctx.indices, K);
      if (training_) {  // gradient mode still tracks EMA cluster sizes (replace policy)
        sync_.reduce(counts);
        const T g = T(cfg_.ema.decay_at(step_));
        ema_.cluster_size = g * ema_.cluster_size + (T(1) - g) * counts;
      }
    }
    if (training_) {
      usage_.record(counts);
      ++step_;
    }
    ctx.metrics = batch_metrics(counts);
    ctx.metrics.window = cfg_.usage_window;
    ctx.metrics.window_usage = usage_.used_within(cfg_.usage_window);
    ctx.metrics.dead = usage_.dead(cfg_.dead.dead_after);
    ctx.metrics.overflow_rows = sync_.overflow_rows(bank_);
    ctx.metrics.lag_fraction = lag;
    ctx.metrics.bank_staleness = staleness;
    ctx.metrics.ema_decay = cfg_.ema.decay_at(training_ ? step_ - 1 : step_);
    ctx.metrics.steps_since_init = step_ - last_init_step_;

    if (training_) apply_dead_code_policy(ctx, rows);
  }

 public:
  /// The same with a row mask (core/row_mask.hpp): only the real rows are
  /// quantized, counted, banked and in the loss, as if the batch held them
  /// alone; a padded row gets index -1 and a zero output row (and a zero
  /// gradient in backward). A batch without a real row changes nothing.
  /// Padded rows may hold anything (NaN too). Under a reducer a training
  /// step stays a collective: every rank calls it with its slice and the
  /// slice's mask, and the step is that of one process given the real rows of
  /// every slice, in rank order (a rank whose slice has no real row still
  /// takes part; a batch without a real row on any rank changes nothing).
  /// Gathers the real rows into the layer's buffers, so it is not
  /// allocation-free.
  void forward(ConstMatrixRef<T> x, const RowMask& mask, RowMatrix<T>& quantized, Context& ctx) {
    constexpr const char* where = "VectorQuantizer::forward";
    const bool reject = cfg_.non_finite == NonFinitePolicy::reject;
    bool all_finite = true;
    Index real_rows = 0;  // over every rank
    if (training_ && sync_.distributed()) {
      // Every rank's slice and mask checked together: if one is rejected
      // every rank throws, if one has a non-finite real row all skip.
      const auto start = sync_.begin_step(
          [&] {
            detail::require_batch(x, cfg_.dim, where, "x");
            detail::require_mask(mask, x.rows(), where);
            if (reject) detail::require_finite_rows<T>(x, &mask, where, "x");
            mask_.select(mask);
            mask_.gather(x, mask_.rows);
            return typename detail::DataParallel<T>::SliceCheck{mask_.size(),
                                                                detail::all_finite(mask_.rows)};
          },
          where);
      all_finite = start.all_finite;
      real_rows = start.rows;
    } else {
      detail::require_batch(x, cfg_.dim, where, "x");
      detail::require_mask(mask, x.rows(), where);
      if (reject) detail::require_finite_rows<T>(x, &mask, where, "x");
      mask_.select(mask);
      if (mask_.size() == x.rows()) return forward(x, quantized, ctx);
      real_rows = mask_.size();
      if (real_rows > 0) mask_.gather(x, mask_.rows);
    }
    if (real_rows == 0) {
      ctx = Context{};
      ctx.training = training_;
      ctx.indices.setConstant(x.rows(), -1);
      ctx.residual.resize(0, cfg_.dim);
      quantized.setZero(x.rows(), cfg_.dim);
    } else {
      run_step(mask_.rows, all_finite, mask_.scratch, ctx);
      if (ctx.skipped) {  // (NonFinitePolicy::skip) the batch's outputs are empty
        quantized.resize(0, cfg_.dim);
        return;
      }
      mask_.scatter(mask_.scratch, x.rows(), quantized);
      IndexVector compact = std::move(ctx.indices);
      mask_.scatter(compact, x.rows(), ctx.indices);
    }
    ctx.kept = mask_.kept;
    ctx.masked = true;
  }
  Context forward(ConstMatrixRef<T> x, const RowMask& mask, RowMatrix<T>& quantized) {
    Context ctx;
    forward(x, mask, quantized, ctx);
    return ctx;
  }

  /// The nearest code of every row, as an eval-mode forward picks it; changes
  /// nothing (no state, no metrics). Throws on a bad or non-finite batch.
  void encode(ConstMatrixRef<T> x, IndexVector& indices) const {
    constexpr const char* where = "VectorQuantizer::encode";
    detail::require_batch(x, cfg_.dim, where, "x");
    detail::require_finite(x, where, "x");
    SearchOptions search = cfg_.search;
    search.metric = cfg_.metric;
    SearchMode mode;
    mode.precision = cfg_.search_precision;
    indices.resize(x.rows());
    nearest_code<T>(backend_, codes_, x, indices, nullptr, search, nullptr, mode);
  }
  IndexVector encode(ConstMatrixRef<T> x) const {
    IndexVector idx;
    encode(x, idx);
    return idx;
  }

  /// The codes of `indices`: out.row(i) = codebook().row(indices[i]); -1 (a
  /// padded row of a masked forward) gives a zero row. Any other index
  /// outside [0, K) throws, naming it, and leaves out unchanged.
  void decode(const IndexVector& indices, RowMatrix<T>& out) const {
    for (Index i = 0; i < indices.size(); ++i)
      VQKIT_REQUIRE(indices[i] >= -1 && indices[i] < cfg_.codebook_size,
                    "VectorQuantizer::decode", "index ", indices[i], " at position ", i,
                    " is outside [0, ", cfg_.codebook_size, ")");
    out.resize(indices.size(), cfg_.dim);
    for (Index i = 0; i < indices.size(); ++i) {
      if (indices[i] < 0)
        out.row(i).setZero();
      else
        out.row(i) = codes_.row(indices[i]);
    }
  }
  RowMatrix<T> decode(const IndexVector& indices) const {
    RowMatrix<T> out;
    decode(indices, out);
    return out;
  }

  /// dq: N x D gradient w.r.t. the quantized output (0 rows: none).
  /// Overwrites *dx with dq + the commitment gradient; in gradient-update
  /// mode also accumulates the codebook term's gradient into codebook_grad().
  void backward(const Context& ctx, ConstMatrixRef<T> dq, RowMatrix<T>* dx) {
    constexpr const char* where = "VectorQuantizer::backward";
    if (ctx.skipped) {  // a skipped batch computed nothing: zero gradient
      VQKIT_REQUIRE(dq.cols() == cfg_.dim || dq.rows() == 0, where, "dq has ", dq.cols(),
                    " columns, expected ", cfg_.dim);
      if (dx) dx->setZero(dq.rows(), cfg_.dim);
      return;
    }
    if (ctx.masked) {  // the real rows' gradient, scattered; padded rows get zero
      const Index N = ctx.indices.size(), n = ctx.kept.size();
      VQKIT_REQUIRE(ctx.residual.rows() == n && ctx.residual.cols() == cfg_.dim, where,
                    "the context does not come from this layer's forward");
      VQKIT_REQUIRE(dq.rows() == 0 || (dq.rows() == N && dq.cols() == cfg_.dim), where, "dq is ",
                    dq.rows(), "x", dq.cols(), ", expected ", N, "x", cfg_.dim);
      if (n == 0) {  // no real row: nothing to add to codebook_grad()
        if (dx) dx->setZero(N, cfg_.dim);
        return;
      }
      masked_idx_.resize(n);
      for (Index i = 0; i < n; ++i) masked_idx_[i] = ctx.indices[ctx.kept[i]];
      if (cfg_.update == CodebookUpdate::gradient)
        vq_codebook_grad<T>(backend_, ctx.residual, masked_idx_, cfg_.loss, grad_);
      if (!dx) return;
      masked_dq_.resize(dq.rows() ? n : 0, cfg_.dim);  // (0 rows: no upstream gradient)
      for (Index i = 0; i < masked_dq_.rows(); ++i) masked_dq_.row(i) = dq.row(ctx.kept[i]);
      vq_input_grad<T>(backend_, ctx.residual, estimated(ctx, masked_dq_), cfg_.loss, masked_dx_);
      dx->setZero(N, cfg_.dim);
      for (Index i = 0; i < n; ++i) dx->row(ctx.kept[i]) = masked_dx_.row(i);
      return;
    }
    VQKIT_REQUIRE(ctx.residual.rows() == ctx.indices.size() && ctx.residual.cols() == cfg_.dim,
                  where, "the context does not come from this layer's forward");
    VQKIT_REQUIRE(dq.rows() == 0 || (dq.rows() == ctx.residual.rows() && dq.cols() == cfg_.dim),
                  where, "dq is ", dq.rows(), "x", dq.cols(), ", expected ", ctx.residual.rows(),
                  "x", cfg_.dim);
    if (cfg_.update == CodebookUpdate::gradient)
      vq_codebook_grad<T>(backend_, ctx.residual, ctx.indices, cfg_.loss, grad_);
    if (dx) vq_input_grad<T>(backend_, ctx.residual, estimated(ctx, dq), cfg_.loss, *dx);
  }

  /// Trainable parameters: the codebook in gradient-update mode, none under EMA.
  ParameterList<T> parameters() {
    if (cfg_.update != CodebookUpdate::gradient) return {};
    return {ParameterRef<T>{"codebook", &codes_, &grad_, {cfg_.codebook_size, cfg_.dim}, false}};
  }
  void zero_grad() { grad_.setZero(); }

  const RowMatrix<T>& codebook() const { return codes_; }
  const RowMatrix<T>& codebook_grad() const { return grad_; }
  const EmaState<T>& ema_state() const { return ema_; }
  const UsageTracker& usage() const { return usage_; }
  const MemoryBank<T>& memory_bank() const { return bank_; }
  const Rng& rng() const { return rng_; }
  std::int64_t step() const { return step_; }
  std::int64_t reinit_count() const { return reinits_; }
  std::int64_t replaced_count() const { return replaced_; }
  std::int64_t skipped_batches() const { return skipped_; }
  /// Step count at the last k-means (re)init or set_codebook (0 before any).
  std::int64_t last_init_step() const { return last_init_step_; }
  bool data_initialized() const { return data_initialized_; }
  bool init_refined() const { return init_refined_; }
  const Backend& backend() const { return backend_; }

  /// Data-parallel training (docs/distributed.md). Collective: every rank
  /// calls it, and it throws on every rank unless every rank's quantizer
  /// has the same config and state (same seed, or the same checkpoint
  /// loaded). From then on each rank passes its slice of every batch (rank
  /// 0 the first rows, then rank 1, ...) and a training step keeps every
  /// rank's codebook identical to that of one process fed the whole batch;
  /// eval-mode forward and backward stay local. nullptr (or a reducer of
  /// size 1) returns to the single-process path; the reducer must outlive
  /// its use here.
  void set_reducer(Reducer* reducer) {
    // (the fingerprint is only compared when a reducer of size > 1 comes)
    const bool compare = reducer != nullptr && reducer->size() > 1;
    sync_.attach(reducer, bank_, compare ? detail::fingerprint(*this) : 0,
                 "VectorQuantizer::set_reducer");
  }
  Reducer* reducer() const { return sync_.reducer(); }

  /// Under a reducer, memory_bank() lacks the rows other ranks pushed since
  /// the bank was last read; this collective gathers them (state() and
  /// checkpoints need it). Without a reducer it does nothing.
  void sync_memory_bank() { sync_.complete(bank_); }

  /// Replaces the codebook (e.g. from a trained model); the EMA state is
  /// reset consistently with N_k = 1.
  void set_codebook(ConstMatrixRef<T> codes) {
    constexpr const char* where = "VectorQuantizer::set_codebook";
    VQKIT_REQUIRE(codes.rows() == cfg_.codebook_size && codes.cols() == cfg_.dim, where,
                  "codes are ", codes.rows(), "x", codes.cols(), ", expected ",
                  cfg_.codebook_size, "x", cfg_.dim);
    detail::require_finite(codes, where, "codes");
    codes_ = codes;
    ema_reset<T>(ema_, codes_, Vector<T>::Ones(cfg_.codebook_size));
    usage_.reset_all();
    data_initialized_ = init_refined_ = true;
    last_init_step_ = step_;
  }

  /// The complete mutable state, for checkpoints (see io/checkpoint.hpp).
  struct State {
    RowMatrix<T> codes, grad;
    EmaState<T> ema;
    IndexVector steps_since_used, used_since_reset;
    RowMatrix<T> bank;
    Index bank_size = 0, bank_head = 0;
    std::int64_t bank_overflow = 0;
    Rng::State rng{};
    std::int64_t step = 0, reinits = 0, replaced = 0, skipped = 0;
    bool data_initialized = false, init_refined = false, training = true;
    std::int64_t last_init_step = 0;  ///< step count at the last k-means (re)init
  };

  State state() const {
    VQKIT_REQUIRE(!sync_.pending(), "VectorQuantizer::state",
                  "the memory bank lacks rows other ranks pushed: call sync_memory_bank() on "
                  "every rank first");
    State s;
    s.codes = codes_;
    s.grad = grad_;
    s.ema = ema_;
    s.steps_since_used = usage_.steps_since_used();
    s.used_since_reset = usage_.used_since_reset();
    s.bank = bank_.storage();
    s.bank_size = bank_.size();
    s.bank_head = bank_.head();
    s.bank_overflow = bank_.overflow_rows();
    s.rng = rng_.state();
    s.step = step_;
    s.reinits = reinits_;
    s.replaced = replaced_;
    s.skipped = skipped_;
    s.data_initialized = data_initialized_;
    s.init_refined = init_refined_;
    s.training = training_;
    s.last_init_step = last_init_step_;
    return s;
  }

  /// Restores a state taken from a quantizer with the same config; checks
  /// every shape first, so a bad state leaves this quantizer untouched.
  void set_state(State s) {
    constexpr const char* where = "VectorQuantizer::set_state";
    const Index K = cfg_.codebook_size, D = cfg_.dim;
    auto shape_ok = [&](const auto& m, Index r, Index c) { return m.rows() == r && m.cols() == c; };
    VQKIT_REQUIRE(shape_ok(s.codes, K, D), where, "codebook is ", s.codes.rows(), "x",
                  s.codes.cols(), ", expected ", K, "x", D);
    VQKIT_REQUIRE(shape_ok(s.grad, K, D), where, "codebook_grad is ", s.grad.rows(), "x",
                  s.grad.cols(), ", expected ", K, "x", D);
    VQKIT_REQUIRE(s.ema.cluster_size.size() == K && shape_ok(s.ema.embed_sum, K, D), where,
                  "EMA state does not match K=", K, ", D=", D);
    VQKIT_REQUIRE(s.steps_since_used.size() == K && s.used_since_reset.size() == K, where,
                  "usage counters do not match K=", K);
    VQKIT_REQUIRE(shape_ok(s.bank, cfg_.bank_rows(), D), where, "memory bank is ",
                  s.bank.rows(), "x", s.bank.cols(), ", expected ", cfg_.bank_rows(), "x", D);
    VQKIT_REQUIRE(s.step >= 0 && s.reinits >= 0 && s.replaced >= 0 && s.skipped >= 0, where,
                  "negative step counters");
    VQKIT_REQUIRE(s.last_init_step >= 0 && s.last_init_step <= s.step, where,
                  "last_init_step must lie in [0, step=", s.step, "], got ", s.last_init_step);
    // No run reaches 2^62 steps; a larger counter (a hostile checkpoint)
    // would overflow on the next step.
    constexpr std::int64_t max_count = std::int64_t{1} << 62;
    VQKIT_REQUIRE(s.step < max_count && s.reinits < max_count && s.replaced < max_count &&
                      s.skipped < max_count,
                  where, "step counters must be below 2^62, got step ", s.step, ", reinits ",
                  s.reinits, ", replaced ", s.replaced, ", skipped ", s.skipped);
    VQKIT_REQUIRE(s.steps_since_used.size() == 0 || s.steps_since_used.maxCoeff() < max_count,
                  where, "usage steps_since_used must be below 2^62, got ",
                  s.steps_since_used.maxCoeff());
    detail::require_finite(s.codes, where, "codebook");
    detail::require_finite(s.ema.embed_sum, where, "EMA sums");
    MemoryBank<T> bank(cfg_.bank_rows(), D);
    bank.restore(std::move(s.bank), s.bank_size, s.bank_head, s.bank_overflow);
    // All checks passed: commit.
    codes_ = std::move(s.codes);
    grad_ = std::move(s.grad);
    ema_ = std::move(s.ema);
    usage_.restore(std::move(s.steps_since_used), std::move(s.used_since_reset));
    bank_ = std::move(bank);
    rng_.set_state(s.rng);
    step_ = s.step;
    reinits_ = s.reinits;
    replaced_ = s.replaced;
    skipped_ = s.skipped;
    data_initialized_ = s.data_initialized;
    init_refined_ = s.init_refined;
    training_ = s.training;
    last_init_step_ = s.last_init_step;
    sync_.restart(bank_);  // (under a reducer every rank must set the same state)
  }

 private:
  /// k-means over the memory bank; codes and EMA state re-initialised
  /// consistently, cluster counts scaled to `rows_per_step`.
  void reinit_from_bank(Index rows_per_step) {
    sync_.complete(bank_);  // (a collective under a reducer: the same bank on every rank)
    KMeansOptions ko;
    ko.k = cfg_.codebook_size;
    ko.iterations = cfg_.kmeans_iterations;
    ko.min_cluster_fraction = cfg_.kmeans_min_cluster_fraction;
    auto km = kmeans<T>(backend_, bank_.rows(), ko, rng_);
    codes_ = std::move(km.centroids);
    const T scale = T(double(rows_per_step) / double(bank_.size()));
    ema_reset<T>(ema_, codes_, km.counts * scale);
    usage_.reset_all();
    last_init_step_ = step_;
  }

  /// How far the bank's oldest rows are from this batch (before the push):
  /// |mean of the oldest min(N, size) rows - mean of x| over the RMS
  /// distance of x's rows from their mean; 0 for an empty bank or a batch
  /// without spread. See CodebookMetrics::bank_staleness.
  double bank_staleness(ConstMatrixRef<T> x) {
    const Index size = bank_.size(), N = x.rows(), D = cfg_.dim;
    if (size == 0 || N == 0) return 0.0;
    const Index n = std::min(N, size), cap = bank_.capacity();
    const Index start = bank_.full() ? bank_.head() : 0;  // the oldest row
    stale_old_.setZero(D);
    stale_now_.setZero(D);
    for (Index i = 0; i < n; ++i)
      stale_old_ += bank_.storage().row((start + i) % cap).template cast<double>().transpose();
    double sq = 0;  // one pass over x: sum and sum of squares, in double
    for (Index i = 0; i < N; ++i) {
      stale_now_ += x.row(i).template cast<double>().transpose();
      sq += x.row(i).template cast<double>().squaredNorm();
    }
    stale_old_ /= double(n);
    stale_now_ /= double(N);
    const double var = sq / double(N) - stale_now_.squaredNorm();
    return var > 1e-12 * sq / double(N) ? (stale_old_ - stale_now_).norm() / std::sqrt(var) : 0.0;
  }

  /// Share of this batch's squared quantization error that is the codes'
  /// distance from their clusters' means, before the EMA update (see
  /// CodebookMetrics::lag_fraction). Per code k with n_k >= 2 rows, batch
  /// mean m_k and rows' squared error R_k = sum |x_i - e_k|^2:
  /// n_k |m_k - e_k|^2 minus its sampling noise S_k / (n_k - 1), where
  /// S_k = R_k - n_k |m_k - e_k|^2 is the cluster's scatter about m_k
  /// (unbiased for i.i.d. rows); summed, clamped to >= 0, over sum_k R_k.
  /// Under a reducer R_k is summed over the ranks (one more all-reduce of K
  /// numbers), like the counts and sums.
  double lag_fraction(const IndexVector& idx, const RowMatrix<T>& residual) {
    lag_sq_.setZero(cfg_.codebook_size);
    for (Index i = 0; i < residual.rows(); ++i) lag_sq_[idx[i]] += residual.row(i).squaredNorm();
    sync_.reduce(lag_sq_);
    double total = 0;
    for (Index k = 0; k < cfg_.codebook_size; ++k) total += double(lag_sq_[k]);
    if (!(total > 0)) return 0.0;
    double lag = 0;
    for (Index k = 0; k < cfg_.codebook_size; ++k) {
      const double n = double(stats_.counts[k]);
      if (n < 2) continue;
      const double offset = n * double((stats_.sums.row(k) / T(n) - codes_.row(k)).squaredNorm());
      lag += offset - std::max(0.0, double(lag_sq_[k]) - offset) / (n - 1);
    }
    return std::clamp(lag / total, 0.0, 1.0);
  }

  /// dq as the gradient estimator passes it on (rows of ctx.residual).
  ConstMatrixRef<T> estimated(const Context& ctx, ConstMatrixRef<T> dq) {
    if (cfg_.gradient_estimator == GradientEstimator::straight_through || dq.rows() == 0) return dq;
    VQKIT_REQUIRE(ctx.rotation_q.rows() == ctx.residual.rows(), "VectorQuantizer::backward",
                  "the context was made without the rotation trick's codes");
    rotation_trick_grad<T>(ctx.residual, ctx.rotation_q, dq, rotated_dq_);
    return rotated_dq_;
  }

  /// The dead-code policy's decision (quantizer/dead_codes.hpp), carried out.
  void apply_dead_code_policy(Context& ctx, Index rows_per_step) {
    DeadCodeInputs<T> in;
    in.step = step_;
    in.dead = ctx.metrics.dead;
    in.window_usage = ctx.metrics.window_usage;
    in.usage_window = cfg_.usage_window;
    in.rows_per_step = rows_per_step;
    in.steps_since_init = step_ - last_init_step_;
    in.data_initialized = data_initialized_;
    in.bank_size = bank_size();
    in.usage = &usage_;
    in.cluster_size = &ema_.cluster_size;
    decide_dead_codes(cfg_.dead, in, dead_);
    if (dead_.reinit) {
      reinit_from_bank(rows_per_step);
      ++reinits_;
      ctx.reinitialized = true;
      return;
    }
    if (dead_.reseed.empty()) return;
    sync_.complete(bank_);  // (a collective under a reducer: the decision is global)
    const Index n = dead_.reseed_from;
    for (Index k : dead_.reseed) {
      const auto row = n == bank_.size() ? bank_.random_row(rng_) : bank_.random_recent_row(rng_, n);
      ema_reset_code<T>(ema_, codes_, k, row, T(dead_.reseed_size));
      usage_.reset(k);
    }
    ctx.replaced = Index(dead_.reseed.size());
    replaced_ += ctx.replaced;
  }

  // Under a reducer bank_ is complete only after a sync; its size is known sooner.
  Index bank_size() const { return sync_.bank_size(bank_); }
  bool bank_full() const { return bank_size() == bank_.capacity(); }

  VectorQuantizerConfig cfg_;
  Backend backend_;
  Rng rng_;
  RowMatrix<T> codes_, grad_;
  EmaState<T> ema_;
  MemoryBank<T> bank_;
  UsageTracker usage_;
  std::int64_t step_ = 0, reinits_ = 0, replaced_ = 0, skipped_ = 0;
  std::int64_t last_init_step_ = 0;
  bool data_initialized_ = false, init_refined_ = false;
  bool training_ = true;
  detail::BatchSync<T> sync_;  ///< local, or the data-parallel collectives under a reducer
  // Workspaces of a step, reused (no state: never checkpointed).
  SearchWorkspace search_ws_;
  ClusterStats<T> stats_;  ///< this step's counts (and sums under EMA)
  ClusterStatsWorkspace stats_ws_;
  Vector<T> lag_sq_;  ///< lag_fraction's per-code squared error
  Eigen::VectorXd stale_old_, stale_now_;  ///< bank_staleness's means
  detail::RowCompactor<T> mask_;            ///< a masked forward's real rows
  IndexVector masked_idx_;                  ///< a masked backward's real rows' indices
  RowMatrix<T> masked_dq_, masked_dx_;      ///< and their gradients
  RowMatrix<T> rotated_dq_;                 ///< the rotation trick's dq
  DeadCodeAction dead_;                     ///< the dead-code policy's decision of a step
};

namespace detail {

/// The worst health verdict over the contexts of a composite's quantizers.
template <class Contexts>
Health worst_health(const Contexts& contexts) {
  Health h = Health::healthy;
  for (const auto& c : contexts)
    if (int(c.metrics.health) > int(h)) h = c.metrics.health;
  return h;
}

/// Restores quantizers[i] from states[i] for every i, all or nothing: when
/// one set_state throws, the ones already restored get their old state back
/// and the error propagates (composite quantizers: ResidualVQ, GroupedVQ).
template <class Q, class State>
void set_states_all_or_nothing(std::vector<Q>& quantizers, std::vector<State> states,
                               const char* where) {
  VQKIT_REQUIRE(states.size() == quantizers.size(), where, "state has ", states.size(),
                " quantizers, expected ", quantizers.size());
  std::vector<State> old;
  old.reserve(quantizers.size());
  for (const auto& q : quantizers) old.push_back(q.state());
  std::size_t i = 0;
  try {
    for (; i < quantizers.size(); ++i) quantizers[i].set_state(std::move(states[i]));
  } catch (...) {
    for (std::size_t m = 0; m < i; ++m) quantizers[m].set_state(std::move(old[m]));
    throw;
  }
}

}  // namespace detail
}  // namespace vqkit
