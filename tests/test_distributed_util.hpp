// Shared by test_distributed.cpp (ranks as threads) and
// test_distributed_mpi.cpp (ranks as MPI processes): training scenarios run
// by ranks that each get a slice of every batch, and their comparison with
// one process that gets the whole batch.
#pragma once

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <vqkit/core/row_mask.hpp>
#include <vqkit/distributed/reducer.hpp>
#include <vqkit/layers/grouped_vq.hpp>
#include <vqkit/layers/residual_vq.hpp>
#include <vqkit/layers/vector_quantizer.hpp>

#include "test_util.hpp"

namespace vqkit::test {

struct Scenario {
  VectorQuantizerConfig cfg;
  int steps = 30;
  Index rows = 96;     ///< rows of the whole batch per step
  int nan_step = -1;   ///< step whose last row holds a NaN (the last rank's slice)
  bool masked = false; ///< train with scenario_mask's row masks
};

/// The row mask of step s of a masked scenario: about one row in five
/// padded; at step 5 the second half of the batch (the last rank's slice,
/// whole, for 2 or 3 ranks), at step 6 every row.
inline RowMask scenario_mask(const Scenario& sc, int s) {
  RowMask m(sc.rows);
  for (Index i = 0; i < sc.rows; ++i)
    m[i] = s == 6 ? false : s == 5 ? i < sc.rows / 2 : (i * 7 + s) % 5 != 0;
  return m;
}

/// Gaussian batches; steps 8-13 are narrow (most codes die, so the
/// kmeans_reinit policy fires); every third step is shifted (codes on the
/// far side lose weight, so the replace policy fires).
template <class T>
RowMatrix<T> scenario_batch(const Scenario& sc, int s) {
  const bool narrow = s >= 8 && s < 14;
  RowMatrix<T> x = gaussian<T>(sc.rows, sc.cfg.dim, 1000 + std::uint64_t(s), narrow ? 0.02 : 1.0);
  if (s % 3 == 2) x.col(0).array() += T(3);
  if (s == sc.nan_step) x(sc.rows - 1, 1) = std::numeric_limits<T>::quiet_NaN();
  if (sc.masked && s % 2 == 0) {  // padded rows may hold anything
    const RowMask m = scenario_mask(sc, s);
    for (Index i = 0; i < sc.rows; ++i)
      if (!m[i]) x(i, 0) = std::numeric_limits<T>::quiet_NaN();
  }
  return x;
}

/// Rank r of P gets rows [first, first + count) of every batch: the first
/// rank the first rows.
inline std::pair<Index, Index> slice_of(Index rows, int r, int P) {
  const Index lo = rows * r / P, hi = rows * (r + 1) / P;
  return {lo, hi - lo};
}

struct StepRecord {
  bool data_initialized = false, reinitialized = false, skipped = false;
  Index replaced = 0, usage = 0, dead = 0, window_usage = 0, batch_rows = 0;
  double perplexity = 0;
  std::int64_t overflow = 0;
};

template <class T>
struct Run {
  typename VectorQuantizer<T>::State state;
  std::vector<StepRecord> steps;
  // masked scenarios: each step's indices (of the rank's slice) and its
  // squared distance over the real rows (the loss's distortion times their count)
  std::vector<IndexVector> indices;
  std::vector<double> distortion;
};

/// Trains one quantizer on the scenario: the whole batch without a reducer,
/// this rank's slice with one.
template <class T>
Run<T> train(const Scenario& sc, Reducer* reducer) {
  VectorQuantizer<T> vq(sc.cfg, cpu{1});
  vq.set_reducer(reducer);
  Run<T> run;
  RowMatrix<T> q;
  for (int s = 0; s < sc.steps; ++s) {
    const RowMatrix<T> x = scenario_batch<T>(sc, s);
    Index first = 0, count = sc.rows;
    if (reducer) std::tie(first, count) = slice_of(sc.rows, reducer->rank(), reducer->size());
    typename VectorQuantizer<T>::Context ctx;
    if (sc.masked) {
      const RowMask m = scenario_mask(sc, s).segment(first, count);
      vq.forward(x.middleRows(first, count), m, q, ctx);
      run.indices.push_back(ctx.indices);
      run.distortion.push_back(ctx.loss.distortion * double(m.count()));
    } else {
      ctx = vq.forward(x.middleRows(first, count), q);
    }
    StepRecord r;
    r.data_initialized = ctx.data_initialized;
    r.reinitialized = ctx.reinitialized;
    r.skipped = ctx.skipped;
    r.replaced = ctx.replaced;
    r.usage = ctx.metrics.usage;
    r.dead = ctx.metrics.dead;
    r.window_usage = ctx.metrics.window_usage;
    r.batch_rows = ctx.metrics.batch_rows;
    r.perplexity = ctx.metrics.perplexity;
    r.overflow = ctx.metrics.overflow_rows;
    run.steps.push_back(r);
  }
  vq.sync_memory_bank();
  run.state = vq.state();
  vq.set_reducer(nullptr);
  return run;
}

/// Steps that ran the data-driven init (first and refining).
template <class T>
int init_count(const Run<T>& run) {
  int n = 0;
  for (const auto& s : run.steps) n += s.data_initialized ? 1 : 0;
  return n;
}

/// max |a - b| <= tol * max |b| (entries relative to the largest one).
template <class A, class B>
bool close(const A& a, const B& b, double tol) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  const double scale = double(b.cwiseAbs().maxCoeff());
  return double((a - b).cwiseAbs().maxCoeff()) <= tol * scale;
}

template <class A, class B>
double rel_diff(const A& a, const B& b) {
  return double((a - b).cwiseAbs().maxCoeff()) / double(b.cwiseAbs().maxCoeff());
}

/// "" when the two states are bit-identical, else the first field that differs.
template <class T>
std::string state_difference(const typename VectorQuantizer<T>::State& a,
                             const typename VectorQuantizer<T>::State& b) {
  if (a.codes != b.codes) return "codebook";
  if (a.ema.cluster_size != b.ema.cluster_size) return "ema.cluster_size";
  if (a.ema.embed_sum != b.ema.embed_sum) return "ema.embed_sum";
  if (a.steps_since_used != b.steps_since_used) return "usage.steps_since_used";
  if (a.used_since_reset != b.used_since_reset) return "usage.used_since_reset";
  if (a.bank != b.bank) return "memory bank rows";
  if (a.bank_size != b.bank_size || a.bank_head != b.bank_head ||
      a.bank_overflow != b.bank_overflow)
    return "memory bank size/head/overflow";
  if (a.rng != b.rng) return "rng";
  if (a.step != b.step || a.reinits != b.reinits || a.replaced != b.replaced ||
      a.skipped != b.skipped)
    return "step counters";
  if (a.data_initialized != b.data_initialized || a.init_refined != b.init_refined)
    return "flags";
  return "";
}

/// "" when a run with a reducer matches the single-process run: codebook and
/// EMA state within `tol` (relative), everything else (bank, Rng, counters,
/// every step's decisions and metrics) exactly.
template <class T>
std::string run_difference(const Run<T>& dist, const Run<T>& ref, double tol) {
  std::ostringstream os;
  const auto &a = dist.state, &b = ref.state;
  if (!close(a.codes, b.codes, tol))
    os << "codebook differs by " << rel_diff(a.codes, b.codes) << " (relative); ";
  if (!close(a.ema.cluster_size, b.ema.cluster_size, tol))
    os << "ema.cluster_size differs by " << rel_diff(a.ema.cluster_size, b.ema.cluster_size)
       << "; ";
  if (!close(a.ema.embed_sum, b.ema.embed_sum, tol))
    os << "ema.embed_sum differs by " << rel_diff(a.ema.embed_sum, b.ema.embed_sum) << "; ";
  if (a.steps_since_used != b.steps_since_used || a.used_since_reset != b.used_since_reset)
    os << "usage counters differ; ";
  if (a.bank != b.bank || a.bank_size != b.bank_size || a.bank_head != b.bank_head ||
      a.bank_overflow != b.bank_overflow)
    os << "memory bank differs; ";
  if (a.rng != b.rng) os << "rng state differs; ";
  if (a.step != b.step || a.reinits != b.reinits || a.replaced != b.replaced ||
      a.skipped != b.skipped || a.data_initialized != b.data_initialized ||
      a.init_refined != b.init_refined)
    os << "counters or flags differ (reinits " << a.reinits << " vs " << b.reinits
       << ", replaced " << a.replaced << " vs " << b.replaced << "); ";
  if (dist.steps.size() != ref.steps.size()) os << "step count differs; ";
  for (std::size_t s = 0; s < std::min(dist.steps.size(), ref.steps.size()); ++s) {
    const auto &x = dist.steps[s], &y = ref.steps[s];
    if (x.data_initialized != y.data_initialized || x.reinitialized != y.reinitialized ||
        x.skipped != y.skipped || x.replaced != y.replaced || x.usage != y.usage ||
        x.dead != y.dead || x.window_usage != y.window_usage || x.batch_rows != y.batch_rows ||
        x.overflow != y.overflow || std::abs(x.perplexity - y.perplexity) > 1e-9 * y.perplexity) {
      os << "step " << s << " differs (decisions or metrics); ";
      break;
    }
  }
  return os.str();
}

// ---- the composites (ResidualVQ, GroupedVQ) -------------------------------------

/// Every VectorQuantizer state inside a composite's state, in order.
template <class S>
void level_states(const S& s, std::vector<VectorQuantizer<double>::State>& out) {
  if constexpr (requires { s.levels; }) {
    for (const auto& l : s.levels) out.push_back(l);
  } else if constexpr (requires { s.heads; }) {
    for (const auto& h : s.heads) level_states(h, out);
  } else {
    out.push_back(s);
  }
}
template <class S>
std::vector<VectorQuantizer<double>::State> level_states(const S& s) {
  std::vector<VectorQuantizer<double>::State> out;
  level_states(s, out);
  return out;
}

template <class Q>
struct CompositeRun {
  typename Q::State state;
  std::vector<IndexMatrix> indices;  ///< every step's, of this rank's slice
};

/// The reinit scenario's batches (D columns) and masks, fed to a composite:
/// the whole batch without a reducer, this rank's slice with one.
template <class Q, class Config>
CompositeRun<Q> train_composite(const Config& cfg, const Scenario& sc, Reducer* reducer) {
  Q q(cfg, cpu{1});
  q.set_reducer(reducer);
  CompositeRun<Q> run;
  RowMatrix<double> out;
  typename Q::Context ctx;
  auto batch_sc = sc;
  batch_sc.cfg.dim = q.dim();
  for (int s = 0; s < sc.steps; ++s) {
    const RowMatrix<double> x = scenario_batch<double>(batch_sc, s);
    Index first = 0, count = sc.rows;
    if (reducer) std::tie(first, count) = slice_of(sc.rows, reducer->rank(), reducer->size());
    if (sc.masked)
      q.forward(x.middleRows(first, count), scenario_mask(sc, s).segment(first, count), out,
                ctx);
    else
      q.forward(x.middleRows(first, count), out, ctx);
    run.indices.push_back(ctx.indices);
  }
  q.sync_memory_bank();
  run.state = q.state();
  q.set_reducer(nullptr);
  return run;
}

/// "" when a composite's level state from a run with a reducer matches the
/// single-process one: run_difference's terms, with the bank rows within
/// tol too (levels past the first bank residuals, which carry the
/// codebooks' rounding: sums in another order).
inline std::string level_difference(const VectorQuantizer<double>::State& got,
                                    const VectorQuantizer<double>::State& want, double tol) {
  Run<double> a, b;
  a.state = got;
  b.state = want;
  if (close(a.state.bank, b.state.bank, tol)) a.state.bank = b.state.bank;
  return run_difference(a, b, tol);
}

// ---- the scenarios ---------------------------------------------------------------

/// kmeans_reinit (the default policy) forced to fire: first k-means init at
/// step 0 (96 rows >= 2 K), refine when the 640-row bank fills (step 7),
/// re-inits after the narrow stretch; a NaN batch skipped at step 4.
inline Scenario reinit_scenario() {
  Scenario sc;
  sc.cfg.codebook_size = 32;
  sc.cfg.dim = 8;
  sc.cfg.seed = 3;
  sc.cfg.dead.dead_after = 3;
  sc.cfg.dead.check_every = 5;
  sc.cfg.dead.min_steps = 5;
  sc.cfg.non_finite = NonFinitePolicy::skip;
  sc.steps = 30;
  sc.rows = 96;
  sc.nan_step = 4;
  return sc;
}

/// The replace policy, with a bank smaller than the batch (every push keeps
/// a random subset: Rng draws on every step).
inline Scenario replace_scenario() {
  Scenario sc;
  sc.cfg.codebook_size = 16;
  sc.cfg.dim = 8;
  sc.cfg.seed = 5;
  sc.cfg.memory_bank_size = 80;
  sc.cfg.init_min_rows = 32;
  sc.cfg.dead.policy = DeadCodePolicy::replace;
  sc.cfg.dead.replace_threshold = 0.5;
  sc.cfg.ema.decay = 0.8;  // cluster sizes follow the shifted batches quickly
  sc.steps = 25;
  sc.rows = 100;
  return sc;
}

/// Gradient mode (counts all-reduced, no EMA sums) with the replace policy.
inline Scenario gradient_scenario() {
  Scenario sc = replace_scenario();
  sc.cfg.update = CodebookUpdate::gradient;
  sc.cfg.memory_bank_size = 0;
  sc.cfg.seed = 7;
  sc.rows = 64;
  return sc;
}

}  // namespace vqkit::test
