// bench/collapse_stream.cpp - issue 16's codebook collapse, reproduced in
// about a second on a synthetic stream of tokens from a "moving encoder".
//
// util/moving_clusters.hpp draws N tokens per step around C cluster centres
// (D dims, unit spread) that all drift together, by `drift` * sqrt(D) per
// step at the start, decaying with a time constant of 150 steps: the
// dynamics docs/tokenizer.md describes for the tokenizer, whose encoder
// moves fast early in training. A VectorQuantizer with the seed's settings
// (EMA 0.99, kmeans_reinit, the library's defaults otherwise) trains on it;
// the program prints the window usage (codes used in the last 10 steps)
// every 20 steps and at every k-means (re-)init, then one summary line.
//
//   collapse_stream [--K 512] [--drift 0.3] [--bank 10240] [--steps 300]
//                   [--dead-after 256] [--check-every 100] [--min-steps 200]
//                   [--init-rows 0] [--decay 0.99] [--clusters 48] [--dim 64]
//                   [--tokens 512] [--seed 5] [--policy kmeans_reinit]
//                   [--replace-threshold 0.1] [--replace-after -1]
//                   [--replace-from 1] [--reinit-below 0]
//                   [--warmup-steps 0] [--warmup-decay 0.8]
//
// --drift 0 is the static stream (the GloVe-like regime); --replace-after 0
// --replace-from 0 is the seed's behaviour. Findings: docs/monitoring.md,
// "A moving encoder".
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
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--policy") == 0) cfg.dead.policy = parse_dead_code_policy(argv[i + 1]);
  cfg.dead.replace_threshold = flag(argc, argv, "--replace-threshold", cfg.dead.replace_threshold);
  cfg.dead.replace_after = std::int64_t(flag(argc, argv, "--replace-after", double(cfg.dead.replace_after)));
  cfg.dead.dead_after = std::int64_t(flag(argc, argv, "--dead-after", double(cfg.dead.dead_after)));
  cfg.dead.check_every = std::int64_t(flag(argc, argv, "--check-every", double(cfg.dead.check_every)));
  cfg.dead.min_steps = std::int64_t(flag(argc, argv, "--min-steps", double(cfg.dead.min_steps)));
  cfg.memory_bank_size = Index(flag(argc, argv, "--bank", 10240));
  cfg.init_min_rows = Index(flag(argc, argv, "--init-rows", 0));
  cfg.dead.replace_from_steps =
      std::int64_t(flag(argc, argv, "--replace-from", double(cfg.dead.replace_from_steps)));
  cfg.dead.reinit_below_usage = flag(argc, argv, "--reinit-below", cfg.dead.reinit_below_usage);
  cfg.ema.warmup_steps = std::int64_t(flag(argc, argv, "--warmup-steps", double(cfg.ema.warmup_steps)));
  cfg.ema.warmup_decay = flag(argc, argv, "--warmup-decay", cfg.ema.warmup_decay);
  try {
    cfg.validate();
  } catch (const vqkit::error& e) {
    std::fprintf(stderr, "collapse_stream: %s\n", e.what());
    return 2;
  }
  MovingClustersOptions so;
  so.clusters = C;
  so.dim = D;
  so.tokens = N;
  so.drift = drift0;
  so.seed = std::uint64_t(flag(argc, argv, "--seed", 5));
  MovingClusters stream(so);
  VectorQuantizer<float> vq(cfg, cpu{1});
  RowMatrix<float> x, q;
  VectorQuantizer<float>::Context ctx;
  Index min_after50 = K;
  double mean_last100 = 0, ppl_last100 = 0;
  const int last = std::min(100, steps);
  for (int t = 0; t < steps; ++t) {
    stream.next(x);
    vq.forward(x, q, ctx);
    const Index wu = ctx.metrics.window_usage;
    if (t >= 50) min_after50 = std::min(min_after50, wu);
    if (t >= steps - last) {
      mean_last100 += double(wu) / last;
      ppl_last100 += ctx.metrics.perplexity / last;
    }
    if (t % 20 == 0 || ctx.data_initialized || ctx.reinitialized)
      std::printf("step %4d  window usage %5ld  perplexity %8.1f  dead %5ld  lag %.2f  stale %.2f  decay %.3f%s%s\n", t,
                  long(wu), ctx.metrics.perplexity, long(ctx.metrics.dead), ctx.metrics.lag_fraction, ctx.metrics.bank_staleness,
                  ctx.metrics.ema_decay, ctx.data_initialized ? "  [k-means init]" : "",
                  ctx.reinitialized ? "  [kmeans_reinit]" : "");
  }
  std::printf("K=%ld drift=%g bank=%ld dead_after=%ld check_every=%ld: window usage min after step 50 %ld (%.0f%%), "
              "mean over the last %d steps %.0f (%.0f%%), batch perplexity %.0f, re-inits %ld, replaced %ld\n",
              long(K), drift0, long(cfg.bank_rows()), long(cfg.dead.dead_after), long(cfg.dead.check_every),
              long(min_after50), 100.0 * double(min_after50) / double(K), last, mean_last100,
              100.0 * mean_last100 / double(K), ppl_last100, long(vq.reinit_count()), long(vq.replaced_count()));
  return 0;
}
