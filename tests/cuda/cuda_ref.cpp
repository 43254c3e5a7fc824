// tests/cuda/cuda_ref.cpp - the CPU backend, compiled by the C++ compiler, as
// the reference of the CUDA tests (see cuda_ref.hpp).
#include "cuda_ref.hpp"

namespace vqkit_test {

bool cpu_search_is_avx512() { return vqkit::avx512_search_supported(); }

void cpu_search(const Mat& codes, const Mat& x, vqkit::Metric m, const Vec* norms, IndexVector& idx, Vec& dist) {
  vqkit::SearchOptions o;
  o.metric = m;
  idx.resize(x.rows());
  vqkit::nearest_code<float>(vqkit::cpu{}, codes, x, idx, &dist, o, norms);
}

// The norms the CPU's float search uses: the AVX-512 kernel forms its own
// (one FMA chain per code, see k512::kernel_norms), so that is what a GPU
// search given "the CPU's norms" must see to match it index for index.
Vec cpu_code_norms(const Mat& codes, vqkit::Metric m) {
#if VQKIT_K512
  if (vqkit::avx512_search_supported()) {
    Vec n;
    vqkit::detail::k512::kernel_norms(codes, m == vqkit::Metric::cosine, n);
    return n;
  }
#endif
  return vqkit::code_norms<float>(vqkit::cpu{}, codes, m);
}

vqkit::ClusterStats<float> cpu_cluster_stats(const Mat& x, const IndexVector& idx, Index K) {
  return vqkit::cluster_stats<float>(vqkit::cpu{}, x, idx, K);
}

Vec cpu_cluster_counts(const IndexVector& idx, Index K) { return vqkit::cluster_counts<float>(vqkit::cpu{}, idx, K); }

void cpu_ema_update(vqkit::EmaState<float>& st, const vqkit::ClusterStats<float>& b, const vqkit::EmaOptions& o,
                    Mat& codes) {
  vqkit::ema_update<float>(vqkit::cpu{}, st, b, o, codes);
}

vqkit::KMeansResult<float> cpu_kmeans(const Mat& data, const vqkit::KMeansOptions& o, vqkit::Rng& rng) {
  return vqkit::kmeans<float>(vqkit::cpu{}, data, o, rng);
}

vqkit::VqLoss cpu_vq_loss(const Mat& r, const vqkit::LossOptions& o) { return vqkit::vq_loss<float>(vqkit::cpu{}, r, o); }

void cpu_input_grad(const Mat& r, const Mat& dq, const vqkit::LossOptions& o, Mat& dx) {
  vqkit::vq_input_grad<float>(vqkit::cpu{}, r, dq, o, dx);
}

void cpu_codebook_grad(const Mat& r, const IndexVector& idx, const vqkit::LossOptions& o, Mat& dcodes) {
  vqkit::vq_codebook_grad<float>(vqkit::cpu{}, r, idx, o, dcodes);
}

LayerTrace cpu_layer_run(const vqkit::VectorQuantizerConfig& cfg, const std::vector<Mat>& batches,
                         const std::vector<Mat>& dqs) {
  return run_layer(cfg, batches, dqs, vqkit::cpu{});
}

}  // namespace vqkit_test
