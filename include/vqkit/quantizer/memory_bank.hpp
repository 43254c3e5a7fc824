// vqkit/quantizer/memory_bank.hpp - ring buffer of recent encoder outputs.
//
// Holds up to `capacity` rows of dimension D, the most recent ones; the
// data-driven (re)initialisation runs k-means over it, and the per-code
// replacement policy draws from it (from the newest rows only with
// DeadCodeOptions::replace_from_steps).
//
// A batch larger than the whole bank cannot fit. It is not cut silently:
// push() then stores a uniformly random subset of `capacity` rows of that
// batch (drawn with the caller's Rng, so runs stay reproducible), replacing
// the whole bank, and counts the rows left out in overflow_rows(), which the
// quantizer reports in its metrics. Choose capacity >= rows per step to keep
// every row (the quantizer defaults to 20 x the codebook size).
#pragma once

#include <algorithm>
#include <vector>

#include "vqkit/core/check.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

template <class T>
class MemoryBank {
 public:
  MemoryBank() = default;
  /// Zero-filled, so a checkpoint of a partly filled bank is deterministic.
  MemoryBank(Index capacity, Index dim) {
    VQKIT_REQUIRE(capacity >= 1, "MemoryBank", "capacity must be >= 1, got ", capacity);
    VQKIT_REQUIRE(dim >= 1, "MemoryBank", "dim must be >= 1, got ", dim);
    data_.setZero(capacity, dim);
  }

  Index capacity() const { return data_.rows(); }
  Index dim() const { return data_.cols(); }
  Index size() const { return size_; }
  Index head() const { return head_; }
  std::int64_t overflow_rows() const { return overflow_; }
  bool full() const { return size_ == capacity(); }

  /// The stored rows in storage order (row i of the ring, not age order).
  auto rows() const { return data_.topRows(size_); }

  void clear() { size_ = head_ = 0; }

  void push(ConstMatrixRef<T> x, Rng& rng) {
    VQKIT_REQUIRE(x.cols() == dim(), "MemoryBank::push", "x has ", x.cols(),
                  " columns, expected ", dim());
    const Index n = x.rows(), cap = capacity();
    if (n > cap) {
      std::vector<Index> perm(n);
      for (Index i = 0; i < n; ++i) perm[i] = i;
      for (Index j = 0; j < cap; ++j) {
        const Index r = j + Index(rng.below(std::uint64_t(n - j)));
        std::swap(perm[j], perm[r]);
      }
      std::sort(perm.begin(), perm.begin() + cap);  // keep the batch's order
      for (Index j = 0; j < cap; ++j) data_.row(j) = x.row(perm[j]);
      size_ = cap;
      head_ = 0;
      overflow_ += n - cap;
      return;
    }
    for (Index i = 0; i < n; ++i) {
      data_.row(head_) = x.row(i);
      head_ = (head_ + 1) % cap;
    }
    size_ = std::min(cap, size_ + n);
  }

  /// A uniformly random stored row.
  auto random_row(Rng& rng) const {
    VQKIT_REQUIRE(size_ > 0, "MemoryBank::random_row", "the bank is empty");
    return data_.row(Index(rng.below(std::uint64_t(size_))));
  }

  /// A uniformly random row among the n most recently pushed (1 <= n <= size()).
  auto random_recent_row(Rng& rng, Index n) const {
    VQKIT_REQUIRE(n >= 1 && n <= size_, "MemoryBank::random_recent_row", "n is ", n,
                  ", expected 1..", size_);
    const Index back = Index(rng.below(std::uint64_t(n)));  // 0 = the newest row
    return data_.row((head_ - 1 - back + 2 * capacity()) % capacity());
  }

  /// Raw access for checkpoints.
  const RowMatrix<T>& storage() const { return data_; }
  void restore(RowMatrix<T> storage, Index size, Index head, std::int64_t overflow) {
    VQKIT_REQUIRE(storage.rows() >= 1 && size >= 0 && size <= storage.rows() && head >= 0 &&
                      head < storage.rows() && overflow >= 0,
                  "MemoryBank::restore", "inconsistent bank: capacity ", storage.rows(), ", size ",
                  size, ", head ", head, ", overflow ", overflow);
    // push() keeps head == size until the ring is full; any other head would
    // make rows() include a row that was never pushed.
    VQKIT_REQUIRE(size == storage.rows() || head == size, "MemoryBank::restore",
                  "inconsistent bank: head ", head, " must equal size ", size,
                  " until the bank is full (capacity ", storage.rows(), ")");
    // Rows past size are never read: zero them, as a fresh bank has them, so
    // that a restored bank equals the one that was saved (whose unused rows a
    // checkpoint stores as zeros) whatever the storage held there.
    storage.bottomRows(storage.rows() - size).setZero();
    data_ = std::move(storage);
    size_ = size;
    head_ = head;
    overflow_ = overflow;
  }

 private:
  RowMatrix<T> data_;
  Index size_ = 0, head_ = 0;
  std::int64_t overflow_ = 0;
};

}  // namespace vqkit
