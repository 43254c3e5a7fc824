// vqkit/cuda/train.cuh - the rest of a training step on the GPU: gather and
// residual, loss terms and gradients, the memory bank, usage counters and
// code resets (the dead-code policies' building blocks).
//
//   q_i = e_{a_i},  r_i = x_i - q_i                                  (gather)
//   L = sum(r^2) / s,  s = N D (mean) or N (sum_over_dim)            (quantizer/loss.hpp)
//   dx = dq + 2 commitment_weight r / s
//   de_k += -2 codebook_weight / s * sum_{i : a_i = k} r_i           (gradient mode)
// The loss is a fixed-shape reduction in double; the codebook gradient sorts
// the rows by code (CUB) and adds each code's rows in row order, as the CPU
// does: deterministic, no floating-point atomics.
// Memory bank: DeviceMemoryBank mirrors MemoryBank (quantizer/memory_bank.hpp)
// draw for draw: the same Rng calls on the host choose the same rows, so a
// device bank fed the same batches holds the same rows in the same slots.
// Usage counters: usage_record mirrors UsageTracker::record on device arrays.
#pragma once

#include <cub/cub.cuh>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vqkit/cuda/backend.cuh"
#include "vqkit/cuda/stats.cuh"
#include "vqkit/core/random.hpp"
#include "vqkit/quantizer/dead_codes.hpp"
#include "vqkit/quantizer/loss.hpp"

namespace vqkit {
namespace gpu {
namespace detail {

template <int Unused = 0>
__global__ void gather_residual_kernel(const float* __restrict__ x, const float* __restrict__ codes,
                                       const std::int64_t* __restrict__ idx, int N, int D,
                                       float* __restrict__ q, float* __restrict__ r) {
  const std::size_t total = std::size_t(N) * D;
  for (std::size_t o = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; o < total; o += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t i = o / D, d = o % D;
    const float v = codes[std::size_t(idx[i]) * D + d];
    if (q) q[o] = v;
    if (r) r[o] = x[o] - v;
  }
}

inline constexpr int kLossBlocks = 256;

/// Per-block sums of r^2 in double over a fixed grid-stride pattern.
template <int Unused = 0>
__global__ void sq_partial_kernel(const float* __restrict__ r, std::size_t n, double* __restrict__ part) {
  __shared__ double sh[256];
  double s = 0;
  for (std::size_t t = std::size_t(blockIdx.x) * 256 + threadIdx.x; t < n; t += std::size_t(kLossBlocks) * 256)
    s += double(r[t]) * double(r[t]);
  sh[threadIdx.x] = s;
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}

template <int Unused = 0>
__global__ void sq_final_kernel(const double* __restrict__ part, double* __restrict__ out) {
  __shared__ double sh[kLossBlocks];
  sh[threadIdx.x] = part[threadIdx.x];
  __syncthreads();
  for (int w = kLossBlocks / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) sh[threadIdx.x] += sh[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = sh[0];
}

template <int Unused = 0>
__global__ void input_grad_kernel(const float* __restrict__ r, const float* __restrict__ dq, std::size_t n,
                                  float c, float* __restrict__ dx) {
  const std::size_t t = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const float g = __fmul_rn(c, r[t]);
  dx[t] = dq ? __fadd_rn(dq[t], g) : g;
}

/// de_kd += c r_id over the rows of code k in row order (CPU order).
template <int Unused = 0>
__global__ void codebook_grad_kernel(const float* __restrict__ r, int D, const int* __restrict__ order,
                                     const int* __restrict__ start, int K, float c, float* __restrict__ de) {
  const std::size_t total = std::size_t(K) * D;
  for (std::size_t t = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t k = t / D, d = t % D;
    float s = de[t];
    for (int p = start[k]; p < start[k + 1]; ++p) s = __fadd_rn(s, __fmul_rn(c, r[std::size_t(order[p]) * D + d]));
    de[t] = s;
  }
}

template <int Unused = 0>
__global__ void usage_record_kernel(const float* __restrict__ counts, int K, std::int64_t* __restrict__ since,
                                    std::int64_t* __restrict__ used) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const bool hit = counts[k] > 0.f;
  since[k] = hit ? 0 : since[k] + 1;
  if (hit) used[k] = 1;
}

template <int Unused = 0>
__global__ void usage_count_kernel(const std::int64_t* __restrict__ since, const std::int64_t* __restrict__ used,
                                   int K, std::int64_t dead_after, std::int64_t window,
                                   unsigned long long* __restrict__ out) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  if (since[k] >= dead_after) atomicAdd(out, 1ull);
  if (since[k] < window && used[k] != 0) atomicAdd(out + 1, 1ull);
}

template <int Unused = 0>
__global__ void gather_rows_kernel(const float* __restrict__ src, const int* __restrict__ rows, int n, int D,
                                   float* __restrict__ dst) {
  const std::size_t total = std::size_t(n) * D;
  for (std::size_t t = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t j = t / D, d = t % D;
    dst[t] = src[std::size_t(rows[j]) * D + d];
  }
}

/// e_k = v, N_k = count, M_k = count v for a list of codes (value rows given).
template <int Unused = 0>
__global__ void reset_codes_kernel(const int* __restrict__ ks, const float* __restrict__ values, int n, int D,
                                   float count, float* __restrict__ codes, float* __restrict__ cluster_size,
                                   float* __restrict__ embed_sum) {
  const std::size_t total = std::size_t(n) * D;
  for (std::size_t t = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t j = t / D, d = t % D;
    const std::size_t k = std::size_t(ks[j]);
    const float v = values[t];
    codes[k * D + d] = v;
    embed_sum[k * D + d] = count * v;
    if (d == 0) cluster_size[k] = count;
  }
}

}  // namespace detail

/// q = e_a and r = x - q (either output may be null); x, q, r: N x D.
inline void gather_residual(const cuda& be, const float* x, const float* codes, const std::int64_t* idx,
                            std::int64_t N, std::int64_t D, float* q, float* r) {
  require_rows("gpu::gather_residual", "N", N);
  if (N == 0) return;
  detail::gather_residual_kernel<<<grid_1d(std::size_t(N) * std::size_t(D)), 256, 0, be.stream>>>(
      x, codes, idx, int(N), int(D), q, r);
  check_launch("gather_residual_kernel");
}

inline std::size_t vq_loss_workspace_bytes() {
  return align_up((detail::kLossBlocks + 1) * sizeof(double));
}

/// Loss terms of a device residual (N x D); synchronises to return them.
inline VqLoss vq_loss(const cuda& be, const float* residual, std::int64_t N, std::int64_t D,
                      const LossOptions& opt, void* workspace, std::size_t bytes) {
  VQKIT_REQUIRE(bytes >= vq_loss_workspace_bytes(), "gpu::vq_loss", "workspace too small: ", bytes);
  double* part = static_cast<double*>(workspace);
  detail::sq_partial_kernel<<<detail::kLossBlocks, 256, 0, be.stream>>>(residual, std::size_t(N * D), part);
  check_launch("sq_partial_kernel");
  detail::sq_final_kernel<<<1, detail::kLossBlocks, 0, be.stream>>>(part, part + detail::kLossBlocks);
  check_launch("sq_final_kernel");
  double sq = 0;
  download(&sq, part + detail::kLossBlocks, 1, be.stream);
  be.sync();
  VqLoss l;
  l.distortion = sq / opt.scale(N, D);
  l.codebook = opt.codebook_weight * l.distortion;
  l.commitment = opt.commitment_weight * l.distortion;
  l.total = l.codebook + l.commitment;
  return l;
}

/// dx = dq + 2 commitment_weight r / s (dq may be null: no upstream gradient).
inline void vq_input_grad(const cuda& be, const float* residual, const float* dq, std::int64_t N, std::int64_t D,
                          const LossOptions& opt, float* dx) {
  const float c = float(2.0 * opt.commitment_weight / opt.scale(N, D));
  const std::size_t n = std::size_t(N * D);
  detail::input_grad_kernel<<<blocks(n, 256), 256, 0, be.stream>>>(residual, dq, n, c, dx);
  check_launch("input_grad_kernel");
}

/// Accumulates the codebook gradient into dcodes (K x D); workspace as cluster_stats.
inline void vq_codebook_grad(const cuda& be, const float* residual, const std::int64_t* idx, std::int64_t N,
                             std::int64_t K, std::int64_t D, const LossOptions& opt, float* dcodes,
                             void* workspace, std::size_t bytes) {
  require_rows("gpu::vq_codebook_grad", "N", N);
  require_rows("gpu::vq_codebook_grad", "K", K);
  VQKIT_REQUIRE(bytes >= cluster_stats_workspace_bytes(N, K, true), "gpu::vq_codebook_grad",
                "workspace too small: ", bytes);
  Carver cv(workspace);
  auto b = detail::carve_stats(cv, N, K, true);
  const cudaStream_t s = be.stream;
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
  const float c = float(-2.0 * opt.codebook_weight / opt.scale(N, D));
  detail::codebook_grad_kernel<<<grid_1d(std::size_t(K) * std::size_t(D)), 256, 0, s>>>(
      residual, d, b.rows_sorted, b.start, k, c, dcodes);
  check_launch("codebook_grad_kernel");
}

/// UsageTracker::record on device arrays (since, used: K int64) from device counts.
inline void usage_record(const cuda& be, const float* counts, std::int64_t K, std::int64_t* since,
                         std::int64_t* used) {
  detail::usage_record_kernel<<<blocks(K, 256), 256, 0, be.stream>>>(counts, int(K), since, used);
  check_launch("usage_record_kernel");
}

/// Dead codes (since >= dead_after) and window usage (since < window and used);
/// workspace: 2 counters. Synchronises.
inline std::pair<std::int64_t, std::int64_t> usage_counts(const cuda& be, const std::int64_t* since,
                                                          const std::int64_t* used, std::int64_t K,
                                                          std::int64_t dead_after, std::int64_t window,
                                                          void* workspace) {
  auto* c = static_cast<unsigned long long*>(workspace);
  check(cudaMemsetAsync(c, 0, 2 * sizeof(unsigned long long), be.stream), "cudaMemsetAsync");
  detail::usage_count_kernel<<<blocks(K, 256), 256, 0, be.stream>>>(since, used, int(K), dead_after,
                                                                               window, c);
  check_launch("usage_count_kernel");
  unsigned long long h[2] = {0, 0};
  download(h, c, 2, be.stream);
  be.sync();
  return {std::int64_t(h[0]), std::int64_t(h[1])};
}

/// Consistent reset of the codes ks (device, n of them) to the device rows
/// `values` (n x D): e_k = v, N_k = count, M_k = count v (ema_reset_code).
inline void ema_reset_codes(const cuda& be, const int* ks, const float* values, std::int64_t n, std::int64_t D,
                            float count, float* codes, float* cluster_size, float* embed_sum) {
  if (n == 0) return;
  detail::reset_codes_kernel<<<grid_1d(std::size_t(n) * std::size_t(D)), 256, 0, be.stream>>>(
      ks, values, int(n), int(D), count, codes, cluster_size, embed_sum);
  check_launch("reset_codes_kernel");
}

/// MemoryBank on the device: the same ring, the same Rng draws as the host
/// class, so the two hold the same rows in the same slots.
class DeviceMemoryBank {
 public:
  DeviceMemoryBank(std::int64_t capacity, std::int64_t dim) : cap_(capacity), dim_(dim) {
    VQKIT_REQUIRE(capacity >= 1, "DeviceMemoryBank", "capacity must be >= 1, got ", capacity);
    VQKIT_REQUIRE(dim >= 1, "DeviceMemoryBank", "dim must be >= 1, got ", dim);
    data_.resize(std::size_t(capacity * dim));
    check(cudaMemset(data_.data(), 0, data_.size() * sizeof(float)), "cudaMemset");
    rows_.resize(std::size_t(capacity));
  }
  std::int64_t capacity() const { return cap_; }
  std::int64_t dim() const { return dim_; }
  std::int64_t size() const { return size_; }
  std::int64_t head() const { return head_; }
  std::int64_t overflow_rows() const { return overflow_; }
  bool full() const { return size_ == cap_; }
  const float* data() const { return data_.data(); }  ///< capacity x dim, storage order

  /// x: n x dim on the device. Same semantics and Rng draws as MemoryBank::push.
  void push(const cuda& be, const float* x, std::int64_t n, Rng& rng) {
    const std::size_t row_bytes = std::size_t(dim_) * sizeof(float);
    if (n > cap_) {
      std::vector<std::int64_t> perm(static_cast<std::size_t>(n));
      for (std::int64_t i = 0; i < n; ++i) perm[std::size_t(i)] = i;
      for (std::int64_t j = 0; j < cap_; ++j) {
        const std::int64_t r = j + std::int64_t(rng.below(std::uint64_t(n - j)));
        std::swap(perm[std::size_t(j)], perm[std::size_t(r)]);
      }
      std::sort(perm.begin(), perm.begin() + cap_);
      std::vector<int> sel(perm.begin(), perm.begin() + cap_);
      upload(rows_.data(), sel.data(), sel.size(), be.stream);
      detail::gather_rows_kernel<<<grid_1d(std::size_t(cap_) * std::size_t(dim_)), 256, 0, be.stream>>>(
          x, rows_.data(), int(cap_), int(dim_), data_.data());
      check_launch("gather_rows_kernel");
      be.sync();  // sel is a host temporary
      size_ = cap_;
      head_ = 0;
      overflow_ += n - cap_;
      return;
    }
    std::int64_t done = 0;
    while (done < n) {
      const std::int64_t len = std::min(n - done, cap_ - head_);
      check(cudaMemcpyAsync(data_.data() + head_ * dim_, x + done * dim_, std::size_t(len) * row_bytes,
                            cudaMemcpyDeviceToDevice, be.stream),
            "bank push");
      done += len;
      head_ = (head_ + len) % cap_;
    }
    size_ = std::min(cap_, size_ + n);
  }

  /// Restores a bank (the host class's restore): `storage` is capacity x dim
  /// host rows; the counters are checked as MemoryBank::restore does.
  void restore(const cuda& be, const float* storage, std::int64_t size, std::int64_t head,
               std::int64_t overflow) {
    VQKIT_REQUIRE(size >= 0 && size <= cap_ && head >= 0 && head < cap_ && overflow >= 0,
                  "DeviceMemoryBank::restore", "inconsistent bank: capacity ", cap_, ", size ", size,
                  ", head ", head, ", overflow ", overflow);
    upload(data_.data(), storage, std::size_t(cap_ * dim_), be.stream);
    size_ = size;
    head_ = head;
    overflow_ = overflow;
  }

  /// Index of a uniformly random stored row (the host class's draw).
  std::int64_t random_row_index(Rng& rng) const {
    VQKIT_REQUIRE(size_ > 0, "DeviceMemoryBank::random_row", "the bank is empty");
    return std::int64_t(rng.below(std::uint64_t(size_)));
  }

  /// Index of a uniformly random row among the n newest (the host class's
  /// random_recent_row draw).
  std::int64_t random_recent_row_index(Rng& rng, std::int64_t n) const {
    VQKIT_REQUIRE(n >= 1 && n <= size_, "DeviceMemoryBank::random_recent_row", "n is ", n,
                  ", expected 1..", size_);
    const std::int64_t back = std::int64_t(rng.below(std::uint64_t(n)));
    return (head_ - 1 - back + 2 * cap_) % cap_;
  }

 private:
  std::int64_t cap_, dim_, size_ = 0, head_ = 0, overflow_ = 0;
  DeviceBuffer<float> data_;
  DeviceBuffer<int> rows_;
};

}  // namespace gpu

// ---- host level ------------------------------------------------------------------

template <class T>
VqLoss vq_loss(const cuda& be, ConstMatrixRef<T> residual, const LossOptions& opt) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  be.activate();
  const Index N = residual.rows(), D = residual.cols();
  float* dr = gpu::upload_matrix<float>(be, residual, 1);
  return gpu::vq_loss(be, dr, N, D, opt, be.arena->slot(10, gpu::vq_loss_workspace_bytes()),
                      gpu::vq_loss_workspace_bytes());
}

template <class T>
void vq_input_grad(const cuda& be, ConstMatrixRef<T> residual, ConstMatrixRef<T> dq, const LossOptions& opt,
                   RowMatrix<T>& dx) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  be.activate();
  const Index N = residual.rows(), D = residual.cols();
  float* dr = gpu::upload_matrix<float>(be, residual, 1);
  const float* ddq = dq.rows() == 0 ? nullptr : gpu::upload_matrix<float>(be, dq, 3);
  float* ddx = static_cast<float*>(be.arena->slot(8, std::size_t(N * D) * sizeof(float)));
  gpu::vq_input_grad(be, dr, ddq, N, D, opt, ddx);
  dx.resize(N, D);
  gpu::download(dx.data(), ddx, std::size_t(N * D), be.stream);
  be.sync();
}

template <class T>
void vq_codebook_grad(const cuda& be, ConstMatrixRef<T> residual, const Eigen::Ref<const IndexVector>& idx,
                      const LossOptions& opt, MatrixRef<T> dcodes) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  const Index N = residual.rows(), D = residual.cols(), K = dcodes.rows();
  require_indices(idx, K, "vq_codebook_grad");
  if (N == 0) return;
  be.activate();
  float* dr = gpu::upload_matrix<float>(be, residual, 1);
  std::int64_t* di = gpu::upload_indices(be, idx, 2);
  float* de = gpu::upload_matrix<float>(be, dcodes, 0);
  const std::size_t wb = gpu::cluster_stats_workspace_bytes(N, K, true);
  gpu::vq_codebook_grad(be, dr, di, N, K, D, opt, de, be.arena->slot(7, wb), wb);
  RowMatrix<T> tmp(K, D);
  gpu::download(tmp.data(), de, std::size_t(K * D), be.stream);
  be.sync();
  dcodes = tmp;
}

}  // namespace vqkit
