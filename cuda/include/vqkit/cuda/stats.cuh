// vqkit/cuda/stats.cuh - per-code counts and sums, the EMA update, batch metrics.
//
//   n_k = #{i : a_i = k},  s_k = sum_{i : a_i = k} x_i        (x: N x D, a: N)
//   N_k <- g N_k + (1 - g) n_k,  M_k <- g M_k + (1 - g) s_k
//   e_k = M_k / Nhat_k,  Nhat_k = (N_k + eps) * Ntot / (Ntot + K eps)
// (formulas: quantizer/cluster_stats.hpp, quantizer/ema.hpp).
//
// Deterministic by construction, no floating-point atomics:
//  - counts: a histogram of the indices by integer atomics (exact; per
//    block in shared memory up to 8192 codes);
//  - sums: the rows are sorted by code with CUB's radix sort (stable, so each
//    code's rows stay in increasing row order, the CPU backend's counting
//    sort order), bucket starts come from an exclusive scan of the counts,
//    and one thread per (code, dimension) adds its bucket's rows in that
//    order - the CPU's order of additions, so the sums are bit-identical to
//    the CPU backend's;
//  - Ntot is a fixed-shape tree reduction in double (one block).
// Repeated runs therefore give identical codebooks.
#pragma once

#include <cub/cub.cuh>

#include <cstdint>
#include <vector>

#include "vqkit/cuda/backend.cuh"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/ema.hpp"
#include "vqkit/quantizer/metrics.hpp"

namespace vqkit {
namespace gpu {
namespace detail {

/// int64 indices -> int32 keys and row numbers; an index outside [0, K)
/// is recorded in *bad (the smallest offending row).
template <int Unused = 0>
__global__ void keys_kernel(const std::int64_t* __restrict__ idx, int N, int K, int* __restrict__ keys,
                            int* __restrict__ rows, int* __restrict__ bad) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= N) return;
  const std::int64_t a = idx[i];
  const bool ok = a >= 0 && a < K;
  if (!ok) atomicMin(bad, i);
  keys[i] = ok ? int(a) : 0;
  if (rows) rows[i] = i;
}

/// counts[k] += #{i : keys[i] = k} (integer atomics: exact, order-free).
/// Up to kPrivateBins codes a block counts in shared memory first. (CUB's
/// DeviceHistogram over-counted near N = 2^31 on the first GPU run: 2.4 M
/// extra samples at N = 2^31 - 1024.)
inline constexpr int kPrivateBins = 8192;
template <int Unused = 0>
__global__ void histogram_kernel(const int* __restrict__ keys, std::int64_t N, int K, int* __restrict__ counts) {
  __shared__ int h[kPrivateBins];
  const bool priv = K <= kPrivateBins;
  if (priv) {
    for (int k = threadIdx.x; k < K; k += blockDim.x) h[k] = 0;
    __syncthreads();
  }
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += std::int64_t(gridDim.x) * blockDim.x)
    atomicAdd(priv ? &h[keys[i]] : &counts[keys[i]], 1);
  if (priv) {
    __syncthreads();
    for (int k = threadIdx.x; k < K; k += blockDim.x)
      if (h[k]) atomicAdd(&counts[k], h[k]);
  }
}

template <class T>
__global__ void counts_to_float_kernel(const int* __restrict__ c, int K, T* __restrict__ out) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < K) out[k] = T(c[k]);
}

/// s_kd = sum over the bucket of code k, in row order (the CPU's order).
template <int Unused = 0>
__global__ void bucket_sums_kernel(const float* __restrict__ x, int D, const int* __restrict__ order,
                                   const int* __restrict__ start, int K, float* __restrict__ sums) {
  const std::size_t total = std::size_t(K) * D;
  for (std::size_t t = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t k = t / D, d = t % D;
    float s = 0.f;
    for (int p = start[k]; p < start[k + 1]; ++p) s += x[std::size_t(order[p]) * D + d];
    sums[t] = s;
  }
}

/// N_k <- g N_k + h n_k (two roundings and an add, as Eigen's g*a + h*b).
template <int Unused = 0>
__global__ void ema_sizes_kernel(float* __restrict__ n, const float* __restrict__ counts, int K, float g, float h) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < K) n[k] = __fadd_rn(__fmul_rn(g, n[k]), __fmul_rn(h, counts[k]));
}

/// scale = Ntot / (Ntot + K eps), Ntot = sum_k double(N_k): one block of 1024
/// threads, fixed strided partial sums and a fixed tree, so always the same.
template <int Unused = 0>
__global__ void ema_scale_kernel(const float* __restrict__ n, int K, double eps, double* __restrict__ scale) {
  __shared__ double part[1024];
  double s = 0;
  for (int k = threadIdx.x; k < K; k += 1024) s += double(n[k]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = 512; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *scale = part[0] / (part[0] + double(K) * eps);
}

/// M_k <- g M_k + h s_k;  e_k = M_k / Nhat_k.
template <int Unused = 0>
__global__ void ema_codes_kernel(float* __restrict__ m, const float* __restrict__ sums,
                                 const float* __restrict__ n, const double* __restrict__ scale, int K,
                                 int D, float g, float h, double eps, float* __restrict__ codes) {
  const std::size_t total = std::size_t(K) * D;
  for (std::size_t o = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t k = o / D;
    const float v = __fadd_rn(__fmul_rn(g, m[o]), __fmul_rn(h, sums[o]));
    m[o] = v;
    const float nhat = float((double(n[k]) + eps) * *scale);
    codes[o] = __fdiv_rn(v, nhat);
  }
}

struct StatsBuffers {
  int* keys = nullptr;
  int* keys_sorted = nullptr;
  int* rows = nullptr;
  int* rows_sorted = nullptr;
  int* counts = nullptr;  // K
  int* start = nullptr;   // K + 1
  int* bad = nullptr;     // 1
  void* temp = nullptr;
  std::size_t temp_bytes = 0;
};

inline int key_bits(std::int64_t K) {
  int b = 1;
  while ((std::int64_t(1) << b) < K) ++b;
  return b;
}

/// CUB's temporary storage for the sort and the scan.
inline std::size_t cub_temp_bytes(std::int64_t N, std::int64_t K) {
  std::size_t a = 0, c = 0;
  check(cub::DeviceRadixSort::SortPairs(nullptr, a, static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
                                        static_cast<const int*>(nullptr), static_cast<int*>(nullptr), int(N), 0,
                                        key_bits(K)),
        "cub::DeviceRadixSort::SortPairs (size)");
  check(cub::DeviceScan::ExclusiveSum(nullptr, c, static_cast<const int*>(nullptr), static_cast<int*>(nullptr),
                                      int(K + 1)),
        "cub::DeviceScan::ExclusiveSum (size)");
  return std::max(a, c);
}

/// counts[0..K) = histogram of keys (N of them), on stream s.
inline void count_keys(const int* keys, std::int64_t N, std::int64_t K, int* counts, cudaStream_t s) {
  check(cudaMemsetAsync(counts, 0, std::size_t(K) * sizeof(int), s), "cudaMemsetAsync");
  histogram_kernel<<<std::min(grid_1d(std::size_t(N)), 4096u), 256, 0, s>>>(keys, N, int(K), counts);
  check_launch("histogram_kernel");
}

inline StatsBuffers carve_stats(Carver& cv, std::int64_t N, std::int64_t K, bool sums) {
  StatsBuffers b;
  b.keys = cv.take<int>(N);
  b.counts = cv.take<int>(K + 1);
  b.bad = cv.take<int>(1);
  if (sums) {
    b.keys_sorted = cv.take<int>(N);
    b.rows = cv.take<int>(N);
    b.rows_sorted = cv.take<int>(N);
    b.start = cv.take<int>(K + 1);
  }
  b.temp_bytes = cub_temp_bytes(N, K);
  b.temp = cv.take<unsigned char>(b.temp_bytes);
  return b;
}

}  // namespace detail

/// Workspace bytes of cluster_counts (sums = false) or cluster_stats (sums = true).
inline std::size_t cluster_stats_workspace_bytes(std::int64_t N, std::int64_t K, bool sums = true) {
  Carver cv;
  detail::carve_stats(cv, N, K, sums);
  return cv.used();
}

/// Device-level counts: counts[k] = #{i : idx[i] = k} as float (K).
/// An index outside [0, K) is reported through *bad_row (device int: the
/// smallest such row, N when none), which the caller checks when it next syncs.
inline void cluster_counts(const cuda& be, const std::int64_t* idx, std::int64_t N, std::int64_t K,
                           float* counts, void* workspace, std::size_t bytes, int* bad_row_out = nullptr) {
  require_rows("gpu::cluster_counts", "N", N);
  require_rows("gpu::cluster_counts", "K", K);
  VQKIT_REQUIRE(bytes >= cluster_stats_workspace_bytes(N, K, false), "gpu::cluster_counts",
                "workspace too small: ", bytes);
  const cudaStream_t s = be.stream;
  if (N == 0) {  // nothing to count (a launch over zero rows would be an error)
    check(cudaMemsetAsync(counts, 0, std::size_t(K) * sizeof(float), s), "cudaMemsetAsync");
    if (bad_row_out) check(cudaMemsetAsync(bad_row_out, 0, sizeof(int), s), "cudaMemsetAsync");
    return;
  }
  Carver cv(workspace);
  auto b = detail::carve_stats(cv, N, K, false);
  const int n = int(N), k = int(K);
  const int init = n;
  check(cudaMemcpyAsync(b.bad, &init, sizeof(int), cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
  detail::keys_kernel<<<blocks(N, 256), 256, 0, s>>>(idx, n, k, b.keys, nullptr, b.bad);
  check_launch("keys_kernel");
  detail::count_keys(b.keys, N, K, b.counts, s);
  detail::counts_to_float_kernel<float><<<blocks(K, 256), 256, 0, s>>>(b.counts, k, counts);
  check_launch("counts_to_float_kernel");
  if (bad_row_out) check(cudaMemcpyAsync(bad_row_out, b.bad, sizeof(int), cudaMemcpyDeviceToDevice, s), "copy");
}

/// Device-level counts and sums (x: N x D contiguous; sums: K x D). See the file comment.
inline void cluster_stats(const cuda& be, const float* x, const std::int64_t* idx, std::int64_t N,
                          std::int64_t K, std::int64_t D, float* counts, float* sums, void* workspace,
                          std::size_t bytes, int* bad_row_out = nullptr) {
  require_rows("gpu::cluster_stats", "N", N);
  require_rows("gpu::cluster_stats", "K", K);
  VQKIT_REQUIRE(D >= 1 && D <= kMaxRows, "gpu::cluster_stats", "D=", D, " is outside [1, ", kMaxRows, "]");
  VQKIT_REQUIRE(bytes >= cluster_stats_workspace_bytes(N, K, true), "gpu::cluster_stats",
                "workspace too small: ", bytes);
  const cudaStream_t s = be.stream;
  if (N == 0) {
    check(cudaMemsetAsync(counts, 0, std::size_t(K) * sizeof(float), s), "cudaMemsetAsync");
    check(cudaMemsetAsync(sums, 0, std::size_t(K) * std::size_t(D) * sizeof(float), s), "cudaMemsetAsync");
    if (bad_row_out) check(cudaMemsetAsync(bad_row_out, 0, sizeof(int), s), "cudaMemsetAsync");
    return;
  }
  Carver cv(workspace);
  auto b = detail::carve_stats(cv, N, K, true);
  const int n = int(N), k = int(K), d = int(D);
  const int init = n;
  check(cudaMemcpyAsync(b.bad, &init, sizeof(int), cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
  detail::keys_kernel<<<blocks(N, 256), 256, 0, s>>>(idx, n, k, b.keys, b.rows, b.bad);
  check_launch("keys_kernel");
  std::size_t tb = b.temp_bytes;
  check(cub::DeviceRadixSort::SortPairs(b.temp, tb, b.keys, b.keys_sorted, b.rows, b.rows_sorted, n, 0,
                                        detail::key_bits(K), s),
        "cub::DeviceRadixSort::SortPairs");
  detail::count_keys(b.keys, N, K, b.counts, s);
  check(cudaMemsetAsync(b.counts + k, 0, sizeof(int), s), "cudaMemsetAsync");
  tb = b.temp_bytes;
  check(cub::DeviceScan::ExclusiveSum(b.temp, tb, b.counts, b.start, k + 1, s), "cub::DeviceScan::ExclusiveSum");
  detail::counts_to_float_kernel<float><<<blocks(K, 256), 256, 0, s>>>(b.counts, k, counts);
  check_launch("counts_to_float_kernel");
  detail::bucket_sums_kernel<<<grid_1d(std::size_t(K) * std::size_t(D)), 256, 0, s>>>(x, d, b.rows_sorted,
                                                                                      b.start, k, sums);
  check_launch("bucket_sums_kernel");
  if (bad_row_out) check(cudaMemcpyAsync(bad_row_out, b.bad, sizeof(int), cudaMemcpyDeviceToDevice, s), "copy");
}

/// N_k <- g N_k + (1 - g) n_k for the K cluster sizes (device arrays): the
/// first part of ema_update, and all of it that gradient mode tracks.
inline void ema_sizes(const cuda& be, float* cluster_size, const float* counts, std::int64_t K, double decay) {
  const float g = float(decay);
  detail::ema_sizes_kernel<<<blocks(K, 256), 256, 0, be.stream>>>(cluster_size, counts, int(K), g, 1.0f - g);
  check_launch("ema_sizes_kernel");
}

/// Workspace of ema_update: one double.
inline std::size_t ema_update_workspace_bytes() { return kAlign; }

/// Device-level EMA step: cluster_size (K), embed_sum (K x D) and codes (K x D)
/// updated in place from the batch counts (K) and sums (K x D).
inline void ema_update(const cuda& be, float* cluster_size, float* embed_sum, const float* counts,
                       const float* sums, std::int64_t K, std::int64_t D, const EmaOptions& opt,
                       float* codes, void* workspace, std::size_t bytes) {
  opt.validate("gpu::ema_update");
  require_rows("gpu::ema_update", "K", K);
  VQKIT_REQUIRE(bytes >= ema_update_workspace_bytes(), "gpu::ema_update", "workspace too small: ", bytes);
  const cudaStream_t s = be.stream;
  const int k = int(K), d = int(D);
  const float g = float(opt.decay), h = 1.0f - float(opt.decay);
  double* scale = static_cast<double*>(workspace);
  ema_sizes(be, cluster_size, counts, K, opt.decay);
  detail::ema_scale_kernel<<<1, 1024, 0, s>>>(cluster_size, k, opt.eps, scale);
  check_launch("ema_scale_kernel");
  detail::ema_codes_kernel<<<grid_1d(std::size_t(K) * std::size_t(D)), 256, 0, s>>>(
      embed_sum, sums, cluster_size, scale, k, d, g, h, opt.eps, codes);
  check_launch("ema_codes_kernel");
}

}  // namespace gpu

// ---- host level ------------------------------------------------------------------

namespace gpu {
/// Uploads host indices (checked on the host first, with the CPU's message).
inline std::int64_t* upload_indices(const cuda& be, const Eigen::Ref<const IndexVector>& idx, int slot) {
  auto* d = static_cast<std::int64_t*>(be.arena->slot(slot, std::size_t(idx.size()) * sizeof(std::int64_t)));
  if (idx.innerStride() == 1) {
    upload(d, idx.data(), std::size_t(idx.size()), be.stream);
  } else {
    const IndexVector tmp = idx;
    upload(d, tmp.data(), std::size_t(tmp.size()), be.stream);
    be.sync();
  }
  return d;
}
/// Uploads a host row-major matrix (any outer stride) into a contiguous device buffer.
template <class T, class M>
T* upload_matrix(const cuda& be, const M& m, int slot) {
  T* d = static_cast<T*>(be.arena->slot(slot, std::size_t(m.rows() * m.cols()) * sizeof(T)));
  if (m.size() > 0)
    check(cudaMemcpy2DAsync(d, std::size_t(m.cols()) * sizeof(T), m.data(), std::size_t(m.outerStride()) * sizeof(T),
                            std::size_t(m.cols()) * sizeof(T), std::size_t(m.rows()), cudaMemcpyHostToDevice,
                            be.stream),
          "upload matrix");
  return d;
}
}  // namespace gpu

template <class T>
Vector<T> cluster_counts(const cuda& be, const Eigen::Ref<const IndexVector>& idx, Index K) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  require_indices(idx, K, "cluster_counts");
  Vector<T> n = Vector<T>::Zero(K);
  if (idx.size() == 0) return n;
  be.activate();
  const Index N = idx.size();
  std::int64_t* di = gpu::upload_indices(be, idx, 2);
  float* dn = static_cast<float*>(be.arena->slot(6, std::size_t(K) * sizeof(float)));
  const std::size_t wb = gpu::cluster_stats_workspace_bytes(N, K, false);
  gpu::cluster_counts(be, di, N, K, dn, be.arena->slot(7, wb), wb);
  gpu::download(n.data(), dn, std::size_t(K), be.stream);
  be.sync();
  return n;
}

template <class T>
ClusterStats<T> cluster_stats(const cuda& be, ConstMatrixRef<T> x, const Eigen::Ref<const IndexVector>& idx,
                              Index K) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  constexpr const char* where = "cluster_stats";
  VQKIT_REQUIRE(K >= 1, where, "K must be >= 1, got ", K);
  VQKIT_REQUIRE(idx.size() == x.rows(), where, "indices has size ", idx.size(),
                ", expected one per row of x (", x.rows(), ")");
  require_indices(idx, K, where);
  const Index N = x.rows(), D = x.cols();
  ClusterStats<T> st;
  st.counts.setZero(K);
  st.sums.setZero(K, D);
  if (N == 0 || D == 0) return st;
  be.activate();
  float* dx = gpu::upload_matrix<float>(be, x, 1);
  std::int64_t* di = gpu::upload_indices(be, idx, 2);
  float* dn = static_cast<float*>(be.arena->slot(6, std::size_t(K) * sizeof(float)));
  float* ds = static_cast<float*>(be.arena->slot(8, std::size_t(K * D) * sizeof(float)));
  const std::size_t wb = gpu::cluster_stats_workspace_bytes(N, K, true);
  gpu::cluster_stats(be, dx, di, N, K, D, dn, ds, be.arena->slot(7, wb), wb);
  gpu::download(st.counts.data(), dn, std::size_t(K), be.stream);
  gpu::download(st.sums.data(), ds, std::size_t(K * D), be.stream);
  be.sync();
  return st;
}

template <class T>
void ema_update(const cuda& be, EmaState<T>& st, const ClusterStats<T>& batch, const EmaOptions& opt,
                MatrixRef<T> codes) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  constexpr const char* where = "ema_update";
  opt.validate(where);
  const Index K = codes.rows(), D = codes.cols();
  VQKIT_REQUIRE(st.cluster_size.size() == K && st.embed_sum.rows() == K && st.embed_sum.cols() == D, where,
                "state is ", st.cluster_size.size(), " / ", st.embed_sum.rows(), "x", st.embed_sum.cols(),
                ", expected K=", K, ", D=", D);
  VQKIT_REQUIRE(batch.counts.size() == K && batch.sums.rows() == K && batch.sums.cols() == D, where,
                "batch statistics are ", batch.sums.rows(), "x", batch.sums.cols(), ", expected ", K, "x", D);
  be.activate();
  auto& a = *be.arena;
  const std::size_t kd = std::size_t(K * D) * sizeof(float), k4 = std::size_t(K) * sizeof(float);
  float* dN = static_cast<float*>(a.slot(6, k4));
  float* dcounts = static_cast<float*>(a.slot(9, k4));
  float* dM = static_cast<float*>(a.slot(0, kd));
  float* dS = static_cast<float*>(a.slot(8, kd));
  float* dE = static_cast<float*>(a.slot(1, kd));
  gpu::upload(dN, st.cluster_size.data(), std::size_t(K), be.stream);
  gpu::upload(dcounts, batch.counts.data(), std::size_t(K), be.stream);
  gpu::upload(dM, st.embed_sum.data(), std::size_t(K * D), be.stream);
  gpu::upload(dS, batch.sums.data(), std::size_t(K * D), be.stream);
  gpu::ema_update(be, dN, dM, dcounts, dS, K, D, opt, dE, a.slot(10, gpu::ema_update_workspace_bytes()),
                  gpu::ema_update_workspace_bytes());
  gpu::download(st.cluster_size.data(), dN, std::size_t(K), be.stream);
  gpu::download(st.embed_sum.data(), dM, std::size_t(K * D), be.stream);
  if (codes.outerStride() == D) {
    gpu::download(codes.data(), dE, std::size_t(K * D), be.stream);
    be.sync();
  } else {
    RowMatrix<T> tmp(K, D);
    gpu::download(tmp.data(), dE, std::size_t(K * D), be.stream);
    be.sync();
    codes = tmp;
  }
}

/// Batch metrics of device indices: a histogram on the device, then the
/// K counts (not the N indices) come back for batch_metrics.
inline CodebookMetrics batch_metrics(const cuda& be, const std::int64_t* idx, std::int64_t N, std::int64_t K,
                                     Vector<float>* counts_out = nullptr) {
  be.activate();
  float* dn = static_cast<float*>(be.arena->slot(6, std::size_t(K) * sizeof(float)));
  const std::size_t wb = gpu::cluster_stats_workspace_bytes(N, K, false);
  gpu::cluster_counts(be, idx, N, K, dn, be.arena->slot(7, wb), wb);
  Vector<float> c(K);
  gpu::download(c.data(), dn, std::size_t(K), be.stream);
  be.sync();
  CodebookMetrics m = batch_metrics(c);
  if (counts_out) *counts_out = std::move(c);
  return m;
}

}  // namespace vqkit
