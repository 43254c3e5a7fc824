// vqkit/quantizer/implicit_codebook.hpp - usage bookkeeping of a quantizer
// whose codebook is a fixed grid (FSQ, LFQ): no codes to learn, but usage,
// perplexity and window usage over its K implicit codes, counted per step.
//
//   begin()           zero this step's counts (O(K));
//   count(k)          one real row picked code k;
//   finish(reducer)   record the step (training only) and return the batch
//                     metrics with window usage; with a reducer (a data-
//                     parallel training step: every rank calls it), the
//                     counts are first summed over the ranks (K values);
//   state() / set_state()   usage counters, step and training flag.
#pragma once

#include <cstdint>
#include <span>

#include "vqkit/core/check.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/distributed/reducer.hpp"
#include "vqkit/quantizer/dead_codes.hpp"
#include "vqkit/quantizer/metrics.hpp"

namespace vqkit {

class ImplicitCodebook {
 public:
  struct State {
    IndexVector steps_since_used, used_since_reset;
    std::int64_t step = 0;
    bool training = true;
  };

  ImplicitCodebook(Index K, std::int64_t usage_window) : usage_(K), window_(usage_window) {}

  Index size() const { return usage_.size(); }
  std::int64_t step() const { return step_; }
  const UsageTracker& usage() const { return usage_; }
  bool training() const { return training_; }
  void set_training(bool on) { training_ = on; }

  void begin() { counts_.setZero(usage_.size()); }
  void count(std::int64_t k) { counts_[k] += 1; }
  CodebookMetrics finish(Reducer* reducer = nullptr) {
    if (reducer) reducer->all_reduce_sum(std::span<double>(counts_.data(), std::size_t(counts_.size())));
    if (training_) {
      usage_.record(counts_);
      ++step_;
    }
    CodebookMetrics m = batch_metrics(counts_);
    m.window = window_;
    m.window_usage = usage_.used_within(window_);
    return m;
  }

  State state() const { return {usage_.steps_since_used(), usage_.used_since_reset(), step_, training_}; }
  /// Checks the sizes and counters first: a bad state changes nothing.
  void set_state(State s, const char* where) {
    const Index K = size();
    VQKIT_REQUIRE(s.steps_since_used.size() == K && s.used_since_reset.size() == K, where,
                  "usage counters have ", s.steps_since_used.size(), " and ", s.used_since_reset.size(),
                  " entries, expected K=", K);
    VQKIT_REQUIRE(s.step >= 0, where, "step must be >= 0, got ", s.step);
    usage_.restore(std::move(s.steps_since_used), std::move(s.used_since_reset));
    step_ = s.step;
    training_ = s.training;
  }

 private:
  UsageTracker usage_;
  std::int64_t window_;
  std::int64_t step_ = 0;
  bool training_ = true;
  Vector<double> counts_;  ///< this step's code counts (reused)
};

}  // namespace vqkit
