// vqkit/distributed/data_parallel.hpp - what VectorQuantizer does under a
// Reducer so that every rank holds the same codebook (docs/distributed.md).
//
// Each rank gets a slice of every batch: rank 0 the first rows of the whole
// batch, rank 1 the next, and so on. The quantizer then behaves as one
// process that sees the whole batch:
//  - begin_step: every rank learns every rank's row count and whether some
//    rank's slice is bad, so all ranks throw, skip or go on together
//    (3 P int64 all-reduced);
//  - the batch's counts and sums are all-reduced before the EMA update
//    (K (D + 1) values), the counts alone in gradient mode (K); dead-code
//    counters, metrics and every decision derive from them;
//  - the memory bank: every rank runs the bank's own ring logic (MemoryBank,
//    the same Rng draws) on row ids (rank, row number) instead of rows, so
//    all ranks know which row of which rank sits in each slot of the bank
//    one process would hold. A rank keeps its own rows in their slots
//    (rows_) and gathers the other ranks' rows only when the bank is read
//    (k-means (re)init, the replace policy, a checkpoint): sync() gathers the
//    rows pushed since the previous sync that are still in the bank - at most
//    the bank's capacity - and writes the complete bank, identical on every
//    rank, into the quantizer's MemoryBank. k-means then runs on the same
//    rows with the same Rng state on every rank.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "vqkit/core/check.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/distributed/reducer.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/memory_bank.hpp"

namespace vqkit::detail {

/// A slice's verdict: the rows it adds to the step and whether they are finite.
struct SliceCheck {
  Index rows = 0;
  bool finite = true;
};
/// What every rank learns at the start of a step.
struct StepStart {
  bool all_finite = true;  ///< every rank's rows are finite
  Index rows = 0;          ///< rows of the whole batch, over every rank
};

/// Collective (3 P int64 all-reduced): runs this rank's `check()`, which
/// returns its SliceCheck or throws a vqkit::error, and shares every rank's
/// verdict. If any rank's check threw, every rank throws (that rank its own
/// message, the others one naming it), so no rank is left waiting in the
/// next collective. `rows_per_rank`, when given, receives each rank's rows.
template <class Check>
StepStart check_every_slice(Reducer& r, Check&& check, const char* where,
                            std::vector<std::int64_t>* rows_per_rank = nullptr) {
  const std::size_t P = std::size_t(r.size()), me = std::size_t(r.rank());
  std::string rejected;  // this rank's own message
  SliceCheck mine;
  try {
    mine = check();
  } catch (const error& e) {
    rejected = e.what();
  }
  // [rows of each rank | rejected by each rank | non-finite on each rank]
  std::vector<std::int64_t> v(3 * P, 0);
  v[me] = rejected.empty() ? mine.rows : 0;
  v[P + me] = rejected.empty() ? 0 : 1;
  v[2 * P + me] = mine.finite ? 0 : 1;
  r.all_reduce_sum(std::span<std::int64_t>(v));
  if (!rejected.empty()) throw error(rejected);
  for (std::size_t q = 0; q < P; ++q)
    VQKIT_REQUIRE(v[P + q] == 0, where, "rank ", q,
                  " rejected its slice of the batch (every rank throws, so none waits for it)");
  if (rows_per_rank) rows_per_rank->assign(v.begin(), v.begin() + std::ptrdiff_t(P));
  StepStart start;
  start.all_finite = std::all_of(v.begin() + std::ptrdiff_t(2 * P), v.end(),
                                 [](std::int64_t bad) { return bad == 0; });
  for (std::size_t q = 0; q < P; ++q) start.rows += Index(v[q]);
  return start;
}

template <class T>
class DataParallel {
 public:
  using SliceCheck = detail::SliceCheck;
  using StepStart = detail::StepStart;

  /// Starts from `bank`, which every rank must hold whole and identical.
  DataParallel(Reducer& reducer, const MemoryBank<T>& bank) : r_(&reducer) { reset(bank); }

  Reducer& reducer() const { return *r_; }

  /// Restarts the bookkeeping from a complete bank (after set_state()).
  void reset(const MemoryBank<T>& bank) {
    const Index C = bank.capacity();
    // Slots hold (rank, row number); -1 is older than any row: never gathered.
    RowMatrix<std::int64_t> ids(C, 2);
    ids.col(0).setZero();
    ids.col(1).setConstant(-1);
    ids_ = MemoryBank<std::int64_t>(C, 2);
    ids_.restore(std::move(ids), bank.size(), bank.head(), bank.overflow_rows());
    rows_ = bank.storage();
    pushed_.assign(std::size_t(r_->size()), 0);
    synced_ = pushed_;
  }

  /// Collective, at the start of a training step. Checks this rank's slice
  /// x (shape, non-empty, finite) and shares the verdict and the row count:
  /// if any rank's slice is rejected, every rank throws (a rank that threw
  /// alone would leave the others waiting in the next collective). Returns
  /// whether every slice is finite (false only when non-finite slices are
  /// skipped, i.e. !reject_non_finite).
  bool begin_step(ConstMatrixRef<T> x, Index dim, bool reject_non_finite, const char* where) {
    return begin_step(
               [&] {
                 require_batch(x, dim, where, "x");
                 const bool finite = x.allFinite();
                 if (!finite && reject_non_finite) require_finite(x, where, "x");
                 return SliceCheck{x.rows(), finite};
               },
               where)
        .all_finite;
  }

  /// The same with the slice's own check: `check()` returns this rank's
  /// SliceCheck (a masked slice: its real rows, possibly none) or throws a
  /// vqkit::error, which every rank then throws.
  template <class Check>
  StepStart begin_step(Check&& check, const char* where) {
    return check_every_slice(*r_, std::forward<Check>(check), where, &step_rows_);
  }

  /// After begin_step: records the rows of every rank in the id bank, with
  /// the quantizer's Rng (the draws and placement of a bank that sees the
  /// whole batch), and keeps this rank's rows that entered it. Returns the
  /// rows of the whole batch.
  Index push(ConstMatrixRef<T> x, Rng& rng) {
    const std::size_t P = step_rows_.size();
    const auto me = std::int64_t(r_->rank());
    Index n = 0;
    for (std::int64_t c : step_rows_) n += c;
    step_ids_.resize(n, 2);
    for (std::size_t q = 0, i = 0; q < P; ++q)
      for (std::int64_t j = 0; j < step_rows_[q]; ++j, ++i) {
        step_ids_(Index(i), 0) = std::int64_t(q);
        step_ids_(Index(i), 1) = pushed_[q] + j;
      }
    ids_.push(step_ids_, rng);
    const auto& ids = ids_.storage();
    const std::int64_t first = pushed_[std::size_t(me)];
    for (Index s = 0; s < ids_.size(); ++s)
      if (ids(s, 0) == me && ids(s, 1) >= first) rows_.row(s) = x.row(ids(s, 1) - first);
    for (std::size_t q = 0; q < P; ++q) pushed_[q] += step_rows_[q];
    return n;
  }

  /// The bank's bookkeeping, current on every rank (the bank's rows are
  /// complete only after sync()).
  Index bank_size() const { return ids_.size(); }
  std::int64_t overflow_rows() const { return ids_.overflow_rows(); }
  /// Rows were pushed since the last sync(): the quantizer's bank lacks them.
  bool pending() const { return pushed_ != synced_; }

  /// Collective: gathers the rows other ranks pushed since the last sync
  /// that are still in the bank and writes the complete bank into `bank`
  /// (identical on every rank, and to the bank of one process).
  void sync(MemoryBank<T>& bank) {
    if (!pending()) return;  // the same on every rank: all return
    const std::size_t P = pushed_.size(), me = std::size_t(r_->rank());
    const Index D = rows_.cols();
    const auto& ids = ids_.storage();
    std::vector<Index> fresh;  // slots filled since the last sync, in slot order
    std::vector<std::size_t> counts(P, 0);
    for (Index s = 0; s < ids_.size(); ++s) {
      const auto q = std::size_t(ids(s, 0));
      if (ids(s, 1) >= synced_[q]) {
        fresh.push_back(s);
        counts[q] += std::size_t(D);
      }
    }
    std::vector<T> mine, all;
    mine.reserve(counts[me]);
    for (Index s : fresh)
      if (std::size_t(ids(s, 0)) == me) mine.insert(mine.end(), &rows_(s, 0), &rows_(s, 0) + D);
    all.resize(std::accumulate(counts.begin(), counts.end(), std::size_t(0)));
    r_->all_gather(std::span<const T>(mine), std::span<const std::size_t>(counts),
                   std::span<T>(all));
    std::vector<std::size_t> at(P, 0);  // read position in `all`, per rank
    for (std::size_t q = 1; q < P; ++q) at[q] = at[q - 1] + counts[q - 1];
    for (Index s : fresh) {
      const auto q = std::size_t(ids(s, 0));
      if (q != me) rows_.row(s) = map_rows(all.data() + at[q], 1, D);
      at[q] += std::size_t(D);
    }
    synced_ = pushed_;
    bank.restore(rows_, ids_.size(), ids_.head(), ids_.overflow_rows());
  }

  /// Collective: the whole batch's counts and sums, in one message.
  void all_reduce(ClusterStats<T>& st) {
    const Index K = st.sums.rows(), KD = st.sums.size();
    buffer_.resize(std::size_t(K + KD));
    std::copy_n(st.counts.data(), K, buffer_.data());
    std::copy_n(st.sums.data(), KD, buffer_.data() + K);
    r_->all_reduce_sum(std::span<T>(buffer_));
    std::copy_n(buffer_.data(), K, st.counts.data());
    std::copy_n(buffer_.data() + K, KD, st.sums.data());
  }
  /// Collective: the whole batch's counts.
  void all_reduce(Vector<T>& counts) {
    r_->all_reduce_sum(std::span<T>(counts.data(), std::size_t(counts.size())));
  }

 private:
  Reducer* r_;
  MemoryBank<std::int64_t> ids_;       ///< (rank, row number) of each slot of the bank
  RowMatrix<T> rows_;                  ///< the bank as this rank knows it (its own rows current)
  std::vector<std::int64_t> pushed_;   ///< rows each rank has pushed
  std::vector<std::int64_t> synced_;   ///< pushed_ at the last sync
  std::vector<std::int64_t> step_rows_;
  RowMatrix<std::int64_t> step_ids_;
  std::vector<T> buffer_;
};

/// FNV-1a over raw bytes: a fingerprint to compare ranks' states.
class Fingerprint {
 public:
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h_ = (h_ ^ b[i]) * 1099511628211ULL;
  }
  template <class Derived>
  void matrix(const Eigen::PlainObjectBase<Derived>& m) {
    bytes(m.data(), std::size_t(m.size()) * sizeof(typename Derived::Scalar));
  }
  template <class... V>
  void values(const V&... v) {
    (bytes(&v, sizeof(V)), ...);
  }
  std::uint64_t value() const { return h_; }

 private:
  std::uint64_t h_ = 14695981039346656037ULL;
};

/// The config and the complete state of a quantizer, except the codebook
/// gradient (per rank by nature).
template <class VQ>
std::uint64_t fingerprint(const VQ& vq) {
  Fingerprint f;
  const auto& c = vq.config();
  // every field of the config (vector_quantizer.hpp's visit_config, found by
  // argument-dependent lookup) and the sizes its defaults imply
  visit_config(c, [&](const FieldKey&, const auto& v) { f.values(v); });
  f.values(c.bank_rows(), c.init_rows());
  f.matrix(vq.codebook());
  f.matrix(vq.ema_state().cluster_size);
  f.matrix(vq.ema_state().embed_sum);
  f.matrix(vq.usage().steps_since_used());
  f.matrix(vq.usage().used_since_reset());
  const auto& bank = vq.memory_bank();
  f.matrix(bank.storage());
  f.values(bank.size(), bank.head(), bank.overflow_rows(), vq.rng().state(), vq.step(),
           vq.reinit_count(), vq.replaced_count(), vq.skipped_batches(), vq.data_initialized(),
           vq.init_refined(), vq.is_training(), vq.last_init_step());
  return f.value();
}

/// The fingerprint of any quantizer of the family: a composite's own
/// (its member fingerprint(), which folds in its parts'), else the above.
template <class Q>
std::uint64_t fingerprint_of(const Q& q) {
  if constexpr (requires { q.fingerprint(); })
    return q.fingerprint();
  else
    return fingerprint(q);
}

/// Collective: throws on every rank unless every rank's fingerprint equals rank 0's.
inline void require_same_on_every_rank(Reducer& r, std::uint64_t mine, const char* where) {
  std::int64_t root = std::bit_cast<std::int64_t>(mine);
  r.broadcast(std::span<std::int64_t>(&root, 1), 0);
  std::vector<std::int64_t> differs(std::size_t(r.size()), 0);
  differs[std::size_t(r.rank())] = std::bit_cast<std::uint64_t>(root) != mine ? 1 : 0;
  r.all_reduce_sum(std::span<std::int64_t>(differs));
  for (std::size_t q = 0; q < differs.size(); ++q)
    VQKIT_REQUIRE(differs[q] == 0, where, "the quantizer of rank ", q,
                  " differs from rank 0's (config or state): give every rank the same config "
                  "and seed, or load the same checkpoint on every rank, before attaching");
}

}  // namespace vqkit::detail
