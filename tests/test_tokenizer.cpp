// Tests for vqkit/models/{tokenizer_net,tokenizer}.hpp: the output shape of
// every module at the small config (the seed's test_tokenizer_shapes.py, in
// C++), the feature-grid query reads world (x, y, z) at (x, y, z) and not at
// (y, x, z), the gradients of the decoder, heads and rendering MLP against
// central finite differences in double (upstream of the quantizer the
// straight-through estimator is not a derivative, so only the chain below it
// is checked this way; every layer above it has its own test), and a few
// training steps on a real KITTI frame lower the loss.
#include <catch2/catch.hpp>
#include <vqkit/core/simd.hpp>
#include <vqkit/lidar/kitti.hpp>
#include <vqkit/lidar/synthetic_scene.hpp>
#include <vqkit/models/tokenizer.hpp>
#include <vqkit/optim/adamw.hpp>
#include <vqkit/optim/clip.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gradcheck.hpp"
#include "test_util.hpp"

using vqkit::Index;
using vqkit::RowMatrix;
using vqkit::TokenizerConfig;

namespace {

/// One real KITTI frame, or a synthetic scan when ../shared/data is absent.
RowMatrix<float> one_frame() {
  const std::string path = vqkit::test::data_file("kitti/seq00/000000.bin");
  if (!path.empty()) return vqkit::lidar::read_kitti_bin(path).points;
  return vqkit::lidar::synthetic_sequence(7, 1).front().points;
}

/// A tiny config for finite differences: 16 x 16 x 4 voxels over +-6.4 m.
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
  c.feature_grid_xy = 16;
  c.feature_grid_z = 4;
  c.feature_channels = 3;
  c.render_mlp_dim = 5;
  c.occupancy_pool = 4;  // coarser than a decoder token: the skip head merges 2x2
  c.rays_per_frame = 12;
  c.samples_per_ray = 6;
  c.ray_far = 10.0;
  return c;
}

}  // namespace

TEST_CASE("every module has the expected output shape at the small config", "[tokenizer]") {
  const TokenizerConfig cfg = TokenizerConfig::small();
  vqkit::Rng rng(1);
  vqkit::Tokenizer<float> tk(cfg, rng);
  const std::vector<RowMatrix<float>> frames{one_frame(), one_frame()};
  const auto batch = tk.make_batch(frames, rng, cfg.rays_per_frame);
  const Index B = 2, V = batch.vox.voxel_count(), P = batch.vox.point_count();
  REQUIRE(V > 1000);
  tk.eval();
  vqkit::TokenizerNet<float>::Output out;
  tk.net.forward(vqkit::Tokenizer<float>::net_input(batch.vox), out);

  // Expected from the architecture (design.md §3, small config), not from the code.
  struct Want {
    const char* name;
    Index rows, cols;
  };
  const std::vector<Want> want = {
      {"pointnet.points", P, 16},         {"pointnet.voxels", V, 16},
      {"bev.mlp", V, 64},                 {"bev.map", B * 128 * 128, 64},
      {"encoder.patch_embed", B * 32 * 32, 128}, {"encoder.stage1", B * 32 * 32, 128},
      {"encoder.merge", B * 16 * 16, 256}, {"encoder.stage2", B * 16 * 16, 256},
      {"pre_vq", B * 16 * 16, 64},        {"vq", B * 16 * 16, 64},
      {"post_vq", B * 16 * 16, 256},      {"decoder.stage2", B * 16 * 16, 256},
      {"decoder.upsample", B * 32 * 32, 128}, {"decoder.stage1", B * 32 * 32, 128},
      {"grid_head", B * 128 * 128, 16 * 16}, {"skip_head", B * 32 * 32, 16}};
  REQUIRE(out.trace.size() == want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("module " << want[i].name);
    CHECK(out.trace[i].name == want[i].name);
    CHECK(out.trace[i].rows == want[i].rows);
    CHECK(out.trace[i].cols == want[i].cols);
  }

  // The whole step: one depth per ray, logits matching the occupancy target.
  const auto r = tk.step(batch, false);
  CHECK(r.depth.size() == batch.rays.size());
  CHECK(batch.rays.size() == B * cfg.rays_per_frame);
  CHECK(r.logits.rows() == batch.occupancy.batch * batch.occupancy.ny * batch.occupancy.nx);
  CHECK(r.logits.cols() == batch.occupancy.nz);
  CHECK(r.codes.size() == B * 16 * 16);
  CHECK(std::isfinite(r.loss.total));
}

TEST_CASE("the feature grid is read at world (x, y, z), not at (y, x, z)", "[tokenizer]") {
  const TokenizerConfig cfg = TokenizerConfig::small();
  const vqkit::GridGeometry geo = vqkit::Tokenizer<double>::geometry(cfg);
  vqkit::TrilinearSampler<double> sampler(geo);
  // Cell size 0.4 m x 0.4 m x 0.5625 m; a world point at a cell centre.
  const Index ix = 90, iy = 20, iz = 9;
  const double x = cfg.roi_x_min + (ix + 0.5) * 0.4, y = cfg.roi_y_min + (iy + 0.5) * 0.4,
               z = cfg.roi_z_min + (iz + 0.5) * (9.0 / 16.0);
  RowMatrix<double> grid = RowMatrix<double>::Zero(128 * 128, 16 * cfg.feature_channels);
  const vqkit::MapShape s{1, 128, 128};
  for (Index c = 0; c < cfg.feature_channels; ++c)
    grid(s.row(0, iy, ix), iz * cfg.feature_channels + c) = 1.0 + double(c);
  RowMatrix<double> pts(2, 3);
  pts << x, y, z, y, x, z;
  vqkit::IndexVector b = vqkit::IndexVector::Zero(2);
  RowMatrix<double> f;
  sampler.forward(grid, pts, b, f, false);
  for (Index c = 0; c < cfg.feature_channels; ++c) {
    CHECK(f(0, c) == Approx(1.0 + double(c)));
    CHECK(f(1, c) == 0.0);
  }
}

TEST_CASE("decoder, heads and rendering gradients match finite differences", "[tokenizer][grad]") {
  const TokenizerConfig cfg = tiny_config();
  vqkit::Rng rng(3);
  vqkit::Tokenizer<double> tk(cfg, rng);
  tk.eval();  // fixed codebook: the loss is a smooth function of the parameters checked
  // Every 40th point of a real or synthetic frame, scaled into the tiny ROI
  // (a few thousand points keep the ~300 forward passes below fast).
  const RowMatrix<float> full = one_frame();
  RowMatrix<double> pts((full.rows() + 39) / 40, full.cols());
  for (Index i = 0; i < pts.rows(); ++i) pts.row(i) = full.row(40 * i).cast<double>();
  pts.leftCols<3>() *= 0.25;
  std::vector<RowMatrix<double>> frames{pts};
  const auto batch = tk.make_batch(frames, rng, cfg.rays_per_frame);
  REQUIRE(batch.rays.size() == cfg.rays_per_frame);

  tk.zero_grad();
  tk.step(batch, true);
  const auto loss = [&] { return tk.step(batch, false).loss.total; };
  vqkit::Rng pick(11);
  int checked = 0;
  for (auto& p : tk.parameters()) {
    const bool downstream = p.name.rfind("post_vq.", 0) == 0 || p.name.rfind("decoder.", 0) == 0 ||
                            p.name.rfind("grid_head.", 0) == 0 ||
                            p.name.rfind("skip_head.", 0) == 0 || p.name.rfind("render.", 0) == 0;
    if (!downstream) {
      // Upstream parameters get a (straight-through) gradient too.
      if (p.name.rfind("encoder.", 0) == 0 && p.name.find("weight") != std::string::npos)
        CHECK(vqkit::test::max_abs(*p.grad) > 0.0);
      continue;
    }
    // A few entries per tensor keep the test fast.
    for (int e = 0; e < 3; ++e) {
      const Index i = Index(pick.below(std::uint64_t(p.value->size())));
      double& v = p.value->data()[i];
      const double orig = v, h = 1e-4;
      double l[4];
      const double steps[4] = {2 * h, h, -h, -2 * h};
      for (int k = 0; k < 4; ++k) {
        v = orig + steps[k];
        l[k] = loss();
      }
      v = orig;
      const double fd = (8 * (l[1] - l[2]) - (l[0] - l[3])) / (12 * h);
      const double an = p.grad->data()[i];
      INFO(p.name << "[" << i << "]: analytic " << an << ", finite differences " << fd);
      CHECK(std::abs(an - fd) <= 1e-6 * std::max(1.0, std::abs(fd)));
      ++checked;
    }
  }
  CHECK(checked >= 3 * 20);
}

// Tokenizer::step keeps the net's context and scratch from step to step, and
// (float on an AVX-512F CPU) the point- and voxel-level layers run on padded
// rows whose count only grows (TokenizerNet::Context). A step after batches
// of other sizes (smaller, then larger) must give what a fresh tokenizer
// gives on that batch, bit for bit: losses, depths, logits, codes and every
// gradient. Run with the AVX-512 kernels and without them (no padding).
TEST_CASE("a step after batches of other sizes gives what a fresh tokenizer gives",
          "[tokenizer]") {
  const TokenizerConfig cfg = tiny_config();
  const RowMatrix<float> full = one_frame();
  auto frame = [&](Index every, float scale) {
    RowMatrix<float> pts((full.rows() + every - 1) / every, full.cols());
    for (Index i = 0; i < pts.rows(); ++i) pts.row(i) = full.row(every * i);
    pts.leftCols<3>() *= scale;
    return pts;
  };
  bool generic = false;
  SECTION("AVX-512 kernels where the CPU has them (padded rows)") { generic = false; }
  SECTION("generic kernels (no padding)") { generic = true; }
  struct Restore {
    ~Restore() { vqkit::detail::avx512_disabled = false; }
  } restore;
  vqkit::detail::avx512_disabled = generic;
  const bool padded = vqkit::detail::cpu_has_avx512f();
  vqkit::Rng rng(3), fresh_rng(3), data(8);
  vqkit::Tokenizer<float> reused(cfg, rng), fresh(cfg, fresh_rng);
  reused.eval();  // fixed codebook: a step's result depends on the batch alone
  fresh.eval();
  using Frames = std::vector<RowMatrix<float>>;
  const auto small = reused.make_batch(Frames{frame(40, 0.25f)}, data, cfg.rays_per_frame);
  const auto other = reused.make_batch(Frames{frame(60, 0.3f)}, data, cfg.rays_per_frame);
  const auto large =
      reused.make_batch(Frames{frame(10, 0.25f), frame(15, 0.2f)}, data, cfg.rays_per_frame);
  REQUIRE(large.vox.point_count() > 2 * small.vox.point_count());
  REQUIRE(other.vox.point_count() < small.vox.point_count());
  for (const auto* b : {&small, &other, &large}) {
    reused.zero_grad();
    reused.step(*b, true);
  }
  reused.zero_grad();
  const auto a = reused.step(small, true);
  fresh.zero_grad();
  const auto f = fresh.step(small, true);

  CHECK(a.loss.total == f.loss.total);
  CHECK(a.codes == f.codes);
  CHECK(a.depth == f.depth);
  CHECK(a.logits == f.logits);
  auto pa = reused.parameters(), pf = fresh.parameters();
  REQUIRE(pa.size() == pf.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    INFO(pa[i].name);
    CHECK(*pa[i].grad == *pf[i].grad);
  }
  // The shapes the net reports are the batch's, not the padded ones.
  vqkit::TokenizerNet<float>::Output out;
  vqkit::TokenizerNet<float>::Context ctx;
  reused.net.forward(vqkit::Tokenizer<float>::net_input(small.vox), out, ctx);
  CHECK(out.trace.at(0).rows == small.vox.point_count());
  CHECK(out.trace.at(1).rows == small.vox.voxel_count());
  if (padded)  // the capacity the large batch left
    CHECK(ctx.padded_point_voxel.size() > large.vox.point_count());
  else
    CHECK(ctx.padded_point_voxel.size() == small.vox.point_count());
}

TEST_CASE("a bad config or voxel grid is rejected with a clear message", "[tokenizer][errors]") {
  vqkit::Rng rng(1);
  TokenizerConfig c = tiny_config();
  c.merged_dim = 24;
  CHECK_THROWS_WITH(vqkit::TokenizerNet<float>(c, rng),
                    Catch::Contains("merged_dim=24 must be 2 * embed_dim=16"));
  c = tiny_config();
  c.occupancy_pool = 3;
  CHECK_THROWS_WITH(vqkit::TokenizerNet<float>(c, rng), Catch::Contains("occupancy_pool=3"));
}

// Slow in sanitizer builds (CI runs it in the release stage only).
TEST_CASE("training steps on a real frame lower the loss (slow)", "[tokenizer][train]") {
  TokenizerConfig cfg = TokenizerConfig::small();
  cfg.stage1_depth = cfg.stage2_depth = 1;
  cfg.rays_per_frame = 512;
  vqkit::Rng rng(5);
  vqkit::Tokenizer<float> tk(cfg, rng);
  tk.train();
  vqkit::AdamWOptions o;
  o.lr = 2e-3;
  o.beta2 = cfg.beta2;
  o.weight_decay = cfg.weight_decay;
  vqkit::AdamW<float> opt(tk.parameters(), o);
  const std::vector<RowMatrix<float>> frames{one_frame()};
  vqkit::Rng data(9);
  const auto batch = tk.make_batch(frames, data, cfg.rays_per_frame);  // the same rays each step
  std::vector<double> depth;
  for (int s = 0; s < 12; ++s) {
    tk.zero_grad();
    const auto r = tk.step(batch, true);
    REQUIRE(std::isfinite(r.loss.total));
    depth.push_back(r.loss.depth_l1 + r.loss.surface + r.loss.occupancy);
    vqkit::clip_grad_norm(tk.parameters(), 1.0);
    opt.step();
  }
  INFO("reconstruction loss first " << depth.front() << ", last " << depth.back());
  CHECK(depth.back() < 0.8 * depth.front());
}
