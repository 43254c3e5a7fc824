// Quantizes a few vectors with the installed headers; exits non-zero on failure.
#include <vqkit/vqkit.hpp>

#include <iostream>

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
  return (ctx.indices.size() == 64 && ctx.metrics.usage > 0) ? 0 : 1;
}
