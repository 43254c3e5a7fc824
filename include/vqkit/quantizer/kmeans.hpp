// vqkit/quantizer/kmeans.hpp - k-means (k-means++ seeding + Lloyd iterations).
//
//   data: n x D, k clusters, n >= k.
// Seeding (k-means++, Arthur & Vassilvitskii 2007): the first centre is a
// uniformly random row; each next one is a row drawn with probability
// proportional to its squared distance to the nearest centre so far.
// It is computed in batches, so that it costs about one nearest-code search
// of (n, k, D) instead of k sequential passes over the data:
//  - the distances mind_i to the centres chosen so far are refreshed once
//    per batch of new centres, by one blocked search of the data against
//    that batch (nearest_code's kernel: the norm trick in float, at GEMM
//    speed), on the data minus its mean (the trick's rounding grows with
//    the norms); a distance small against the norms (where the trick
//    cancels) is recomputed directly, so a row equal to a centre gets 0;
//  - inside a batch, each centre is drawn exactly from the k-means++
//    distribution by rejection: a row i proposed with probability
//    proportional to mind_i (the distances at the start of the batch) is
//    accepted with probability min(mind_i, d(x_i, centres drawn earlier in
//    this batch)) / mind_i, which turns the proposal into a draw
//    proportional to the current distances. Rejections cost only the
//    distances to the batch's own centres.
// Batches double in size (1, 1, 2, 4, ... up to 512 centres; below 16 the
// distances are computed directly, in one streaming pass): early centres
// change the distances most and would be rejected often. A batch whose
// proposals keep being rejected ends early (the distances are refreshed).
// Data whose entries leave float's safe range (see nearest_code.hpp) are
// seeded by the sequential k-means++ in double (kmeans_plus_plus_exact).
// Lloyd: assign every row to its nearest centre (nearest_code, ties to the
// lowest index), move each centre to the mean of its rows (cluster_stats).
// An empty cluster is never left where it was, nor at zero: it is re-seeded
// by splitting the largest cluster (its centre c becomes c(1 + delta) for
// the empty one and c(1 - delta) for the largest, with a tiny +-delta
// pattern per dimension, and the count is shared), as FAISS does.
// Deterministic for a given Rng state, whatever the thread count.
// Range: the Lloyd searches scale the data and centres by a power of two
// when their entries leave float's safe range (nearest_code.hpp), so entries
// of ~1e19 or subnormal ones (~1e-41) cluster as they would at unit scale.
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
  /// With plus_plus: the sequential k-means++ in double (k passes over the
  /// data, kmeans_plus_plus_exact) instead of the batched one. The same
  /// distribution; for comparisons (bench/kmeans_quality).
  bool exact_seeding = false;
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

/// Sequential k-means++ seeding with distances in double (k passes over the
/// data): the fallback for data outside float's safe range, and the
/// reference the batched seeding is tested against. Returns k centres
/// (copies of rows of data).
template <class T>
RowMatrix<T> kmeans_plus_plus_exact(const cpu& be, ConstMatrixRef<T> data, Index k, Rng& rng) {
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

/// sum_d ((a_d - s_d) - b_d)^2 in T, each difference rounded as a centred
/// copy would hold it; s and b may be null (zero). (Eigen's unaligned maps:
/// the same bits wherever the rows live.)
template <class T>
double shifted_sq_dist(const T* a, const T* s, const T* b, Index D) {
  using Row = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
  if (s && b) return double(((Row(a, D) - Row(s, D)) - Row(b, D)).squaredNorm());
  if (s) return double((Row(a, D) - Row(s, D)).squaredNorm());
  if (b) return double((Row(a, D) - Row(b, D)).squaredNorm());
  return double(Row(a, D).squaredNorm());
}

/// Batched k-means++ seeding (see the file comment). data_max = max_abs(data),
/// finite. Returns k centres (copies of rows of data).
template <class T>
RowMatrix<T> kmeans_plus_plus(const cpu& be, ConstMatrixRef<T> data, Index k, Rng& rng, T data_max) {
  const Index n = data.rows(), D = data.cols();
  if (range_exponent<T>(data_max, D) != 0) return kmeans_plus_plus_exact<T>(be, data, k, rng);
  // Distances are translation-invariant; the norm trick's rounding is not
  // (it grows with ||x||^2): work on the data minus its mean. Centred
  // entries are at most 2 data_max, still inside the band unless data_max
  // is at its very top.
  Eigen::Matrix<double, 1, Eigen::Dynamic> mean = Eigen::Matrix<double, 1, Eigen::Dynamic>::Zero(D);
  for (Index i = 0; i < n; ++i) mean += data.row(i).template cast<double>();  // row order: streams
  mean /= double(n);
  const Eigen::Matrix<T, 1, Eigen::Dynamic> shift = mean.template cast<T>();
  // Where the AVX-512 kernel serves the searches it centres the rows as it
  // packs them, and the row distances below centre them on the fly: no
  // centred copy of the data (n x D, freshly paged in: on some VMs that
  // alone cost more than the batched searches). Elsewhere a centred copy
  // xc is searched. Both see the same centred values, rounded once.
  bool fused = false;
#if VQKIT_K512
  if constexpr (std::is_same_v<T, float>) fused = avx512_search_supported();
#endif
  RowMatrix<T> xc;
  const auto centre_copy = [&] {
    xc.resize(n, D);
    parallel_for(be, n, [&](Index i) { xc.row(i) = data.row(i) - shift; });
  };
  if (!fused) centre_copy();
  const T* const sp = fused ? shift.data() : nullptr;
  const auto row = [&](Index i) -> const T* {
    return fused ? data.data() + i * data.outerStride() : xc.data() + i * D;
  };
  {
    std::vector<T> row_max(std::size_t(n), T(0));
    using Row = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;
    parallel_for(be, n, [&](Index i) {
      row_max[std::size_t(i)] = sp ? (Row(row(i), D) - Row(sp, D)).cwiseAbs().maxCoeff()
                                   : Row(row(i), D).cwiseAbs().maxCoeff();
    });
    if (range_exponent<T>(*std::max_element(row_max.begin(), row_max.end()), D) != 0)
      return kmeans_plus_plus_exact<T>(be, data, k, rng);
  }
  constexpr Index max_batch = 512;
  RowMatrix<T> c(k, D);            // centred centres
  std::vector<Index> picked;       // their rows
  picked.reserve(std::size_t(k));
  std::vector<double> mind(std::size_t(n), std::numeric_limits<double>::infinity());
  std::vector<double> prefix(static_cast<std::size_t>(n));
  IndexVector idx(n);
  Vector<T> dist;
  SearchWorkspace ws;  // (the kernel's scratch, kept across the batches)
  Eigen::Matrix<T, 1, Eigen::Dynamic> xi(D);  // a proposed row, centred
  Vector<double> xn2(n);
  parallel_for(be, n, [&](Index i) {
    xn2[i] = shifted_sq_dist<T>(row(i), sp, nullptr, D);
  });
  const auto centre_row = [&](Index i, T* dst) {  // row i as the centred copy holds it
    const T* a = row(i);
    for (Index d = 0; d < D; ++d) dst[d] = sp ? T(a[d] - sp[d]) : a[d];
  };
  const auto pick = [&](Index i) {
    centre_row(i, c.data() + Index(picked.size()) * D);
    picked.push_back(i);
  };
  const auto dist_to = [&](Index i, Index centre) {
    return shifted_sq_dist<T>(row(i), sp, c.data() + centre * D, D);
  };
  pick(Index(rng.below(std::uint64_t(n))));
  Index done = 0;  // centres [0, done) are reflected in mind
  while (Index(picked.size()) < k) {
    const Index j = Index(picked.size());
    // Refresh mind with the centres [done, j).
    if (j > done) {
      if (j - done < 16) {
        // A few centres: direct distances, one streaming pass over the data
        // (cheaper than packing it for the kernel).
        parallel_for(be, n, [&](Index i) {
          double d = mind[std::size_t(i)];
          for (Index b = done; b < j; ++b) d = std::min(d, dist_to(i, b));
          mind[std::size_t(i)] = d;
        });
      } else {  // one search against them
        const auto nb = c.middleRows(done, j - done);
        const Vector<T> cn2 = nb.rowwise().squaredNorm();
        bool searched = false;
#if VQKIT_K512
        if constexpr (std::is_same_v<T, float>)
          if (fused)
            searched = nearest_code_avx512(be, nb, data, idx, &dist, SearchOptions{}, nullptr, nullptr,
                                           &ws, sp);
#endif
        if (!searched) {  // (the generic search, or a kernel that declined)
          if (xc.rows() != n) centre_copy();
          nearest_code_unchecked<T>(be, nb, xc, idx, &dist, SearchOptions{}, nullptr);
        }
        parallel_for(be, n, [&](Index i) {
          const Index a = idx[i];
          double d = double(dist[i]);
          // The norm trick loses the small distances to cancellation: where
          // d is small against the norms, compute it directly (a row equal
          // to a centre gets exactly 0 and is never drawn).
          if (d <= 0x1p-10 * (xn2[i] + double(cn2[a]))) d = dist_to(i, done + a);
          if (d < mind[std::size_t(i)]) mind[std::size_t(i)] = d;
        });
      }
      done = j;
    }
    double total = 0;
    for (Index i = 0; i < n; ++i) prefix[std::size_t(i)] = (total += mind[std::size_t(i)]);
    if (!(total > 0)) {  // every row coincides with a centre: fall back to uniform
      pick(Index(rng.below(std::uint64_t(n))));
      continue;
    }
    // Draw the next batch by rejection from the distances at its start.
    const Index want = std::min(k - j, std::min(j, max_batch));
    const Index max_proposals = 16 * want + 64;
    // This batch's centres so far are c's rows [j, picked.size()).
    for (Index proposals = 0; Index(picked.size()) - j < want && proposals < max_proposals; ++proposals) {
      const double u = rng.uniform() * total;
      Index i = Index(std::upper_bound(prefix.begin(), prefix.end(), u) - prefix.begin());
      i = std::min(i, n - 1);
      const double mi = mind[std::size_t(i)];
      if (!(mi > 0)) continue;  // (rounding at the end of the prefix sums)
      double cur = mi;
      if (Index(picked.size()) > j) centre_row(i, xi.data());  // once for the batch's centres
      for (Index b = j; b < Index(picked.size()) && cur > 0; ++b)
        cur = std::min(cur, shifted_sq_dist<T>(xi.data(), nullptr, c.data() + b * D, D));
      // Accept with probability cur / mi (no draw when cur == mi).
      if (cur < mi && rng.uniform() * mi >= cur) continue;
      pick(i);
    }
  }
  for (Index j = 0; j < k; ++j) c.row(j) = data.row(picked[std::size_t(j)]);
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

/// The CPU backend that runs a backend's seeding (host code): the backend
/// itself on the CPU, a default cpu{} for the others.
inline cpu seeding_backend(const cpu& be) { return be; }
template <class Backend>
cpu seeding_backend(const Backend&) {
  return cpu{};
}

}  // namespace detail

/// k-means of the rows of data, on any backend: written once over the
/// backend's primitives (nearest_code_ranged through detail::PlainSearch,
/// cluster_stats); the seeding is host code on the CPU backend, so every
/// backend draws the same Rng numbers. (The CUDA backend: cuda/kmeans.cuh.)
template <class T, class Backend>
KMeansResult<T> kmeans(const Backend& be, ConstMatrixRef<T> data, const KMeansOptions& opt, Rng& rng) {
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
  const cpu host = detail::seeding_backend(be);
  const T data_max = detail::max_abs(data, &host);
  if (!std::isfinite(data_max)) detail::require_finite(data, where, "data");

  KMeansResult<T> r;
  r.centroids = !opt.plus_plus     ? detail::kmeans_random_rows<T>(data, opt.k, rng)
                : opt.exact_seeding ? detail::kmeans_plus_plus_exact<T>(host, data, opt.k, rng)
                                    : detail::kmeans_plus_plus<T>(host, data, opt.k, rng, data_max);
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
