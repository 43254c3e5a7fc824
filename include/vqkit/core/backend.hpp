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

/// Runs f(i) for i in [0, n) on be's threads (OpenMP, schedule(static)), or,
/// with one thread, in a plain loop that makes no OpenMP call at all:
/// libgomp allocates and frees a team for every one-thread parallel region,
/// and a steady quantizer step must not allocate.
template <class I, class F>
void parallel_for(const cpu& be, I n, F&& f) {
  const int t = be.num_threads();
  if (t > 1) {
#pragma omp parallel for schedule(static) num_threads(t)
    for (I i = 0; i < n; ++i) f(i);
  } else {
    for (I i = 0; i < n; ++i) f(i);
  }
}

/// parallel_for with schedule(dynamic, chunk).
template <class I, class F>
void parallel_for_dynamic(const cpu& be, I n, int chunk, F&& f) {
  const int t = be.num_threads();
  if (t > 1) {
#pragma omp parallel for schedule(dynamic, chunk) num_threads(t)
    for (I i = 0; i < n; ++i) f(i);
  } else {
    for (I i = 0; i < n; ++i) f(i);
  }
}

}  // namespace vqkit
