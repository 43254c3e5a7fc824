// vq_train - trains one vqkit::VectorQuantizer on a set of vectors and
// watches its codebook health.
//
// The data is a .fvecs / .bvecs file (--data) or, without one, a built-in
// Gaussian mixture generated from --seed, so the program runs on a machine
// with no data at all. Each step draws --batch rows uniformly at random (with
// replacement) and runs one training forward (EMA update, or plain SGD on the
// codebook with --update gradient). It prints a line every --log-every steps,
// writes every step to a CSV file and ends with a summary and a verdict:
// the last step's codebook health (CodebookMetrics::health) combined with a
// loss check over the run (no loss spike after warm-up). Run with --help for
// the options.
//
// Exit status: 0 after a completed run, whatever its verdict (it is a demo);
// 1 on a vqkit::error or an I/O error; 2 on a bad command line.

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <string_view>
#include <system_error>
#include <vector>

#include <vqkit/io/vecs.hpp>
#include <vqkit/vqkit.hpp>

#include "cli.hpp"
#include "quantizer_family.hpp"

namespace {

using vqkit::cli::bad_value;
using vqkit::cli::ends_with;
using vqkit::cli::parse_double;
using vqkit::cli::parse_int;
using vqkit::cli::UsageError;
namespace cli = vqkit::cli;

using vqkit::Index;
using Matrix = vqkit::RowMatrix<float>;
using Clock = std::chrono::steady_clock;

// ---- options ------------------------------------------------------------------------

constexpr Index kMixtureRows = 20000;
constexpr Index kMixtureComponents = 64;
constexpr Index kMixtureDim = 64;
constexpr double kWarmupFraction = 0.10;  // loss check: the first 10% of steps are warm-up
constexpr double kSpikeLimit = 0.10;      // loss check: allowed excess over the running minimum
constexpr std::int64_t kSmoothSteps = 5;  // loss check: moving average over this many steps
constexpr double kAutoLrFraction = 0.1;   // --lr auto: an average code moves 10% per step

struct Options {
  std::string data;               // empty: the built-in mixture
  Index max_rows = -1;            // -1: all
  Index code_dim = 0;             // 0: not given
  Index codebook_size = 512;
  Index batch = 4096;
  std::int64_t steps = 300;
  double decay = 0.99;
  double codebook_weight = 0.25;
  double commitment_weight = 1.0;
  vqkit::DeadCodePolicy dead_policy = vqkit::DeadCodePolicy::kmeans_reinit;
  vqkit::Metric metric = vqkit::Metric::l2;
  vqkit::CodebookUpdate update = vqkit::CodebookUpdate::ema;
  double lr = 0;                  // 0: auto
  std::uint64_t seed = 0;
  int threads = 0;
  std::int64_t log_every = 10;
  std::string csv = "vq_train.csv";
  std::string vq_config;          // JSON of VectorQuantizerConfig keys, applied over the flags
  std::string quantizer_config;   // JSON of the --quantizer's own config, applied last
  bool help = false;
  // the quantizer family (quantizer_family.hpp)
  std::string quantizer = "vq";   // vq | rvq | grouped | fsq | lfq
  bool autoencoder = false;
  Index latent_dim = 16;          // the autoencoder's code dimension (vq, rvq, grouped)
  Index rvq_levels = 4;
  Index groups = 4;
  bool shared = false;
  std::vector<int> fsq_levels = {8, 5, 5, 5};
  Index lfq_bits = 10;
  double lfq_entropy_weight = 0.1;
  double ae_lr = 1e-3;
};

void print_usage() {
  std::printf(
      "usage: vq_train [options]\n"
      "\n"
      "Trains one vqkit::VectorQuantizer on a set of vectors, prints its loss and codebook\n"
      "health, writes every step to a CSV file and ends with a summary and a verdict.\n"
      "Each step draws --batch rows uniformly at random (with replacement) from the data\n"
      "and runs one training forward. Options take a value as '--flag VALUE' or\n"
      "'--flag=VALUE'.\n"
      "\n"
      "data:\n"
      "  --data FILE               .fvecs or .bvecs file, chosen by the extension. Without\n"
      "                            it: a built-in Gaussian mixture of %lld rows, %lld\n"
      "                            components with different weights and scales, generated\n"
      "                            from --seed\n"
      "  --max-rows N              use at most the first N rows (default: all)\n"
      "  --code-dim D              the code dimension. This demo quantizes the raw vectors,\n"
      "                            so the code dimension IS the data's dimension: with\n"
      "                            --data leave it out (or give the file's dimension; any\n"
      "                            other value is an error); for the built-in mixture it\n"
      "                            sets the mixture's dimension (default %lld)\n"
      "quantizer:\n"
      "  --codebook-size K         number of codes (default 512)\n"
      "  --metric M                l2 | cosine (default l2)\n"
      "  --update U                ema | gradient (default ema)\n"
      "  --decay G                 EMA decay, in (0, 1) (default 0.99)\n"
      "  --codebook-weight W       weight of ||sg[x] - q||^2, >= 0 (default 0.25)\n"
      "  --commitment-weight W     weight of ||x - sg[q]||^2, >= 0 (default 1.0)\n"
      "  --dead-code-policy P      kmeans_reinit | replace | none (default kmeans_reinit)\n"
      "  --lr LR                   --update gradient only: plain SGD step on the codebook,\n"
      "                            > 0 (default auto = %.1f*K*D/(2*codebook-weight)). The\n"
      "                            loss is a mean over N*D entries, so the gradient of code k\n"
      "                            is 2*w*n_k/(N*D) times (code - mean of its rows), and a\n"
      "                            step of LR moves the code LR*2*w*n_k/(N*D) of the way to\n"
      "                            that mean: auto moves a code of average size (n_k = N/K)\n"
      "                            %.0f%% of the way per step (a fixed LR like 1.0 would\n"
      "                            barely move it: 2*w/(K*D), about 1e-5 of the way)\n"
      "training:\n"
      "  --batch N                 rows per step (default 4096)\n"
      "  --steps S                 training steps (default 300)\n"
      "  --seed S                  seed of the mixture, the batch draws and the quantizer\n"
      "                            (default 0)\n"
      "  --threads T               threads of the cpu backend, 0 = OpenMP's default\n"
      "                            (default 0)\n"
      "quantizer family (every kind but the default 'vq' runs the loop of\n"
      "examples/quantizer_family.hpp; the options above set each VQ level / head):\n"
      "  --quantizer Q             vq | rvq | grouped | fsq | lfq (default vq)\n"
      "  --autoencoder             train Linear(D -> d) -> quantizer -> Linear(d -> D) with\n"
      "                            AdamW on the reconstruction error (needed by fsq, lfq)\n"
      "  --latent-dim d            the autoencoder's code dimension for vq, rvq, grouped\n"
      "                            (default 16; fsq and lfq: the number of levels / bits)\n"
      "  --levels Q                rvq: levels (default 4)\n"
      "  --groups G                grouped: heads, G must divide the dimension (default 4)\n"
      "  --shared                  grouped: one codebook for every head\n"
      "  --fsq-levels L1,L2,...    fsq: levels per dimension (default 8,5,5,5)\n"
      "  --lfq-bits B              lfq: bits per code (default 10)\n"
      "  --lfq-entropy-weight W    lfq: entropy loss weight (default 0.1)\n"
      "  --ae-lr LR                the autoencoder's AdamW learning rate (default 1e-3)\n"
      "output:\n"
      "  --log-every N             print a line every N steps, plus step 1, the last step\n"
      "                            and every k-means (re)initialisation (default 10)\n"
      "  --csv FILE                per-step CSV, '' for none (default vq_train.csv)\n"
      "  --vq-config FILE          JSON object of VectorQuantizerConfig keys (any field, e.g.\n"
      "                            {\"gradient_estimator\": \"rotation\", \"dead.replace_after\": 20};\n"
      "                            docs/api.md), applied over the flags above; \"dim\" must\n"
      "                            match the data (or --latent-dim with --autoencoder)\n"
      "  --quantizer-config FILE   JSON of the --quantizer's own config (io/config_json.hpp):\n"
      "                            rvq: ResidualVQConfig keys and a \"level\" object of\n"
      "                            VectorQuantizerConfig keys; grouped: GroupedVQConfig keys\n"
      "                            and a \"head\" object; fsq: FsqConfig (\"levels\": [8,5,5,5]);\n"
      "                            lfq: LfqConfig; vq: as --vq-config. Applied last\n"
      "  --help                    this text\n"
      "\n"
      "Verdict: the last step's codebook health (healthy / degraded / collapsed, from its\n"
      "batch usage and perplexity against C = min(K, batch), see vqkit/quantizer/\n"
      "metrics.hpp), made 'degraded' at best if the loss check fails. Loss check (the\n"
      "seed's 'no loss spikes after warm-up'): the warm-up is the first %.0f%% of the steps,\n"
      "extended to the k-means init and its refinement if they come later; after it, the\n"
      "%lld-step moving average of the VQ loss must never rise more than %.0f%% above its\n"
      "running minimum. Relative, so it does not depend on the scale of the data; averaged,\n"
      "so the noise of sampling a batch does not count as a spike (a change of the codebook\n"
      "persists over steps; one odd batch does not).\n"
      "\n"
      "Exit status: 0 after a completed run whatever its verdict, 1 on a vqkit or I/O\n"
      "error, 2 on a bad option.\n",
      static_cast<long long>(kMixtureRows), static_cast<long long>(kMixtureComponents),
      static_cast<long long>(kMixtureDim), kAutoLrFraction, kAutoLrFraction * 100,
      kWarmupFraction * 100, static_cast<long long>(kSmoothSteps), kSpikeLimit * 100);
}

Options parse_args(int argc, char** argv) {
  Options o;
  cli::Args args(argc, argv);
  while (args.next()) {
    const std::string_view flag = args.flag();
    const auto next = [&] { return args.value(); };

    if (flag == "--data") {
      o.data = next();
      if (o.data.empty()) bad_value(flag, o.data, "a .fvecs or .bvecs file");
    } else if (flag == "--max-rows") {
      o.max_rows = parse_int<Index>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--code-dim") {
      o.code_dim = parse_int<Index>(flag, next(), 1, "an integer >= 1");
      if (o.code_dim > vqkit::io::vecs_max_dim)
        bad_value(flag, std::to_string(o.code_dim), "at most 2^20");
    } else if (flag == "--codebook-size") {
      o.codebook_size = parse_int<Index>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--batch") {
      o.batch = parse_int<Index>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--steps") {
      o.steps = parse_int<std::int64_t>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--decay") {
      o.decay = parse_double(flag, next(), [](double v) { return v > 0 && v < 1; },
                             "a number in (0, 1)");
    } else if (flag == "--codebook-weight") {
      o.codebook_weight = parse_double(flag, next(), [](double v) { return v >= 0; },
                                       "a finite number >= 0");
    } else if (flag == "--commitment-weight") {
      o.commitment_weight = parse_double(flag, next(), [](double v) { return v >= 0; },
                                         "a finite number >= 0");
    } else if (flag == "--dead-code-policy") {
      const std::string_view v = next();
      if (v == "kmeans_reinit") o.dead_policy = vqkit::DeadCodePolicy::kmeans_reinit;
      else if (v == "replace") o.dead_policy = vqkit::DeadCodePolicy::replace;
      else if (v == "none") o.dead_policy = vqkit::DeadCodePolicy::none;
      else bad_value(flag, v, "kmeans_reinit, replace or none");
    } else if (flag == "--metric") {
      const std::string_view v = next();
      if (v == "l2") o.metric = vqkit::Metric::l2;
      else if (v == "cosine") o.metric = vqkit::Metric::cosine;
      else bad_value(flag, v, "l2 or cosine");
    } else if (flag == "--update") {
      const std::string_view v = next();
      if (v == "ema") o.update = vqkit::CodebookUpdate::ema;
      else if (v == "gradient") o.update = vqkit::CodebookUpdate::gradient;
      else bad_value(flag, v, "ema or gradient");
    } else if (flag == "--lr") {
      const std::string_view v = next();
      o.lr = v == "auto" ? 0.0
                         : parse_double(flag, v, [](double x) { return x > 0; },
                                        "a finite number > 0, or auto");
    } else if (flag == "--seed") {
      o.seed = parse_int<std::uint64_t>(flag, next(), 0, "an integer in [0, 2^64)");
    } else if (flag == "--threads") {
      o.threads = parse_int<int>(flag, next(), 0, "an integer >= 0 (0 = OpenMP's default)");
    } else if (flag == "--log-every") {
      o.log_every = parse_int<std::int64_t>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--csv") {
      o.csv = next();
    } else if (flag == "--vq-config") {
      o.vq_config = next();
      if (o.vq_config.empty()) bad_value(flag, o.vq_config, "a JSON file");
    } else if (flag == "--quantizer-config") {
      o.quantizer_config = next();
      if (o.quantizer_config.empty()) bad_value(flag, o.quantizer_config, "a JSON file");
    } else if (flag == "--quantizer") {
      const std::string_view v = next();
      if (v != "vq" && v != "rvq" && v != "grouped" && v != "fsq" && v != "lfq")
        bad_value(flag, v, "vq, rvq, grouped, fsq or lfq");
      o.quantizer = std::string(v);
    } else if (flag == "--autoencoder") {
      o.autoencoder = true;
    } else if (flag == "--shared") {
      o.shared = true;
    } else if (flag == "--latent-dim") {
      o.latent_dim = parse_int<Index>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--levels") {
      o.rvq_levels = parse_int<Index>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--groups") {
      o.groups = parse_int<Index>(flag, next(), 1, "an integer >= 1");
    } else if (flag == "--lfq-bits") {
      o.lfq_bits = parse_int<Index>(flag, next(), 1, "an integer in [1, 20]");
    } else if (flag == "--lfq-entropy-weight") {
      o.lfq_entropy_weight = parse_double(flag, next(), [](double v) { return v >= 0; },
                                          "a finite number >= 0");
    } else if (flag == "--ae-lr") {
      o.ae_lr = parse_double(flag, next(), [](double v) { return v > 0; }, "a finite number > 0");
    } else if (flag == "--fsq-levels") {
      const std::string_view v = next();
      o.fsq_levels.clear();
      std::size_t start = 0;
      while (start <= v.size()) {
        const std::size_t comma = std::min(v.find(',', start), v.size());
        o.fsq_levels.push_back(parse_int<int>(flag, v.substr(start, comma - start), 2,
                                              "comma-separated integers >= 2"));
        start = comma + 1;
      }
    } else {
      args.unknown();
    }
  }
  o.help = args.help();
  return o;
}

// ---- data ---------------------------------------------------------------------------

/// The built-in data set: a mixture of `C` axis-aligned Gaussians in D
/// dimensions. Means ~ N(0, 3^2 I), well apart (about 3 sqrt(2D) between
/// two) compared with the spread of a component (scale s in [0.5, 2] times a
/// per-dimension factor in [0.67, 1.5]); weights differ up to 10x.
Matrix gaussian_mixture(Index rows, Index D, Index C, std::uint64_t seed) {
  vqkit::Rng rng(seed);
  auto log_uniform = [&](double lo, double hi) {
    return std::exp(std::log(lo) + (std::log(hi) - std::log(lo)) * rng.uniform());
  };
  Matrix mean(C, D), scale(C, D);
  std::vector<double> cumulative(static_cast<std::size_t>(C));
  double total = 0;
  for (Index c = 0; c < C; ++c) {
    const double s = log_uniform(0.5, 2.0);
    for (Index d = 0; d < D; ++d) {
      mean(c, d) = static_cast<float>(3.0 * rng.normal());
      scale(c, d) = static_cast<float>(s * log_uniform(1.0 / 1.5, 1.5));
    }
    total += log_uniform(1.0, 10.0);
    cumulative[static_cast<std::size_t>(c)] = total;
  }
  Matrix x(rows, D);
  for (Index i = 0; i < rows; ++i) {
    const double u = rng.uniform() * total;
    const auto it = std::upper_bound(cumulative.begin(), cumulative.end(), u);
    const Index c = std::min<Index>(C - 1, static_cast<Index>(it - cumulative.begin()));
    for (Index d = 0; d < D; ++d)
      x(i, d) = mean(c, d) + scale(c, d) * static_cast<float>(rng.normal());
  }
  return x;
}

struct Data {
  Matrix x;
  std::string description;
};

Data load_data(const Options& o, std::uint64_t mixture_seed) {
  Data data;
  if (o.data.empty()) {
    const Index D = o.code_dim > 0 ? o.code_dim : kMixtureDim;
    const Index rows = o.max_rows > 0 ? std::min(o.max_rows, kMixtureRows) : kMixtureRows;
    data.x = gaussian_mixture(rows, D, kMixtureComponents, mixture_seed);
    data.description = "built-in Gaussian mixture (" + std::to_string(kMixtureComponents) +
                       " components)";
    return data;
  }
  if (ends_with(o.data, ".fvecs"))
    data.x = vqkit::io::read_fvecs(o.data, o.max_rows);
  else if (ends_with(o.data, ".bvecs"))
    data.x = vqkit::io::read_bvecs(o.data, o.max_rows);
  else
    throw UsageError("--data: bad value '" + o.data +
                     "': the file name must end in .fvecs or .bvecs (the format is chosen by "
                     "the extension)");
  data.description = o.data;
  if (o.code_dim > 0 && o.code_dim != data.x.cols())
    throw UsageError("--code-dim: bad value '" + std::to_string(o.code_dim) + "': '" + o.data +
                     "' has dimension " + std::to_string(data.x.cols()) +
                     ", and this demo quantizes the raw vectors, so the code dimension is the "
                     "data's (leave --code-dim out)");
  if (!data.x.allFinite()) {
    for (Index i = 0; i < data.x.rows(); ++i)
      if (!data.x.row(i).allFinite())
        throw vqkit::error("vq_train: '" + o.data + "' holds a non-finite value in row " +
                           std::to_string(i));
  }
  return data;
}

// ---- the run ------------------------------------------------------------------------

struct StepRecord {
  vqkit::VqLoss loss;
  vqkit::CodebookMetrics metrics;
  double wall_s = 0;  // since the start of training
  std::string event;
};

std::string percent(double part, double whole) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", whole > 0 ? 100.0 * part / whole : 0.0);
  return buf;
}

std::string fraction(Index n, Index K) { return std::to_string(n) + "/" + std::to_string(K); }

int digits(Index v) { return static_cast<int>(std::to_string(v).size()); }

/// Every kind of quantizer, or the autoencoder (quantizer_family.hpp).
int run_family(const Options& o, const Data& data, vqkit::VectorQuantizerConfig cfg,
               std::uint64_t batch_seed) {
  namespace fam = vqkit::family;
  const Index D = data.x.cols(), d = o.autoencoder ? o.latent_dim : D;
  const vqkit::cpu backend{o.threads};
  std::unique_ptr<fam::Quantizer> q;
  cfg.dim = d;
  // The flags' config, then --quantizer-config's keys over it.
  const auto with_file = [&](const auto& flags) {
    return o.quantizer_config.empty() ? flags : vqkit::load_config_json(o.quantizer_config, flags);
  };
  if (o.quantizer == "vq") {
    q = std::make_unique<fam::Adapter<vqkit::VectorQuantizer<float>>>(cfg, backend);  // (files applied)
  } else if (o.quantizer == "rvq") {
    vqkit::ResidualVQConfig rc;
    rc.levels = o.rvq_levels;
    rc.level = cfg;
    q = std::make_unique<fam::Adapter<vqkit::ResidualVQ<float>>>(with_file(rc), backend);
  } else if (o.quantizer == "grouped") {
    if (d % o.groups != 0)
      throw UsageError("--groups: bad value '" + std::to_string(o.groups) + "': it must divide the code dimension " +
                       std::to_string(d));
    vqkit::GroupedVQConfig gc;
    gc.groups = o.groups;
    gc.shared = o.shared;
    gc.head = cfg;
    gc.head.dim = d / o.groups;
    q = std::make_unique<fam::Adapter<vqkit::GroupedVQ<float>>>(with_file(gc), backend);
  } else if (o.quantizer == "fsq") {
    vqkit::FsqConfig fc;
    fc.levels = o.fsq_levels;
    q = std::make_unique<fam::Adapter<vqkit::FSQ<float>>>(with_file(fc));
  } else {
    vqkit::LfqConfig lc;
    lc.dim = o.lfq_bits;
    lc.entropy_weight = o.lfq_entropy_weight;
    q = std::make_unique<fam::Adapter<vqkit::LFQ<float>>>(with_file(lc));
  }
  std::printf("vq_train: %s: %lld rows x %lld dims, batch %lld, %lld steps, seed %llu\n",
              data.description.c_str(), static_cast<long long>(data.x.rows()), static_cast<long long>(D),
              static_cast<long long>(o.batch), static_cast<long long>(o.steps),
              static_cast<unsigned long long>(o.seed));
  fam::RunOptions ro;
  ro.batch = o.batch;
  ro.steps = o.steps;
  ro.log_every = o.log_every;
  ro.autoencoder = o.autoencoder;
  ro.lr = o.ae_lr;
  ro.seed = o.seed;
  ro.batch_seed = batch_seed;
  ro.threads = o.threads;
  ro.csv = o.csv;
  return fam::run(*q, data.x, ro);
}

int run(const Options& o) {
  // Independent streams for the mixture and the batch draws; the quantizer
  // (memory bank, k-means, replacements) gets --seed itself.
  vqkit::Rng seeder(o.seed);
  const std::uint64_t mixture_seed = seeder.next(), batch_seed = seeder.next();

  const auto t_load = Clock::now();
  Data data = load_data(o, mixture_seed);
  const double load_s = std::chrono::duration<double>(Clock::now() - t_load).count();
  const Matrix& X = data.x;
  const Index n = X.rows(), D = X.cols(), N = o.batch;

  vqkit::VectorQuantizerConfig cfg;
  cfg.codebook_size = o.codebook_size;
  cfg.dim = o.autoencoder ? o.latent_dim : D;  // run_family sets the same
  cfg.metric = o.metric;
  cfg.search.metric = o.metric;  // the search reads SearchOptions::metric
  cfg.update = o.update;
  cfg.ema.decay = o.decay;
  cfg.loss.codebook_weight = o.codebook_weight;
  cfg.loss.commitment_weight = o.commitment_weight;
  cfg.dead.policy = o.dead_policy;
  cfg.seed = o.seed;
  // --vq-config's keys over the flags (and, for vq, --quantizer-config's).
  const std::pair<const char*, std::string> files[] = {
      {"--vq-config", o.vq_config}, {"--quantizer-config", o.quantizer == "vq" ? o.quantizer_config : ""}};
  for (const auto& [flag, file] : files) {
    if (file.empty()) continue;
    const Index dim = cfg.dim;
    cfg = vqkit::load_config_json(file, cfg);
    if (cfg.dim != dim)
      throw UsageError(std::string(flag) + ": '" + file + "' sets dim=" + std::to_string(cfg.dim) +
                       ", but the code dimension is " + std::to_string(dim));
  }
  const Index K = cfg.codebook_size;
  const vqkit::cpu backend{o.threads};
  if (o.threads > 0) Eigen::setNbThreads(o.threads);
  if (o.quantizer != "vq" || o.autoencoder) return run_family(o, data, cfg, batch_seed);
  vqkit::VectorQuantizer<float> vq(cfg, backend);
  vq.train();

  const bool gradient = cfg.update == vqkit::CodebookUpdate::gradient;
  double lr = o.lr;
  std::string lr_note;
  if (gradient && lr == 0) {
    if (cfg.loss.codebook_weight > 0) {
      lr = kAutoLrFraction * double(K) * double(D) / (2.0 * cfg.loss.codebook_weight);
      lr_note = " (auto)";
    } else {
      lr_note = " (auto; --codebook-weight 0 gives the codebook no gradient, codes stay put)";
    }
  }

  std::printf("vq_train: %s: %lld rows x %lld dims (%.2f s to %s)\n", data.description.c_str(),
              static_cast<long long>(n), static_cast<long long>(D), load_s,
              o.data.empty() ? "generate" : "read");
  std::printf("  K=%lld codes of dim %lld, batch %lld (uniform, with replacement), %lld steps, "
              "seed %llu, %d threads\n",
              static_cast<long long>(K), static_cast<long long>(D), static_cast<long long>(N),
              static_cast<long long>(o.steps), static_cast<unsigned long long>(o.seed),
              backend.num_threads());
  std::printf("  metric %s, update %s", vqkit::to_string(cfg.metric), vqkit::to_string(cfg.update));
  if (gradient) std::printf(" (SGD, lr %g%s)", lr, lr_note.c_str());
  else std::printf(" (decay %g)", cfg.ema.decay);
  std::printf(", loss weights codebook %g / commitment %g, dead-code policy %s\n",
              cfg.loss.codebook_weight, cfg.loss.commitment_weight, vqkit::to_string(cfg.dead.policy));
  if (K > n)
    std::printf("  note: K=%lld exceeds the %lld rows of the data; some codes must stay unused\n",
                static_cast<long long>(K), static_cast<long long>(n));

  std::ofstream csv;
  if (!o.csv.empty()) {
    csv.open(o.csv, std::ios::trunc);
    if (!csv.is_open())
      throw std::runtime_error("--csv: cannot create '" + o.csv + "': " + std::strerror(errno));
    csv << "step,loss,codebook_loss,commitment_loss,distortion,perplexity,entropy,"
           "normalized_entropy,usage,window_usage,dead,cluster_min,cluster_mean,cluster_max,"
           "health,event,wall_s\n";
  }

  const int wu = 2 * digits(K) + 1;  // width of an "n/K" column
  std::printf("\nusage = codes picked by the batch, window = codes picked in the last %lld steps, "
              "dead = codes unused for >= %lld steps\n",
              static_cast<long long>(cfg.usage_window), static_cast<long long>(cfg.dead.dead_after));
  std::printf("%6s %12s %12s %12s %10s %*s %*s %6s  %s\n", "step", "loss", "codebook",
              "commitment", "perplexity", wu, "usage", wu, "window", "dead", "events");

  vqkit::Rng draw(batch_seed);
  Matrix x(N, D), q;
  const Matrix no_upstream(0, D);  // backward: no gradient from above
  std::vector<StepRecord> history;
  history.reserve(static_cast<std::size_t>(o.steps));
  std::int64_t inits = 0, first_init_step = 0, refine_step = 0;
  Index replaced_since_line = 0;
  bool reinit_since_line = false;
  const auto t_train = Clock::now();

  for (std::int64_t step = 1; step <= o.steps; ++step) {
    for (Index i = 0; i < N; ++i) x.row(i) = X.row(Index(draw.below(std::uint64_t(n))));
    auto ctx = vq.forward(x, q);
    if (gradient) {
      vq.backward(ctx, no_upstream, nullptr);
      for (auto& p : vq.parameters()) *p.value -= float(lr) * *p.grad;
      vq.zero_grad();
    }

    StepRecord r;
    r.loss = ctx.loss;
    r.metrics = ctx.metrics;
    r.wall_s = std::chrono::duration<double>(Clock::now() - t_train).count();
    bool force_line = false;
    auto add_event = [&r](const std::string& e) { r.event += (r.event.empty() ? "" : " ") + e; };
    if (ctx.data_initialized) {
      ++inits;
      if (inits == 1) {
        first_init_step = step;
        add_event("kmeans_init");
      } else {
        refine_step = step;
        add_event("kmeans_refine");
      }
      force_line = true;
    }
    if (ctx.reinitialized) {
      add_event("kmeans_reinit");
      reinit_since_line = force_line = true;
    }
    if (ctx.replaced > 0) {
      add_event("replaced:" + std::to_string(ctx.replaced));
      replaced_since_line += ctx.replaced;
    }

    if (csv.is_open()) {
      const auto& m = r.metrics;
      char buf[512];
      std::snprintf(buf, sizeof buf,
                    "%lld,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%.9g,%lld,%lld,%lld,%.9g,%.9g,%.9g,%s,%s,"
                    "%.6f\n",
                    static_cast<long long>(step), r.loss.total, r.loss.codebook, r.loss.commitment,
                    r.loss.distortion, m.perplexity, m.entropy, m.normalized_entropy,
                    static_cast<long long>(m.usage), static_cast<long long>(m.window_usage),
                    static_cast<long long>(m.dead), m.cluster_size_min, m.cluster_size_mean,
                    m.cluster_size_max, vqkit::to_string(m.health), r.event.c_str(), r.wall_s);
      csv << buf;
    }

    if (step == 1 || step % o.log_every == 0 || step == o.steps || force_line) {
      // Events of this line's step, plus replacements / re-inits since the last line.
      std::string events;
      if (ctx.data_initialized) events = inits == 1 ? "k-means init" : "k-means refine";
      if (reinit_since_line) events += std::string(events.empty() ? "" : ", ") + "k-means re-init";
      if (replaced_since_line > 0)
        events += std::string(events.empty() ? "" : ", ") +
                  std::to_string(replaced_since_line) + " codes replaced since the last line";
      const auto& m = r.metrics;
      if (!events.empty()) events.insert(0, "  ");
      std::printf("%6lld %12.6g %12.6g %12.6g %10.1f %*s %*s %6lld%s\n",
                  static_cast<long long>(step), r.loss.total, r.loss.codebook, r.loss.commitment,
                  m.perplexity, wu, fraction(m.usage, K).c_str(), wu,
                  fraction(m.window_usage, K).c_str(), static_cast<long long>(m.dead),
                  events.c_str());
      std::fflush(stdout);
      replaced_since_line = 0;
      reinit_since_line = false;
    }
    history.push_back(std::move(r));
  }
  const double train_s = std::chrono::duration<double>(Clock::now() - t_train).count();
  if (csv.is_open()) {
    csv.close();
    if (csv.fail()) throw std::runtime_error("writing the CSV file '" + o.csv + "' failed");
  }

  // ---- summary ------------------------------------------------------------------------
  const std::int64_t S = o.steps;
  const StepRecord& last = history.back();
  const auto& m = last.metrics;
  const Index C = std::min(K, N);
  Index min_usage = K;
  std::int64_t min_usage_step = 0;
  for (std::int64_t s = 2; s <= S; ++s) {
    const Index u = history[std::size_t(s - 1)].metrics.usage;
    if (u < min_usage) {
      min_usage = u;
      min_usage_step = s;
    }
  }

  // Loss check (see --help): after the warm-up, the moving average of the loss
  // against its running minimum since the warm-up.
  auto mean_loss = [&](std::int64_t from, std::int64_t to) {
    double acc = 0;
    for (std::int64_t s = from; s <= to; ++s) acc += history[std::size_t(s - 1)].loss.total;
    return acc / double(to - from + 1);
  };
  const auto warmup_fraction_steps =
      static_cast<std::int64_t>(std::ceil(kWarmupFraction * double(S)));
  const std::int64_t last_init_step = std::max(first_init_step, refine_step);
  const std::int64_t warmup =
      std::min<std::int64_t>(S, std::max(warmup_fraction_steps, last_init_step));
  const bool loss_checked = warmup < S;
  const std::int64_t smooth = std::min<std::int64_t>(kSmoothSteps, S - warmup);
  double worst_excess = 0, running_min = std::numeric_limits<double>::infinity();
  std::int64_t worst_step = 0, spikes = 0;
  for (std::int64_t s = warmup + smooth; loss_checked && s <= S; ++s) {
    const double avg = mean_loss(s - smooth + 1, s);
    running_min = std::min(running_min, avg);
    const double excess = running_min > 0 ? (avg - running_min) / running_min : 0.0;
    if (excess > worst_excess) {
      worst_excess = excess;
      worst_step = s;
    }
    if (excess > kSpikeLimit) ++spikes;
  }
  const bool loss_ok = spikes == 0;

  vqkit::Health verdict = m.health;
  if (!loss_ok && verdict == vqkit::Health::healthy) verdict = vqkit::Health::degraded;

  std::printf("\nsummary after %lld steps\n", static_cast<long long>(S));
  std::printf("  final loss       %.6g (codebook %.6g + commitment %.6g; distortion %.6g per "
              "entry)\n",
              last.loss.total, last.loss.codebook, last.loss.commitment, last.loss.distortion);
  std::printf("  final usage      %s codes in the batch (%s of K); last %lld steps: %s (%s)\n",
              fraction(m.usage, K).c_str(), percent(double(m.usage), double(K)).c_str(),
              static_cast<long long>(m.window), fraction(m.window_usage, K).c_str(),
              percent(double(m.window_usage), double(K)).c_str());
  std::printf("  perplexity       %.1f (%s of K); normalized entropy %.4f\n", m.perplexity,
              percent(m.perplexity, double(K)).c_str(), m.normalized_entropy);
  if (S >= 2)
    std::printf("  min batch usage  %s (%s of K) at step %lld, over steps 2..%lld\n",
                fraction(min_usage, K).c_str(), percent(double(min_usage), double(K)).c_str(),
                static_cast<long long>(min_usage_step), static_cast<long long>(S));
  else
    std::printf("  min batch usage  n/a (a single step)\n");
  std::printf("  dead codes       %lld (unused for >= %lld steps)\n",
              static_cast<long long>(m.dead), static_cast<long long>(cfg.dead.dead_after));
  if (first_init_step > 0)
    std::printf("  events           k-means init at step %lld",
                static_cast<long long>(first_init_step));
  else
    std::printf("  events           no k-means init yet (the memory bank holds %lld of the %lld "
                "rows it waits for)",
                static_cast<long long>(vq.memory_bank().size()),
                static_cast<long long>(cfg.init_rows()));
  if (refine_step > 0) std::printf(", refined at step %lld", static_cast<long long>(refine_step));
  std::printf("; %lld k-means re-inits; %lld codes replaced\n",
              static_cast<long long>(vq.reinit_count()), static_cast<long long>(vq.replaced_count()));
  if (m.overflow_rows > 0)
    std::printf("  memory bank      %lld rows did not fit (batch > bank of %lld rows)\n",
                static_cast<long long>(m.overflow_rows), static_cast<long long>(cfg.bank_rows()));
  std::printf("  time             %.2f ms/step (%.2f s for %lld steps, %d threads)\n",
              1000.0 * train_s / double(S), train_s, static_cast<long long>(S),
              backend.num_threads());
  std::printf("  codebook health  %s at the last step, with C = min(K, batch) = %lld:\n"
              "                   usage %lld (healthy > 0.8 C = %.1f, collapsed < 300/1024 C = "
              "%.1f),\n"
              "                   perplexity %.1f (healthy > 500/1024 C = %.1f, collapsed < "
              "200/1024 C = %.1f)\n",
              vqkit::to_string(m.health), static_cast<long long>(C),
              static_cast<long long>(m.usage), 0.8 * double(C), 300.0 / 1024.0 * double(C),
              m.perplexity, 500.0 / 1024.0 * double(C), 200.0 / 1024.0 * double(C));
  if (loss_checked) {
    std::printf("  loss check       %s: warm-up = steps 1..%lld (%s); over steps %lld..%lld "
                "the %lld-step\n"
                "                   moving average of the loss rose more than %.0f%% above its "
                "running minimum %lld times;\n"
                "                   largest rise %.2f%%%s\n",
                loss_ok ? "ok" : "FAILED", static_cast<long long>(warmup),
                last_init_step > warmup_fraction_steps ? "up to the last k-means init"
                                                       : "the first 10% of the steps",
                static_cast<long long>(warmup + 1), static_cast<long long>(S),
                static_cast<long long>(smooth), kSpikeLimit * 100, static_cast<long long>(spikes),
                100.0 * worst_excess,
                worst_step > 0 ? (" (at step " + std::to_string(worst_step) + ")").c_str() : "");
    const std::int64_t span = std::max<std::int64_t>(1, (S - warmup) / 10);
    const double early = mean_loss(warmup + 1, warmup + span), late = mean_loss(S - span + 1, S);
    std::printf("  loss trend       mean %.6g over steps %lld..%lld, %.6g over steps %lld..%lld "
                "(%+.2f%%)\n",
                early, static_cast<long long>(warmup + 1), static_cast<long long>(warmup + span),
                late, static_cast<long long>(S - span + 1), static_cast<long long>(S),
                early > 0 ? 100.0 * (late - early) / early : 0.0);
  } else {
    std::printf("  loss check       not done: no steps after the warm-up (steps 1..%lld)\n",
                static_cast<long long>(warmup));
  }
  if (!o.csv.empty()) std::printf("  csv              %s\n", o.csv.c_str());
  std::printf("verdict: %s\n", vqkit::to_string(verdict));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return vqkit::cli::run_main("vq_train", [&] { return parse_args(argc, argv); }, print_usage, run);
}
