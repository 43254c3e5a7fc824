// vqkit/distributed/batch_sync.hpp - the batch sync component of a
// quantizer: how one training step comes to see the whole batch.
//
// VectorQuantizer owns one BatchSync and calls it, unconditionally, at every
// point of a training step that needs the whole batch:
//   begin_step(x, ...)  whether every slice of the batch is finite
//   push(x, bank, rng)  the rows enter the memory bank; returns the batch's rows
//   reduce(stats)       the batch's counts (and sums) summed over the slices
//   complete(bank)      the bank holds every slice's rows (before it is read)
//   bank_size(bank), overflow_rows(bank), pending(), restart(bank)
// With no reducer attached (local, the default) each of these is the bank's
// own call or nothing. attach() with a Reducer of size > 1 makes them the
// collectives of distributed/data_parallel.hpp, so every rank holds the
// codebook one process fed the whole batch would (docs/distributed.md). The
// quantizer's step is the same code on both paths; a different way of
// agreeing on a batch (another transport, gradient accumulation over
// micro-batches) is another implementation of this component.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>

#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/distributed/data_parallel.hpp"
#include "vqkit/distributed/reducer.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/memory_bank.hpp"

namespace vqkit::detail {

template <class T>
class BatchSync {
 public:
  /// Whether a reducer of size > 1 is attached.
  bool distributed() const { return dp_.has_value(); }
  Reducer* reducer() const { return dp_ ? &dp_->reducer() : nullptr; }

  /// Leaves the current mode (completing `bank` first), then attaches
  /// `reducer` (nullptr or size 1: local). Collective under a reducer:
  /// throws on every rank unless every rank's `fingerprint` (the quantizer's
  /// config and state) equals rank 0's; then nothing is attached.
  void attach(Reducer* reducer, MemoryBank<T>& bank, std::uint64_t fingerprint,
              const char* where) {
    if (dp_) {
      dp_->sync(bank);
      dp_.reset();
    }
    if (reducer == nullptr || reducer->size() == 1) return;
    require_same_on_every_rank(*reducer, fingerprint, where);
    dp_.emplace(*reducer, bank);
  }

  /// Start of a training step: checks every slice together (a collective
  /// under a reducer: if one rank's slice is rejected every rank throws).
  /// Returns whether every slice is finite. Locally the quantizer checks x
  /// itself, so this returns true.
  bool begin_step(ConstMatrixRef<T> x, Index dim, bool reject_non_finite, const char* where) {
    return dp_ ? dp_->begin_step(x, dim, reject_non_finite, where) : true;
  }
  /// Under a reducer: the same with the slice's own check (DataParallel's
  /// begin_step), returning the whole batch's row count and finiteness.
  template <class Check>
  typename DataParallel<T>::StepStart begin_step(Check&& check, const char* where) {
    VQKIT_REQUIRE(dp_.has_value(), where, "begin_step(check) needs a reducer");
    return dp_->begin_step(std::forward<Check>(check), where);
  }

  /// The rows enter the memory bank (under a reducer, as row ids; the rows
  /// arrive at complete()). Returns the rows of the whole batch.
  Index push(ConstMatrixRef<T> x, MemoryBank<T>& bank, Rng& rng) {
    if (dp_) return dp_->push(x, rng);
    bank.push(x, rng);
    return x.rows();
  }

  /// The whole batch's counts and sums (or counts, or any per-code sums).
  void reduce(ClusterStats<T>& stats) {
    if (dp_) dp_->all_reduce(stats);
  }
  void reduce(Vector<T>& per_code) {
    if (dp_) dp_->all_reduce(per_code);
  }

  /// Makes `bank` hold every rank's rows (a collective under a reducer).
  void complete(MemoryBank<T>& bank) {
    if (dp_) dp_->sync(bank);
  }
  /// The bank's row count and overflow over the whole batch, known before
  /// complete().
  Index bank_size(const MemoryBank<T>& bank) const { return dp_ ? dp_->bank_size() : bank.size(); }
  std::int64_t overflow_rows(const MemoryBank<T>& bank) const {
    return dp_ ? dp_->overflow_rows() : bank.overflow_rows();
  }
  /// The quantizer's bank lacks rows other ranks pushed.
  bool pending() const { return dp_ && dp_->pending(); }

  /// After the quantizer's state was replaced: restart from its (complete) bank.
  void restart(const MemoryBank<T>& bank) {
    if (dp_) dp_->reset(bank);
  }

 private:
  std::optional<DataParallel<T>> dp_;  ///< engaged under a reducer of size > 1
};

}  // namespace vqkit::detail
