// bench/bench_swin.cpp - Google Benchmark of one Swin block (float),
// forward + backward (with the input gradient), at the small CPU config's
// shapes (design.md §3):
//   swin_block/32x32/dim=128   128x128 BEV, 4x4 patches -> 32x32 tokens,
//                              window 8, 8 heads, batch 1
//   swin_block/16x16/dim=256   the stage after 2x2 patch merging, window 8,
//                              8 heads, batch 1
// Both blocks are shifted (shift 4), the more expensive case (the mask).
//
// Own flags (before Google Benchmark's): --threads=1,2. Counter GFLOP/s
// counts the GEMM flops only, per iteration (N tokens, C dim, n = 64 tokens
// per window, hidden = 4C):
//   forward   qkv 2N*C*3C + attention 4N*n*C (QK^T and PV) + proj 2N*C*C
//             + MLP 2 * 2N*C*hidden
//   backward  twice each of those (weight and input gradients; dP, dV, dQ,
//             dK), so 3x the forward in total.
// Times are wall times (UseRealTime); the machine may be shared.
#include <benchmark/benchmark.h>

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <vqkit/layers/swin_block.hpp>

#include "bench_common.hpp"

using namespace vqkit;
namespace vb = vqkit::bench;

namespace {

struct SwinShape {
  Index side, dim, heads, window;
};

double swin_block_flops(const SwinShape& s) {
  const double N = double(s.side * s.side), C = double(s.dim), n = double(s.window * s.window);
  const double hidden = 4.0 * C;
  const double forward = 2 * N * C * 3 * C + 4 * N * n * C + 2 * N * C * C + 2 * 2 * N * C * hidden;
  return 3.0 * forward;
}

void bm_swin_block(benchmark::State& st, SwinShape s, int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  Rng rng(1);
  SwinBlock<float> block(s.dim, s.heads, s.window, s.window / 2, rng, 4, cpu{threads});
  const MapShape shape{1, s.side, s.side};
  const RowMatrix<float> x = vb::gaussian(shape.rows(), s.dim, 2);
  const RowMatrix<float> g = vb::gaussian(shape.rows(), s.dim, 3);
  RowMatrix<float> y, dx;
  for (auto _ : st) {
    const auto ctx = block.forward(x, y, shape);
    block.backward(ctx, g, &dx);
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  using C = benchmark::Counter;
  st.counters["GFLOP/s"] = C(swin_block_flops(s) * 1e-9, C::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> threads = {1, 2};
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) {
      threads.clear();
      std::stringstream ss(argv[i] + 10);
      std::string t;
      while (std::getline(ss, t, ',')) threads.push_back(std::stoi(t));
    } else {
      rest.push_back(argv[i]);
    }
  }
  int rest_argc = int(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 1;
  benchmark::AddCustomContext("load_average_at_start", vb::load_average());

  const SwinShape shapes[] = {{32, 128, 8, 8}, {16, 256, 8, 8}};
  for (const auto& s : shapes)
    for (int t : threads) {
      std::ostringstream name;
      name << "swin_block/" << s.side << "x" << s.side << "/dim=" << s.dim << "/heads=" << s.heads
           << "/window=" << s.window << "/threads=" << t;
      benchmark::RegisterBenchmark(name.str().c_str(), bm_swin_block, s, t)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(0.5);
    }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
