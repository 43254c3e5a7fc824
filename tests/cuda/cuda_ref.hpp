// tests/cuda/cuda_ref.hpp - CPU references for the CUDA tests, and helpers.
//
// The cpu_* functions are compiled in cuda_ref.cpp by the C++ compiler with
// vqkit's own flags (so nearest_code there is the CPU backend exactly as
// vqkit's CPU tests build it: the AVX-512 kernel on such machines).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/vector_quantizer.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/ema.hpp"
#include "vqkit/quantizer/kmeans.hpp"
#include "vqkit/quantizer/loss.hpp"
#include "vqkit/quantizer/memory_bank.hpp"
#include "vqkit/quantizer/nearest_code.hpp"

namespace vqkit_test {

using vqkit::Index;
using vqkit::IndexVector;
using Mat = vqkit::RowMatrix<float>;
using Vec = vqkit::Vector<float>;

bool cpu_search_is_avx512();
void cpu_search(const Mat& codes, const Mat& x, vqkit::Metric m, const Vec* norms, IndexVector& idx, Vec& dist);
Vec cpu_code_norms(const Mat& codes, vqkit::Metric m);
vqkit::ClusterStats<float> cpu_cluster_stats(const Mat& x, const IndexVector& idx, Index K);
Vec cpu_cluster_counts(const IndexVector& idx, Index K);
void cpu_ema_update(vqkit::EmaState<float>& st, const vqkit::ClusterStats<float>& b, const vqkit::EmaOptions& o,
                    Mat& codes);
vqkit::KMeansResult<float> cpu_kmeans(const Mat& data, const vqkit::KMeansOptions& o, vqkit::Rng& rng);
vqkit::VqLoss cpu_vq_loss(const Mat& r, const vqkit::LossOptions& o);
void cpu_input_grad(const Mat& r, const Mat& dq, const vqkit::LossOptions& o, Mat& dx);
void cpu_codebook_grad(const Mat& r, const IndexVector& idx, const vqkit::LossOptions& o, Mat& dcodes);

/// What a few training steps of a VectorQuantizer produced.
struct LayerTrace {
  std::vector<IndexVector> indices;
  std::vector<double> loss;
  std::vector<Mat> dx;
  Mat codes, grad;
  vqkit::EmaState<float> ema;
  std::int64_t reinits = 0, replaced = 0;
};

/// Runs forward (train) + backward over the batches; one dq per batch.
template <class Backend>
LayerTrace run_layer(const vqkit::VectorQuantizerConfig& cfg, const std::vector<Mat>& batches,
                     const std::vector<Mat>& dqs, Backend be) {
  vqkit::VectorQuantizer<float, Backend> vq(cfg, be);
  vq.train();
  LayerTrace t;
  Mat q, dx;
  for (std::size_t s = 0; s < batches.size(); ++s) {
    auto ctx = vq.forward(batches[s], q);
    vq.backward(ctx, dqs[s], &dx);
    t.indices.push_back(ctx.indices);
    t.loss.push_back(ctx.loss.total);
    t.dx.push_back(dx);
  }
  t.codes = vq.codebook();
  t.grad = vq.codebook_grad();
  t.ema = vq.ema_state();
  t.reinits = vq.reinit_count();
  t.replaced = vq.replaced_count();
  return t;
}

LayerTrace cpu_layer_run(const vqkit::VectorQuantizerConfig& cfg, const std::vector<Mat>& batches,
                         const std::vector<Mat>& dqs);

/// The configs both layer comparisons run (test_cuda_layer,
/// test_cuda_device_layer): EMA with the k-means init over a small bank, and
/// gradient mode with the replace policy under cosine.
inline vqkit::VectorQuantizerConfig layer_test_ema_config() {
  vqkit::VectorQuantizerConfig c;
  c.codebook_size = 64;
  c.dim = 16;
  c.memory_bank_size = 1500;
  c.init_min_rows = 256;
  c.seed = 3;
  return c;
}
inline vqkit::VectorQuantizerConfig layer_test_gradient_config() {
  vqkit::VectorQuantizerConfig c = layer_test_ema_config();
  c.update = vqkit::CodebookUpdate::gradient;
  c.dead.policy = vqkit::DeadCodePolicy::replace;
  c.dead.replace_threshold = 0.5;
  c.metric = vqkit::Metric::cosine;
  return c;
}

// ---- a tiny test harness: a failed check is counted and printed ----------------
inline int& failures() {
  static int f = 0;
  return f;
}
inline int& checks() {
  static int c = 0;
  return c;
}
#define VQ_CHECK(cond, ...)                                                 \
  do {                                                                      \
    ++::vqkit_test::checks();                                               \
    if (!(cond)) {                                                          \
      ++::vqkit_test::failures();                                           \
      std::printf("  FAIL %s:%d: %s ", __FILE__, __LINE__, #cond);          \
      std::printf(__VA_ARGS__);                                             \
      std::printf("\n");                                                    \
    }                                                                       \
  } while (0)

/// Largest |a - b| / (|b| + floor) over all entries.
template <class A, class B>
double max_rel(const A& a, const B& b, double floor = 1e-6) {
  double m = 0;
  for (Index i = 0; i < b.size(); ++i) {
    const double d = std::abs(double(a.data()[i]) - double(b.data()[i])) / (std::abs(double(b.data()[i])) + floor);
    if (!(d <= m)) m = d;  // NaN propagates
  }
  return m;
}

inline Mat gaussian(Index rows, Index cols, vqkit::Rng& rng, double scale = 1.0) {
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(scale * rng.normal());
  return m;
}

/// Rows drawn around `centres` random centres (a mixture): clustered data.
inline Mat mixture(Index rows, Index cols, Index centres, vqkit::Rng& rng, double spread = 0.3) {
  const Mat c = gaussian(centres, cols, rng, 3.0);
  Mat m(rows, cols);
  for (Index i = 0; i < rows; ++i) {
    const Index j = Index(rng.below(std::uint64_t(centres)));
    for (Index d = 0; d < cols; ++d) m(i, d) = c(j, d) + float(spread * rng.normal());
  }
  return m;
}

}  // namespace vqkit_test
