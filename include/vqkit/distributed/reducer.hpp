// vqkit/distributed/reducer.hpp - the collective operations data-parallel
// training needs, behind a small interface that includes nothing of MPI.
//
//   all_reduce_sum(span<U>)          in place: every rank receives the sum over ranks
//   broadcast(span<U>, root)         in place: every rank receives root's values
//   all_gather(mine, counts, all)    every rank's `mine`, concatenated in rank order
// with U = float, double or std::int64_t.
//
// Contract of an implementation (see docs/distributed.md):
//  - every rank calls the same operations in the same order with the same
//    sizes (counts: every rank passes the same vector);
//  - all_reduce_sum gives every rank the *bit-identical* result. Integer sums
//    are exact in any order; for floating point the implementation must make
//    sure of it (MpiReducer reduces to rank 0 and broadcasts its bits, since
//    MPI only recommends that every rank get the same bits);
//  - the buffers are the backend's memory: host memory for the CPU backend;
//    a NCCL implementation for the CUDA backend takes device pointers and
//    enqueues on its stream.
//
// Implementations: LocalReducer (below, one process, every operation a
// no-op), MpiReducer (vqkit/distributed/mpi.hpp, the only header that
// includes <mpi.h>). VectorQuantizer::set_reducer() takes a Reducer*.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <type_traits>

#include "vqkit/core/error.hpp"

namespace vqkit {

/// Element type of a collective's buffer (MPI_FLOAT / ncclFloat32, ...).
enum class ElementType { f32, f64, i64 };

inline std::size_t element_size(ElementType t) { return t == ElementType::f32 ? 4 : 8; }

template <class U>
constexpr ElementType element_type_of() {
  if constexpr (std::is_same_v<U, float>) {
    return ElementType::f32;
  } else if constexpr (std::is_same_v<U, double>) {
    return ElementType::f64;
  } else {
    static_assert(std::is_same_v<U, std::int64_t>, "Reducer: float, double or std::int64_t only");
    return ElementType::i64;
  }
}

/// A group of `size()` processes (ranks) that call the same collectives in
/// the same order. The public functions check their arguments and call the
/// protected virtual ones, which an implementation overrides.
class Reducer {
 public:
  virtual ~Reducer() = default;
  virtual int rank() const = 0;  ///< this process, in [0, size())
  virtual int size() const = 0;  ///< number of ranks

  /// In place: data <- sum over ranks of data, bit-identical on every rank.
  template <class U>
  void all_reduce_sum(std::span<U> data) {
    do_all_reduce_sum(data.data(), data.size(), element_type_of<U>());
  }

  /// In place: data <- root's data.
  template <class U>
  void broadcast(std::span<U> data, int root = 0) {
    VQKIT_REQUIRE(root >= 0 && root < size(), "Reducer::broadcast", "root ", root,
                  " is not a rank of a group of ", size());
    do_broadcast(data.data(), data.size(), element_type_of<U>(), root);
  }

  /// all <- every rank's `mine`, rank 0's first. counts[r] is the number of
  /// elements rank r contributes (every rank passes the same counts; 0 is
  /// allowed); all.size() must be their sum.
  template <class U>
  void all_gather(std::span<const U> mine, std::span<const std::size_t> counts,
                  std::span<U> all) {
    constexpr const char* where = "Reducer::all_gather";
    VQKIT_REQUIRE(counts.size() == std::size_t(size()), where, "counts has ", counts.size(),
                  " entries for ", size(), " ranks");
    VQKIT_REQUIRE(mine.size() == counts[std::size_t(rank())], where, "rank ", rank(),
                  " contributes ", mine.size(), " elements, counts says ",
                  counts[std::size_t(rank())]);
    VQKIT_REQUIRE(all.size() == std::accumulate(counts.begin(), counts.end(), std::size_t(0)),
                  where, "the output holds ", all.size(), " elements, not the sum of counts");
    do_all_gather(mine.data(), counts.data(), all.data(), element_type_of<U>());
  }

 protected:
  virtual void do_all_reduce_sum(void* data, std::size_t count, ElementType type) = 0;
  virtual void do_broadcast(void* data, std::size_t count, ElementType type, int root) = 0;
  /// counts: size() entries, in elements; all: their sum, rank 0's first.
  virtual void do_all_gather(const void* mine, const std::size_t* counts, void* all,
                             ElementType type) = 0;
};

/// One process: the sum over ranks and a broadcast leave the data as it is,
/// a gather copies. A quantizer given a reducer of size 1 runs exactly as
/// without one.
class LocalReducer final : public Reducer {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }

 protected:
  void do_all_reduce_sum(void*, std::size_t, ElementType) override {}
  void do_broadcast(void*, std::size_t, ElementType, int) override {}
  void do_all_gather(const void* mine, const std::size_t* counts, void* all,
                     ElementType type) override {
    if (counts[0] > 0) std::memcpy(all, mine, counts[0] * element_size(type));
  }
};

}  // namespace vqkit
