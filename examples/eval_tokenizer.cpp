// eval_tokenizer - evaluates a tokenizer checkpoint of train_tokenizer: how
// well the scans come back through the tokens.
//
// For every frame (one at a time), tk.reconstruct(): the encoder turns the
// scan into tokens, the quantizer picks their codes (eval mode: no codebook
// update), the decoder builds the feature grid and the skip head's predicted
// occupancy, and every ray of the scan inside the ROI (or --rays N drawn per
// frame) is rendered. Per frame (lidar/eval_metrics.hpp):
//   depth MAE, RMSE            over the rays, metres
//   within 1 m                 share of rays with |rendered - measured| < 1 m
//   Chamfer                    (mean nearest distance A->B + B->A) / 2 between the
//                              input points of those rays (o + measured d: the scan's
//                              points in the ROI beyond ray_near) and the
//                              reconstructed points (o + rendered d)
// Over all frames: ray-weighted MAE / RMSE / within, the mean Chamfer, and
// the perplexity and usage of the codes over every eval frame's tokens.
// Writes eval.json, eval.md and bev_frame0.png (input | reconstruction, bird's
// eye view coloured by height) under --out. Run with --help.
//
// Exit status: 0 after a completed run, 1 on a vqkit or I/O error, 2 on a
// bad command line.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <vqkit/lidar/bev_image.hpp>
#include <vqkit/lidar/eval_metrics.hpp>
#include <vqkit/lidar/kitti.hpp>
#include <vqkit/lidar/synthetic_scene.hpp>
#include <vqkit/models/tokenizer.hpp>
#include <vqkit/models/tokenizer_checkpoint.hpp>
#include <vqkit/quantizer/metrics.hpp>

#include "cli.hpp"

namespace {

using vqkit::cli::bad_value;
using vqkit::cli::parse_int;
using vqkit::cli::UsageError;
namespace cli = vqkit::cli;

namespace fs = std::filesystem;
using vqkit::Index;
using vqkit::RowMatrix;

constexpr int kSyntheticFrames = 8;
constexpr const char* kDefaultData = "../shared/data/kitti/seq00";

struct Options {
  std::string checkpoint;
  std::string data;
  std::string out = "runs/tokenizer/eval";
  Index rays = 0;       // 0: every ray
  Index max_frames = 0;  // 0: every frame
  int threads = 0;
  std::uint64_t seed = 0;
  bool help = false;
};

void print_usage() {
  std::printf(
      "usage: eval_tokenizer --checkpoint FILE [options]\n"
      "\n"
      "Reconstructs every scan through a trained tokenizer and reports depth errors, the\n"
      "Chamfer distance and codebook usage. Options take '--flag VALUE' or '--flag=VALUE'.\n"
      "\n"
      "  --checkpoint FILE   a checkpoint written by train_tokenizer (required)\n"
      "  --data DIR          folder of KITTI .bin scans. Default: %s if it exists\n"
      "                      (working directory, then source tree), else the built-in\n"
      "                      synthetic street (%d frames, the same as train_tokenizer's);\n"
      "                      'synthetic' picks the synthetic street\n"
      "  --out DIR           eval.json, eval.md, bev_frame0.png (default runs/tokenizer/eval)\n"
      "  --rays N            rays per frame, drawn at random; 0 = every ray (default 0)\n"
      "  --frames N          evaluate the first N frames only; 0 = all (default 0)\n"
      "  --threads N         OpenMP threads, 0 = OpenMP's default (default 0)\n"
      "  --seed S            seed of the ray draws and depth samples (default 0)\n"
      "  --help              this text\n",
      kDefaultData, kSyntheticFrames);
}

Options parse_args(int argc, char** argv) {
  Options o;
  cli::Args args(argc, argv);
  while (args.next()) {
    const std::string_view flag = args.flag();
    const auto next = [&] { return args.value(); };
    const auto path = [&] { return args.path(); };
    if (flag == "--checkpoint") o.checkpoint = path();
    else if (flag == "--data") o.data = path();
    else if (flag == "--out") o.out = path();
    else if (flag == "--rays") o.rays = parse_int<Index>(flag, next(), 0, "an integer >= 0");
    else if (flag == "--frames") o.max_frames = parse_int<Index>(flag, next(), 0, "an integer >= 0");
    else if (flag == "--threads") o.threads = parse_int<int>(flag, next(), 0, "an integer >= 0");
    else if (flag == "--seed") o.seed = parse_int<std::uint64_t>(flag, next(), 0, "an integer in [0, 2^64)");
    else args.unknown();
  }
  o.help = args.help();
  if (!o.help && o.checkpoint.empty()) throw UsageError("--checkpoint FILE is required (see --help)");
  return o;
}

struct Dataset {
  std::vector<RowMatrix<float>> frames;
  std::string description;
};

/// The same choice as train_tokenizer's: --data, else the default KITTI
/// folder, else the synthetic street.
Dataset load_data(const std::string& dir, Index max_frames) {
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
  } else {
    auto files = vqkit::lidar::list_kitti_frames(folder);
    if (files.empty()) throw vqkit::error("no .bin scans in '" + folder + "'");
    if (max_frames > 0 && static_cast<Index>(files.size()) > max_frames)
      files.resize(static_cast<std::size_t>(max_frames));
    for (const auto& f : files) d.frames.push_back(vqkit::lidar::read_kitti_bin(f).points);
    d.description = "KITTI scans in " + fs::weakly_canonical(folder).string() + " (" +
                    std::to_string(files.size()) + " frames)";
    return d;
  }
  if (max_frames > 0 && static_cast<Index>(d.frames.size()) > max_frames)
    d.frames.resize(static_cast<std::size_t>(max_frames));
  return d;
}

struct FrameResult {
  Index rays = 0;
  double mae = 0, rmse = 0, within = 0, chamfer = 0, in_to_rec = 0, rec_to_in = 0;
  double perplexity = 0;
  Index usage = 0;
};

int run(const Options& o) {
#ifdef _OPENMP
  if (o.threads > 0) omp_set_num_threads(o.threads);
#endif
  if (o.threads > 0) Eigen::setNbThreads(o.threads);

  const vqkit::TokenizerConfig cfg = vqkit::read_tokenizer_config(o.checkpoint);
  vqkit::Rng init(cfg.seed);
  vqkit::Tokenizer<float> tk(cfg, init);
  const auto info = vqkit::load_tokenizer_weights(o.checkpoint, tk);
  const Dataset data = load_data(o.data, o.max_frames);
  std::printf("checkpoint: %s (step %lld)\n", o.checkpoint.c_str(), static_cast<long long>(info.step));
  std::printf("data:       %s\n", data.description.c_str());
  const auto trained_on = info.metadata.find("run.data");
  if (trained_on != info.metadata.end() && trained_on->second == data.description)
    std::printf("note:       these are the frames the checkpoint was trained on (no held-out split)\n");
  std::printf("rays:       %s per frame\n",
              o.rays > 0 ? std::to_string(o.rays).c_str() : "every ray in the ROI");

  fs::create_directories(o.out);
  vqkit::Rng rng(o.seed);
  std::vector<FrameResult> results;
  vqkit::Vector<double> counts = vqkit::Vector<double>::Zero(cfg.codebook_size);
  double sum_abs = 0, sum_sq = 0, sum_within = 0, bar_metres = 0;
  Index total_rays = 0;
  std::printf("\n%5s %8s %9s %9s %8s %10s %8s %6s\n", "frame", "rays", "MAE [m]", "RMSE [m]",
              "<1 m", "Chamfer[m]", "ppl", "codes");
  for (std::size_t fi = 0; fi < data.frames.size(); ++fi) {
    const std::vector<RowMatrix<float>> one{data.frames[fi]};
    const auto rec = tk.reconstruct(one, rng, o.rays);
    const auto& rays = rec.rays;
    const Index R = rays.size();
    if (R == 0) {
      std::printf("%5zu: no rays inside the ROI, skipped\n", fi);
      continue;
    }
    FrameResult fr;
    fr.rays = R;
    const auto de = vqkit::lidar::depth_errors<float>(rec.depth, rays.depth, 1.0);
    fr.mae = de.mae;
    fr.rmse = de.rmse;
    fr.within = de.within;
    RowMatrix<float> input(R, 3), recon(R, 3);
    for (Index r = 0; r < R; ++r) {
      input.row(r) = rays.origin.row(r) + rays.depth[r] * rays.direction.row(r);
      recon.row(r) = rays.origin.row(r) + rec.depth[r] * rays.direction.row(r);
    }
    const auto ch = vqkit::lidar::chamfer<float>(input, recon);
    fr.chamfer = ch.chamfer;
    fr.in_to_rec = ch.a_to_b;
    fr.rec_to_in = ch.b_to_a;
    fr.perplexity = rec.metrics.perplexity;
    fr.usage = rec.metrics.usage;
    for (Index i = 0; i < rec.codes.size(); ++i) counts[rec.codes[i]] += 1.0;
    sum_abs += de.mae * static_cast<double>(R);
    sum_sq += de.rmse * de.rmse * static_cast<double>(R);
    sum_within += de.within * static_cast<double>(R);
    total_rays += R;
    std::printf("%5zu %8lld %9.4f %9.4f %7.1f%% %10.4f %8.2f %6lld\n", fi,
                static_cast<long long>(R), fr.mae, fr.rmse, 100.0 * fr.within, fr.chamfer,
                fr.perplexity, static_cast<long long>(fr.usage));
    if (fi == 0) {
      // Both panels show the whole ROI at the same scale (square pixels),
      // each with a scale bar.
      auto view = vqkit::lidar::square_pixel_view(cfg.roi_x_min, cfg.roi_x_max, cfg.roi_y_min, cfg.roi_y_max);
      view.y_up = true;
      bar_metres = vqkit::lidar::scale_bar_metres(view);
      auto left = vqkit::lidar::bev_height_image<float>(input, view);
      auto right = vqkit::lidar::bev_height_image<float>(recon, view);
      vqkit::lidar::draw_scale_bar(left, view, bar_metres);
      vqkit::lidar::draw_scale_bar(right, view, bar_metres);
      vqkit::lidar::write_png((fs::path(o.out) / "bev_frame0.png").string(),
                              vqkit::lidar::side_by_side(left, right));
    }
    results.push_back(fr);
  }
  if (results.empty()) throw vqkit::error("no frame had rays inside the ROI");

  const auto all = vqkit::batch_metrics(counts);
  const double mae = sum_abs / static_cast<double>(total_rays);
  const double rmse = std::sqrt(sum_sq / static_cast<double>(total_rays));
  const double within = sum_within / static_cast<double>(total_rays);
  double chamfer = 0;
  for (const auto& r : results) chamfer += r.chamfer;
  chamfer /= static_cast<double>(results.size());
  std::printf("%5s %8lld %9.4f %9.4f %7.1f%% %10.4f %8.2f %6lld   (rays-weighted; Chamfer: "
              "mean over frames; ppl/codes: all tokens)\n",
              "all", static_cast<long long>(total_rays), mae, rmse, 100.0 * within, chamfer,
              all.perplexity, static_cast<long long>(all.usage));
  std::printf("codebook: %lld of %lld codes used by %lld tokens, perplexity %.2f\n",
              static_cast<long long>(all.usage), static_cast<long long>(cfg.codebook_size),
              static_cast<long long>(all.batch_rows), all.perplexity);

  nlohmann::ordered_json j;
  j["checkpoint"] = o.checkpoint;
  j["step"] = info.step;
  j["data"] = data.description;
  j["rays_per_frame"] = o.rays > 0 ? nlohmann::ordered_json(o.rays) : nlohmann::ordered_json("all");
  j["seed"] = o.seed;
  j["overall"] = {{"rays", total_rays},       {"depth_mae_m", mae},
                  {"depth_rmse_m", rmse},     {"within_1m", within},
                  {"chamfer_m", chamfer},     {"perplexity", all.perplexity},
                  {"codes_used", all.usage},  {"codebook_size", cfg.codebook_size},
                  {"tokens", all.batch_rows}};
  nlohmann::ordered_json frames = nlohmann::ordered_json::array();
  for (std::size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    frames.push_back({{"frame", i},
                      {"rays", r.rays},
                      {"depth_mae_m", r.mae},
                      {"depth_rmse_m", r.rmse},
                      {"within_1m", r.within},
                      {"chamfer_m", r.chamfer},
                      {"input_to_recon_m", r.in_to_rec},
                      {"recon_to_input_m", r.rec_to_in},
                      {"perplexity", r.perplexity},
                      {"codes_used", r.usage}});
  }
  j["frames"] = frames;
  const fs::path out(o.out);
  {
    std::ofstream f(out / "eval.json", std::ios::trunc);
    f << j.dump(2) << "\n";
    if (!f.good()) throw vqkit::error("cannot write " + (out / "eval.json").string());
  }
  {
    std::ofstream f(out / "eval.md", std::ios::trunc);
    char line[256];
    f << "# Tokenizer evaluation\n\n"
      << "- checkpoint: `" << o.checkpoint << "` (step " << info.step << ")\n"
      << "- data: " << data.description << "\n"
      << "- rays per frame: " << (o.rays > 0 ? std::to_string(o.rays) : "all in the ROI") << "\n\n"
      << "| frame | rays | depth MAE [m] | depth RMSE [m] | within 1 m | Chamfer [m] | perplexity | codes |\n"
      << "|---|---|---|---|---|---|---|---|\n";
    for (std::size_t i = 0; i < results.size(); ++i) {
      const auto& r = results[i];
      std::snprintf(line, sizeof line, "| %zu | %lld | %.4f | %.4f | %.1f%% | %.4f | %.2f | %lld |\n",
                    i, static_cast<long long>(r.rays), r.mae, r.rmse, 100.0 * r.within, r.chamfer,
                    r.perplexity, static_cast<long long>(r.usage));
      f << line;
    }
    std::snprintf(line, sizeof line,
                  "| all | %lld | %.4f | %.4f | %.1f%% | %.4f | %.2f | %lld |\n",
                  static_cast<long long>(total_rays), mae, rmse, 100.0 * within, chamfer,
                  all.perplexity, static_cast<long long>(all.usage));
    f << line
      << "\nDepth errors are over rays (the \"all\" row weights frames by their rays); Chamfer is "
         "(input->reconstruction + reconstruction->input) / 2 in metres, averaged over frames; "
         "perplexity and codes of the \"all\" row are over every frame's tokens. "
         "`bev_frame0.png`: input (left) and reconstruction (right), bird's eye view of the "
         "whole ROI, y up, the same extent and scale in both panels (square pixels), coloured by "
         "height; the white bar at the bottom left is "
      << bar_metres << " m.\n";
    if (!f.good()) throw vqkit::error("cannot write " + (out / "eval.md").string());
  }
  std::printf("wrote %s, %s, %s\n", (out / "eval.json").string().c_str(),
              (out / "eval.md").string().c_str(), (out / "bev_frame0.png").string().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return vqkit::cli::run_main("eval_tokenizer", [&] { return parse_args(argc, argv); }, print_usage, run);
}
