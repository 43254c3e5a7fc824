// bench/step_compare.cpp - one training step of vqkit's QuantizerBlock, timed
// step by step, for the side-by-side comparison with a PyTorch version of the
// seed's block (tools/torch_seed_block.py; the driver is tools/compare_step.py,
// issue 12 part 5).
//
// The block (design.md §3 step 5, the seed's shapes):
//   x (B*N x 256) -> LayerNorm -> GELU -> Linear(256 -> 1024)
//     -> VectorQuantizer(K = 1024, D = 1024; EMA, k-means init from the
//        memory bank, refine when the bank first fills) -> Linear(1024 -> 256)
// One step = forward + backward with a fixed random dL/dy, then zero_grad()
// (no optimizer), the same as the PyTorch script's step. Inputs (fresh
// standard normal rows every step) are drawn before the clock starts.
//
// Usage:
//   vqkit_step_compare --batch B --tokens N --threads T --steps S --seed s --json PATH
// Writes {"impl":"vqkit","batch":B,"tokens":N,"threads":T,"step_ms":[...], ...}
// plus per-step diagnostics (init steps, VQ loss, usage, perplexity).
// T sets the backend (vqkit::cpu{T}) and, so that Eigen's GEMM inside Linear
// does not use more threads than asked, OpenMP's and Eigen's thread counts.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <vqkit/core/random.hpp>
#include <vqkit/core/types.hpp>
#include <vqkit/layers/quantizer_block.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using Block = vqkit::QuantizerBlock<float>;

struct Args {
  long batch = 4, tokens = 1024, steps = 10;
  int threads = 1;
  std::uint64_t seed = 0;
  std::string json;
  std::string precision = "fp32";  ///< the quantizer's search_precision
};

/// What one step reports besides its time (read after the clock stops).
struct StepInfo {
  bool data_initialized = false;  ///< the k-means init (first or refine) ran
  double vq_loss = 0, perplexity = 0;
  long usage = 0;
};

// ---- THE STEP ------------------------------------------------------------
// The only code that is timed: the public API of QuantizerBlock, with a
// context reused between steps (forward(x, y, ctx)), as a training loop
// that cares about speed writes it.
StepInfo training_step(Block& block, const vqkit::RowMatrix<float>& x,
                       const vqkit::RowMatrix<float>& dy, vqkit::RowMatrix<float>& y,
                       vqkit::RowMatrix<float>& dx) {
  static Block::Context ctx;  // reused: the benchmark drives one block
  block.forward(x, y, ctx);
  block.backward(ctx, dy, &dx);
  block.zero_grad();
  StepInfo info;
  info.data_initialized = ctx.vq.data_initialized;
  info.vq_loss = ctx.vq.loss.total;
  info.perplexity = ctx.vq.metrics.perplexity;
  info.usage = long(ctx.vq.metrics.usage);
  return info;
}
// ---- end of the step -----------------------------------------------------

[[noreturn]] void usage_exit(const char* prog, const std::string& why) {
  std::fprintf(stderr,
               "%s\nusage: %s --batch B --tokens N --threads T --steps S --seed s --json PATH"
               " [--search-precision fp32|bf16_rerank]\n",
               why.c_str(), prog);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help") usage_exit(argv[0], "vqkit QuantizerBlock step timer");
    if (i + 1 >= argc) usage_exit(argv[0], "missing value after " + flag);
    const char* v = argv[++i];
    try {
      if (flag == "--batch") a.batch = std::stol(v);
      else if (flag == "--tokens") a.tokens = std::stol(v);
      else if (flag == "--threads") a.threads = std::stoi(v);
      else if (flag == "--steps") a.steps = std::stol(v);
      else if (flag == "--seed") a.seed = std::stoull(v);
      else if (flag == "--json") a.json = v;
      else if (flag == "--search-precision") {
        a.precision = v;
        if (a.precision != "fp32" && a.precision != "bf16_rerank")
          usage_exit(argv[0], "--search-precision must be fp32 or bf16_rerank");
      }
      else usage_exit(argv[0], "unknown flag " + flag);
    } catch (const std::logic_error&) {
      usage_exit(argv[0], "bad value '" + std::string(v) + "' for " + flag);
    }
  }
  if (a.batch < 1 || a.tokens < 1 || a.threads < 1 || a.steps < 1)
    usage_exit(argv[0], "--batch, --tokens, --threads and --steps must be >= 1");
  return a;
}

void fill_normal(vqkit::RowMatrix<float>& m, vqkit::Rng& rng) {
  for (vqkit::Index i = 0; i < m.size(); ++i) m.data()[i] = float(rng.normal());
}

template <class V, class F>
void write_array(std::ofstream& f, const char* key, const std::vector<V>& v, F fmt) {
  f << ",\"" << key << "\":[";
  for (std::size_t i = 0; i < v.size(); ++i) f << (i ? "," : "") << fmt(v[i]);
  f << "]";
}

std::string num(double d) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6g", d);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  const Args a = parse(argc, argv);
#ifdef _OPENMP
  omp_set_num_threads(a.threads);
#endif
  Eigen::setNbThreads(a.threads);

  vqkit::QuantizerBlockConfig cfg;
  cfg.dim = 256;
  cfg.quantizer.codebook_size = 1024;
  cfg.quantizer.dim = 1024;
  cfg.seed = a.seed;
  cfg.quantizer.seed = a.seed;
  cfg.quantizer.search_precision =
      a.precision == "bf16_rerank" ? vqkit::Precision::bf16_rerank : vqkit::Precision::fp32;
  Block block(cfg, vqkit::cpu{a.threads});

  const vqkit::Index rows = vqkit::Index(a.batch * a.tokens);
  vqkit::Rng rng(a.seed + 0x5eed);
  vqkit::RowMatrix<float> x(rows, cfg.dim), dy(rows, cfg.dim), y, dx;
  fill_normal(dy, rng);  // fixed for the whole run

  std::vector<double> step_ms;
  std::vector<StepInfo> infos;
  for (long s = 0; s < a.steps; ++s) {
    fill_normal(x, rng);  // outside the timed region
    const auto t0 = std::chrono::steady_clock::now();
    const StepInfo info = training_step(block, x, dy, y, dx);
    const auto t1 = std::chrono::steady_clock::now();
    step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    infos.push_back(info);
    std::fprintf(stderr, "vqkit step %ld: %.1f ms%s  vq_loss %.4g  usage %ld  perplexity %.1f\n", s,
                 step_ms.back(), info.data_initialized ? " [k-means init]" : "", info.vq_loss,
                 info.usage, info.perplexity);
  }

  if (!a.json.empty()) {
    std::ofstream f(a.json);
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", a.json.c_str());
      return 1;
    }
    f << "{\"impl\":\"vqkit\",\"batch\":" << a.batch << ",\"tokens\":" << a.tokens
      << ",\"threads\":" << a.threads;
    write_array(f, "step_ms", step_ms, num);
    std::vector<long> init_steps;
    std::vector<double> loss, perp;
    std::vector<long> usage;
    for (std::size_t i = 0; i < infos.size(); ++i) {
      if (infos[i].data_initialized) init_steps.push_back(long(i));
      loss.push_back(infos[i].vq_loss);
      usage.push_back(infos[i].usage);
      perp.push_back(infos[i].perplexity);
    }
    write_array(f, "init_steps", init_steps, [](long v) { return std::to_string(v); });
    write_array(f, "vq_loss", loss, num);
    write_array(f, "usage", usage, [](long v) { return std::to_string(v); });
    write_array(f, "perplexity", perp, num);
    f << "}\n";
  }
  return 0;
}
