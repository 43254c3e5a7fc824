// vqkit/core/backend.hpp - backend tags.
//
// Every primitive is an overload set whose first parameter is a backend
// object: nearest_code(cpu{}, codes, x, ...). The backend object carries the
// execution context (here the thread count; for the CUDA backend a stream and
// a workspace), and the layers hold one and pass it on, so a layer written as
// VectorQuantizer<T, Backend> calls the same names whatever the backend.
#pragma once

#include <algorithm>
#include <functional>

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


namespace detail {

/// Loops over fewer elements than this run on the calling thread: a
/// parallel region costs microseconds, more than such a loop.
inline constexpr long kParallelMinElements = 1L << 15;

/// f(i) for each row i of an (n, cols) array, the rows split over be's
/// threads when the array is large enough. For row-independent work, whose
/// results cannot depend on the split.
template <class I, class F>
void parallel_rows(const cpu& be, I n, I cols, F&& f) {
  if (long(n) * long(cols) >= kParallelMinElements) {
    parallel_for(be, n, f);
  } else {
    for (I i = 0; i < n; ++i) f(i);
  }
}

/// f(c0, w) for a split of the columns [0, cols) of an (n, cols) array into
/// one contiguous range per thread (widths a multiple of 16 but the last),
/// or once for all columns when the array is small. For column sums that
/// add the rows in order inside f: each column's bits do not depend on
/// the split, so results are the same for any thread count.
template <class I, class F>
void parallel_column_ranges(const cpu& be, I n, I cols, F&& f) {
  const I groups = (cols + 15) / 16;
  const int t = be.num_threads();
  if (t <= 1 || groups < 2 || long(n) * long(cols) < kParallelMinElements) {
    if (cols > 0) f(I(0), cols);
    return;
  }
  const I ranges = std::min<I>(I(t), groups);
  const I width = (groups + ranges - 1) / ranges * 16;
  parallel_for(be, ranges, [&](I r) {
    const I c0 = r * width;
    if (c0 < cols) f(c0, std::min<I>(width, cols - c0));
  });
}

// Whether two row-major matrices (or blocks, or Refs) share any storage.
template <class A, class B>
bool storage_overlaps(const A& a, const B& b) {
  if (a.size() == 0 || b.size() == 0) return false;
  const auto* a0 = reinterpret_cast<const char*>(a.data());
  const auto* a1 = reinterpret_cast<const char*>(a.data() + (a.rows() - 1) * a.outerStride() + a.cols());
  const auto* b0 = reinterpret_cast<const char*>(b.data());
  const auto* b1 = reinterpret_cast<const char*>(b.data() + (b.rows() - 1) * b.outerStride() + b.cols());
  std::less<const char*> lt;
  return lt(a0, b1) && lt(b0, a1);
}

/// dst = src (Eigen matrices), resizing dst, the rows copied on be's threads
/// when large. dst must not overlap src unless it is src.
template <class Src, class Dst>
void copy_rows(const cpu& be, const Src& src, Dst& dst) {
  // A matrix copied onto itself (a layer that filled its context's buffer in
  // place) needs nothing.
  if (static_cast<const void*>(dst.data()) == static_cast<const void*>(src.data()) &&
      dst.rows() == src.rows() && dst.cols() == src.cols() && src.size() > 0 &&
      (src.rows() <= 1 || src.outerStride() == dst.outerStride()))
    return;
  dst.resize(src.rows(), src.cols());
  parallel_rows(be, src.rows(), src.cols(), [&](auto i) { dst.row(i) = src.row(i); });
}

}  // namespace detail

}  // namespace vqkit
