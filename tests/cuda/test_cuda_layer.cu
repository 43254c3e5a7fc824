// tests/cuda/test_cuda_layer.cu - VectorQuantizer<float, vqkit::cuda> against
// VectorQuantizer<float, vqkit::cpu>: the same config, seed and batches.
//
// Exits 77 (ctest: skipped) when there is no CUDA device; 1 on any failure.
// Training steps (forward + backward) with the k-means init over the memory
// bank, the EMA update and (second config) gradient mode with the replace
// policy; for each search precision: indices identical at every step, loss
// within 1e-9 relative, input gradients within 1e-5, codebook and EMA state
// within 1e-5 relative, the same policy decisions.
#include <cstdio>

#include "cuda_ref.hpp"
#include "vqkit/cuda/vector_quantizer.cuh"

using namespace vqkit_test;

namespace {

void compare(const char* name, const vqkit::VectorQuantizerConfig& cfg, vqkit::SearchPrecision p) {
  vqkit::Rng rng(21);
  std::vector<Mat> batches, dqs;
  for (int s = 0; s < 8; ++s) {
    batches.push_back(mixture(256 + 37 * s, cfg.dim, 24, rng, 0.6));
    dqs.push_back(gaussian(batches.back().rows(), cfg.dim, rng, 0.1));
  }
  const LayerTrace c = cpu_layer_run(cfg, batches, dqs);
  vqkit::cuda be;
  be.precision = p;
  const LayerTrace g = run_layer(cfg, batches, dqs, be);
  Index diff = 0;
  double loss_err = 0, dx_err = 0;
  for (std::size_t s = 0; s < batches.size(); ++s) {
    for (Index i = 0; i < c.indices[s].size(); ++i) diff += g.indices[s][i] != c.indices[s][i];
    loss_err = std::max(loss_err, std::abs(g.loss[s] - c.loss[s]) / std::abs(c.loss[s]));
    dx_err = std::max(dx_err, max_rel(g.dx[s], c.dx[s], 1e-3));
  }
  const double ce = max_rel(g.codes, c.codes, 1e-3), ne = max_rel(g.ema.cluster_size, c.ema.cluster_size),
               me = max_rel(g.ema.embed_sum, c.ema.embed_sum, 1e-3), ge = max_rel(g.grad, c.grad, 1e-3);
  std::printf("  %-22s %-11s index mismatches %ld, loss %.1e, dx %.1e, codes %.1e, N %.1e, M %.1e, grad %.1e, "
              "replaced %ld/%ld\n",
              name, vqkit::to_string(p), long(diff), loss_err, dx_err, ce, ne, me, ge, long(c.replaced),
              long(g.replaced));
  VQ_CHECK(diff == 0, "%s: %ld indices differ", name, long(diff));
  VQ_CHECK(loss_err <= 1e-9, "%s: loss error %.3e", name, loss_err);
  VQ_CHECK(dx_err <= 1e-5, "%s: dx error %.3e", name, dx_err);
  VQ_CHECK(ce <= 1e-5 && ne <= 1e-5 && me <= 1e-5 && ge <= 1e-5, "%s: state error %.3e %.3e %.3e %.3e", name, ce,
           ne, me, ge);
  VQ_CHECK(g.replaced == c.replaced && g.reinits == c.reinits, "%s: policy decisions differ", name);
}

}  // namespace

int main() {
  if (vqkit::gpu::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device found (cudaGetDeviceCount); the CUDA tests need a GPU\n");
    return 77;
  }
  try {
    const vqkit::VectorQuantizerConfig ema = layer_test_ema_config(), grad = layer_test_gradient_config();
    for (auto p : {vqkit::SearchPrecision::fp32, vqkit::SearchPrecision::bf16_rerank}) {
      compare("EMA, k-means init", ema, p);
      compare("gradient, replace, cos", grad, p);
    }
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d checks, %d failed\n", checks(), failures());
  return failures() == 0 ? 0 : 1;
}
