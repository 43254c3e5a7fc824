// bench/cuda/bench_cuda_search.cu - the CUDA backend's search (and EMA step)
// with Google Benchmark, timed by CUDA events (manual time: each iteration
// is the device time between two events around one call).
//
// Shapes (N, K, D): (16384,1024,1024) (16384,1024,256) (65536,512,64)
// (4096,8192,256) (1024,65536,32) (65536,1024,1024); for each:
//   search/fp32          the exact fused kernel
//   search/bf16_rerank   tensor cores + exact fp32 re-rank (same indices)
//   cublas_argmin/bf16   baseline: cuBLAS BF16 GEMM (fp32 out) into an N x K
//                        matrix, then a separate norm + argmin kernel (not exact)
//   cublas_argmin/fp32   the same with cuBLAS SGEMM (FP32, no TF32)
//   ema_step             cluster_stats + ema_update (device level)
// Counters: TFLOPs (2 N K D / time), pct_bf16_peak (over VQKIT_GPU_PEAK_TFLOPS,
// default 989 = H100 SXM dense BF16), cand (mean exact dot products per row).
// Inputs: Gaussian, generated on the device (never zeros).
// --quick: only the three smaller shapes.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "vqkit/cuda/search.cuh"
#include "vqkit/cuda/stats.cuh"

namespace {

using vqkit::gpu::check;
using vqkit::gpu::DeviceBuffer;

double peak_tflops() {
  const char* e = std::getenv("VQKIT_GPU_PEAK_TFLOPS");
  return e ? std::atof(e) : 989.0;
}

__global__ void gauss_kernel(float* p, std::size_t n, unsigned seed) {
  const std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  auto h = [](unsigned long long z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  const unsigned long long r = h((static_cast<unsigned long long>(seed) << 40) ^ i);
  const float u1 = (float((r >> 40) & 0xffffff) + 0.5f) / 16777216.f, u2 = float((r >> 8) & 0xffffff) / 16777216.f;
  p[i] = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
}

__global__ void to_bf16_kernel(const float* s, __nv_bfloat16* d, std::size_t n) {
  const std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) d[i] = __float2bfloat16_rn(s[i]);
}

__global__ void sqnorm_kernel(const float* e, int K, int D, float* n) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  float s = 0.f;
  for (int d = 0; d < D; ++d) s = fmaf(e[std::size_t(k) * D + d], e[std::size_t(k) * D + d], s);
  n[k] = s;
}

/// argmin_k (||e_k||^2 - 2 dots[i][k]); one block per row.
__global__ void argmin_kernel(const float* dots, const float* n2, int K, std::int64_t* idx) {
  const int row = blockIdx.x;
  const float* r = dots + std::size_t(row) * K;
  float best = INFINITY;
  int arg = 0x7fffffff;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = n2[k] - 2.f * r[k];
    if (v < best) {
      best = v;
      arg = k;
    }
  }
  __shared__ float sb[256];
  __shared__ int sa[256];
  sb[threadIdx.x] = best;
  sa[threadIdx.x] = arg;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) {
      const float ob = sb[threadIdx.x + w];
      const int oa = sa[threadIdx.x + w];
      if (ob < sb[threadIdx.x] || (ob == sb[threadIdx.x] && oa < sa[threadIdx.x])) {
        sb[threadIdx.x] = ob;
        sa[threadIdx.x] = oa;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) idx[row] = sa[0];
}

struct Problem {
  std::int64_t N, K, D;
  DeviceBuffer<float> x, e;
  DeviceBuffer<std::int64_t> idx;
  Problem(std::int64_t n, std::int64_t k, std::int64_t d) : N(n), K(k), D(d), x(n * d), e(k * d), idx(n) {
    gauss_kernel<<<unsigned((x.size() + 255) / 256), 256>>>(x.data(), x.size(), 1);
    gauss_kernel<<<unsigned((e.size() + 255) / 256), 256>>>(e.data(), e.size(), 2);
    check(cudaGetLastError(), "gauss_kernel");
    check(cudaDeviceSynchronize(), "sync");
  }
};

struct EventTimer {
  cudaEvent_t a{}, b{};
  EventTimer() {
    check(cudaEventCreate(&a), "cudaEventCreate");
    check(cudaEventCreate(&b), "cudaEventCreate");
  }
  ~EventTimer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  template <class F>
  double ms(F&& f, cudaStream_t s) {
    check(cudaEventRecord(a, s), "cudaEventRecord");
    f();
    check(cudaEventRecord(b, s), "cudaEventRecord");
    check(cudaEventSynchronize(b), "cudaEventSynchronize");
    float t = 0;
    check(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
    return double(t);
  }
};

void set_counters(benchmark::State& st, const Problem& p) {
  const double flops = 2.0 * double(p.N) * double(p.K) * double(p.D);
  st.counters["TFLOPs"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["pct_bf16_peak"] =
      benchmark::Counter(flops * 1e-12 * 100.0 / peak_tflops(), benchmark::Counter::kIsIterationInvariantRate);
  st.counters["N"] = double(p.N);
  st.counters["K"] = double(p.K);
  st.counters["D"] = double(p.D);
}

void BM_search(benchmark::State& st, vqkit::SearchPrecision prec) {
  Problem p(st.range(0), st.range(1), st.range(2));
  vqkit::cuda be;
  be.precision = prec;
  const std::size_t wb = vqkit::gpu::nearest_code_workspace_bytes(p.N, p.K, p.D, prec);
  DeviceBuffer<unsigned char> ws(wb);
  auto call = [&] {
    vqkit::gpu::nearest_code(be, p.e.data(), p.K, p.x.data(), p.N, p.D, vqkit::Metric::l2, p.idx.data(), nullptr,
                             nullptr, ws.data(), wb);
  };
  call();  // warm-up
  vqkit::SearchStats stats;
  if (prec == vqkit::SearchPrecision::bf16_rerank)
    vqkit::gpu::nearest_code(be, p.e.data(), p.K, p.x.data(), p.N, p.D, vqkit::Metric::l2, p.idx.data(), nullptr,
                             nullptr, ws.data(), wb, &stats);
  check(cudaDeviceSynchronize(), "sync");
  EventTimer t;
  for (auto _ : st) st.SetIterationTime(t.ms(call, be.stream) * 1e-3);
  set_counters(st, p);
  st.counters["cand"] = double(stats.reranked) / double(p.N);
  st.counters["fallback_rows"] = double(stats.fallback_rows);
}

void BM_cublas_argmin(benchmark::State& st, bool bf16) {
  Problem p(st.range(0), st.range(1), st.range(2));
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    st.SkipWithError("cublasCreate failed");
    return;
  }
  cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
  DeviceBuffer<float> dots(std::size_t(p.N * p.K)), n2(std::size_t(p.K));
  DeviceBuffer<__nv_bfloat16> xb(bf16 ? p.x.size() : 0), eb(bf16 ? p.e.size() : 0);
  if (bf16) {
    to_bf16_kernel<<<unsigned((p.x.size() + 255) / 256), 256>>>(p.x.data(), xb.data(), p.x.size());
    to_bf16_kernel<<<unsigned((p.e.size() + 255) / 256), 256>>>(p.e.data(), eb.data(), p.e.size());
  }
  const float one = 1.f, zero = 0.f;
  // Row-major dots (N x K) = x (N x D) e^T: column-major dots^T (K x N) = e x^T,
  // i.e. C = op(A) op(B) with A = e (col-major D x K, transposed), B = x (D x N).
  auto call = [&] {
    sqnorm_kernel<<<unsigned((p.K + 255) / 256), 256>>>(p.e.data(), int(p.K), int(p.D), n2.data());
    cublasStatus_t s;
    if (bf16)
      s = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(p.K), int(p.N), int(p.D), &one, eb.data(), CUDA_R_16BF,
                       int(p.D), xb.data(), CUDA_R_16BF, int(p.D), &zero, dots.data(), CUDA_R_32F, int(p.K),
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    else
      s = cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, int(p.K), int(p.N), int(p.D), &one, p.e.data(), int(p.D),
                      p.x.data(), int(p.D), &zero, dots.data(), int(p.K));
    if (s != CUBLAS_STATUS_SUCCESS) std::fprintf(stderr, "cuBLAS GEMM failed (%d)\n", int(s));
    argmin_kernel<<<unsigned(p.N), 256>>>(dots.data(), n2.data(), int(p.K), p.idx.data());
  };
  call();
  check(cudaDeviceSynchronize(), "sync");
  EventTimer t;
  for (auto _ : st) st.SetIterationTime(t.ms(call, nullptr) * 1e-3);
  set_counters(st, p);
  cublasDestroy(h);
}

void BM_ema_step(benchmark::State& st) {
  Problem p(st.range(0), st.range(1), st.range(2));
  vqkit::cuda be;
  std::vector<std::int64_t> hidx(std::size_t(p.N));
  for (std::int64_t i = 0; i < p.N; ++i) hidx[std::size_t(i)] = (i * 2654435761LL) % p.K;
  vqkit::gpu::upload(p.idx.data(), hidx.data(), hidx.size(), be.stream);
  DeviceBuffer<float> counts(std::size_t(p.K)), sums(std::size_t(p.K * p.D)), n(std::size_t(p.K)),
      m(std::size_t(p.K * p.D));
  check(cudaMemset(n.data(), 0, n.size() * 4), "memset");
  check(cudaMemset(m.data(), 0, m.size() * 4), "memset");
  const std::size_t wb = vqkit::gpu::cluster_stats_workspace_bytes(p.N, p.K, true);
  DeviceBuffer<unsigned char> ws(wb), ws2(vqkit::gpu::ema_update_workspace_bytes());
  auto call = [&] {
    vqkit::gpu::cluster_stats(be, p.x.data(), p.idx.data(), p.N, p.K, p.D, counts.data(), sums.data(), ws.data(), wb);
    vqkit::gpu::ema_update(be, n.data(), m.data(), counts.data(), sums.data(), p.K, p.D, vqkit::EmaOptions{},
                           p.e.data(), ws2.data(), ws2.size());
  };
  call();
  check(cudaDeviceSynchronize(), "sync");
  EventTimer t;
  for (auto _ : st) st.SetIterationTime(t.ms(call, be.stream) * 1e-3);
  st.counters["GBps"] = benchmark::Counter(double(p.N * p.D * 4 + 3 * p.K * p.D * 4) * 1e-9,
                                           benchmark::Counter::kIsIterationInvariantRate);
}

bool g_quick = false;

void shapes(benchmark::internal::Benchmark* b) {
  const std::int64_t all[][3] = {{16384, 1024, 1024}, {16384, 1024, 256}, {65536, 512, 64},
                                 {4096, 8192, 256},   {1024, 65536, 32},  {65536, 1024, 1024}};
  for (const auto& s : all) {
    if (g_quick && s[0] * s[1] * s[2] > (std::int64_t(1) << 32)) continue;
    b->Args({s[0], s[1], s[2]});
  }
  b->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.3);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0)
      g_quick = true;
    else
      args.push_back(argv[i]);
  }
  int n = int(args.size());
  if (vqkit::gpu::device_count() == 0) {
    // Not a success: a GPU check must not pass on a run that measured nothing.
    std::printf("no CUDA device: nothing to benchmark\n");
    return 77;
  }
  benchmark::RegisterBenchmark("search/fp32", BM_search, vqkit::SearchPrecision::fp32)->Apply(shapes);
  benchmark::RegisterBenchmark("search/bf16_rerank", BM_search, vqkit::SearchPrecision::bf16_rerank)->Apply(shapes);
  benchmark::RegisterBenchmark("cublas_argmin/bf16", BM_cublas_argmin, true)->Apply(shapes);
  benchmark::RegisterBenchmark("cublas_argmin/fp32", BM_cublas_argmin, false)->Apply(shapes);
  benchmark::RegisterBenchmark("ema_step", BM_ema_step)->Apply(shapes);
  benchmark::Initialize(&n, args.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
