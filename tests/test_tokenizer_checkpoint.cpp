// Tests for vqkit/models/tokenizer_checkpoint.hpp and vqkit/lidar/augment.hpp.
//
// Checkpoints: a tiny tokenizer trained 4 steps without stopping, against 2
// steps + save + load into a freshly built Tokenizer / AdamW / data Rng (all
// three made from different seeds, so nothing matches unless the load
// restores it) + 2 more steps: every parameter, both AdamW moments and its
// step count, every field of the quantizer's State and the data Rng must be
// bit-identical, and so must the losses of the resumed steps. Bad files (a
// different config, a NaN, a wrong shape, a missing or unknown tensor, a
// quantizer-only file, different AdamW options, an optimiser over other
// tensors) are rejected with a message naming the problem, and leave the
// model, optimiser, quantizer and Rng exactly as they were.
//
// Augmentation: against independent formulas: ranges ||p|| and heights z are
// kept, the drawn angle lies in [-yaw, yaw] and rotates (1, 0) to (cos, sin),
// the flip maps y -> -y (det -1: a mirror, not a rotation), yaw 0 / flip 0 is
// the identity, flip 1 always mirrors, the same Rng state gives the same
// frame, and the Rng advances by exactly two draws.
#include <catch2/catch.hpp>
#include <vqkit/io/checkpoint.hpp>
#include <vqkit/lidar/augment.hpp>
#include <vqkit/lidar/synthetic_scene.hpp>
#include <vqkit/models/tokenizer.hpp>
#include <vqkit/models/tokenizer_checkpoint.hpp>
#include <vqkit/optim/adamw.hpp>
#include <vqkit/optim/clip.hpp>
#include <vqkit/optim/schedule.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numbers>
#include <string>
#include <unistd.h>
#include <vector>

using vqkit::Index;
using vqkit::Rng;
using vqkit::RowMatrix;
using vqkit::TokenizerConfig;
using Tk = vqkit::Tokenizer<float>;
using Opt = vqkit::AdamW<float>;

namespace {

/// The tiny config of test_tokenizer.cpp (16 x 16 x 4 voxels over +-6.4 m),
/// with a small memory bank and a short dead-code horizon so that the k-means
/// init and the dead-code machinery run within four steps, and augmentation on.
TokenizerConfig tiny_config() {
  TokenizerConfig c = TokenizerConfig::small();
  c.roi_x_min = c.roi_y_min = -6.4;
  c.roi_x_max = c.roi_y_max = 6.4;
  c.roi_z_min = -2.0;
  c.roi_z_max = 2.0;
  c.voxels_x = c.voxels_y = 16;
  c.voxels_z = 4;
  c.pointnet_dim = 4;
  c.bev_dim = 6;
  c.patch_size = 2;
  c.embed_dim = 8;
  c.merged_dim = 16;
  c.num_heads = 2;
  c.window_size = 2;
  c.stage1_depth = c.stage2_depth = 1;
  c.codebook_size = 8;
  c.code_dim = 4;
  c.memory_bank_size = 40;
  c.dead_code_after = 2;
  c.usage_window = 3;
  c.feature_grid_xy = 16;
  c.feature_grid_z = 4;
  c.feature_channels = 3;
  c.render_mlp_dim = 5;
  c.occupancy_pool = 4;
  c.rays_per_frame = 12;
  c.samples_per_ray = 6;
  c.ray_far = 10.0;
  c.warmup_steps = 1;
  c.total_steps = 4;
  c.batch_size = 2;
  c.augment_yaw_deg = 30.0;
  c.augment_flip = 0.5;
  return c;
}

/// Three coarse synthetic scans (32 beams x 360 azimuths) scaled into the
/// tiny ROI (made once).
const std::vector<RowMatrix<float>>& pool() {
  static const std::vector<RowMatrix<float>> frames = [] {
    vqkit::lidar::ScanOptions opt;
    opt.pattern.beams = 32;
    opt.pattern.azimuths = 360;
    std::vector<RowMatrix<float>> out;
    for (auto& f : vqkit::lidar::synthetic_sequence(5, 3, opt)) {
      f.points.leftCols<3>() *= 0.25f;
      out.push_back(std::move(f.points));
    }
    return out;
  }();
  return frames;
}

vqkit::AdamWOptions adamw_options(const TokenizerConfig& c) {
  vqkit::AdamWOptions o;
  o.lr = c.lr;
  o.beta1 = c.beta1;
  o.beta2 = c.beta2;
  o.weight_decay = c.weight_decay;
  return o;
}

/// One training step as examples/train_tokenizer.cpp makes it; returns the total loss.
double train_step(Tk& tk, Opt& opt, Rng& data, const std::vector<RowMatrix<float>>& frames,
                  std::int64_t s) {
  const TokenizerConfig& c = tk.config();
  std::vector<RowMatrix<float>> batch_frames;
  for (Index b = 0; b < c.batch_size; ++b) {
    const auto k = data.below(frames.size());
    batch_frames.push_back(
        vqkit::lidar::augment_frame(frames[k], data, c.augment_yaw_deg, c.augment_flip));
  }
  const auto batch = tk.make_batch(batch_frames, data, c.rays_per_frame);
  tk.zero_grad();
  const auto r = tk.step(batch, true);
  vqkit::clip_grad_norm(tk.parameters(), c.grad_clip);
  const vqkit::WarmupCosine sched(c.lr, c.warmup_steps, c.total_steps, 0.1 * c.lr);
  opt.set_lr(sched.lr(s));
  opt.step();
  return r.loss.total;
}

struct Snapshot {
  std::vector<RowMatrix<float>> params;
  Opt::State optim;
  vqkit::VectorQuantizer<float>::State vq;
  Rng::State rng{};
};

Snapshot snapshot(Tk& tk, const Opt& opt, const Rng& rng) {
  Snapshot s;
  for (const auto& p : tk.parameters()) s.params.push_back(*p.value);
  s.optim = opt.state();
  s.vq = tk.net.vq.state();
  s.rng = rng.state();
  return s;
}

template <class M>
bool same(const M& a, const M& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), sizeof(*a.data()) * a.size()) == 0);
}

/// Every field compared exactly (bitwise for floats).
void require_identical(const Snapshot& a, const Snapshot& b) {
  REQUIRE(a.params.size() == b.params.size());
  for (std::size_t i = 0; i < a.params.size(); ++i) {
    INFO("parameter " << i);
    CHECK(same(a.params[i], b.params[i]));
  }
  CHECK(a.optim.step == b.optim.step);
  REQUIRE(a.optim.tensors.size() == b.optim.tensors.size());
  for (const auto& [name, m] : a.optim.tensors) {
    INFO("optimiser tensor " << name);
    REQUIRE(b.optim.tensors.count(name) == 1);
    CHECK(same(m, b.optim.tensors.at(name)));
  }
  const auto &x = a.vq, &y = b.vq;
  CHECK(same(x.codes, y.codes));
  CHECK(same(x.grad, y.grad));
  CHECK(same(x.ema.cluster_size, y.ema.cluster_size));
  CHECK(same(x.ema.embed_sum, y.ema.embed_sum));
  CHECK(same(x.steps_since_used, y.steps_since_used));
  CHECK(same(x.used_since_reset, y.used_since_reset));
  CHECK(x.bank_size == y.bank_size);
  CHECK(same(RowMatrix<float>(x.bank.topRows(x.bank_size)),
             RowMatrix<float>(y.bank.topRows(y.bank_size))));
  CHECK(x.bank_head == y.bank_head);
  CHECK(x.bank_overflow == y.bank_overflow);
  CHECK(x.rng == y.rng);
  CHECK(x.step == y.step);
  CHECK(x.reinits == y.reinits);
  CHECK(x.replaced == y.replaced);
  CHECK(x.skipped == y.skipped);
  CHECK(x.data_initialized == y.data_initialized);
  CHECK(x.init_refined == y.init_refined);
  CHECK(x.training == y.training);
  CHECK(a.rng == b.rng);
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("vqkit_tkckpt_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

/// Expects `f` to throw a vqkit::error whose message holds `needle`.
template <class F>
void require_error_with(F&& f, const std::string& needle) {
  try {
    f();
    FAIL("no error thrown; expected one mentioning '" << needle << "'");
  } catch (const vqkit::error& e) {
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("2 steps + save + load + 2 steps is bit-identical to 4 steps", "[tokenizer_checkpoint]") {
  const TokenizerConfig cfg = tiny_config();
  const auto& frames = pool();

  // The reference: 4 steps straight.
  Rng init_a(1);
  Tk a(cfg, init_a);
  Opt opt_a(a.parameters(), adamw_options(cfg));
  Rng data_a(100);
  std::vector<double> loss_a;
  for (std::int64_t s = 0; s < 4; ++s) loss_a.push_back(train_step(a, opt_a, data_a, frames, s));
  CHECK(a.net.vq.data_initialized());  // the k-means init ran

  // 2 steps, save.
  Rng init_b(1);
  Tk b(cfg, init_b);
  Opt opt_b(b.parameters(), adamw_options(cfg));
  Rng data_b(100);
  for (std::int64_t s = 0; s < 2; ++s) CHECK(train_step(b, opt_b, data_b, frames, s) == loss_a[std::size_t(s)]);
  const std::string path = temp_path("resume.safetensors");
  vqkit::save_training_checkpoint(path, b, opt_b, 2, data_b, {{"note", "hello"}});

  // A fresh tokenizer, optimiser and Rng from other seeds: nothing matches yet.
  Rng init_c(999);
  Tk c(cfg, init_c);
  Opt opt_c(c.parameters(), adamw_options(cfg));
  Rng data_c(12345);
  CHECK_FALSE(same(*c.parameters()[0].value, *b.parameters()[0].value));
  const auto info = vqkit::load_training_checkpoint(path, c, opt_c, data_c);
  CHECK(info.step == 2);
  CHECK(info.config == cfg);
  CHECK(info.metadata.at("note") == "hello");
  CHECK(info.metadata.count("format") == 0);
  require_identical(snapshot(c, opt_c, data_c), snapshot(b, opt_b, data_b));

  for (std::int64_t s = 2; s < 4; ++s) CHECK(train_step(c, opt_c, data_c, frames, s) == loss_a[std::size_t(s)]);
  require_identical(snapshot(c, opt_c, data_c), snapshot(a, opt_a, data_a));
  CHECK(opt_c.step_count() == 4);

  // The file is a plain safetensors file with the documented names.
  const auto f = vqkit::safetensors::load(path);
  CHECK(f.metadata.at("format") == "vqkit.tokenizer_training");
  for (const auto& p : b.parameters()) {
    CHECK(f.contains("model." + p.name));
    CHECK(f.contains("optim." + p.name + ".exp_avg"));
  }
  CHECK(f.contains("vq.codebook"));
  CHECK(f.contains("vq.memory_bank.rows"));
  CHECK(f.contains("optim.step"));
  CHECK(f.contains("train.data_rng"));
  CHECK(f.metadata.count("vq.codebook_size") == 1);
  CHECK(vqkit::read_tokenizer_config(path) == cfg);

  // Weights only (evaluation): parameters and quantizer, not the optimiser.
  Rng init_d(7);
  Tk d(cfg, init_d);
  vqkit::load_tokenizer_weights(path, d);
  for (std::size_t i = 0; i < d.parameters().size(); ++i)
    CHECK(same(*d.parameters()[i].value, *b.parameters()[i].value));
  CHECK(same(d.net.vq.codebook(), b.net.vq.codebook()));
  std::filesystem::remove(path);
}

TEST_CASE("bad or mismatched checkpoints are rejected and change nothing", "[tokenizer_checkpoint]") {
  const TokenizerConfig cfg = tiny_config();
  const auto& frames = pool();
  Rng init(1);
  Tk src(cfg, init);
  Opt opt_src(src.parameters(), adamw_options(cfg));
  Rng data_src(100);
  for (std::int64_t s = 0; s < 2; ++s) train_step(src, opt_src, data_src, frames, s);
  const vqkit::safetensors::File good = vqkit::to_training_safetensors(src, opt_src, 2, data_src);

  // The target: trained one step from other seeds, so its state is not the file's.
  Rng init_t(2);
  Tk tk(cfg, init_t);
  Opt opt(tk.parameters(), adamw_options(cfg));
  Rng data(55);
  train_step(tk, opt, data, frames, 0);
  const Snapshot before = snapshot(tk, opt, data);
  const auto load = [&](const vqkit::safetensors::File& f) {
    vqkit::from_training_safetensors(f, tk, opt, data);
  };
  const std::string param0 = tk.parameters()[0].name;

  SECTION("a different config names the first differing key") {
    TokenizerConfig other = cfg;
    other.depth_weight = 2.0;
    Rng r(3);
    Tk tk2(other, r);
    Opt opt2(tk2.parameters(), adamw_options(other));
    Rng d2(4);
    const Snapshot b2 = snapshot(tk2, opt2, d2);
    require_error_with([&] { vqkit::from_training_safetensors(good, tk2, opt2, d2); },
                       "depth_weight");
    require_identical(snapshot(tk2, opt2, d2), b2);
  }
  SECTION("a non-finite parameter") {
    auto f = good;
    auto& t = f.tensors.at("model." + param0);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(t.bytes.data(), &nan, sizeof nan);
    require_error_with([&] { load(f); }, "non-finite");
  }
  SECTION("a wrong shape") {
    auto f = good;
    f.tensors["model." + param0] = vqkit::safetensors::from_matrix(RowMatrix<float>::Zero(1, 3));
    require_error_with([&] { load(f); }, "has shape");
  }
  SECTION("a missing optimiser tensor") {
    auto f = good;
    f.tensors.erase("optim." + param0 + ".exp_avg_sq");
    require_error_with([&] { load(f); }, param0 + ".exp_avg_sq");
  }
  SECTION("a negative second moment") {
    auto f = good;
    auto& t = f.tensors.at("optim." + param0 + ".exp_avg_sq");
    const float neg = -1.0f;
    std::memcpy(t.bytes.data(), &neg, sizeof neg);
    require_error_with([&] { load(f); }, "negative");
  }
  SECTION("an unknown model tensor") {
    auto f = good;
    f.tensors["model.extra.weight"] = vqkit::safetensors::from_matrix(RowMatrix<float>::Zero(1, 1));
    require_error_with([&] { load(f); }, "model.extra.weight");
  }
  SECTION("a bad quantizer part, found after the model part passed") {
    auto f = good;
    auto& t = f.tensors.at("vq.codebook");
    const float inf = std::numeric_limits<float>::infinity();
    std::memcpy(t.bytes.data(), &inf, sizeof inf);
    require_error_with([&] { load(f); }, "codebook");
  }
  SECTION("an all-zero data Rng") {
    auto f = good;
    f.tensors["train.data_rng"] = vqkit::safetensors::from_vector(std::vector<std::uint64_t>(4, 0));
    require_error_with([&] { load(f); }, "train.data_rng");
  }
  SECTION("different AdamW options") {
    auto o = adamw_options(cfg);
    o.eps = 1e-6;
    Opt opt2(tk.parameters(), o);
    require_error_with([&] { vqkit::from_training_safetensors(good, tk, opt2, data); },
                       "optim.eps");
  }
  SECTION("an optimiser over other tensors") {
    Rng r(3);
    Tk other(cfg, r);
    Opt opt2(other.parameters(), adamw_options(cfg));
    require_error_with([&] { vqkit::from_training_safetensors(good, tk, opt2, data); },
                       "build AdamW from tk.parameters()");
  }
  SECTION("a quantizer-only checkpoint, a missing file, a float64 file") {
    const std::string path = temp_path("quantizer_only.safetensors");
    vqkit::save_checkpoint(path, src.net.vq);
    require_error_with([&] { vqkit::load_training_checkpoint(path, tk, opt, data); },
                       "not a vqkit tokenizer training checkpoint");
    std::filesystem::remove(path);
    require_error_with(
        [&] { vqkit::load_training_checkpoint(temp_path("missing.safetensors"), tk, opt, data); },
        "missing.safetensors");
    auto f = good;
    f.metadata["scalar"] = "float64";
    require_error_with([&] { load(f); }, "float64");
  }
  SECTION("reserved extra metadata keys are refused before anything is written") {
    const std::string path = temp_path("reserved.safetensors");
    for (const char* key : {"format", "tokenizer_config", "vq.codebook_size", "model.x", "train.y"})
      require_error_with([&] { vqkit::save_training_checkpoint(path, src, opt_src, 2, data_src, {{key, "1"}}); },
                         "reserved");
    CHECK_FALSE(std::filesystem::exists(path));
  }
  require_identical(snapshot(tk, opt, data), before);
  // And the untouched target still trains.
  CHECK(std::isfinite(train_step(tk, opt, data, frames, 1)));
}

// ---- augmentation ---------------------------------------------------------------

namespace {
RowMatrix<double> cloud(std::uint64_t seed, Index n) {
  Rng r(seed);
  RowMatrix<double> m(n, 4);
  for (Index i = 0; i < n; ++i) {
    m(i, 0) = 40 * r.uniform() - 20;
    m(i, 1) = 40 * r.uniform() - 20;
    m(i, 2) = 4 * r.uniform() - 2;
    m(i, 3) = r.uniform();
  }
  return m;
}
}  // namespace

TEST_CASE("augmentation: rotation keeps ranges and heights, angle within the bound",
          "[augment]") {
  const RowMatrix<double> p = cloud(1, 57);
  Rng rng(3);
  for (int trial = 0; trial < 20; ++trial) {
    vqkit::lidar::Augmentation a;
    const RowMatrix<double> q = vqkit::lidar::augment_frame(p, rng, 45.0, 0.0, &a);
    CHECK_FALSE(a.flip);
    CHECK(std::abs(a.yaw) <= 45.0 * std::numbers::pi / 180.0);
    for (Index i = 0; i < p.rows(); ++i) {
      CHECK(q.row(i).head<3>().norm() == Approx(p.row(i).head<3>().norm()).epsilon(1e-12));
      CHECK(q(i, 2) == p(i, 2));
      CHECK(q(i, 3) == p(i, 3));
      // The angle about z grows by exactly yaw (mod 2 pi).
      const double d = std::remainder(std::atan2(q(i, 1), q(i, 0)) - std::atan2(p(i, 1), p(i, 0)) - a.yaw,
                                      2 * std::numbers::pi);
      CHECK(std::abs(d) < 1e-9);
    }
  }
  // The draw covers the range: some angles near each end.
  double lo = 1, hi = -1;
  for (int i = 0; i < 200; ++i) {
    const auto a = vqkit::lidar::draw_augment(rng, 10.0, 0.0);
    lo = std::min(lo, a.yaw);
    hi = std::max(hi, a.yaw);
  }
  const double bound = 10.0 * std::numbers::pi / 180.0;
  CHECK(lo < -0.9 * bound);
  CHECK(hi > 0.9 * bound);
  CHECK(lo >= -bound);
  CHECK(hi <= bound);
  // A 90 degree rotation by hand: (1, 0) -> (0, 1), counter-clockwise.
  RowMatrix<double> e(1, 3);
  e << 1, 0, 0.5;
  vqkit::lidar::apply_augment(e, {std::numbers::pi / 2, false});
  CHECK(e(0, 0) == Approx(0.0).margin(1e-15));
  CHECK(e(0, 1) == Approx(1.0));
  CHECK(e(0, 2) == 0.5);
}

TEST_CASE("augmentation: flip mirrors y, identity at zero settings", "[augment]") {
  const RowMatrix<float> p = cloud(2, 31).cast<float>();
  Rng rng(5);
  // flip 1, yaw 0: exactly (x, -y, z, r).
  for (int trial = 0; trial < 3; ++trial) {
    const RowMatrix<float> q = vqkit::lidar::augment_frame(p, rng, 0.0, 1.0);
    for (Index i = 0; i < p.rows(); ++i) {
      CHECK(q(i, 0) == p(i, 0));
      CHECK(q(i, 1) == -p(i, 1));
      CHECK(q(i, 2) == p(i, 2));
      CHECK(q(i, 3) == p(i, 3));
    }
  }
  // yaw 0, flip 0: the frame itself, bit for bit.
  const RowMatrix<float> same_frame = vqkit::lidar::augment_frame(p, rng, 0.0, 0.0);
  CHECK(same(same_frame, p));
  // With yaw and flip: the map is a mirror (det -1) when flipped: the signed
  // area of a triangle changes sign; the rotation alone keeps it.
  RowMatrix<double> tri(3, 3);
  tri << 1, 0, 0, 0, 1, 0, 0, 0, 0;
  const auto area = [](const RowMatrix<double>& t) {
    return (t(1, 0) - t(0, 0)) * (t(2, 1) - t(0, 1)) - (t(2, 0) - t(0, 0)) * (t(1, 1) - t(0, 1));
  };
  RowMatrix<double> r = tri, m = tri;
  vqkit::lidar::apply_augment(r, {0.3, false});
  vqkit::lidar::apply_augment(m, {0.3, true});
  CHECK(area(r) == Approx(area(tri)));
  CHECK(area(m) == Approx(-area(tri)));
  // flip_prob 0.5 flips about half the time.
  int flips = 0;
  for (int i = 0; i < 400; ++i) flips += vqkit::lidar::draw_augment(rng, 0.0, 0.5).flip ? 1 : 0;
  CHECK(flips > 150);
  CHECK(flips < 250);
}

TEST_CASE("augmentation: deterministic from the Rng, two draws, checked settings", "[augment]") {
  const RowMatrix<float> p = cloud(3, 40).cast<float>();
  Rng a(9), b(9), c(9);
  const RowMatrix<float> qa = vqkit::lidar::augment_frame(p, a, 30.0, 0.5);
  const RowMatrix<float> qb = vqkit::lidar::augment_frame(p, b, 30.0, 0.5);
  CHECK(same(qa, qb));
  CHECK(a.state() == b.state());
  c.uniform();
  c.uniform();
  CHECK(a.state() == c.state());  // exactly two draws
  Rng z(9);
  vqkit::lidar::augment_frame(p, z, 0.0, 0.0);  // two draws even when off
  CHECK(z.state() == c.state());

  Rng d(9);
  const Rng::State s0 = d.state();
  RowMatrix<float> two_cols(3, 2);
  two_cols.setZero();
  require_error_with([&] { vqkit::lidar::augment_frame(two_cols, d, 10.0, 0.5); }, "columns");
  require_error_with([&] { vqkit::lidar::augment_frame(p, d, 181.0, 0.5); }, "yaw_deg");
  require_error_with([&] { vqkit::lidar::augment_frame(p, d, -1.0, 0.5); }, "yaw_deg");
  require_error_with([&] { vqkit::lidar::augment_frame(p, d, 10.0, 1.5); }, "flip_prob");
  require_error_with([&] { vqkit::lidar::augment_frame(p, d, std::nan(""), 0.5); }, "yaw_deg");
  CHECK(d.state() == s0);  // no draw on an error
}
