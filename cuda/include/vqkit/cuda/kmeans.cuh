// vqkit/cuda/kmeans.cuh - k-means on the GPU (init and re-init of the codebook).
//
// The algorithm is the CPU backend's (quantizer/kmeans.hpp): k-means++ or
// k random rows, then Lloyd with empty (or too small) clusters re-seeded by
// splitting the largest, and the same Rng draws in the same order.
// What runs where:
//  - seeding: the CPU's own functions on the host (batched k-means++, or the
//    sequential one with exact_seeding, or random rows): the same code, so
//    the Rng sees the same calls (a copy of it on the device drifted from the
//    CPU's when the CPU's seeding changed, which the first GPU run caught);
//  - Lloyd: the search (gpu::nearest_code, the backend's precision - both
//    precisions give the fp32 indices) and the counts and sums
//    (gpu::cluster_stats, bit-identical to the CPU's) run on the device; the
//    K x D sums come back and the host divides and splits as the CPU does.
// So, given the same inputs, the result equals the CPU backend's up to the
// rare row whose nearest centre is a near-tie (within the rounding of the
// code norms, which the two backends sum in different orders).
// Scratch: device buffers owned by the call (k-means is not in the hot path).
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "vqkit/cuda/backend.cuh"
#include "vqkit/cuda/search.cuh"
#include "vqkit/cuda/stats.cuh"
#include "vqkit/quantizer/kmeans.hpp"

namespace vqkit {

template <class T>
KMeansResult<T> kmeans(const cuda& be, ConstMatrixRef<T> data, const KMeansOptions& opt, Rng& rng) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  constexpr const char* where = "kmeans";
  const Index n = data.rows(), D = data.cols();
  VQKIT_REQUIRE(opt.k >= 1, where, "k must be >= 1, got k=", opt.k);
  VQKIT_REQUIRE(D >= 1, where, "data has dimension D=0");
  VQKIT_REQUIRE(n >= opt.k, where, "needs at least k samples: got n=", n, " samples for k=", opt.k, " clusters");
  VQKIT_REQUIRE(opt.iterations >= 0, where, "iterations must be >= 0, got ", opt.iterations);
  VQKIT_REQUIRE(opt.min_cluster_fraction >= 0.0 && opt.min_cluster_fraction <= 1.0, where,
                "min_cluster_fraction must lie in [0, 1], got ", opt.min_cluster_fraction);
  vqkit::detail::require_finite(data, where, "data");
  be.activate();
  const Index k = opt.k;
  const cudaStream_t s = be.stream;

  gpu::DeviceBuffer<float> dx(std::size_t(n * D));
  gpu::check(cudaMemcpy2DAsync(dx.data(), std::size_t(D) * sizeof(float), data.data(),
                               std::size_t(data.outerStride()) * sizeof(float), std::size_t(D) * sizeof(float),
                               std::size_t(n), cudaMemcpyHostToDevice, s),
             "upload data");

  KMeansResult<T> r;
  if (opt.plus_plus) {
    // The CPU's seeding, on the host (the same function, so the same Rng
    // draws): the batched k-means++ or, with exact_seeding, the sequential one.
    const T data_max = vqkit::detail::max_abs(data);
    r.centroids = opt.exact_seeding ? vqkit::detail::kmeans_plus_plus_exact<T>(cpu{}, data, k, rng)
                                    : vqkit::detail::kmeans_plus_plus<T>(cpu{}, data, k, rng, data_max);
  } else {
    r.centroids = vqkit::detail::kmeans_random_rows<T>(data, k, rng);
  }

  const T min_size = std::max(T(1), T(std::ceil(opt.min_cluster_fraction * double(n) / double(k))));
  gpu::DeviceBuffer<float> dc(std::size_t(k * D)), ddist{std::size_t(n)}, dcounts{std::size_t(k)},
      dsums(std::size_t(k * D));
  gpu::DeviceBuffer<std::int64_t> dassign{std::size_t(n)};
  gpu::DeviceBuffer<unsigned char> ws_search(gpu::nearest_code_workspace_bytes(n, k, D, be.precision));
  gpu::DeviceBuffer<unsigned char> ws_stats(gpu::cluster_stats_workspace_bytes(n, k, true));
  std::vector<float> dist(static_cast<std::size_t>(n));
  RowMatrix<T> sums(k, D);
  for (int it = 0;; ++it) {
    vqkit::detail::require_finite(r.centroids, "nearest_code", "codes");
    gpu::upload(dc.data(), r.centroids.data(), std::size_t(k * D), s);
    gpu::nearest_code(be, dc.data(), k, dx.data(), n, D, Metric::l2, dassign.data(), ddist.data(), nullptr,
                      ws_search.data(), ws_search.size());
    gpu::cluster_stats(be, dx.data(), dassign.data(), n, k, D, dcounts.data(), dsums.data(), ws_stats.data(),
                       ws_stats.size());
    gpu::download(dist.data(), ddist.data(), dist.size(), s);
    r.counts.resize(k);
    gpu::download(r.counts.data(), dcounts.data(), std::size_t(k), s);
    gpu::download(sums.data(), dsums.data(), std::size_t(k * D), s);
    be.sync();
    double inertia = 0;
    for (float v : dist) inertia += double(v);
    r.inertia = inertia;
    if (it == opt.iterations) {
      r.empty_splits += vqkit::detail::split_empty_clusters(r.centroids, r.counts);
      break;
    }
    for (Index j = 0; j < k; ++j)
      if (r.counts[j] > T(0)) r.centroids.row(j) = sums.row(j) / r.counts[j];
    r.empty_splits +=
        vqkit::detail::split_empty_clusters(r.centroids, r.counts, it + 1 < opt.iterations ? min_size : T(1));
  }
  return r;
}

}  // namespace vqkit
