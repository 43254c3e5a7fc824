// vqkit/quantizer/kmeans.hpp - k-means (k-means++ seeding + Lloyd iterations).
//
//   data: n x D, k clusters, n >= k.
// Seeding (k-means++, Arthur & Vassilvitskii 2007): the first centre is a
// uniformly random row; each next one is a row drawn with probability
// proportional to its squared distance to the nearest centre so far.
// Lloyd: assign every row to its nearest centre (nearest_code, ties to the
// lowest index), move each centre to the mean of its rows (cluster_stats).
// An empty cluster is never left where it was, nor at zero: it is re-seeded
// by splitting the largest cluster (its centre c becomes c(1 + delta) for
// the empty one and c(1 - delta) for the largest, with a tiny +-delta
// pattern per dimension, and the count is shared), as FAISS does.
// Deterministic for a given Rng state, whatever the thread count.
// Range: the seeding's distances are computed in double, and the Lloyd
// searches scale the data and centres by a power of two when their entries
// leave float's safe range (nearest_code.hpp), so entries of ~1e19 or
// subnormal ones (~1e-41) cluster as they would at unit scale.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/nearest_code.hpp"

namespace vqkit {

struct KMeansOptions {
  Index k = 0;          ///< number of clusters, 1 <= k <= n
  int iterations = 10;  ///< Lloyd iterations after seeding (0: seeding only)
  bool plus_plus = true;  ///< k-means++ seeding; false: k distinct random rows
  /// During the Lloyd iterations (not after the last), a cluster holding
  /// fewer than min_cluster_fraction * n/k rows is re-seeded like an empty
  /// one, by splitting the largest. 0 (the default) re-seeds empty clusters
  /// only, as plain k-means does; the quantizer uses 0.5, which keeps codes
  /// off isolated outliers (on GloVe it raises batch usage from ~88% to ~97%
  /// and slightly lowers the distortion; see docs/design.md).
  double min_cluster_fraction = 0.0;
};

template <class T>
struct KMeansResult {
  RowMatrix<T> centroids;  ///< k x D
  Vector<T> counts;        ///< k: rows per cluster after the last assignment (all > 0)
  double inertia = 0;      ///< sum of squared distances at the last assignment
  Index empty_splits = 0;  ///< empty (or too small) clusters re-seeded, over all iterations
};

namespace detail {

/// k-means++ seeding; returns k centres (copies of rows of data).
template <class T>
RowMatrix<T> kmeans_plus_plus(const cpu& be, ConstMatrixRef<T> data, Index k, Rng& rng) {
  const Index n = data.rows(), D = data.cols();
  RowMatrix<T> c(k, D);
  std::vector<double> mind(n, std::numeric_limits<double>::infinity());
  Index pick = Index(rng.below(std::uint64_t(n)));
  for (Index j = 0; j < k; ++j) {
    c.row(j) = data.row(pick);
    if (j + 1 == k) break;
    // Distances in double: float squares of large entries (~1e19) overflow
    // and those of tiny ones (~1e-41) underflow, which would make every
    // distance inf (or 0) and the draw degenerate.
    const Eigen::Matrix<double, 1, Eigen::Dynamic> cj = c.row(j).template cast<double>();
#pragma omp parallel for schedule(static) num_threads(be.num_threads())
    for (Index i = 0; i < n; ++i) {
      const double d = (data.row(i).template cast<double>() - cj).squaredNorm();
      if (d < mind[i]) mind[i] = d;
    }
    double total = 0;
    for (Index i = 0; i < n; ++i) total += mind[i];
    if (!(total > 0)) {  // every row coincides with a centre: fall back to uniform
      pick = Index(rng.below(std::uint64_t(n)));
      continue;
    }
    const double u = rng.uniform() * total;
    double acc = 0;
    pick = n - 1;
    for (Index i = 0; i < n; ++i) {
      acc += mind[i];
      if (acc > u && mind[i] > 0) { pick = i; break; }
    }
  }
  return c;
}

/// k distinct random rows (partial Fisher-Yates).
template <class T>
RowMatrix<T> kmeans_random_rows(ConstMatrixRef<T> data, Index k, Rng& rng) {
  const Index n = data.rows();
  std::vector<Index> perm(n);
  for (Index i = 0; i < n; ++i) perm[i] = i;
  RowMatrix<T> c(k, data.cols());
  for (Index j = 0; j < k; ++j) {
    const Index r = j + Index(rng.below(std::uint64_t(n - j)));
    std::swap(perm[j], perm[r]);
    c.row(j) = data.row(perm[j]);
  }
  return c;
}

/// Re-seeds every empty cluster by splitting the largest; returns how many.
template <class T>
Index split_empty_clusters(RowMatrix<T>& c, Vector<T>& counts, T min_size = T(1)) {
  constexpr double delta = 1.0 / 1024;
  Index splits = 0;
  for (Index e = 0; e < c.rows(); ++e) {
    if (counts[e] >= min_size) continue;
    Index big = 0;
    for (Index j = 1; j < c.rows(); ++j)
      if (counts[j] > counts[big]) big = j;
    for (Index d = 0; d < c.cols(); ++d) {
      const T s = (d % 2 == 0) ? T(delta) : T(-delta);
      c(e, d) = c(big, d) * (T(1) + s);
      c(big, d) = c(big, d) * (T(1) - s);
    }
    const T half = std::floor(counts[big] / T(2));
    counts[e] = half;
    counts[big] -= half;
    ++splits;
  }
  return splits;
}

}  // namespace detail

template <class T>
KMeansResult<T> kmeans(const cpu& be, ConstMatrixRef<T> data, const KMeansOptions& opt, Rng& rng) {
  constexpr const char* where = "kmeans";
  const Index n = data.rows(), D = data.cols();
  VQKIT_REQUIRE(opt.k >= 1, where, "k must be >= 1, got k=", opt.k);
  VQKIT_REQUIRE(D >= 1, where, "data has dimension D=0");
  VQKIT_REQUIRE(n >= opt.k, where, "needs at least k samples: got n=", n, " samples for k=",
                opt.k, " clusters");
  VQKIT_REQUIRE(opt.iterations >= 0, where, "iterations must be >= 0, got ", opt.iterations);
  VQKIT_REQUIRE(opt.min_cluster_fraction >= 0.0 && opt.min_cluster_fraction <= 1.0, where,
                "min_cluster_fraction must lie in [0, 1], got ", opt.min_cluster_fraction);
  // One scan: finiteness, and the largest |entry| for the search's range scaling.
  const T data_max = detail::max_abs(data, &be);
  if (!std::isfinite(data_max)) detail::require_finite(data, where, "data");

  KMeansResult<T> r;
  r.centroids = opt.plus_plus ? detail::kmeans_plus_plus<T>(be, data, opt.k, rng)
                              : detail::kmeans_random_rows<T>(data, opt.k, rng);
  // A cluster below min_size rows is re-seeded (never below 1: empty ones always are).
  const T min_size = std::max(T(1), T(std::ceil(opt.min_cluster_fraction * double(n) / double(opt.k))));
  IndexVector assign(n);
  Vector<T> dist;
  for (int it = 0;; ++it) {
    // data was checked once above; centres are means of its rows, finite
    // unless the sums overflow, which the search's own check reports.
    const T centroids_max = detail::max_abs(r.centroids);
    if (!std::isfinite(centroids_max)) detail::require_finite(r.centroids, "nearest_code", "codes");
    detail::nearest_code_ranged<T>(be, r.centroids, data, assign, &dist, SearchOptions{}, nullptr,
                                   centroids_max, data_max);
    r.inertia = dist.template cast<double>().sum();
    auto st = cluster_stats<T>(be, data, assign, opt.k);
    r.counts = st.counts;
    if (it == opt.iterations) {
      r.empty_splits += detail::split_empty_clusters(r.centroids, r.counts);
      break;
    }
    for (Index j = 0; j < opt.k; ++j)
      if (st.counts[j] > T(0)) r.centroids.row(j) = st.sums.row(j) / st.counts[j];
    r.empty_splits += detail::split_empty_clusters(r.centroids, r.counts, it + 1 < opt.iterations ? min_size : T(1));
  }
  return r;
}

}  // namespace vqkit
