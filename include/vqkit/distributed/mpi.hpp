// vqkit/distributed/mpi.hpp - the Reducer over MPI. The only vqkit header
// that includes <mpi.h>; link MPI::MPI_CXX (CMake: find_package(MPI
// COMPONENTS CXX)) when you include it.
//
//   MPI_Init(&argc, &argv);
//   {
//     vqkit::MpiReducer reducer;            // MPI_COMM_WORLD (a duplicate of it)
//     vq.set_reducer(&reducer);             // every rank
//     ... each rank: vq.forward(its slice of the batch, q) ...
//     vq.set_reducer(nullptr);              // before the reducer goes
//   }
//   MPI_Finalize();
//
// MPI must be initialised before the reducer is built and finalised after
// it is destroyed. Collectives run on a duplicate of the communicator, so
// vqkit's messages never mix with the caller's.
#pragma once

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/distributed/reducer.hpp"

namespace vqkit {

class MpiReducer final : public Reducer {
 public:
  explicit MpiReducer(MPI_Comm comm = MPI_COMM_WORLD) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    VQKIT_REQUIRE(initialized, "MpiReducer", "MPI is not initialised (call MPI_Init first)");
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiReducer() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  MpiReducer(const MpiReducer&) = delete;
  MpiReducer& operator=(const MpiReducer&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm comm() const { return comm_; }

 protected:
  void do_all_reduce_sum(void* data, std::size_t count, ElementType type) override {
    const int n = to_int(count, "all_reduce_sum");
    if (type == ElementType::i64) {  // exact: every order gives the same sum
      check(MPI_Allreduce(MPI_IN_PLACE, data, n, mpi_type(type), MPI_SUM, comm_), "MPI_Allreduce");
      return;
    }
    // MPI only recommends that MPI_Allreduce give every rank the same bits;
    // reducing to rank 0 and broadcasting its result guarantees it.
    check(MPI_Reduce(rank_ == 0 ? MPI_IN_PLACE : data, rank_ == 0 ? data : nullptr, n,
                     mpi_type(type), MPI_SUM, 0, comm_),
          "MPI_Reduce");
    check(MPI_Bcast(data, n, mpi_type(type), 0, comm_), "MPI_Bcast");
  }

  void do_broadcast(void* data, std::size_t count, ElementType type, int root) override {
    check(MPI_Bcast(data, to_int(count, "broadcast"), mpi_type(type), root, comm_), "MPI_Bcast");
  }

  void do_all_gather(const void* mine, const std::size_t* counts, void* all,
                     ElementType type) override {
    std::vector<int> n(static_cast<std::size_t>(size_)), at(n.size());
    std::size_t total = 0;
    for (std::size_t r = 0; r < n.size(); ++r) {
      at[r] = to_int(total, "all_gather");
      n[r] = to_int(counts[r], "all_gather");
      total += counts[r];
    }
    to_int(total, "all_gather");
    check(MPI_Allgatherv(mine, n[std::size_t(rank_)], mpi_type(type), all, n.data(), at.data(),
                         mpi_type(type), comm_),
          "MPI_Allgatherv");
  }

 private:
  static MPI_Datatype mpi_type(ElementType t) {
    switch (t) {
      case ElementType::f32: return MPI_FLOAT;
      case ElementType::f64: return MPI_DOUBLE;
      case ElementType::i64: return MPI_INT64_T;
    }
    return MPI_DATATYPE_NULL;
  }
  /// MPI counts are int. The sizes are the same on every rank, so every rank throws.
  static int to_int(std::size_t n, const char* what) {
    VQKIT_REQUIRE(n <= std::size_t(INT_MAX), "MpiReducer", what, ": ", n,
                  " elements exceed MPI's int count");
    return int(n);
  }
  static void check(int rc, const char* call) {
    VQKIT_REQUIRE(rc == MPI_SUCCESS, "MpiReducer", call, " failed with error code ", rc);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

}  // namespace vqkit
