// vqkit/cuda/backend.cuh - the CUDA backend object, device buffers, workspaces.
//
// vqkit::cuda is the GPU counterpart of vqkit::cpu (core/backend.hpp): every
// primitive has an overload whose first parameter is `const cuda&`, so a layer
// written as Layer<T, Backend> calls the same names on either backend.
//
// Two levels of API (docs/cuda.md):
//  - device level (namespace vqkit::gpu): raw device pointers, an explicit
//    stream and an explicit workspace, in the CUB style: ask for the
//    workspace size, allocate it once, then call; nothing is allocated in
//    these calls and nothing synchronises the host unless the function says
//    so (a few host decisions, e.g. in k-means, need a copy back);
//  - host level (namespace vqkit, the same signatures as the CPU backend):
//    Eigen matrices in host memory are copied to the device, the device
//    primitive runs, results are copied back. Scratch memory comes from the
//    backend's Arena, which only grows (so after the first call of a given
//    size nothing is allocated), and the call synchronises its stream.
//
// A cuda object is cheap to copy; copies share the arena (one arena must not
// be used from two host threads at once).
#pragma once

// Eigen is used on the host only: keep it from annotating itself for nvcc.
#ifndef EIGEN_NO_CUDA
#define EIGEN_NO_CUDA
#endif

#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "vqkit/core/error.hpp"
#include "vqkit/quantizer/nearest_code.hpp"

namespace vqkit {

namespace gpu {

/// Throws vqkit::error naming the call and CUDA's message when e != cudaSuccess.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::ostringstream os;
    os << "vqkit::cuda: " << what << " failed: " << cudaGetErrorName(e) << " ("
       << cudaGetErrorString(e) << ")";
    throw vqkit::error(os.str());
  }
}

/// Checks the last launch (configuration errors); asynchronous errors surface
/// at the next synchronising call.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

/// Largest row or code count (N, K) the device-level calls accept: every
/// int index and launch computation (i + 255 and the like) stays below 2^31,
/// and CUB's int item counts hold.
inline constexpr std::int64_t kMaxRows = (std::int64_t(1) << 31) - 1024;

/// Throws vqkit::error naming the count when n is outside [0, kMaxRows].
inline void require_rows(const char* where, const char* what, std::int64_t n) {
  VQKIT_REQUIRE(n >= 0 && n <= kMaxRows, where, what, "=", n, " is outside [0, ", kMaxRows, "]");
}

/// Blocks for a grid-stride loop over `items` with `threads` per block: one
/// item per thread up to 2^20 blocks (no grid dimension limit is reached, so
/// K or N on a grid's y axis - at most 65535 - never occurs).
inline unsigned grid_1d(std::size_t items, unsigned threads = 256) {
  const std::size_t b = (items + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > (std::size_t(1) << 20) ? (std::size_t(1) << 20) : b));
}

/// Blocks of `per_block` items covering n, one item per thread (n <=
/// kMaxRows, or n / per_block below 2^31 otherwise: no overflow).
inline unsigned blocks(std::int64_t n, std::int64_t per_block) {
  return unsigned((n + per_block - 1) / per_block);
}

inline constexpr std::size_t kAlign = 256;
inline constexpr std::size_t align_up(std::size_t n, std::size_t a = kAlign) {
  return (n + a - 1) / a * a;
}

/// Carves one workspace into aligned pieces. Used twice with the same
/// sequence of take() calls: once with base = nullptr to measure the size,
/// once with the real pointer to hand out the pieces.
class Carver {
 public:
  explicit Carver(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(std::size_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += align_up(count * sizeof(T));
    return p;
  }
  std::size_t used() const { return used_; }

 private:
  char* base_;
  std::size_t used_ = 0;
};

/// An owning device allocation (cudaMalloc), movable, not copyable.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) { resize(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  /// Reallocates (contents lost) when n differs from the current size.
  void resize(std::size_t n) {
    if (n == n_) return;
    release();
    if (n > 0) check(cudaMalloc(reinterpret_cast<void**>(&p_), n * sizeof(T)), "cudaMalloc");
    n_ = n;
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }

 private:
  void release() {
    if (p_) cudaFree(p_);  // never throws from a destructor
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// Grow-only device scratch shared by the host-level overloads of one backend.
/// slot(i, bytes) returns a buffer of at least `bytes`, reused between calls;
/// separate slots let one call hold several buffers at once.
class Arena {
 public:
  static constexpr int kSlots = 12;
  void* slot(int i, std::size_t bytes) {
    DeviceBuffer<unsigned char>& b = slots_[i];
    if (b.size() < bytes) {
      b.resize(0);
      b.resize(align_up(bytes < 256 ? 256 : bytes, 1 << 20));
    }
    return b.data();
  }
  std::size_t bytes() const {
    std::size_t s = 0;
    for (const auto& b : slots_) s += b.size();
    return s;
  }

 private:
  DeviceBuffer<unsigned char> slots_[kSlots];
};

/// Bytes copied by upload() and download() since the program started (all
/// threads): what a caller can watch to see what crosses the bus.
inline std::atomic<std::uint64_t>& transfer_bytes() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}

/// Copies between host and device on a stream (pageable host memory: the
/// copies are synchronous with respect to the host for device-to-host).
template <class T>
void upload(T* dst, const T* src, std::size_t n, cudaStream_t s) {
  if (n) check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, s), "upload");
  transfer_bytes().fetch_add(n * sizeof(T), std::memory_order_relaxed);
}
template <class T>
void download(T* dst, const T* src, std::size_t n, cudaStream_t s) {
  if (n) check(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, s), "download");
  transfer_bytes().fetch_add(n * sizeof(T), std::memory_order_relaxed);
}

/// Number of CUDA devices; 0 when there is no driver or no device (never throws).
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

}  // namespace gpu

/// How the nearest-code search computes its dot products: the CPU's enum
/// (quantizer/nearest_code.hpp), one name on both backends. On the GPU:
///  fp32        exact fp32 FMA chains on the CUDA cores (the reference path);
///  bf16_rerank BF16 tensor cores, then an exact fp32 re-rank of a provable
///              candidate set (the same indices and distances as fp32).
using SearchPrecision = Precision;

/// The CUDA backend: a device, a stream, the search precision and a scratch
/// arena for the host-level overloads. Results never depend on the stream,
/// the precision or the launch configuration (see each primitive).
struct cuda {
  int device = 0;
  cudaStream_t stream = nullptr;  ///< nullptr: the legacy default stream
  SearchPrecision precision = SearchPrecision::fp32;
  std::shared_ptr<gpu::Arena> arena = std::make_shared<gpu::Arena>();

  /// Makes `device` current (the host-level overloads call it first).
  void activate() const { gpu::check(cudaSetDevice(device), "cudaSetDevice"); }
  void sync() const { gpu::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize"); }
  int sm_count() const {
    int n = 0;
    gpu::check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute");
    return n;
  }
};

}  // namespace vqkit
