// bench/compare_faiss.cpp - vqkit and FAISS side by side, in one process.
//
// Search: vqkit::nearest_code (the kernel), vqkit's generic path (Eigen GEMM
// tiles, the implementation before the kernel) and faiss::knn_L2sqr with
// k = 1 (cosine: faiss::knn_inner_product over normalised codes) run in
// turn, A B C A B C ..., on the same data and the same number of OpenMP
// threads; each row of the table gives the median time of each and the
// median over rounds of the per-round time ratio FAISS / vqkit. Indices are
// compared: a row where they differ is a mismatch, classified by the exact
// (double) distances of the two candidates: "near-tie" when they agree to
// within the float rounding of the search (see docs/performance.md), else a
// real error.
// k-means: vqkit::kmeans (random-row init, plain Lloyd, as FAISS) versus
// faiss::Clustering over IndexFlatL2, 10 iterations each, and the quantizer
// layer's training step that runs its k-means init over a bank of the same
// rows (batched k-means++ seeding + 10 iterations), alternating.
//
//   compare_faiss [--threads=2] [--reps=5] [--quick] [--no-random] [--no-real]
//                 [--no-kmeans] [--cosine] [--data=DIR]
#include <dlfcn.h>

#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

#include <faiss/Clustering.h>
#include <faiss/IndexFlat.h>
#include <faiss/utils/distances.h>
#include <vqkit/io/vecs.hpp>
#include <vqkit/vqkit.hpp>

#include "bench_common.hpp"

using namespace vqkit;
namespace vb = vqkit::bench;

namespace {

struct Args {
  int threads = 2;
  int reps = 5;
  bool quick = false, random = true, real = true, km = true, cosine = false;
  std::string data_dir = VQKIT_BENCH_DATA_DIR;
};

/// BLAS behind FAISS, found at run time (libblas.so.3 is an alternatives link).
std::string blas_info(int threads) {
  std::string s = "unknown BLAS (not OpenBLAS?)";
  using get_config_t = char* (*)();
  using get_parallel_t = int (*)();
  using set_threads_t = void (*)(int);
  auto get_config = reinterpret_cast<get_config_t>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  auto get_parallel = reinterpret_cast<get_parallel_t>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  auto set_threads = reinterpret_cast<set_threads_t>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (set_threads) set_threads(threads);
  if (get_config) {
    s = get_config();
    if (get_parallel) {
      const int p = get_parallel();
      s += p == 2 ? " [OpenMP build]" : p == 1 ? " [pthreads build: spins against OpenMP!]" : " [sequential build]";
    }
  }
  return s;
}

struct Mismatch {
  Index total = 0, near_tie = 0, vq_closer = 0, faiss_closer = 0;
  double max_rel_gap = 0;  ///< max |d_vq - d_faiss| / (|d| scale) over mismatches
};

/// Exact squared L2 distance (cosine: 1 - cos) in double.
double exact_dist(const RowMatrix<float>& codes, const RowMatrix<float>& x, Index i, Index k, Metric m) {
  const Eigen::RowVectorXd xi = x.row(i).cast<double>();
  const Eigen::RowVectorXd e = codes.row(k).cast<double>();
  if (m == Metric::l2) return (xi - e).squaredNorm();
  const double nx = xi.norm(), ne = e.norm();
  return 1.0 - ((nx > 0 && ne > 0) ? xi.dot(e) / (nx * ne) : 0.0);
}

/// Classifies the rows where the two searches disagree. The float search
/// computes ||e||^2 - 2 x.e with a rounding error of a few ulps of the
/// larger of ||x||^2 and ||e||^2 (the terms cancel); two candidates closer
/// than that are a near-tie that either answer may win.
Mismatch compare_indices(const RowMatrix<float>& codes, const RowMatrix<float>& x,
                         const IndexVector& a, const std::vector<faiss::Index::idx_t>& b, Metric m) {
  Mismatch r;
  for (Index i = 0; i < x.rows(); ++i) {
    if (a[i] == Index(b[i])) continue;
    ++r.total;
    const double da = exact_dist(codes, x, i, a[i], m), db = exact_dist(codes, x, i, Index(b[i]), m);
    double scale = 1.0;
    if (m == Metric::l2)
      scale = x.row(i).cast<double>().squaredNorm() +
              std::max(codes.row(a[i]).cast<double>().squaredNorm(),
                       codes.row(Index(b[i])).cast<double>().squaredNorm());
    const double rel = std::abs(da - db) / scale;
    r.max_rel_gap = std::max(r.max_rel_gap, rel);
    // float epsilon 2^-24 = 6e-8; a D-term dot product in float carries up
    // to about sqrt(D) to D ulps: 1e-5 of the scale is a generous near-tie.
    if (rel <= 1e-5) ++r.near_tie;
    if (da < db) ++r.vq_closer;
    if (db < da) ++r.faiss_closer;
  }
  return r;
}

/// One table row. peak: the CPU-time FMA peak of `threads` threads (GFLOP/s).
/// "% peak" divides the wall-time rate by it; "% peak/CPU" divides the rate
/// per CPU-second (process CPU time, all threads) by the peak of one core:
/// the efficiency while running, which other processes on the machine do
/// not change (spin-waiting at barriers counts as CPU time).
void print_row(const std::string& what, Index N, Index K, Index D, const char* method,
               const vb::Times& t, const vb::Times* faiss, double flops, double peak, int threads) {
  const double wall = vb::median(t.wall), cpu = vb::median(t.cpu);
  const double gf = flops / wall * 1e-9, gf_cpu = flops / cpu * 1e-9;
  char ratio[64] = "-";
  if (faiss)
    std::snprintf(ratio, sizeof ratio, "%.2fx | %.2fx", vb::median_ratio(faiss->wall, t.wall),
                  vb::median_ratio(faiss->cpu, t.cpu));
  else
    std::snprintf(ratio, sizeof ratio, "- | -");
  std::printf("| %-22s | %6lld x %6lld x %5lld | %-16s | %9.2f | %7.1f | %5.1f%% | %9.2f | %5.1f%% | %s |\n",
              what.c_str(), (long long)N, (long long)K, (long long)D, method, wall * 1e3, gf,
              gf / peak * 100, cpu * 1e3, gf_cpu / (peak / threads) * 100, ratio);
}

void compare_search(const Args& a, const std::string& what, const RowMatrix<float>& codes,
                    const RowMatrix<float>& x, Metric metric, double peak) {
  const Index N = x.rows(), K = codes.rows(), D = codes.cols();
  const cpu be{a.threads};
  SearchOptions opt;
  opt.metric = metric;
  IndexVector vq_idx(N), tile_idx(N);
  Vector<float> vq_dist, tile_dist;
  std::vector<faiss::Index::idx_t> f_idx(N);
  std::vector<float> f_dist(N);
  RowMatrix<float> unit;  // cosine: FAISS searches max inner product over unit codes
  auto run_vq = [&] { nearest_code<float>(be, codes, x, vq_idx, &vq_dist, opt); };
  auto run_tiles = [&] {
    detail::nearest_code_gemm_tiles<float>(be, codes, x, tile_idx, &tile_dist, opt, nullptr);
  };
  auto run_faiss = [&] {
    if (metric == Metric::l2) {
      faiss::knn_L2sqr(x.data(), codes.data(), size_t(D), size_t(N), size_t(K), 1, f_dist.data(),
                       f_idx.data());
    } else {
      unit = codes;
      for (Index k = 0; k < K; ++k) {
        const float n = unit.row(k).norm();
        if (n > 0) unit.row(k) /= n;
      }
      faiss::knn_inner_product(x.data(), unit.data(), size_t(D), size_t(N), size_t(K), 1,
                               f_dist.data(), f_idx.data());
    }
  };
  const auto t = vb::alternate({run_vq, run_tiles, run_faiss}, a.reps);
  const std::string label = what + (metric == Metric::l2 ? " l2" : " cos");
  const double fl = vb::search_flops(N, K, D);
  print_row(label, N, K, D, "vqkit kernel", t[0], &t[2], fl, peak, a.threads);
  print_row(label, N, K, D, "vqkit gemm tiles", t[1], &t[2], fl, peak, a.threads);
  print_row(label, N, K, D, "faiss", t[2], nullptr, fl, peak, a.threads);
  const auto mm = compare_indices(codes, x, vq_idx, f_idx, metric);
  const Index tiles_vs_kernel = (vq_idx.array() != tile_idx.array()).count();
  // Thread-count independence: the same search on one thread, bit for bit.
  IndexVector one_idx(N);
  Vector<float> one_dist;
  nearest_code<float>(cpu{1}, codes, x, one_idx, &one_dist, opt);
  const bool same = one_idx == vq_idx && one_dist == vq_dist;
  std::printf("|   %s: mismatches vs faiss %lld/%lld (near-ties %lld, vqkit closer %lld, faiss closer %lld, "
              "max gap %.1e of scale); kernel vs gemm tiles %lld; 1 vs %d threads %s |\n",
              label.c_str(), (long long)mm.total, (long long)N, (long long)mm.near_tie,
              (long long)mm.vq_closer, (long long)mm.faiss_closer, mm.max_rel_gap,
              (long long)tiles_vs_kernel, a.threads, same ? "bit-identical" : "DIFFER");
  std::fflush(stdout);
}

void compare_kmeans(const Args& a, Index n, Index k, Index D, double peak) {
  const RowMatrix<float> x = vb::gaussian(n, D, 21);
  const int iters = 10;
  KMeansOptions ko;
  ko.k = k;
  ko.iterations = iters;
  ko.plus_plus = false;
  double vq_inertia = 0, f_obj = 0;
  auto run_vq = [&] {
    Rng rng(5);
    auto r = kmeans<float>(cpu{a.threads}, x, ko, rng);
    vq_inertia = r.inertia;
  };
  auto run_faiss = [&] {
    faiss::ClusteringParameters cp;
    cp.niter = iters;
    cp.seed = 5;
    cp.max_points_per_centroid = 1 << 30;  // no subsampling: the same n rows as vqkit
    cp.min_points_per_centroid = 1;
    faiss::Clustering c(int(D), size_t(k), cp);
    faiss::IndexFlatL2 index(D);
    c.train(n, x.data(), index);
    f_obj = c.iteration_stats.back().obj;
  };
  // The quantizer layer's k-means (re)init as a user meets it: one training
  // step whose batch fills a bank of n rows, so the k-means (batched
  // k-means++ seeding, 10 Lloyd iterations, min_cluster_fraction 0.5) runs
  // over those n rows; the step also searches and EMA-updates the n rows.
  // This is the cost of the layer's refine step over a bank of n rows (and of
  // its first-step init when init_min_rows = n).
  VectorQuantizerConfig vc;
  vc.codebook_size = k;
  vc.dim = D;
  vc.memory_bank_size = n;
  vc.init_min_rows = n;
  auto run_layer = [&] {
    VectorQuantizer<float> vq(vc, cpu{a.threads});
    RowMatrix<float> q;
    const auto ctx = vq.forward(x, q);
    if (!ctx.data_initialized) std::fprintf(stderr, "compare_faiss: the layer did not initialise\n");
  };
  const auto t = vb::alternate({run_vq, run_faiss, run_layer}, std::max(1, a.reps / 2));
  // vqkit assigns iterations + 1 times (the last gives the final counts and
  // inertia), FAISS iterations times; GFLOP/s count each one's own searches.
  const double fl = vb::search_flops(n, k, D);
  print_row("kmeans10 (11 searches)", n, k, D, "vqkit", t[0], &t[1], fl * (iters + 1), peak, a.threads);
  print_row("kmeans10 (10 searches)", n, k, D, "faiss::Clustering", t[1], nullptr, fl * iters, peak,
            a.threads);
  print_row("layer step: k-means++ init + 10 it. over the bank", n, k, D, "VectorQuantizer", t[2], &t[1],
            fl * (iters + 3), peak, a.threads);
  std::printf("|   layer step / vqkit kmeans10 (median of per-round ratios): %.2fx |\n",
              vb::median_ratio(t[2].wall, t[0].wall));
  std::printf("|   kmeans %lld x %lld x %lld: final inertia vqkit %.6g, faiss objective %.6g |\n",
              (long long)n, (long long)k, (long long)D, vq_inertia, f_obj);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s.rfind("--threads=", 0) == 0) a.threads = std::stoi(s.substr(10));
    else if (s.rfind("--reps=", 0) == 0) a.reps = std::stoi(s.substr(7));
    else if (s.rfind("--data=", 0) == 0) a.data_dir = s.substr(7);
    else if (s == "--quick") a.quick = true;
    else if (s == "--no-random") a.random = false;
    else if (s == "--no-real") a.real = false;
    else if (s == "--no-kmeans") a.km = false;
    else if (s == "--cosine") a.cosine = true;
    else {
      std::fprintf(stderr, "usage: %s [--threads=T] [--reps=R] [--quick] [--no-random] [--no-real] "
                           "[--no-kmeans] [--cosine] [--data=DIR]\n", argv[0]);
      return 2;
    }
  }
  omp_set_num_threads(a.threads);  // FAISS's and OpenBLAS's OpenMP regions
  const vb::Peak pk = vb::peak(a.threads);
  const double peak = pk.cpu;
  std::printf("threads %d, reps %d, FMA peak (measured, %d thread%s): %.1f GFLOP/s by CPU time, "
              "best wall-time run %.1f GFLOP/s; load %s\n",
              a.threads, a.reps, a.threads, a.threads > 1 ? "s" : "", pk.cpu, pk.wall,
              vb::load_average().c_str());
  std::printf("BLAS: %s\n\n", blas_info(a.threads).c_str());
  std::printf("| data | N x K x D | method | ms (median wall) | GFLOP/s | %% peak | CPU ms (median) | "
              "%% peak/CPU | faiss/this wall | faiss/this CPU |\n");
  std::printf("|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n");

  if (a.random) {
    std::vector<vb::Shape> shapes(vb::shapes.begin(), vb::shapes.end());
    if (a.quick) shapes = {shapes[2], shapes[4]};
    for (const auto& s : shapes) {
      const auto codes = vb::gaussian(s.K, s.D, 1), x = vb::gaussian(s.N, s.D, 2);
      compare_search(a, "random", codes, x, Metric::l2, peak);
      if (a.cosine) compare_search(a, "random", codes, x, Metric::cosine, peak);
    }
  }
  if (a.real) {
    try {
      const auto base = io::read_fvecs(a.data_dir + "/vectors/glove100/glove100_base_10k.fvecs");
      const auto query = io::read_fvecs(a.data_dir + "/vectors/glove100/glove100_query_1k.fvecs");
      compare_search(a, "glove q1k/base10k", base, query, Metric::l2, peak);
      compare_search(a, "glove base10k/q1k", query, base, Metric::l2, peak);
      if (a.cosine) compare_search(a, "glove q1k/base10k", base, query, Metric::cosine, peak);
      const auto mnist = io::read_bvecs(a.data_dir + "/vectors/mnist10k/mnist10k_784d.bvecs");
      const RowMatrix<float> mcodes = mnist.topRows(1024);
      compare_search(a, "mnist 10k/first 1024", mcodes, mnist, Metric::l2, peak);
    } catch (const std::exception& e) {
      std::printf("(real data skipped: %s)\n", e.what());
    }
  }
  if (a.km) {
    std::printf("\n");
    compare_kmeans(a, 20480, 1024, 1024, peak);
    if (!a.quick) {
      compare_kmeans(a, 16384, 1024, 256, peak);
      compare_kmeans(a, 65536, 512, 64, peak);
    }
  }
  std::printf("\nload at end: %s\n", vb::load_average().c_str());
  return 0;
}
