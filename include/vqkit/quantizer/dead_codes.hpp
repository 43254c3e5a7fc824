// vqkit/quantizer/dead_codes.hpp - per-code usage counters and the two
// dead-code policies.
//
// Every training step, steps_since_used[k] becomes 0 for each code the batch
// picked and grows by 1 for every other code. A code is *dead* once it has
// gone unused for >= dead_after steps (CoPilot4D: 256). The same counters
// give usage over a window: codes with steps_since_used < window.
//
// Policies (DeadCodePolicy):
//  - kmeans_reinit (the paper's): at steps that are multiples of
//    check_every, from min_steps on, if more than max_dead_fraction of the
//    codes are dead, re-run k-means over the memory bank and re-initialise
//    the whole codebook (and its EMA state, consistently). Besides this
//    clock, a health trigger (reinit_below_usage > 0): once a full usage
//    window has passed since the last k-means (re)init, re-initialise as soon
//    as the window usage falls below reinit_below_usage x min(K, rows seen in
//    the window). A code is dead only after dead_after idle steps, so under
//    a moving encoder the clock alone acts long after the codebook has
//    collapsed (issue 16, docs/monitoring.md).
//  - replace (SoundStream / vector-quantize-pytorch): after each step, every
//    code whose EMA cluster size N_k fell below replace_threshold times the
//    mean cluster size (a fraction, so it does not depend on the batch size
//    or K) is replaced by a random row of the memory bank; its e, N and M
//    are reset together, with N_k = the mean cluster size.
//  - both kmeans_reinit and replace, with replace_after > 0: every code
//    unused for replace_after steps is re-seeded like a replaced code, from
//    a random recent token (under kmeans_reinit in the steps without a
//    k-means re-init). Under a moving encoder the codes the tokens have left
//    behind go idle within a few steps; this puts them back where the tokens
//    are now, in proportion to how often they occur there (issue 16,
//    docs/monitoring.md).
//  - none.
// decide_dead_codes() is the policies' one decision (what to reset); the
// quantizer layer carries it out after the EMA update of the step, so a reset
// code is never overwritten by that step's update. Adding a policy touches
// this header only (and the config's field list, if it has options).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

enum class DeadCodePolicy { none, kmeans_reinit, replace };

inline const char* to_string(DeadCodePolicy p) {
  switch (p) {
    case DeadCodePolicy::none: return "none";
    case DeadCodePolicy::kmeans_reinit: return "kmeans_reinit";
    case DeadCodePolicy::replace: return "replace";
  }
  return "?";
}

inline DeadCodePolicy parse_dead_code_policy(const std::string& s) {
  if (s == "none") return DeadCodePolicy::none;
  if (s == "kmeans_reinit" || s == "kmeans") return DeadCodePolicy::kmeans_reinit;
  if (s == "replace") return DeadCodePolicy::replace;
  detail::throw_error("parse_dead_code_policy", "unknown policy '", s,
                      "' (expected none, kmeans_reinit or replace)");
}

struct DeadCodeOptions {
  DeadCodePolicy policy = DeadCodePolicy::kmeans_reinit;
  std::int64_t dead_after = 256;     ///< steps unused after which a code is dead
  std::int64_t check_every = 100;    ///< kmeans_reinit: check period (steps)
  std::int64_t min_steps = 200;      ///< kmeans_reinit: no check before this step
  double max_dead_fraction = 0.03;   ///< kmeans_reinit: re-init when more are dead
  double replace_threshold = 0.1;    ///< replace: fraction of the mean EMA cluster size
  /// kmeans_reinit: health trigger, a fraction of the codes the window could
  /// show (0: off, the seed's clock only)
  double reinit_below_usage = 0.0;
  /// kmeans_reinit and replace: also re-seed every code unused for this many
  /// steps; 0: off (the seed's behaviour); -1 (the default): automatic, the
  /// steps in which a code used at the uniform rate would be picked 10 times,
  /// at least the usage window: max(usage_window, ceil(10 K / rows per step))
  std::int64_t replace_after = -1;
  /// Replacements (both rules) draw from the bank rows of the last this-many
  /// steps (this step's rows x the count); 0: the whole bank (the seed's).
  /// k-means (re)inits always use the whole bank: k-means over few rows per
  /// code overfits them (docs/design.md, "hubness").
  std::int64_t replace_from_steps = 1;

  /// replace_after resolved for a step of `rows_per_step` rows (0: off).
  std::int64_t replace_after_steps(Index K, Index rows_per_step, std::int64_t usage_window) const {
    if (replace_after >= 0) return replace_after;
    const double steps = std::ceil(10.0 * double(K) / double(std::max<Index>(rows_per_step, 1)));
    return std::max<std::int64_t>(usage_window, std::int64_t(std::min(steps, 1e15)));
  }

  /// The field list (core/config_fields.hpp).
  template <class Self, class F>
  static void visit_fields(Self& o, F&& f, const char* prefix = "") {
    using R = FieldRange;
    detail::visit_field(f, {prefix, "policy"}, o.policy, R::unrestricted());
    detail::visit_field(f, {prefix, "dead_after"}, o.dead_after, R::at_least(1));
    detail::visit_field(f, {prefix, "check_every"}, o.check_every, R::at_least(1));
    detail::visit_field(f, {prefix, "min_steps"}, o.min_steps, R::at_least(0));
    detail::visit_field(f, {prefix, "max_dead_fraction"}, o.max_dead_fraction, R::closed_open(0, 1));
    detail::visit_field(f, {prefix, "replace_threshold"}, o.replace_threshold, R::at_least(0));
    detail::visit_field(f, {prefix, "reinit_below_usage"}, o.reinit_below_usage,
                        R::closed_open(0, 1));
    detail::visit_field(f, {prefix, "replace_after"}, o.replace_after,
                        R::at_least(-1, "be >= 0 (steps) or -1 (automatic)"));
    detail::visit_field(f, {prefix, "replace_from_steps"}, o.replace_from_steps, R::at_least(0));
  }
  void validate(const char* where, const char* prefix = "") const {
    visit_fields(*this, detail::field_checker(where), prefix);
  }
};

/// Per-code steps since last use (or since the code was last (re)initialised,
/// for a code not used since), and whether it has been used since then.
class UsageTracker {
 public:
  UsageTracker() = default;
  explicit UsageTracker(Index K) : since_(IndexVector::Zero(K)), used_(IndexVector::Zero(K)) {}

  Index size() const { return since_.size(); }
  const IndexVector& steps_since_used() const { return since_; }
  /// 1 where the code has been picked since its last (re)initialisation.
  const IndexVector& used_since_reset() const { return used_; }
  void restore(IndexVector since, IndexVector used) {
    VQKIT_REQUIRE(since.size() == used.size(), "UsageTracker::restore", "sizes differ: ",
                  since.size(), " and ", used.size());
    since_ = std::move(since);
    used_ = std::move(used);
  }

  /// Records one step given the batch counts n_k.
  template <class Counts>
  void record(const Counts& counts) {
    for (Index k = 0; k < since_.size(); ++k) {
      const bool hit = counts[k] > 0;
      since_[k] = hit ? 0 : since_[k] + 1;
      if (hit) used_[k] = 1;
    }
  }
  void reset_all() {
    since_.setZero();
    used_.setZero();
  }
  void reset(Index k) { since_[k] = used_[k] = 0; }

  /// Codes unused for >= dead_after steps.
  Index dead(std::int64_t dead_after) const { return (since_.array() >= dead_after).count(); }
  /// Codes picked at least once in the last `window` steps.
  Index used_within(std::int64_t window) const {
    return (since_.array() < window && used_.array() != 0).count();
  }

 private:
  IndexVector since_, used_;
};

/// The paper policy's decision at step `step` (1-based count of training steps done).
inline bool kmeans_reinit_due(const DeadCodeOptions& o, std::int64_t step, Index dead, Index K) {
  if (o.policy != DeadCodePolicy::kmeans_reinit) return false;
  if (step < o.min_steps || step % o.check_every != 0) return false;
  return double(dead) > o.max_dead_fraction * double(K);
}

/// The health trigger of kmeans_reinit: `window_usage` codes were picked in
/// the last `window` steps, which held `window_rows` rows in all, and
/// `since_init` steps have passed since the last k-means (re)init.
inline bool kmeans_health_reinit_due(const DeadCodeOptions& o, Index window_usage,
                                     std::int64_t window, double window_rows,
                                     std::int64_t since_init, Index K) {
  if (o.policy != DeadCodePolicy::kmeans_reinit || o.reinit_below_usage <= 0.0) return false;
  if (since_init < window) return false;  // the window still mixes in the old codebook
  return double(window_usage) < o.reinit_below_usage * std::min(double(K), window_rows);
}


/// What a dead-code policy sees after a training step's EMA update.
template <class T>
struct DeadCodeInputs {
  std::int64_t step = 0;              ///< training steps done, this one included
  Index dead = 0;                     ///< codes unused for dead_after steps
  Index window_usage = 0;             ///< codes used within the usage window
  std::int64_t usage_window = 1;      ///< its length (steps)
  Index rows_per_step = 0;            ///< rows of this step's whole batch
  std::int64_t steps_since_init = 0;  ///< since the last k-means (re)init
  bool data_initialized = false;      ///< (before the k-means init nothing is reset)
  Index bank_size = 0;                ///< rows in the memory bank (whole batch)
  const UsageTracker* usage = nullptr;
  const Vector<T>* cluster_size = nullptr;  ///< EMA N_k
};

/// What the policy asks of the quantizer, which carries it out: re-run
/// k-means over the whole memory bank, or re-seed the listed codes, each
/// from a random row among the bank's newest `reseed_from` rows (the whole
/// bank when it equals the bank's size), its e, N and M reset together with
/// N_k = reseed_size (ema_reset_code).
struct DeadCodeAction {
  bool reinit = false;
  std::vector<Index> reseed;  ///< ascending; empty when reinit
  Index reseed_from = 0;
  double reseed_size = 0;

  /// Space for K codes, so that deciding never allocates.
  explicit DeadCodeAction(Index K = 0) { reseed.reserve(static_cast<std::size_t>(K)); }
};

/// The dead-code policies, decided in one place: a new policy is a
/// DeadCodePolicy value, its options in DeadCodeOptions and its rule here
/// (with a new kind of action in DeadCodeAction if re-init and re-seeding do
/// not cover it). Overwrites `out`; allocates nothing once out has space for
/// K codes.
template <class T>
void decide_dead_codes(const DeadCodeOptions& o, const DeadCodeInputs<T>& in,
                       DeadCodeAction& out) {
  out.reinit = false;
  out.reseed.clear();
  out.reseed_from = out.reseed_size = 0;
  if (!in.data_initialized || o.policy == DeadCodePolicy::none) return;
  const Vector<T>& size = *in.cluster_size;
  const Index K = size.size();
  if (o.policy == DeadCodePolicy::kmeans_reinit) {
    const bool due = kmeans_reinit_due(o, in.step, in.dead, K) ||
                     kmeans_health_reinit_due(o, in.window_usage, in.usage_window,
                                              double(in.rows_per_step) * double(in.usage_window),
                                              in.steps_since_init, K);
    if (due && in.bank_size >= K) {
      out.reinit = true;
      return;
    }
  }
  // Re-seeding: replace's small codes, and under both policies idle ones.
  const bool by_size = o.policy == DeadCodePolicy::replace;
  const std::int64_t idle_steps = o.replace_after_steps(K, in.rows_per_step, in.usage_window);
  if (!by_size && idle_steps <= 0) return;
  const T mean = size.sum() / T(K);
  // (a threshold of -1 turns the EMA-size rule off: sizes are >= 0)
  const T threshold = by_size ? T(o.replace_threshold) * mean : T(-1);
  for (Index k = 0; k < K; ++k) {
    const bool idle = idle_steps > 0 && in.usage->steps_since_used()[k] >= idle_steps;
    if (size[k] < threshold || idle) out.reseed.push_back(k);
  }
  if (out.reseed.empty()) return;
  out.reseed_size = double(mean);
  out.reseed_from = in.bank_size;
  if (o.replace_from_steps > 0) {  // the newest rows only
    const double rows = double(in.rows_per_step) * double(o.replace_from_steps);
    if (rows < double(in.bank_size)) out.reseed_from = std::max<Index>(1, Index(rows));
  }
}

}  // namespace vqkit
