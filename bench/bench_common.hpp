// bench/bench_common.hpp - helpers shared by vqkit's benchmark programs:
// random data, the FMA peak probe, flop counts and an alternating-run timer.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include <vqkit/core/random.hpp>
#include <vqkit/core/types.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace vqkit::bench {

/// The benchmark shapes (N rows, K codes, D dimensions) of the performance issue.
struct Shape {
  Index N, K, D;
};
inline constexpr std::array<Shape, 5> shapes = {{{16384, 1024, 1024},
                                                 {16384, 1024, 256},
                                                 {65536, 512, 64},
                                                 {4096, 8192, 256},
                                                 {1024, 65536, 32}}};

/// N x D standard normal values (vqkit's own Rng: the same data on every machine).
inline RowMatrix<float> gaussian(Index rows, Index cols, std::uint64_t seed) {
  Rng r(seed);
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(r.normal());
  return m;
}

/// Flops of one nearest-code search: the N x K dot products of length D.
inline double search_flops(Index N, Index K, Index D) { return 2.0 * double(N) * double(K) * double(D); }

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// CPU seconds used by this thread / by the whole process (all threads).
inline double thread_cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}
inline double process_cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

// ---- the FMA peak probe ------------------------------------------------------
// kPeakAcc independent chains of 16-lane FMAs (acc = acc * m + c), each one
// vfmadd on a zmm register. 16 chains cover the FMA latency (4 cycles) times
// the FMA pipes (2) with room to spare, so the loop is bound by FMA
// throughput alone. Without AVX-512 the same loop runs on GCC vector
// extensions (whatever the target gives; the "peak" is then that target's).
inline constexpr int kPeakAcc = 16;

#if defined(__AVX512F__)
__attribute__((noinline)) inline float fma_chains(long iters, float seed) {
  __m512 acc[kPeakAcc];
  for (int j = 0; j < kPeakAcc; ++j) acc[j] = _mm512_set1_ps(seed + 0.001f * float(j));
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kPeakAcc; ++j) acc[j] = _mm512_fmadd_ps(acc[j], m, c);
  }
  alignas(64) float lanes[16];
  __m512 s = acc[0];
  for (int j = 1; j < kPeakAcc; ++j) s = _mm512_add_ps(s, acc[j]);
  _mm512_store_ps(lanes, s);
  float t = 0;
  for (float v : lanes) t += v;
  return t;
}
#else
typedef float v16f __attribute__((vector_size(64)));
__attribute__((noinline)) inline float fma_chains(long iters, float seed) {
  v16f acc[kPeakAcc];
  for (int j = 0; j < kPeakAcc; ++j)
    for (int l = 0; l < 16; ++l) acc[j][l] = seed + 0.001f * float(j);
  v16f m, c;
  for (int l = 0; l < 16; ++l) m[l] = 0.999999f, c[l] = 1e-6f;
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kPeakAcc; ++j) acc[j] = acc[j] * m + c;
  }
  float s = 0;
  for (int j = 0; j < kPeakAcc; ++j)
    for (int l = 0; l < 16; ++l) s += acc[j][l];
  return s;
}
#endif

/// Flops of fma_chains(iters): 2 per lane per FMA.
inline double fma_chain_flops(long iters) { return double(iters) * kPeakAcc * 16 * 2; }

inline volatile float g_peak_sink = 0;

/// Measured FMA peak in GFLOP/s of `threads` threads running the chains at
/// once, two ways, each the best of `reps` short runs:
///  - wall: flops / wall time of the run;
///  - cpu:  the sum over threads of flops / that thread's CPU time, i.e. what
///    the cores deliver while they run this process's threads. On a shared
///    machine other processes take turns on the cores; this figure does not
///    see them, so it is the stable divisor for "% of peak".
struct Peak {
  double wall = 0, cpu = 0;
};

inline Peak measure_fma_peak(int threads, int reps = 40, double seconds = 0.01) {
  long iters = 1 << 12;
  for (;;) {  // calibrate one thread to about `seconds`
    const double t0 = now_s();
    g_peak_sink = fma_chains(iters, 1.0f);
    if (now_s() - t0 > seconds / 4 || iters > (1L << 34)) break;
    iters *= 2;
  }
  iters *= 4;
  Peak best;
  for (int r = 0; r < reps; ++r) {
    double cpu_rate = 0;
    const double t0 = now_s();
#pragma omp parallel num_threads(threads) reduction(+ : cpu_rate)
    {
      const double c0 = thread_cpu_s();
      const float s = fma_chains(iters, 1.0f);
      cpu_rate += fma_chain_flops(iters) / (thread_cpu_s() - c0) * 1e-9;
#pragma omp critical
      g_peak_sink = g_peak_sink + s;
    }
    const double t = now_s() - t0;
    best.wall = std::max(best.wall, fma_chain_flops(iters) * threads / t * 1e-9);
    best.cpu = std::max(best.cpu, cpu_rate);
  }
  return best;
}

/// The peak to divide by: VQKIT_PEAK_GFLOPS_<threads> if set (e.g.
/// VQKIT_PEAK_GFLOPS_2=420), else the CPU-time peak measured once per thread
/// count (see measure_fma_peak).
inline Peak peak(int threads) {
  static Peak cache[65] = {};
  if (threads < 1 || threads > 64) return {};
  if (cache[threads].cpu > 0) return cache[threads];
  cache[threads] = measure_fma_peak(threads);
  const std::string var = "VQKIT_PEAK_GFLOPS_" + std::to_string(threads);
  if (const char* v = std::getenv(var.c_str()))
    if (std::atof(v) > 0) cache[threads].cpu = std::atof(v);
  return cache[threads];
}
inline double peak_gflops(int threads) { return peak(threads).cpu; }

// ---- alternating runs ----------------------------------------------------------

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Wall and process CPU seconds of each run of one function.
struct Times {
  std::vector<double> wall, cpu;
};

/// Runs every function once for warm-up, then `reps` rounds of each in turn
/// (A B C A B C ...); returns the times of every run, per function.
inline std::vector<Times> alternate(const std::vector<std::function<void()>>& fns, int reps) {
  std::vector<Times> t(fns.size());
  for (auto& f : fns) f();
  for (int r = 0; r < reps; ++r)
    for (std::size_t j = 0; j < fns.size(); ++j) {
      const double c0 = process_cpu_s(), t0 = now_s();
      fns[j]();
      t[j].wall.push_back(now_s() - t0);
      t[j].cpu.push_back(process_cpu_s() - c0);
    }
  return t;
}

/// Median over rounds of the per-round ratio a[r] / b[r].
inline double median_ratio(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r;
  for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) r.push_back(a[i] / b[i]);
  return median(r);
}

/// The first line of /proc/loadavg, for the record.
inline std::string load_average() {
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  if (!f) return "?";
  char buf[128] = {};
  const bool ok = std::fgets(buf, sizeof buf, f) != nullptr;
  std::fclose(f);
  std::string s = ok ? buf : "?";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

}  // namespace vqkit::bench
