// bench/bench_gelu.cpp - Google Benchmark of Gelu<float> forward and backward
// on one thread, with each kernel (layers/gelu.hpp):
//   gelu/{forward,backward}/n=.../kernel=avx512   the AVX-512 code, chosen
//                                                  at run time (any flags)
//   gelu/{forward,backward}/n=.../kernel=generic  Eigen's vector code, as on
//                                                  a CPU without AVX-512F:
//                                                  SSE2 in a build without
//                                                  -march, AVX-512 with
//                                                  -march=native
// n = 2^22 (a large batch) and 2048 x 512 (the pre-VQ GELU's input at the
// small tokenizer's shape is 512 x 256; the Swin MLPs' are 1024 x 512 and
// 256 x 1024 per block). Counter "values/s". A consumer's build (no -march):
//   cmake -S . -B build-plain -DCMAKE_BUILD_TYPE=Release -DVQKIT_NATIVE=OFF
//         -DVQKIT_BUILD_BENCHMARKS=ON -DVQKIT_BUILD_TESTS=OFF -DVQKIT_CUDA=OFF
//   cmake --build build-plain --target vqkit_bench_gelu
//   build-plain/bench/vqkit_bench_gelu
#include <benchmark/benchmark.h>

#include <string>

#include <vqkit/layers/gelu.hpp>

#include "bench_common.hpp"

using namespace vqkit;
namespace vb = vqkit::bench;

namespace {

void bm_gelu(benchmark::State& st, Index rows, Index cols, bool backward, bool generic) {
  if (!generic && !detail::cpu_has_avx512f()) {
    st.SkipWithError("no AVX-512F on this CPU");
    return;
  }
  detail::avx512_disabled = generic;
  Gelu<float> gelu(cpu{1});
  const RowMatrix<float> x = vb::gaussian(rows, cols, 1);
  const RowMatrix<float> g = vb::gaussian(rows, cols, 2);
  RowMatrix<float> y, dx;
  auto ctx = gelu.forward(x, y);
  for (auto _ : st) {
    if (backward) gelu.backward(ctx, g, &dx);
    else gelu.forward(x, y, ctx);
    benchmark::ClobberMemory();
  }
  detail::avx512_disabled = false;
  st.counters["values/s"] =
      benchmark::Counter(double(rows * cols), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("load_average_at_start", vb::load_average());
  const Index shapes[][2] = {{1, Index(1) << 22}, {2048, 512}};
  for (const auto& s : shapes)
    for (const bool backward : {false, true})
      for (const bool generic : {false, true}) {
        const std::string name = std::string("gelu/") + (backward ? "backward" : "forward") +
                                 "/n=" + std::to_string(s[0] * s[1]) +
                                 "/kernel=" + (generic ? "generic" : "avx512");
        benchmark::RegisterBenchmark(name.c_str(), bm_gelu, s[0], s[1], backward, generic)
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(0.3);
      }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
