// vqkit/quantizer/nearest_code.hpp - nearest-code search (L2 and cosine).
//
//   codes: K x D, x: N x D (row-major, one vector per row)
//   L2:     a_i = argmin_k ||x_i - e_k||^2 = argmin_k (||e_k||^2 - 2 x_i.e_k)
//   cosine: a_i = argmax_k x_i.e_k / ||e_k||  (||x_i|| is the same for every k)
// Ties go to the lowest index. Distances, when asked for, are ||x_i - e_a||^2
// (clamped at 0) for L2 and 1 - cos(x_i, e_a) for cosine; a zero vector has
// cosine 0 with everything.
//
// The N x K distance matrix is never built: x is cut into blocks of
// row_block rows, the codebook into blocks of code_block codes; each
// (row block x code block) tile of dot products is one GEMM into a per-thread
// buffer that stays in cache, followed by a running argmin. Threads take row
// blocks; the tiling does not depend on the thread count, so results are
// bit-identical for any number of threads.
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

enum class Metric { l2, cosine };

inline const char* to_string(Metric m) { return m == Metric::l2 ? "l2" : "cosine"; }

struct SearchOptions {
  Metric metric = Metric::l2;
  Index row_block = 128;   ///< rows of x per tile
  Index code_block = 512;  ///< codes per tile
};

/// The per-code quantity the search needs, cached per codebook version:
/// ||e_k||^2 for L2, 1/||e_k|| (0 for a zero code) for cosine.
template <class T>
Vector<T> code_norms(const cpu&, ConstMatrixRef<T> codes, Metric metric) {
  Vector<T> n = codes.rowwise().squaredNorm();
  if (metric == Metric::cosine)
    for (Index k = 0; k < n.size(); ++k) n[k] = n[k] > T(0) ? T(1) / std::sqrt(n[k]) : T(0);
  return n;
}

/// Nearest code of every row of x. Writes indices (size N); writes distances
/// (size N) when it is non-null. `norms`, if given, must be
/// code_norms(codes, metric) for the current codes (saves one pass over the
/// codebook per call).
template <class T>
void nearest_code(const cpu& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                  Eigen::Ref<IndexVector> indices, Vector<T>* distances = nullptr,
                  const SearchOptions& opt = {}, const Vector<T>* norms = nullptr) {
  constexpr const char* where = "nearest_code";
  const Index K = codes.rows(), D = codes.cols(), N = x.rows();
  VQKIT_REQUIRE(K >= 1, where, "the codebook is empty (K=0)");
  VQKIT_REQUIRE(D >= 1, where, "the codebook has dimension D=0");
  detail::require_batch(x, D, where, "x");
  detail::require_finite(x, where, "x");
  detail::require_finite(codes, where, "codes");
  VQKIT_REQUIRE(indices.size() == N, where, "indices has size ", indices.size(), ", expected N=", N);
  VQKIT_REQUIRE(opt.row_block >= 1 && opt.code_block >= 1, where,
                "row_block and code_block must be >= 1, got ", opt.row_block, " and ",
                opt.code_block);
  VQKIT_REQUIRE(norms == nullptr || norms->size() == K, where, "norms has size ",
                norms ? norms->size() : 0, ", expected K=", K);

  Vector<T> own_norms;
  if (norms == nullptr) {
    own_norms = code_norms<T>(be, codes, opt.metric);
    norms = &own_norms;
  }
  const T* nrm = norms->data();
  if (distances) distances->resize(N);
  const bool l2 = opt.metric == Metric::l2;
  const Index rb = std::min(opt.row_block, N), cb = std::min(opt.code_block, K);
  const Index row_blocks = (N + rb - 1) / rb;

#pragma omp parallel num_threads(be.num_threads())
  {
#ifdef _OPENMP
    omp_set_num_threads(1);  // this task's ICV only: keeps Eigen's GEMM below serial
#endif
    RowMatrix<T> tile(rb, cb);
    std::vector<T> best(rb);
    std::vector<Index> arg(rb);
#pragma omp for schedule(dynamic, 1)
    for (Index blk = 0; blk < row_blocks; ++blk) {
      const Index i0 = blk * rb, ni = std::min(rb, N - i0);
      std::fill(best.begin(), best.begin() + ni, std::numeric_limits<T>::infinity());
      std::fill(arg.begin(), arg.begin() + ni, Index(0));
      for (Index k0 = 0; k0 < K; k0 += cb) {
        const Index nk = std::min(cb, K - k0);
        auto t = tile.topLeftCorner(ni, nk);
        t.noalias() = x.middleRows(i0, ni) * codes.middleRows(k0, nk).transpose();
        for (Index i = 0; i < ni; ++i) {
          const T* row = &t(i, 0);
          T b = best[i];
          Index a = arg[i];
          if (l2) {
            for (Index j = 0; j < nk; ++j) {
              const T v = nrm[k0 + j] - T(2) * row[j];
              if (v < b) { b = v; a = k0 + j; }
            }
          } else {
            for (Index j = 0; j < nk; ++j) {
              const T v = -row[j] * nrm[k0 + j];
              if (v < b) { b = v; a = k0 + j; }
            }
          }
          best[i] = b;
          arg[i] = a;
        }
      }
      for (Index i = 0; i < ni; ++i) {
        indices[i0 + i] = arg[i];
        if (distances) {
          const T xn2 = x.row(i0 + i).squaredNorm();
          if (l2) {
            (*distances)[i0 + i] = std::max(T(0), xn2 + best[i]);
          } else {
            const T xn = std::sqrt(xn2);
            (*distances)[i0 + i] = xn > T(0) ? T(1) + best[i] / xn : T(1);
          }
        }
      }
    }
  }
}

template <class T>
struct SearchResult {
  IndexVector indices;
  Vector<T> distances;
};

/// Convenience form: allocates and returns indices and distances.
template <class T>
SearchResult<T> nearest_code(const cpu& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                             const SearchOptions& opt = {}) {
  SearchResult<T> r;
  r.indices.resize(x.rows());
  nearest_code<T>(be, codes, x, r.indices, &r.distances, opt);
  return r;
}

}  // namespace vqkit
