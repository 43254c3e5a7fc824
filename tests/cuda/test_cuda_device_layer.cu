// tests/cuda/test_cuda_device_layer.cu - gpu::DeviceVectorQuantizer (state on
// the device) against VectorQuantizer<float, vqkit::cpu>: the same config,
// seed and batches (cuda/include/vqkit/cuda/device_quantizer.cuh).
//
// Exits 77 (ctest: skipped) when there is no CUDA device; 1 on any failure.
//  - training steps (forward + backward) under three configs - EMA with the
//    k-means init and its refinement, gradient mode with the replace policy
//    (cosine), EMA with kmeans_reinit - for each search precision: indices
//    identical at every step, loss within 1e-9 relative, input gradients
//    within 1e-5, codebook / EMA state / gradient within 1e-5 relative, the
//    same policy decisions (init, re-inits, replaced codes);
//  - what crosses the bus: in every step without a k-means init or re-init,
//    fewer bytes than one K x D array (gpu::transfer_bytes);
//  - state() / set_state(): a copy restored from the state continues
//    bit-identically, and state() after the run equals the CPU layer's;
//  - a NaN in x is rejected naming its row, with the state unchanged.
#include <cmath>
#include <cstdio>
#include <string>

#include "cuda_ref.hpp"
#include "vqkit/cuda/device_quantizer.cuh"

using namespace vqkit_test;
namespace gpu = vqkit::gpu;

namespace {

struct DeviceRun {
  LayerTrace trace;
  std::uint64_t max_step_bytes = 0;  // steps without a k-means init / re-init
  std::int64_t kmeans_steps = 0;
};

void step(gpu::DeviceVectorQuantizer& vq, const Mat& x, const Mat& dq, gpu::DeviceContext& ctx, Mat& dx_out,
          std::uint64_t* bytes) {
  const vqkit::Index N = x.rows(), D = x.cols();
  gpu::DeviceBuffer<float> dxin(std::size_t(N * D)), dq_d(std::size_t(N * D)), q(std::size_t(N * D)),
      dx(std::size_t(N * D));
  const cudaStream_t s = vq.backend().stream;
  gpu::upload(dxin.data(), x.data(), dxin.size(), s);
  gpu::upload(dq_d.data(), dq.data(), dq_d.size(), s);
  const std::uint64_t before = gpu::transfer_bytes().load();
  vq.forward(dxin.data(), N, q.data(), ctx);
  vq.backward(ctx, dq_d.data(), dx.data());
  if (bytes) *bytes = gpu::transfer_bytes().load() - before;
  dx_out.resize(N, D);
  gpu::download(dx_out.data(), dx.data(), dx.size(), s);
  gpu::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
}

DeviceRun device_run(const vqkit::VectorQuantizerConfig& cfg, const std::vector<Mat>& batches,
                     const std::vector<Mat>& dqs, vqkit::SearchPrecision p) {
  vqkit::cuda be;
  be.precision = p;
  gpu::DeviceVectorQuantizer vq(cfg, be);
  DeviceRun r;
  gpu::DeviceContext ctx;
  Mat dx;
  for (std::size_t s = 0; s < batches.size(); ++s) {
    std::uint64_t bytes = 0;
    step(vq, batches[s], dqs[s], ctx, dx, &bytes);
    if (ctx.data_initialized || ctx.reinitialized)
      ++r.kmeans_steps;
    else
      r.max_step_bytes = std::max(r.max_step_bytes, bytes);
    r.trace.indices.push_back(ctx.host_indices());
    r.trace.loss.push_back(ctx.loss.total);
    r.trace.dx.push_back(dx);
  }
  r.trace.codes = vq.codebook();
  r.trace.grad = vq.codebook_grad();
  r.trace.ema = vq.ema_state();
  r.trace.reinits = vq.reinit_count();
  r.trace.replaced = vq.replaced_count();
  return r;
}

void compare(const char* name, const vqkit::VectorQuantizerConfig& cfg, vqkit::SearchPrecision p,
             bool want_policy = false) {
  vqkit::Rng rng(41);
  std::vector<Mat> batches, dqs;
  for (int s = 0; s < 12; ++s) {
    batches.push_back(mixture(256 + 37 * s, cfg.dim, 24, rng, 0.6));
    dqs.push_back(gaussian(batches.back().rows(), cfg.dim, rng, 0.1));
  }
  const LayerTrace c = cpu_layer_run(cfg, batches, dqs);
  const DeviceRun g = device_run(cfg, batches, dqs, p);
  Index diff = 0;
  double loss_err = 0, dx_err = 0;
  for (std::size_t s = 0; s < batches.size(); ++s) {
    for (Index i = 0; i < c.indices[s].size(); ++i) diff += g.trace.indices[s][i] != c.indices[s][i];
    loss_err = std::max(loss_err, std::abs(g.trace.loss[s] - c.loss[s]) / std::abs(c.loss[s]));
    dx_err = std::max(dx_err, max_rel(g.trace.dx[s], c.dx[s], 1e-3));
  }
  const double ce = max_rel(g.trace.codes, c.codes, 1e-3),
               ne = max_rel(g.trace.ema.cluster_size, c.ema.cluster_size),
               me = max_rel(g.trace.ema.embed_sum, c.ema.embed_sum, 1e-3), ge = max_rel(g.trace.grad, c.grad, 1e-3);
  const std::uint64_t kd = std::uint64_t(cfg.codebook_size) * std::uint64_t(cfg.dim) * sizeof(float);
  std::printf("  %-24s %-11s index mismatches %ld, loss %.1e, dx %.1e, codes %.1e, N %.1e, M %.1e, grad %.1e, "
              "reinits %ld/%ld, replaced %ld/%ld, k-means steps %ld, max bytes/step %llu (K x D = %llu)\n",
              name, vqkit::to_string(p), long(diff), loss_err, dx_err, ce, ne, me, ge, long(c.reinits),
              long(g.trace.reinits), long(c.replaced), long(g.trace.replaced), long(g.kmeans_steps),
              static_cast<unsigned long long>(g.max_step_bytes), static_cast<unsigned long long>(kd));
  VQ_CHECK(diff == 0, "%s: %ld indices differ", name, long(diff));
  VQ_CHECK(loss_err <= 1e-9, "%s: loss error %.3e", name, loss_err);
  VQ_CHECK(dx_err <= 1e-5, "%s: dx error %.3e", name, dx_err);
  VQ_CHECK(ce <= 1e-5 && ne <= 1e-5 && me <= 1e-5 && ge <= 1e-5, "%s: state error %.3e %.3e %.3e %.3e", name, ce,
           ne, me, ge);
  VQ_CHECK(g.trace.replaced == c.replaced && g.trace.reinits == c.reinits, "%s: policy decisions differ", name);
  if (want_policy)
    VQ_CHECK(c.reinits + c.replaced > 0, "%s: the policy never acted, so this case tests nothing of it", name);
  VQ_CHECK(g.max_step_bytes < kd, "%s: a step copied %llu bytes (K x D = %llu)", name,
           static_cast<unsigned long long>(g.max_step_bytes), static_cast<unsigned long long>(kd));
}

void test_state_round_trip(const vqkit::VectorQuantizerConfig& cfg) {
  std::printf("state() / set_state()\n");
  vqkit::Rng rng(42);
  std::vector<Mat> batches, dqs;
  for (int s = 0; s < 10; ++s) {
    batches.push_back(mixture(300, cfg.dim, 16, rng, 0.5));
    dqs.push_back(gaussian(300, cfg.dim, rng, 0.1));
  }
  gpu::DeviceVectorQuantizer a(cfg);
  gpu::DeviceContext ca, cb;
  Mat dx;
  for (int s = 0; s < 5; ++s) step(a, batches[s], dqs[s], ca, dx, nullptr);
  gpu::DeviceVectorQuantizer b(cfg);
  b.set_state(a.state());
  Index diff = 0;
  for (int s = 5; s < 10; ++s) {
    Mat dxa, dxb;
    step(a, batches[s], dqs[s], ca, dxa, nullptr);
    step(b, batches[s], dqs[s], cb, dxb, nullptr);
    diff += (ca.host_indices().array() != cb.host_indices().array()).count();
    diff += (dxa.array() != dxb.array()).count();
  }
  const bool same = a.codebook() == b.codebook() && a.ema_state().embed_sum == b.ema_state().embed_sum &&
                    a.rng().state() == b.rng().state() && a.step() == b.step();
  std::printf("  restored copy, 5 more steps: %ld differences, state %s\n", long(diff), same ? "equal" : "DIFFERS");
  VQ_CHECK(diff == 0 && same, "a restored copy diverged (%ld differences)", long(diff));
  // the state a CPU layer reaches on the same batches
  vqkit::VectorQuantizer<float> h(cfg);
  Mat q, hdx;
  for (int s = 0; s < 10; ++s) {
    auto ctx = h.forward(batches[s], q);
    h.backward(ctx, dqs[s], &hdx);
  }
  const auto hs = h.state();
  const auto ds = a.state();
  const double ce = max_rel(ds.codes, hs.codes, 1e-3);
  VQ_CHECK(ce <= 1e-5 && ds.bank == hs.bank && ds.bank_size == hs.bank_size && ds.bank_head == hs.bank_head &&
               ds.steps_since_used == hs.steps_since_used && ds.used_since_reset == hs.used_since_reset &&
               ds.rng == hs.rng && ds.step == hs.step && ds.reinits == hs.reinits,
           "state() differs from the CPU layer's (codes rel err %.3e)", ce);
  // a bad state is rejected and changes nothing
  auto bad = ds;
  bad.codes.resize(3, cfg.dim);
  const auto before = b.codebook();
  bool threw = false;
  try {
    b.set_state(bad);
  } catch (const vqkit::error& e) {
    threw = std::string(e.what()).find("codebook is 3x") != std::string::npos;
  }
  VQ_CHECK(threw && b.codebook() == before, "a bad state is rejected with its message, state unchanged");
}

void test_bad_input(const vqkit::VectorQuantizerConfig& cfg) {
  std::printf("bad input\n");
  vqkit::Rng rng(43);
  gpu::DeviceVectorQuantizer vq(cfg);
  gpu::DeviceContext ctx;
  Mat dx;
  step(vq, gaussian(300, cfg.dim, rng), gaussian(300, cfg.dim, rng), ctx, dx, nullptr);
  Mat x = gaussian(50, cfg.dim, rng);
  x(17, 3) = std::nanf("");
  gpu::DeviceBuffer<float> dxin(std::size_t(x.size())), q(std::size_t(x.size()));
  gpu::upload(dxin.data(), x.data(), dxin.size(), nullptr);
  const auto codes = vq.codebook();
  const auto st = vq.step();
  bool threw = false;
  try {
    vq.forward(dxin.data(), x.rows(), q.data(), ctx);
  } catch (const vqkit::error& e) {
    threw = std::string(e.what()).find("row 17, column 3") != std::string::npos;
  }
  VQ_CHECK(threw, "NaN in x is rejected naming row 17, column 3");
  VQ_CHECK(vq.codebook() == codes && vq.step() == st, "a rejected batch changes nothing");
}

}  // namespace

int main() {
  if (gpu::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device found (cudaGetDeviceCount); the CUDA tests need a GPU\n");
    return 77;
  }
  try {
    const vqkit::VectorQuantizerConfig ema = layer_test_ema_config(), grad = layer_test_gradient_config();
    vqkit::VectorQuantizerConfig reinit = ema;
    reinit.codebook_size = 96;
    reinit.dead.policy = vqkit::DeadCodePolicy::kmeans_reinit;
    reinit.dead.dead_after = 2;
    reinit.dead.min_steps = 3;
    reinit.dead.check_every = 2;
    reinit.dead.max_dead_fraction = 0.05;
    for (auto p : {vqkit::SearchPrecision::fp32, vqkit::SearchPrecision::bf16_rerank}) {
      compare("EMA, k-means init", ema, p);
      compare("gradient, replace, cos", grad, p, true);
      compare("EMA, kmeans_reinit", reinit, p, true);
    }
    test_state_round_trip(ema);
    test_bad_input(ema);
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d checks, %d failed\n", checks(), failures());
  return failures() == 0 ? 0 : 1;
}
