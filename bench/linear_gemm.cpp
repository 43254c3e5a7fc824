// bench/linear_gemm.cpp - the six GEMMs of a QuantizerBlock step (the two
// Linear layers' forward, weight gradient and input gradient at dim 256 <->
// codebook dim 1024), each timed with vqkit::gemm, Eigen's product, and,
// built with -DWITH_CBLAS, OpenBLAS's cblas_sgemm; medians of 7 calls after
// one warm-up, the three alternating per shape, one thread, and the ratios.
// Built by hand with the consumer's own flags, as bench/search_plain.cpp:
//   g++ -O3 -std=c++20 -fopenmp -Iinclude -I/usr/include/eigen3 bench/linear_gemm.cpp -o gemm_plain
//   g++ -O3 -march=native -std=c++20 -fopenmp -DWITH_CBLAS -Iinclude -I/usr/include/eigen3 \
//       bench/linear_gemm.cpp -o gemm_native -l:libopenblas.so.0
//   OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ./gemm_native 4096; ./gemm_plain 4096
// (argument: tokens per step N; default 4096).
#include <vqkit/core/gemm.hpp>
#include <vqkit/core/random.hpp>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>
#ifdef WITH_CBLAS
#include <cblas.h>
#endif

using namespace vqkit;
using M = RowMatrix<float>;

namespace {

M gaussian(Index r, Index c, Rng& rng) {
  M m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(rng.normal());
  return m;
}

double median_ms(const std::function<void()>& f) {
  f();
  std::vector<double> t;
  for (int i = 0; i < 7; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[3];
}

}  // namespace

int main(int argc, char** argv) {
  const Index N = argc > 1 ? std::atol(argv[1]) : 4096;
  Eigen::setNbThreads(1);
  const cpu be{1};
  Rng rng(1);
  struct Row {
    const char* name;
    double vq, eigen, blas;
  };
  std::vector<Row> rows;
  // One Linear(in -> out): x (N, in), W (out, in), dy (N, out).
  for (const auto [in, out] : {std::pair<Index, Index>{256, 1024}, {1024, 256}}) {
    const M x = gaussian(N, in, rng), w = gaussian(out, in, rng), dy = gaussian(N, out, rng);
    M y(N, out), dw = M::Zero(out, in), dx(N, in);
    const bool first = in == 256;
    rows.push_back({first ? "proj_in  y = x W^T" : "proj_out y = x W^T",
                    median_ms([&] { gemm<float>(be, Op::none, x, Op::transpose, w, y, false); }),
                    median_ms([&] { y.noalias() = x * w.transpose(); }), 0.0});
#ifdef WITH_CBLAS
    rows.back().blas = median_ms([&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(N), int(out), int(in), 1.f,
                  x.data(), int(in), w.data(), int(in), 0.f, y.data(), int(out));
    });
#endif
    rows.push_back({first ? "proj_in  dW += dy^T x" : "proj_out dW += dy^T x",
                    median_ms([&] { gemm<float>(be, Op::transpose, dy, Op::none, x, dw, true); }),
                    median_ms([&] { dw.noalias() += dy.transpose() * x; }), 0.0});
#ifdef WITH_CBLAS
    rows.back().blas = median_ms([&] {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(out), int(in), int(N), 1.f,
                  dy.data(), int(out), x.data(), int(in), 1.f, dw.data(), int(in));
    });
#endif
    rows.push_back({first ? "proj_in  dx = dy W" : "proj_out dx = dy W",
                    median_ms([&] { gemm<float>(be, Op::none, dy, Op::none, w, dx, false); }),
                    median_ms([&] { dx.noalias() = dy * w; }), 0.0});
#ifdef WITH_CBLAS
    rows.back().blas = median_ms([&] {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(N), int(in), int(out), 1.f,
                  dy.data(), int(out), w.data(), int(in), 0.f, dx.data(), int(in));
    });
#endif
  }
  const double gflop = 2.0 * double(N) * 256 * 1024 / 1e9;
  std::printf("N = %ld tokens, 1 thread, %.2f GFLOP per GEMM, vqkit kernel: %s\n", long(N), gflop,
              detail::cpu_has_avx512f() ? "avx512" : "generic (Eigen)");
  std::printf("%-24s %10s %10s %10s %12s %12s\n", "GEMM", "vqkit ms", "Eigen ms", "BLAS ms",
              "Eigen/vqkit", "BLAS/vqkit");
  double tv = 0, te = 0, tb = 0;
  for (const Row& r : rows) {
    std::printf("%-24s %10.2f %10.2f %10.2f %12.2f %12.2f\n", r.name, r.vq, r.eigen, r.blas,
                r.eigen / r.vq, r.blas / r.vq);
    tv += r.vq, te += r.eigen, tb += r.blas;
  }
  std::printf("%-24s %10.2f %10.2f %10.2f %12.2f %12.2f\n", "all six", tv, te, tb, te / tv, tb / tv);
  std::printf("GFLOP/s: vqkit %.0f, Eigen %.0f, BLAS %.0f\n", 6 * gflop / tv * 1e3,
              6 * gflop / te * 1e3, tb > 0 ? 6 * gflop / tb * 1e3 : 0.0);
}
