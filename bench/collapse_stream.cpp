// bench/collapse_stream.cpp - issue 16's codebook collapse, reproduced in
// seconds on a synthetic stream of tokens from a "moving encoder".
//
// Each step draws N tokens around C cluster centres (D dims, unit spread);
// all centres drift together, by `drift` * sqrt(D) per step at the start,
// decaying with a time constant of 150 steps (mostly along one direction):
// the dynamics docs/tokenizer.md describes for the tokenizer, whose encoder
// moves fast early in training while the memory bank still holds tokens it
// has moved away from. A VectorQuantizer with the seed's settings (EMA 0.99,
// kmeans_reinit, the library's defaults otherwise) trains on it; the program
// prints the window usage (codes used in the last 10 steps) every 20 steps
// and at every k-means (re-)init, then one summary line.
//
//   collapse_stream [--K 512] [--drift 0.3] [--bank 10240] [--steps 300]
//                   [--dead-after 256] [--check-every 100] [--min-steps 200]
//                   [--init-rows 0] [--decay 0.99] [--clusters 48] [--dim 64]
//                   [--tokens 512] [--seed 5]
//
// --drift 0 is the static stream (the GloVe-like regime, where the seed's
// settings keep every code alive). Findings: docs/tokenizer.md, "Collapse
// under the seed's settings, reproduced".
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "vqkit/vqkit.hpp"

using namespace vqkit;

namespace {

double flag(int argc, char** argv, const char* name, double def) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) {
      char* end = nullptr;
      const double v = std::strtod(argv[i + 1], &end);
      if (end == argv[i + 1] || *end != '\0') {
        std::fprintf(stderr, "collapse_stream: %s needs a number, got '%s'\n", name, argv[i + 1]);
        std::exit(2);
      }
      return v;
    }
  return def;
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; i += 2)
    if (std::strncmp(argv[i], "--", 2) != 0 || i + 1 >= argc) {
      std::fprintf(stderr, "collapse_stream: expected --name value pairs, got '%s' (see the file comment)\n",
                   argv[i]);
      return 2;
    }
  const Index K = Index(flag(argc, argv, "--K", 512));
  const double drift0 = flag(argc, argv, "--drift", 0.3);
  const int steps = int(flag(argc, argv, "--steps", 300));
  const Index C = Index(flag(argc, argv, "--clusters", 48)), D = Index(flag(argc, argv, "--dim", 64));
  const Index N = Index(flag(argc, argv, "--tokens", 512));
  VectorQuantizerConfig cfg;
  cfg.codebook_size = K;
  cfg.dim = D;
  cfg.ema.decay = flag(argc, argv, "--decay", 0.99);
  cfg.dead.policy = DeadCodePolicy::kmeans_reinit;
  cfg.dead.dead_after = std::int64_t(flag(argc, argv, "--dead-after", double(cfg.dead.dead_after)));
  cfg.dead.check_every = std::int64_t(flag(argc, argv, "--check-every", double(cfg.dead.check_every)));
  cfg.dead.min_steps = std::int64_t(flag(argc, argv, "--min-steps", double(cfg.dead.min_steps)));
  cfg.memory_bank_size = Index(flag(argc, argv, "--bank", 10240));
  cfg.init_min_rows = Index(flag(argc, argv, "--init-rows", 0));
  try {
    cfg.validate();
  } catch (const vqkit::error& e) {
    std::fprintf(stderr, "collapse_stream: %s\n", e.what());
    return 2;
  }
  Rng rng(std::uint64_t(flag(argc, argv, "--seed", 5)));
  RowMatrix<float> centre(C, D), dir(1, D), shift = RowMatrix<float>::Zero(1, D);
  for (Index i = 0; i < centre.size(); ++i) centre.data()[i] = float(3.0 * rng.normal());
  for (Index d = 0; d < D; ++d) dir(0, d) = float(rng.normal());
  dir /= dir.norm();
  VectorQuantizer<float> vq(cfg, cpu{1});
  RowMatrix<float> x(N, D), q;
  VectorQuantizer<float>::Context ctx;
  Index min_after50 = K;
  double mean_last100 = 0;
  const int last = std::min(100, steps);
  for (int t = 0; t < steps; ++t) {
    const double v = drift0 * std::exp(-t / 150.0) * std::sqrt(double(D));
    for (Index d = 0; d < D; ++d)
      shift(0, d) += float(v * (0.7 * dir(0, d) + 0.3 * rng.normal() / std::sqrt(double(D))));
    for (Index i = 0; i < N; ++i) {
      const Index j = Index(rng.below(std::uint64_t(C)));
      for (Index d = 0; d < D; ++d) x(i, d) = centre(j, d) + shift(0, d) + float(rng.normal());
    }
    vq.forward(x, q, ctx);
    const Index wu = ctx.metrics.window_usage;
    if (t >= 50) min_after50 = std::min(min_after50, wu);
    if (t >= steps - last) mean_last100 += double(wu) / last;
    if (t % 20 == 0 || ctx.data_initialized || ctx.reinitialized)
      std::printf("step %4d  window usage %5ld  perplexity %8.1f  dead %5ld%s%s\n", t, long(wu),
                  ctx.metrics.perplexity, long(ctx.metrics.dead), ctx.data_initialized ? "  [k-means init]" : "",
                  ctx.reinitialized ? "  [kmeans_reinit]" : "");
  }
  std::printf("K=%ld drift=%g bank=%ld dead_after=%ld check_every=%ld: window usage min after step 50 %ld (%.0f%%), "
              "mean over the last %d steps %.0f (%.0f%%), re-inits %ld\n",
              long(K), drift0, long(cfg.bank_rows()), long(cfg.dead.dead_after), long(cfg.dead.check_every),
              long(min_after50), 100.0 * double(min_after50) / double(K), last, mean_last100,
              100.0 * mean_last100 / double(K), long(vq.reinit_count()));
  return 0;
}
