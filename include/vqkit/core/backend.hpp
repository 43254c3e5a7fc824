// vqkit/core/backend.hpp - backend tags.
//
// Every primitive is an overload set whose first parameter is a backend
// object: nearest_code(cpu{}, codes, x, ...). The backend object carries the
// execution context (here the thread count; for the CUDA backend a stream and
// a workspace), and the layers hold one and pass it on, so a layer written as
// VectorQuantizer<T, Backend> calls the same names whatever the backend.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace vqkit {

/// The CPU backend: Eigen for arithmetic, OpenMP for threads.
struct cpu {
  /// Threads for vqkit's parallel loops; 0 means OpenMP's default
  /// (OMP_NUM_THREADS, else the number of cores). Results never depend on it.
  int threads = 0;

  int num_threads() const {
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    return 1;
#endif
  }
};

}  // namespace vqkit
