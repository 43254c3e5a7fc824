// bench/compare_faiss_codes.cpp - multi-code quantizers against FAISS, in one
// process, on GloVe 10k (100 dims): vqkit::ResidualVQ versus
// faiss::ResidualQuantizer (levels x 8 bits), and vqkit::GroupedVQ with
// separate codebooks versus faiss::ProductQuantizer (heads x 8 bits).
//
// Training: FAISS's own train(); vqkit's layers take the whole set as one
// batch per step (each level's / head's memory bank holds all rows, so its
// first step is a k-means over them: 25 iterations, FAISS's default), then
// `--steps` - 1 more EMA steps. FAISS's residual quantizer runs with beam 1
// (greedy, as vqkit) and with its default beam (5).
// Printed: reconstruction MSE (mean squared error per vector) of each and the
// ratio; encode time (median of alternating runs A B A B ...) and the ratio.
//
//   compare_faiss_codes [--threads=2] [--reps=5] [--levels=8] [--heads=10]
//                       [--steps=3] [--data=DIR]
#include <cstring>
#include <iostream>
#include <string>

#include <faiss/impl/ProductQuantizer.h>
#include <faiss/impl/ResidualQuantizer.h>
#include <vqkit/io/vecs.hpp>
#include <vqkit/quantizer.hpp>

#include "bench_common.hpp"

using namespace vqkit;
namespace vb = vqkit::bench;

namespace {

struct Args {
  int threads = 2, reps = 5, steps = 3;
  Index levels = 8, heads = 10;
  std::string data_dir = VQKIT_BENCH_DATA_DIR;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    auto val = [&](const char* key) { return s.rfind(key, 0) == 0 ? s.substr(std::strlen(key)) : std::string(); };
    if (!val("--threads=").empty()) a.threads = std::stoi(val("--threads="));
    else if (!val("--reps=").empty()) a.reps = std::stoi(val("--reps="));
    else if (!val("--steps=").empty()) a.steps = std::stoi(val("--steps="));
    else if (!val("--levels=").empty()) a.levels = std::stol(val("--levels="));
    else if (!val("--heads=").empty()) a.heads = std::stol(val("--heads="));
    else if (!val("--data=").empty()) a.data_dir = val("--data=");
    else throw std::runtime_error("unknown argument " + s);
  }
  return a;
}

VectorQuantizerConfig level_config(Index D, Index N) {
  VectorQuantizerConfig c;
  c.codebook_size = 256;
  c.dim = D;
  c.memory_bank_size = N;
  c.init_min_rows = N;
  c.kmeans_iterations = 25;
  return c;
}

double mse(const RowMatrix<float>& x, const RowMatrix<float>& y) {
  return (x - y).cast<double>().squaredNorm() / double(x.rows());
}

void row(const char* name, double mse_v, double mse_f, const vb::Times& tv, const vb::Times& tf) {
  std::printf("%-34s %10.4f %10.4f %8.3f   %9.2f %9.2f %8.2fx\n", name, mse_v, mse_f, mse_v / mse_f,
              1e3 * vb::median(tv.wall), 1e3 * vb::median(tf.wall), vb::median_ratio(tf.wall, tv.wall));
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
  omp_set_num_threads(a.threads);
  const RowMatrix<float> x = io::read_fvecs(a.data_dir + "/vectors/glove100/glove100_base_10k.fvecs");
  const Index N = x.rows(), D = x.cols();
  const cpu be{a.threads};
  std::printf("GloVe %ld x %ld, %d threads, %d reps, load %s\n", long(N), long(D), a.threads, a.reps,
              vb::load_average().c_str());
  std::printf("%-34s %10s %10s %8s   %9s %9s %9s\n", "quantizer (bits)", "MSE vqkit", "MSE FAISS",
              "ratio", "enc ms vq", "enc ms FS", "FS/vq");

  // ---- residual: levels x 256 codes ----
  ResidualVQConfig rc;
  rc.levels = a.levels;
  rc.level = level_config(D, N);
  ResidualVQ<float> rvq(rc, be);
  RowMatrix<float> out;
  for (int s = 0; s < a.steps; ++s) rvq.forward(x, out);
  rvq.eval();
  for (int beam : {1, 5}) {
    faiss::ResidualQuantizer rq(size_t(D), size_t(a.levels), 8);
    rq.max_beam_size = beam;
    rq.train(size_t(N), x.data());
    std::vector<std::uint8_t> codes(rq.code_size * std::size_t(N));
    IndexMatrix idx;
    const auto t = vb::alternate({[&] { idx = rvq.encode(x); },
                                  [&] { rq.compute_codes(x.data(), codes.data(), size_t(N)); }},
                                 a.reps);
    RowMatrix<float> rf(N, D);
    rq.decode(codes.data(), rf.data(), size_t(N));
    const std::string name = "RVQ " + std::to_string(a.levels) + "x256 (" + std::to_string(8 * a.levels) +
                             "), FAISS beam " + std::to_string(beam);
    row(name.c_str(), mse(x, rvq.decode(idx)), mse(x, rf), t[0], t[1]);
  }
  // every level's error
  {
    const IndexMatrix idx = rvq.encode(x);
    RowMatrix<float> partial = RowMatrix<float>::Zero(N, D);
    std::printf("  vqkit RVQ MSE by level:");
    for (Index l = 0; l < a.levels; ++l) {
      partial += rvq.level(l).decode(IndexVector(idx.col(l)));
      std::printf(" %.3f", mse(x, partial));
    }
    std::printf("\n  codes used per level (of 256):");
    for (Index l = 0; l < a.levels; ++l) {
      std::vector<char> used(256, 0);
      for (Index i = 0; i < N; ++i) used[std::size_t(idx(i, l))] = 1;
      std::printf(" %ld", long(std::count(used.begin(), used.end(), 1)));
    }
    std::printf("\n");
  }

  // ---- product: heads x 256 codes ----
  if (D % a.heads != 0) {
    std::printf("heads=%ld does not divide D=%ld: no product-quantizer row\n", long(a.heads), long(D));
    return 0;
  }
  GroupedVQConfig gc;
  gc.groups = a.heads;
  gc.head = level_config(D / a.heads, N);
  GroupedVQ<float> gvq(gc, be);
  for (int s = 0; s < a.steps; ++s) gvq.forward(x, out);
  gvq.eval();
  faiss::ProductQuantizer pq(size_t(D), size_t(a.heads), 8);
  pq.train(size_t(N), x.data());
  std::vector<std::uint8_t> codes(pq.code_size * std::size_t(N));
  IndexMatrix idx;
  const auto t = vb::alternate({[&] { idx = gvq.encode(x); },
                                [&] { pq.compute_codes(x.data(), codes.data(), size_t(N)); }},
                               a.reps);
  RowMatrix<float> rf(N, D);
  pq.decode(codes.data(), rf.data(), size_t(N));
  const std::string name = "Grouped/PQ " + std::to_string(a.heads) + "x256 (" + std::to_string(8 * a.heads) + ")";
  row(name.c_str(), mse(x, gvq.decode(idx)), mse(x, rf), t[0], t[1]);
  return 0;
}
