// bench/bench_vqkit.cpp - Google Benchmark programs for vqkit's hot paths.
//
//   fma_peak                 the FMA throughput probe (the "% of peak" divisor)
//   search/{l2,cosine}       nearest_code (the AVX-512 kernel where built with it)
//   search_bf16/{l2,cosine}  nearest_code with SearchMode{Precision::bf16_rerank}
//                            (bf16 dot products + exact fp32 re-rank; the same
//                            results as search/, see nearest_code_bf16.hpp)
//   search_gemm_tiles/l2     the generic path (Eigen GEMM tiles + argmin), for reference
//   ema_update               cluster_stats + ema_update
//   metrics                  cluster_counts + batch_metrics
//   kmeans                   10 Lloyd iterations (random-row init, as FAISS)
//   vq_step                  VectorQuantizer forward (train, EMA) + backward
// for the shapes (N, K, D) of bench_common.hpp and 1 and 2 threads.
//
// Own flags (before Google Benchmark's): --threads=1,2  --quick (keeps the
// two smallest shapes)  --bf16-vs-fp32[=reps] (instead of the benchmarks: the
// fp32 and the bf16_rerank search alternating, A B A B ..., in one process on
// the three shapes of docs/performance.md, at the first --threads value
// (default 2); prints median times, the median per-round ratio, and checks
// that indices and distances are identical). Counters: GFLOP/s (2 N K D flops per search, wall
// time) and pct_peak (GFLOP/s over the FMA peak of the same thread count,
// measured by CPU time at start, see bench_common.hpp; VQKIT_PEAK_GFLOPS_<t>
// fixes it instead), GB/s for the memory-bound EMA step. Times are wall
// times (UseRealTime): on a shared machine compare runs from one process,
// or use compare_faiss, which alternates and reports CPU time as well.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <tuple>

#include <vqkit/vqkit.hpp>

#include "bench_common.hpp"

using namespace vqkit;
namespace vb = vqkit::bench;

namespace {

/// Random data, generated once per (rows, cols, seed) and kept for the run.
const RowMatrix<float>& data(Index rows, Index cols, std::uint64_t seed) {
  static std::map<std::tuple<Index, Index, std::uint64_t>, std::unique_ptr<RowMatrix<float>>> cache;
  auto& slot = cache[{rows, cols, seed}];
  if (!slot) slot = std::make_unique<RowMatrix<float>>(vb::gaussian(rows, cols, seed));
  return *slot;
}

std::string shape_name(const char* what, Index N, Index K, Index D, int threads) {
  std::ostringstream s;
  s << what << "/N=" << N << "/K=" << K << "/D=" << D << "/threads=" << threads;
  return s.str();
}

/// GFLOP/s and pct_peak counters for `flops` per iteration.
void flop_counters(benchmark::State& st, double flops, int threads) {
  using C = benchmark::Counter;
  st.counters["GFLOP/s"] = C(flops * 1e-9, C::kIsIterationInvariantRate);
  st.counters["pct_peak"] = C(flops * 1e-9 / vb::peak_gflops(threads) * 100.0,
                              C::kIsIterationInvariantRate);
}

void bm_fma_peak(benchmark::State& st, int threads) {
  const long iters = 1 << 20;
  for (auto _ : st) {
#pragma omp parallel num_threads(threads)
    {
      const float s = vb::fma_chains(iters, 1.0f);
      benchmark::DoNotOptimize(s);
    }
  }
  using C = benchmark::Counter;
  st.counters["GFLOP/s"] = C(vb::fma_chain_flops(iters) * threads * 1e-9, C::kIsIterationInvariantRate);
}

void bm_search(benchmark::State& st, Metric metric, bool gemm_tiles, vb::Shape s, int threads,
               Precision precision) {
  const auto& codes = data(s.K, s.D, 1);
  const auto& x = data(s.N, s.D, 2);
  IndexVector idx(s.N);
  Vector<float> dist;
  SearchOptions opt;
  opt.metric = metric;
  SearchStats stats;
  const SearchMode mode{precision, &stats};
  const cpu be{threads};
  for (auto _ : st) {
    if (gemm_tiles)
      detail::nearest_code_gemm_tiles<float>(be, codes, x, idx, &dist, opt, nullptr);
    else
      nearest_code<float>(be, codes, x, idx, &dist, opt, nullptr, mode);
    benchmark::DoNotOptimize(idx.data());
  }
  flop_counters(st, vb::search_flops(s.N, s.K, s.D), threads);
  if (precision == Precision::bf16_rerank) {
    st.counters["bf16"] = stats.precision == Precision::bf16_rerank ? 1 : 0;  // 0: fp32 fallback
    st.counters["reranked_per_row"] = double(stats.reranked) / double(s.N);
  }
}

/// --bf16-vs-fp32: fp32 and bf16_rerank alternating on the same data.
int bf16_vs_fp32(int reps, int threads) {
  std::printf("bf16_rerank vs fp32 search, alternating (fp32, bf16, fp32, bf16, ...), %d threads, "
              "1 warm-up + %d rounds each; bf16 supported: %s; load average %s\n",
              threads, reps, bf16_search_supported() ? "yes" : "NO (fp32 fallback)",
              vb::load_average().c_str());
  std::printf("%-20s %-6s %10s %10s %10s %12s %10s %s\n", "N x K x D", "metric", "fp32 ms", "bf16 ms",
              "fp32/bf16", "fp32 GFLOP/s", "rerank/row", "identical");
  const cpu be{threads};
  for (const vb::Shape s : {vb::Shape{16384, 1024, 1024}, vb::Shape{16384, 1024, 256}, vb::Shape{4096, 8192, 256}})
    for (Metric metric : {Metric::l2, Metric::cosine}) {
      const auto& codes = data(s.K, s.D, 1);
      const auto& x = data(s.N, s.D, 2);
      SearchOptions opt;
      opt.metric = metric;
      IndexVector i32(s.N), i16(s.N);
      Vector<float> d32, d16;
      SearchStats st;
      const auto t = vb::alternate(
          {[&] { nearest_code<float>(be, codes, x, i32, &d32, opt); },
           [&] { nearest_code<float>(be, codes, x, i16, &d16, opt, nullptr, SearchMode{Precision::bf16_rerank, &st}); }},
          reps);
      const bool same = i32 == i16 && d32 == d16;
      const double f32 = vb::median(t[0].wall), f16 = vb::median(t[1].wall);
      std::printf("%5ld x %5ld x %4ld  %-6s %10.2f %10.2f %9.3fx %12.1f %10.2f %s\n", long(s.N), long(s.K),
                  long(s.D), to_string(metric), f32 * 1e3, f16 * 1e3, vb::median_ratio(t[0].wall, t[1].wall),
                  vb::search_flops(s.N, s.K, s.D) / f32 * 1e-9, double(st.reranked) / double(s.N),
                  same ? "yes" : "NO");
      std::fflush(stdout);
      if (!same) return 1;
    }
  std::printf("load average at the end %s\n", vb::load_average().c_str());
  return 0;
}

void bm_ema_update(benchmark::State& st, vb::Shape s, int threads) {
  const auto& x = data(s.N, s.D, 2);
  const cpu be{threads};
  RowMatrix<float> codes = data(s.K, s.D, 1);
  IndexVector idx(s.N);
  nearest_code<float>(be, codes, x, idx);
  EmaState<float> ema;
  ema_reset<float>(ema, codes, Vector<float>::Ones(s.K));
  EmaOptions eo;
  for (auto _ : st) {
    auto stats = cluster_stats<float>(be, x, idx, s.K);
    ema_update<float>(be, ema, stats, eo, codes);
    benchmark::DoNotOptimize(codes.data());
  }
  // Read x; write + read the sums; read + write M; write the codes.
  const double bytes = 4.0 * (double(s.N) * s.D + 5.0 * double(s.K) * s.D);
  using C = benchmark::Counter;
  st.counters["GB/s"] = C(bytes * 1e-9, C::kIsIterationInvariantRate);
}

void bm_metrics(benchmark::State& st, vb::Shape s) {
  IndexVector idx(s.N);
  Rng r(3);
  for (Index i = 0; i < s.N; ++i) idx[i] = Index(r.below(std::uint64_t(s.K)));
  for (auto _ : st) {
    Vector<float> counts = cluster_counts<float>(cpu{1}, idx, s.K);
    auto m = batch_metrics(counts);
    benchmark::DoNotOptimize(m.perplexity);
  }
  st.counters["rows/s"] = benchmark::Counter(double(s.N), benchmark::Counter::kIsIterationInvariantRate);
}

void bm_kmeans(benchmark::State& st, vb::Shape s, int threads, int iterations) {
  const auto& x = data(s.N, s.D, 2);
  KMeansOptions ko;
  ko.k = s.K;
  ko.iterations = iterations;
  ko.plus_plus = false;  // k random rows, as FAISS: the Lloyd iterations alone
  const cpu be{threads};
  for (auto _ : st) {
    Rng rng(7);
    auto r = kmeans<float>(be, x, ko, rng);
    benchmark::DoNotOptimize(r.centroids.data());
  }
  // iterations + 1 assignments (the last one measures the final inertia).
  flop_counters(st, (iterations + 1) * vb::search_flops(s.N, s.K, s.D), threads);
}

void bm_vq_step(benchmark::State& st, vb::Shape s, int threads) {
  const auto& x = data(s.N, s.D, 2);
  const auto& dq = data(s.N, s.D, 4);
  VectorQuantizerConfig cfg;
  cfg.codebook_size = s.K;
  cfg.dim = s.D;
  cfg.init = InitMethod::normalized;       // the steady-state step: no k-means inside
  cfg.dead.policy = DeadCodePolicy::none;  // nor a re-init
  cfg.memory_bank_size = std::max<Index>(s.N, s.K);
  VectorQuantizer<float> vq(cfg, cpu{threads});
  RowMatrix<float> q, dx;
  for (auto _ : st) {
    auto ctx = vq.forward(x, q);
    vq.backward(ctx, dq, &dx);
    benchmark::DoNotOptimize(dx.data());
  }
  flop_counters(st, vb::search_flops(s.N, s.K, s.D), threads);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads = {1, 2};
  bool quick = false;
  int ratio_reps = 0;
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      threads.clear();
      std::stringstream ss(argv[i] + 10);
      std::string t;
      while (std::getline(ss, t, ',')) threads.push_back(std::stoi(t));
    } else if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strncmp(argv[i], "--bf16-vs-fp32", 14) == 0) {
      ratio_reps = argv[i][14] == '=' ? std::atoi(argv[i] + 15) : 7;
    } else {
      rest.push_back(argv[i]);
    }
  }
  if (ratio_reps > 0) {
    bool threads_given = false;
    for (int i = 0; i < argc; ++i) threads_given |= std::strncmp(argv[i], "--threads=", 10) == 0;
    return bf16_vs_fp32(ratio_reps, threads_given ? threads.front() : 2);
  }
  int rest_argc = int(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;

  for (int t : threads) {
    const vb::Peak p = vb::peak(t);
    benchmark::AddCustomContext("fma_peak_gflops_" + std::to_string(t) + "t",
                                std::to_string(p.cpu) + " (by CPU time: the pct_peak divisor; best wall-time run " +
                                    std::to_string(p.wall) + ")");
    benchmark::RegisterBenchmark(("fma_peak/threads=" + std::to_string(t)).c_str(), bm_fma_peak, t)
        ->UseRealTime()->Unit(benchmark::kMillisecond);
  }
  benchmark::AddCustomContext("load_average_at_start", vb::load_average());

  std::vector<vb::Shape> shapes(vb::shapes.begin(), vb::shapes.end());
  if (quick) shapes = {shapes[2], shapes[4]};
  const auto reg = [](const std::string& name, auto&&... args) {
    return benchmark::RegisterBenchmark(name.c_str(), args...)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.2);
  };
  for (const auto& s : shapes)
    for (int t : threads) {
      reg(shape_name("search/l2", s.N, s.K, s.D, t), bm_search, Metric::l2, false, s, t, Precision::fp32);
      reg(shape_name("search/cosine", s.N, s.K, s.D, t), bm_search, Metric::cosine, false, s, t,
          Precision::fp32);
      reg(shape_name("search_bf16/l2", s.N, s.K, s.D, t), bm_search, Metric::l2, false, s, t,
          Precision::bf16_rerank);
      reg(shape_name("search_bf16/cosine", s.N, s.K, s.D, t), bm_search, Metric::cosine, false, s, t,
          Precision::bf16_rerank);
      reg(shape_name("search_gemm_tiles/l2", s.N, s.K, s.D, t), bm_search, Metric::l2, true, s, t,
          Precision::fp32);
    }
  for (const auto& s : shapes)
    for (int t : threads) reg(shape_name("ema_update", s.N, s.K, s.D, t), bm_ema_update, s, t);
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    bool seen = false;  // one run per (N, K): D does not matter here
    for (std::size_t j = 0; j < i; ++j) seen |= shapes[j].N == shapes[i].N && shapes[j].K == shapes[i].K;
    if (!seen) reg(shape_name("metrics", shapes[i].N, shapes[i].K, 0, 1), bm_metrics, shapes[i]);
  }
  std::vector<vb::Shape> km_shapes;
  for (const auto& s : shapes)
    if (s.N >= s.K) km_shapes.push_back(s);  // k-means needs n >= k
  if (!quick) km_shapes.push_back({20480, 1024, 1024});  // the FAISS comparison's shape
  for (const auto& s : km_shapes)
    for (int t : threads) reg(shape_name("kmeans10", s.N, s.K, s.D, t), bm_kmeans, s, t, 10);
  for (const auto& s : shapes)
    for (int t : threads) reg(shape_name("vq_step", s.N, s.K, s.D, t), bm_vq_step, s, t);

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
