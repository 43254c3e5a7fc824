// A user's program: quantizes a few vectors with the installed headers, then
// runs a float search and prints which kernel served it and a digest of its
// results; exits non-zero on failure. Built twice by the package test
// (tests/consumer/run.cmake): as a consumer would (CMake Release: -O3, no
// -march), and inside vqkit's build with -march=native (vqkit_consumer_native);
// both must print the same digest, and the plain build must have run the
// AVX-512 kernel (run-time dispatch) on a CPU that has AVX-512F.
#include <vqkit/quantizer.hpp>  // the core component: Eigen (+ OpenMP) only

#include <cstdint>
#include <cstring>
#include <iostream>
#include <string>

namespace {

/// FNV-1a over the bytes of indices and distances.
std::uint64_t digest(const vqkit::IndexVector& idx, const vqkit::Vector<float>& dist, std::uint64_t h) {
  const auto mix = [&h](const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  };
  mix(idx.data(), std::size_t(idx.size()) * sizeof(idx[0]));
  mix(dist.data(), std::size_t(dist.size()) * sizeof(float));
  return h;
}

}  // namespace

int main() {
  vqkit::VectorQuantizerConfig cfg;
  cfg.codebook_size = 16;
  cfg.dim = 4;
  vqkit::VectorQuantizer<float> vq(cfg);
  vqkit::Rng rng(1);
  vqkit::RowMatrix<float> x(64, 4), q;
  for (vqkit::Index i = 0; i < x.size(); ++i) x.data()[i] = float(rng.normal());
  auto ctx = vq.forward(x, q);
  std::cout << "consumer: usage " << ctx.metrics.usage << "/16, loss " << ctx.loss.total << "\n";
  if (!(ctx.indices.size() == 64 && ctx.metrics.usage > 0)) return 1;

  // The search, as a program built with its own flags gets it.
  vqkit::RowMatrix<float> data(3000, 100), codes(300, 100);
  for (vqkit::Index i = 0; i < data.size(); ++i) data.data()[i] = float(rng.normal());
  for (vqkit::Index i = 0; i < codes.size(); ++i) codes.data()[i] = float(rng.normal());
  std::uint64_t h = 1469598103934665603ull;
  std::string kernel;
  for (const auto precision : {vqkit::Precision::fp32, vqkit::Precision::bf16_rerank})
    for (const auto metric : {vqkit::Metric::l2, vqkit::Metric::cosine}) {
      vqkit::IndexVector idx(data.rows());
      vqkit::Vector<float> dist;
      vqkit::SearchStats st;
      vqkit::SearchOptions opt;
      opt.metric = metric;
      vqkit::SearchMode mode;
      mode.precision = precision;
      mode.stats = &st;
      vqkit::nearest_code<float>(vqkit::cpu{2}, codes, data, idx, &dist, opt, nullptr, mode);
      h = digest(idx, dist, h);
      if (precision == vqkit::Precision::fp32) kernel = st.kernel;
    }
  std::cout << "consumer: search kernel " << kernel << "\n";
  std::cout << "consumer: search digest " << std::hex << h << std::dec << "\n";
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const std::string want = __builtin_cpu_supports("avx512f") ? "avx512" : "generic";
  if (kernel != want) {
    std::cout << "consumer: expected the " << want << " kernel, got " << kernel << "\n";
    return 1;
  }
#endif
  return 0;
}
