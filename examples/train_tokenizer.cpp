// train_tokenizer - trains the CoPilot4D LiDAR tokenizer (vqkit/models/
// tokenizer.hpp) on KITTI scans or on the built-in synthetic street, with a
// progress line, a per-step CSV, gnuplot curves, checkpoints and exact resume.
//
// Each step (s = 0, 1, ..., steps - 1; one Rng, the "data Rng", makes every
// random choice of the step, in this order):
//   frames   batch_size frames drawn uniformly (with replacement) from the data
//   augment  each frame rotated about the sensor's z axis and mirrored
//            (lidar/augment.hpp; augment_yaw_deg, augment_flip)
//   batch    tk.make_batch(frames, data_rng, rays_per_frame)  (voxels, rays, samples)
//   forward/backward  tk.zero_grad(); tk.step(batch, true)
//   clip     g = clip_grad_norm(params, grad_clip)
//   lr       WarmupCosine(lr, min(warmup_steps, steps), steps, 0.1 lr).lr(s)
//   update   AdamW step (skipped, and counted, if g is not finite)
// A checkpoint (models/tokenizer_checkpoint.hpp) holds the model, AdamW, the
// quantizer and the data Rng, so --resume continues with exactly the same
// draws and updates as a run that never stopped: bit-identical with the same
// --threads (checked: 30 steps straight vs 15 + resume + 15 give the same
// checkpoint bytes), and with any other thread count too: every product and
// reduction of a step is vqkit's own, with a fixed order (docs/tokenizer.md).
//
// Validation (--val-data DIR, or --holdout N: the last N frames of the data
// are not trained on): every --val-every steps and after the last one, the
// held-out frames and as many training frames (the first ones) are
// reconstructed as eval_tokenizer does (tk.reconstruct: quantizer in eval
// mode, --val-rays rays per frame drawn by a fixed-seed Rng, the same rays
// every time), and depth MAE, the share of rays within 1 m and the codes
// used by their tokens go to val.csv and val.png. Validation draws nothing
// from the data Rng and changes no state: the training steps are the same
// bit for bit with or without it.
//
// Outputs under --out: train.csv (one row per step), loss.png and
// codebook.png (when gnuplot is installed; the .gp scripts are always
// written), val.csv and val.png with validation,
// checkpoints/step_NNNNNN.safetensors. Run with --help.
//
// Exit status: 0 after a completed run, 1 on a vqkit or I/O error, 2 on a
// bad command line.

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <vqkit/lidar/augment.hpp>
#include <vqkit/lidar/eval_metrics.hpp>
#include <vqkit/lidar/kitti.hpp>
#include <vqkit/lidar/synthetic_scene.hpp>
#include <vqkit/models/tokenizer.hpp>
#include <vqkit/models/tokenizer_checkpoint.hpp>
#include <vqkit/optim/adamw.hpp>
#include <vqkit/optim/clip.hpp>
#include <vqkit/optim/schedule.hpp>
#include <vqkit/tokenizer/config.hpp>
#include <vqkit/util/progress.hpp>

#include "cli.hpp"

namespace {

using vqkit::cli::bad_value;
using vqkit::cli::parse_int;
using vqkit::cli::UsageError;
namespace cli = vqkit::cli;

namespace fs = std::filesystem;
using vqkit::Index;
using Clock = std::chrono::steady_clock;

constexpr std::int64_t kDefaultSteps = 300;  // a demo length, not the config's total_steps
constexpr int kSyntheticFrames = 8;
constexpr const char* kDefaultData = "../shared/data/kitti/seq00";

struct Options {
  std::string config;  // empty: the small preset (or the checkpoint's config with --resume)
  std::string data;    // empty: the default folder if it exists, else synthetic
  std::int64_t steps = -1;  // -1: kDefaultSteps, or the resumed run's length
  std::string out = "runs/tokenizer";
  std::int64_t checkpoint_every = 100;
  std::string resume;
  std::string val_data;         // held-out frames from another folder
  Index holdout = 0;            // or: the last N frames of --data
  std::int64_t val_every = 50;  // validation period in steps
  Index val_rays = 16384;       // rays per validation frame (0: all in the ROI)
  int threads = 0;
  bool has_seed = false;
  std::uint64_t seed = 0;
  bool help = false;
};

void print_usage() {
  std::printf(
      "usage: train_tokenizer [options]\n"
      "\n"
      "Trains the CoPilot4D LiDAR tokenizer (vqkit::Tokenizer<float>) on LiDAR scans.\n"
      "Options take a value as '--flag VALUE' or '--flag=VALUE'.\n"
      "\n"
      "  --config FILE          TokenizerConfig JSON (examples/configs/; keys may override a\n"
      "                         preset). Default: the small preset, or with --resume the\n"
      "                         checkpoint's own config\n"
      "  --data DIR             folder of KITTI .bin scans. Default: %s if it exists\n"
      "                         (relative to the working directory, then to the source\n"
      "                         tree), else the built-in synthetic street (%d frames);\n"
      "                         'synthetic' picks the synthetic street\n"
      "  --steps N              total training steps, also the length of the cosine schedule\n"
      "                         (default %lld for the demo, not the config's total_steps; with\n"
      "                         --resume: the resumed run's length)\n"
      "  --out DIR              CSV, plots and checkpoints (default runs/tokenizer)\n"
      "  --checkpoint-every N   save every N steps, 0 = only at the end (default 100)\n"
      "  --resume FILE          continue from a checkpoint of this program\n"
      "  --val-data DIR         held-out KITTI frames to validate on (val.csv, val.png)\n"
      "  --holdout N            or: hold out the last N frames of the data (not trained on)\n"
      "  --val-every N          validate every N steps and at the end (default 50)\n"
      "  --val-rays N           rays per validation frame, 0 = all in the ROI (default 16384)\n"
      "  --threads N            OpenMP and Eigen threads, 0 = OpenMP's default (default 0);\n"
      "                         results do not depend on it (bit for bit)\n"
      "  --seed S               overrides the config's seed (model init, data draws and\n"
      "                         quantizer derive from it)\n"
      "  --help                 this text\n",
      kDefaultData, kSyntheticFrames, static_cast<long long>(kDefaultSteps));
}

Options parse_args(int argc, char** argv) {
  Options o;
  cli::Args args(argc, argv);
  while (args.next()) {
    const std::string_view flag = args.flag();
    const auto next = [&] { return args.value(); };
    const auto path = [&] { return args.path(); };
    if (flag == "--config") o.config = path();
    else if (flag == "--data") o.data = path();
    else if (flag == "--out") o.out = path();
    else if (flag == "--resume") o.resume = path();
    else if (flag == "--val-data") o.val_data = path();
    else if (flag == "--holdout") o.holdout = parse_int<Index>(flag, next(), 1, "an integer >= 1");
    else if (flag == "--val-every") o.val_every = parse_int<std::int64_t>(flag, next(), 1, "an integer >= 1");
    else if (flag == "--val-rays") o.val_rays = parse_int<Index>(flag, next(), 0, "an integer >= 0");
    else if (flag == "--steps") o.steps = parse_int<std::int64_t>(flag, next(), 1, "an integer >= 1");
    else if (flag == "--checkpoint-every")
      o.checkpoint_every = parse_int<std::int64_t>(flag, next(), 0, "an integer >= 0");
    else if (flag == "--threads") o.threads = parse_int<int>(flag, next(), 0, "an integer >= 0");
    else if (flag == "--seed") {
      o.seed = parse_int<std::uint64_t>(flag, next(), 0, "an integer in [0, 2^64)");
      o.has_seed = true;
    } else
      args.unknown();
  }
  o.help = args.help();
  if (!o.val_data.empty() && o.holdout > 0)
    throw UsageError("--val-data and --holdout exclude each other (see --help)");
  return o;
}

// ---- data ---------------------------------------------------------------------------

struct Dataset {
  std::vector<vqkit::RowMatrix<float>> frames;
  std::string description;
};

/// --data, else the default KITTI folder (working directory, then source
/// tree), else the synthetic street.
Dataset load_data(const std::string& dir) {
  Dataset d;
  std::string folder = dir;
  if (folder.empty()) {
    std::vector<std::string> candidates{kDefaultData};
#ifdef VQKIT_SOURCE_DIR
    candidates.push_back(std::string(VQKIT_SOURCE_DIR) + "/" + kDefaultData);
#endif
    for (const auto& c : candidates) {
      std::error_code ec;
      if (fs::is_directory(c, ec) && !vqkit::lidar::list_kitti_frames(c).empty()) {
        folder = c;
        break;
      }
    }
  }
  if (folder.empty() || folder == "synthetic") {
    for (auto& f : vqkit::lidar::synthetic_sequence(0, kSyntheticFrames))
      d.frames.push_back(std::move(f.points));
    d.description = "synthetic street (lidar::synthetic_sequence, seed 0, " +
                    std::to_string(kSyntheticFrames) + " frames)";
    return d;
  }
  const auto files = vqkit::lidar::list_kitti_frames(folder);
  if (files.empty()) throw vqkit::error("no .bin scans in '" + folder + "'");
  for (const auto& f : files) d.frames.push_back(vqkit::lidar::read_kitti_bin(f).points);
  d.description = "KITTI scans in " + fs::weakly_canonical(folder).string() + " (" +
                  std::to_string(files.size()) + " frames)";
  return d;
}

// ---- CSV history ----------------------------------------------------------------------

const std::vector<std::string> kColumns = {
    "step",      "seconds",    "lr",           "total", "depth_l1", "surface", "occupancy", "vq",
    "grad_norm", "perplexity", "usage", "window_usage", "dead",     "reinit",  "replaced",
    "lag_fraction", "bank_staleness", "ema_decay"};
enum Col { kStep, kSeconds, kLr, kTotal, kDepth, kSurface, kOcc, kVq, kGrad, kPpl, kUsage, kWindow,
           kDead, kReinit, kReplaced, kLag, kStale, kDecay };

/// Rows of an earlier CSV of these columns (step first) with step <= last_step
/// (for --resume).
std::vector<std::vector<double>> read_history(const std::string& path, const std::vector<std::string>& columns,
                                              std::int64_t last_step) {
  std::vector<std::vector<double>> rows;
  std::ifstream in(path);
  if (!in.good()) return rows;
  std::string line;
  std::getline(in, line);
  std::string header;
  for (std::size_t i = 0; i < columns.size(); ++i) header += (i ? "," : "") + columns[i];
  if (line != header) return rows;
  while (std::getline(in, line)) {
    std::vector<double> v;
    std::stringstream ss(line);
    std::string cell;
    while (std::getline(ss, cell, ',')) {
      double x = std::nan("");
      if (cell != "nan") {
        try {
          x = std::stod(cell);
        } catch (const std::exception&) {
          break;
        }
      }
      v.push_back(x);
    }
    if (v.size() != columns.size()) continue;
    if (v[0] <= static_cast<double>(last_step)) rows.push_back(std::move(v));
  }
  return rows;
}

double mean_of(const std::vector<double>& v, std::size_t begin, std::size_t end) {
  double s = 0;
  for (std::size_t i = begin; i < end; ++i) s += v[i];
  return end > begin ? s / static_cast<double>(end - begin) : std::nan("");
}

double median_of(std::vector<double> v) {
  if (v.empty()) return std::nan("");
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string checkpoint_name(const fs::path& dir, std::int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%06lld.safetensors", static_cast<long long>(step));
  return (dir / buf).string();
}

// ---- validation -------------------------------------------------------------------

const std::vector<std::string> kValColumns = {"step",      "train_mae", "train_within_1m", "train_codes",
                                              "val_mae",   "val_within_1m", "val_codes", "val_perplexity"};
constexpr std::uint64_t kValSeed = 0x5eed0fa1;  // the validation rays: the same at every step

struct Scores {
  double mae = std::nan(""), within = std::nan(""), perplexity = std::nan("");
  Index codes = 0, rays = 0;
};

/// Reconstructs each frame alone as eval_tokenizer does and scores it: depth
/// MAE and share within 1 m over all rays, codes used and perplexity over all
/// tokens. Uses its own Rng; the tokenizer's training state is untouched.
Scores score_frames(vqkit::Tokenizer<float>& tk, const std::vector<vqkit::RowMatrix<float>>& frames, Index rays) {
  vqkit::Rng rng(kValSeed);
  vqkit::Vector<double> counts = vqkit::Vector<double>::Zero(tk.config().codebook_size);
  double sum_abs = 0, sum_within = 0;
  Scores sc;
  for (const auto& f : frames) {
    const auto rec = tk.reconstruct({f}, rng, rays);
    const Index R = rec.rays.size();
    if (R == 0) continue;
    const auto de = vqkit::lidar::depth_errors<float>(rec.depth, rec.rays.depth, 1.0);
    sum_abs += de.mae * static_cast<double>(R);
    sum_within += de.within * static_cast<double>(R);
    sc.rays += R;
    for (Index i = 0; i < rec.codes.size(); ++i) counts[rec.codes[i]] += 1.0;
  }
  if (sc.rays == 0) return sc;
  sc.mae = sum_abs / static_cast<double>(sc.rays);
  sc.within = sum_within / static_cast<double>(sc.rays);
  const auto m = vqkit::batch_metrics(counts);
  sc.codes = m.usage;
  sc.perplexity = m.perplexity;
  return sc;
}

int run(const Options& o) {
#ifdef _OPENMP
  if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
  if (o.threads > 0) Eigen::setNbThreads(o.threads);
#ifdef _OPENMP
  const int threads = omp_get_max_threads();
#else
  const int threads = 1;
#endif

  vqkit::TokenizerConfig cfg;
  std::string config_source = "the small preset";
  if (!o.config.empty()) {
    cfg = vqkit::TokenizerConfig::load(o.config);
    config_source = o.config;
  } else if (!o.resume.empty()) {
    cfg = vqkit::read_tokenizer_config(o.resume);
    config_source = "the checkpoint " + o.resume;
  }
  if (o.has_seed) cfg.seed = o.seed;
  cfg.validate();

  Dataset data = load_data(o.data);
  std::vector<vqkit::RowMatrix<float>> val_frames;
  std::string val_description;
  if (o.holdout > 0) {
    if (static_cast<Index>(data.frames.size()) <= o.holdout)
      throw UsageError("--holdout " + std::to_string(o.holdout) + ": the data has only " +
                       std::to_string(data.frames.size()) + " frames; keep at least one to train on");
    const auto first = data.frames.end() - o.holdout;
    val_frames.assign(std::make_move_iterator(first), std::make_move_iterator(data.frames.end()));
    data.frames.erase(first, data.frames.end());
    val_description = "the last " + std::to_string(o.holdout) + " frame(s) of the data, held out";
    data.description += ", the last " + std::to_string(o.holdout) + " held out for validation";
  } else if (!o.val_data.empty()) {
    Dataset v = load_data(o.val_data);
    val_frames = std::move(v.frames);
    val_description = v.description;
  }
  std::printf("data:    %s\n", data.description.c_str());
  if (!val_frames.empty())
    std::printf("val:     %s; every %lld steps, %s rays per frame\n", val_description.c_str(),
                static_cast<long long>(o.val_every),
                o.val_rays > 0 ? std::to_string(o.val_rays).c_str() : "all");
  std::printf("config:  %s (voxels %lldx%lldx%lld, K=%lld, D=%lld, batch %lld, %lld rays/frame)\n",
              config_source.c_str(), static_cast<long long>(cfg.voxels_x),
              static_cast<long long>(cfg.voxels_y), static_cast<long long>(cfg.voxels_z),
              static_cast<long long>(cfg.codebook_size), static_cast<long long>(cfg.code_dim),
              static_cast<long long>(cfg.batch_size), static_cast<long long>(cfg.rays_per_frame));

  vqkit::Rng init_rng(cfg.seed);
  vqkit::Tokenizer<float> tk(cfg, init_rng);
  vqkit::AdamWOptions ao;
  ao.lr = cfg.lr;
  ao.beta1 = cfg.beta1;
  ao.beta2 = cfg.beta2;
  ao.weight_decay = cfg.weight_decay;
  vqkit::AdamW<float> opt(tk.parameters(), ao);
  vqkit::Rng data_rng(cfg.seed + 1);
  const vqkit::ParameterList<float> params = tk.parameters();

  std::int64_t start = 0;
  std::int64_t steps = o.steps > 0 ? o.steps : kDefaultSteps;
  if (!o.resume.empty()) {
    const auto info = vqkit::load_training_checkpoint(o.resume, tk, opt, data_rng);
    start = info.step;
    const auto it = info.metadata.find("run.steps");
    if (it != info.metadata.end()) {
      const std::int64_t saved = std::stoll(it->second);
      if (o.steps <= 0) steps = saved;
      else if (saved != o.steps)
        std::printf("note:    the checkpoint's run was %lld steps, --steps is %lld: the lr "
                    "schedule changes, so the run will differ from the original\n",
                    static_cast<long long>(saved), static_cast<long long>(o.steps));
    }
    const auto d = info.metadata.find("run.data");
    if (d != info.metadata.end() && d->second != data.description)
      std::printf("note:    the checkpoint was trained on %s\n", d->second.c_str());
    std::printf("resume:  %s at step %lld\n", o.resume.c_str(), static_cast<long long>(start));
  }
  const std::int64_t warmup = std::min<std::int64_t>(cfg.warmup_steps, steps);
  const vqkit::WarmupCosine sched(cfg.lr, warmup, steps, 0.1 * cfg.lr);
  std::printf("run:     steps %lld..%lld of %lld%s, lr %g warm-up %lld%s then cosine to %g; "
              "augment yaw +-%g deg, flip %g; threads %d\n",
              static_cast<long long>(start + 1), static_cast<long long>(steps),
              static_cast<long long>(steps), o.steps > 0 ? "" : " (demo default)", cfg.lr,
              static_cast<long long>(warmup),
              warmup < cfg.warmup_steps ? " (config's warm-up cut to the run)" : "", 0.1 * cfg.lr,
              cfg.augment_yaw_deg, cfg.augment_flip, threads);
  if (start >= steps) {
    std::printf("nothing to do: the checkpoint is at step %lld of %lld\n",
                static_cast<long long>(start), static_cast<long long>(steps));
    return 0;
  }

  const fs::path out(o.out);
  const fs::path ckpt_dir = out / "checkpoints";
  fs::create_directories(ckpt_dir);
  const std::string csv_path = (out / "train.csv").string();
  std::vector<std::vector<double>> history;
  if (!o.resume.empty()) {
    history = read_history(csv_path, kColumns, start);
    if (static_cast<std::int64_t>(history.size()) != start)
      std::printf("note:    %s holds %zu of the %lld earlier steps; the summary covers what "
                  "it has\n",
                  csv_path.c_str(), history.size(), static_cast<long long>(start));
  }
  vqkit::CsvLogger csv(csv_path, kColumns);
  for (const auto& row : history) csv.row(row);
  // Validation: the held-out frames and as many training frames (at least 2).
  const std::string val_path = (out / "val.csv").string();
  std::unique_ptr<vqkit::CsvLogger> val_csv;
  std::vector<vqkit::RowMatrix<float>> train_probe;
  std::vector<std::vector<double>> val_history;
  if (!val_frames.empty()) {
    const std::size_t n_probe = std::min(data.frames.size(), std::max<std::size_t>(2, val_frames.size()));
    train_probe.assign(data.frames.begin(), data.frames.begin() + static_cast<std::ptrdiff_t>(n_probe));
    if (!o.resume.empty()) val_history = read_history(val_path, kValColumns, start);
    val_csv = std::make_unique<vqkit::CsvLogger>(val_path, kValColumns);
    for (const auto& row : val_history) val_csv->row(row);
  }
  double last_val_mae = std::nan("");
  // Validation and checkpoints run between steps: the activations the
  // tokenizer keeps for the next step are freed first (the next step maps
  // them again), so they do not add to these passes' peak memory.
  const auto validate = [&](std::int64_t step) {
    tk.release_buffers();
    const Scores tr = score_frames(tk, train_probe, o.val_rays);
    const Scores va = score_frames(tk, val_frames, o.val_rays);
    std::vector<double> row{static_cast<double>(step), tr.mae, tr.within, static_cast<double>(tr.codes),
                            va.mae, va.within, static_cast<double>(va.codes), va.perplexity};
    val_csv->row(row);
    val_history.push_back(std::move(row));
    last_val_mae = va.mae;
  };

  const std::map<std::string, std::string> meta{{"run.steps", std::to_string(steps)},
                                                {"run.data", data.description},
                                                {"run.threads", std::to_string(threads)}};
  const auto save = [&](std::int64_t step) {
    const std::string p = checkpoint_name(ckpt_dir, step);
    tk.release_buffers();
    vqkit::save_training_checkpoint(p, tk, opt, step, data_rng, meta);
    return p;
  };

  vqkit::ProgressBar bar(steps - start);
  std::vector<double> step_seconds;
  std::int64_t skipped = 0;
  std::string last_ckpt;
  const auto n_frames = static_cast<std::uint64_t>(data.frames.size());
  for (std::int64_t s = start; s < steps; ++s) {
    const auto t0 = Clock::now();
    std::vector<vqkit::RowMatrix<float>> frames;
    frames.reserve(static_cast<std::size_t>(cfg.batch_size));
    for (Index b = 0; b < cfg.batch_size; ++b) {
      const auto k = data_rng.below(n_frames);
      frames.push_back(vqkit::lidar::augment_frame(data.frames[k], data_rng, cfg.augment_yaw_deg,
                                                   cfg.augment_flip));
    }
    const auto batch = tk.make_batch(frames, data_rng, cfg.rays_per_frame);
    tk.zero_grad();
    const auto r = tk.step(batch, true);
    const double g = vqkit::clip_grad_norm(params, cfg.grad_clip);
    const double lr = sched.lr(s);
    opt.set_lr(lr);
    if (std::isfinite(g)) {
      opt.step();
    } else {
      ++skipped;
      std::fprintf(stderr, "\nstep %lld: gradient norm %g is not finite; update skipped\n",
                   static_cast<long long>(s + 1), g);
    }
    const double sec = std::chrono::duration<double>(Clock::now() - t0).count();
    step_seconds.push_back(sec);
    const auto& m = r.metrics;
    std::vector<double> row{static_cast<double>(s + 1),
                            sec,
                            lr,
                            r.loss.total,
                            r.loss.depth_l1,
                            r.loss.surface,
                            r.loss.occupancy,
                            r.loss.vq,
                            g,
                            m.perplexity,
                            static_cast<double>(m.usage),
                            static_cast<double>(m.window_usage),
                            static_cast<double>(m.dead),
                            static_cast<double>(tk.net.vq.reinit_count()),
                            static_cast<double>(tk.net.vq.replaced_count()),
                            m.lag_fraction,
                            m.bank_staleness,
                            m.ema_decay};
    csv.row(row);
    history.push_back(row);
    vqkit::Metrics shown;
    if (val_csv && (s + 1) % o.val_every == 0 && s + 1 < steps) validate(s + 1);
    if (start > 0) shown.emplace_back("step", static_cast<double>(s + 1));
    shown.insert(shown.end(), {{"L1", r.loss.depth_l1},
                               {"vq", r.loss.vq},
                               {"ppl", m.perplexity},
                               {"use", static_cast<double>(m.usage)},
                               {"win", static_cast<double>(m.window_usage)},
                               {"dead", static_cast<double>(m.dead)}});
    if (val_csv) shown.emplace_back("valMAE", last_val_mae);
    bar.update(s + 1 - start, shown);
    if (o.checkpoint_every > 0 && (s + 1) % o.checkpoint_every == 0 && s + 1 < steps)
      last_ckpt = save(s + 1);
  }
  last_ckpt = save(steps);
  if (val_csv) validate(steps);

  const bool plotted_loss = vqkit::plot_csv(csv_path, (out / "loss.png").string(), "step",
                                            {"total", "depth_l1", "surface", "occupancy", "vq"},
                                            "tokenizer losses", true);
  const bool plotted_cb =
      vqkit::plot_csv(csv_path, (out / "codebook.png").string(), "step",
                      {"perplexity", "usage", "window_usage", "dead"}, "codebook usage", false);
  const bool plotted_val =
      val_csv && vqkit::plot_csv(val_path, (out / "val.png").string(), "step",
                                 {"train_mae", "val_mae", "train_within_1m", "val_within_1m"},
                                 "reconstruction: training vs held-out frames (depth MAE [m], share within 1 m)",
                                 false);

  // ---- summary ----
  std::vector<double> l1, use, win;
  for (const auto& row : history) {
    l1.push_back(row[kDepth]);
    use.push_back(row[kUsage]);
    win.push_back(row[kWindow]);
  }
  const std::size_t n = l1.size(), k = std::min<std::size_t>(10, n);
  std::printf("\nsummary (%zu steps logged)\n", n);
  std::printf("  depth L1, mean of the first %zu steps: %.4f m\n", k, mean_of(l1, 0, k));
  std::printf("  depth L1, mean of the last %zu steps:  %.4f m\n", k, mean_of(l1, n - k, n));
  const auto min_over = [](const std::vector<double>& v, std::size_t begin) {
    double m = std::nan("");
    for (std::size_t i = begin; i < v.size(); ++i) m = std::isnan(m) ? v[i] : std::min(m, v[i]);
    return m;
  };
  const std::size_t last100 = n > 100 ? n - 100 : 0;
  if (n > 50)
    std::printf("  codes used per batch, min after step 50: %g (window usage min %g) of K=%lld\n",
                min_over(use, 50), min_over(win, 50), static_cast<long long>(cfg.codebook_size));
  else
    std::printf("  codes used per batch, min after step 50: n/a (run shorter than 51 steps)\n");
  std::printf("  codes used per batch, min over the last %zu steps: %g (window usage min %g)\n",
              n - last100, min_over(use, last100), min_over(win, last100));
  std::printf("  step time, median of this run's %zu steps: %.3f s\n", step_seconds.size(),
              median_of(step_seconds));
  if (skipped > 0) std::printf("  updates skipped (non-finite gradient): %lld\n", static_cast<long long>(skipped));
  std::printf("  quantizer: %lld k-means re-inits, %lld codes replaced\n",
              static_cast<long long>(tk.net.vq.reinit_count()),
              static_cast<long long>(tk.net.vq.replaced_count()));
  if (val_csv && !val_history.empty()) {
    const auto& v = val_history.back();
    std::printf("  validation at step %lld (%zu training frames | %zu held-out frames): depth MAE %.4f | "
                "%.4f m, within 1 m %.1f%% | %.1f%%, codes used %g | %g of K=%lld\n",
                static_cast<long long>(v[0]), train_probe.size(), val_frames.size(), v[1], v[4],
                100.0 * v[2], 100.0 * v[5], v[3], v[6], static_cast<long long>(cfg.codebook_size));
    std::printf("  val csv: %s%s\n", val_path.c_str(),
                plotted_val ? (", plot " + (out / "val.png").string()).c_str() : "");
  }
  std::printf("  csv: %s\n", csv_path.c_str());
  std::printf("  plots: %s\n", plotted_loss && plotted_cb
                                   ? ((out / "loss.png").string() + ", " +
                                      (out / "codebook.png").string()).c_str()
                                   : "not made (gnuplot missing or failed; .gp scripts written)");
  std::printf("  checkpoint: %s\n", last_ckpt.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return vqkit::cli::run_main("train_tokenizer", [&] { return parse_args(argc, argv); }, print_usage, run);
}
