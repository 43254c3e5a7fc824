// Tests for the neural-feature-grid head's building blocks: trilinear
// sampling (vqkit/layers/trilinear.hpp), volume rendering
// (vqkit/layers/volume_render.hpp) and the reconstruction losses
// (vqkit/layers/recon_loss.hpp). References: PyTorch tensors in
// tests/fixtures/render.safetensors (gen_render.py: F.grid_sample, the
// cumprod formula with autograd, F.l1_loss, F.binary_cross_entropy_with_logits)
// and central finite differences in double.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <vqkit/io/safetensors.hpp>
#include <vqkit/layers/recon_loss.hpp>
#include <vqkit/layers/trilinear.hpp>
#include <vqkit/layers/volume_render.hpp>

#include "gradcheck.hpp"

using namespace vqkit;
using vqkit::test::fixture_file;
using vqkit::test::numeric_grad;
using vqkit::test::randn;
using vqkit::test::rel_err;

namespace {

const safetensors::File& fixture() {
  static const safetensors::File f = safetensors::load(fixture_file("render.safetensors"));
  return f;
}

RowMatrix<double> fx(const std::string& name) { return fixture().matrix<double>(name); }
Vector<double> fv(const std::string& name) { return fixture().vector<double>(name); }
double fs(const std::string& name) { return fixture().scalar<double>(name); }

RowMatrix<double> col(const Vector<double>& v) { return RowMatrix<double>(v); }

// Points whose continuous cell coordinates stay at least `margin` away from
// integers (the kinks of the interpolation), up to `out` cells outside.
RowMatrix<double> random_points(const GridGeometry& g, Index P, Rng& rng, double out = 0.8,
                                double margin = 0.05) {
  RowMatrix<double> pts(P, 3);
  const Index n[3] = {g.nx, g.ny, g.nz};
  for (Index p = 0; p < P; ++p)
    for (int a = 0; a < 3; ++a) {
      double u;
      do {
        u = -0.5 - out + rng.uniform() * (static_cast<double>(n[a]) + 2 * out);
      } while (std::abs(u - std::round(u)) < margin);
      pts(p, a) = g.origin[a] + (u + 0.5) * g.voxel[a];
    }
  return pts;
}

IndexVector random_batch(Index P, Index B, Rng& rng) {
  IndexVector b(P);
  for (Index p = 0; p < P; ++p) b[p] = static_cast<std::int64_t>(rng.below(B));
  return b;
}

GridGeometry fixture_geometry(Index& batch) {
  const Vector<double> o = fv("tri.origin"), v = fv("tri.voxel");
  const auto dims = fixture().vector<std::int64_t>("tri.dims");
  GridGeometry g;
  g.origin = {o[0], o[1], o[2]};
  g.voxel = {v[0], v[1], v[2]};
  batch = dims[0];
  g.nx = dims[1];
  g.ny = dims[2];
  g.nz = dims[3];
  g.channels = dims[4];
  return g;
}

}  // namespace

// ---- trilinear sampling --------------------------------------------------------

TEST_CASE("trilinear: forward and both gradients match F.grid_sample (3-D, zeros, align_corners=False)",
          "[trilinear]") {
  Index B = 0;
  const GridGeometry g = fixture_geometry(B);
  const RowMatrix<double> grid = fx("tri.grid");
  const RowMatrix<double> points = fx("tri.points");
  const IndexVector batch = fixture().vector<std::int64_t>("tri.batch");
  REQUIRE(grid.rows() == B * g.ny * g.nx);
  TrilinearSampler<double> tri(g);
  RowMatrix<double> out;
  const auto ctx = tri.forward(grid, points, batch, out);
  CHECK(rel_err(out, fx("tri.out")) < 1e-12);
  // The fixture has points partly and wholly outside the grid.
  CHECK((out.rowwise().squaredNorm().array() == 0.0).any());
  RowMatrix<double> dgrid, dpoints;
  tri.backward(ctx, fx("tri.g_out"), &dgrid, &dpoints);
  CHECK(rel_err(dgrid, fx("tri.dgrid")) < 1e-12);
  CHECK(rel_err(dpoints, fx("tri.dpoints")) < 1e-12);

  // float agrees to float precision
  TrilinearSampler<float> trif(g);
  RowMatrix<float> outf;
  const auto ctxf =
      trif.forward(grid.cast<float>(), points.cast<float>(), batch, outf);
  CHECK(rel_err(outf.cast<double>(), fx("tri.out")) < 1e-5);
  RowMatrix<float> dgf, dpf;
  trif.backward(ctxf, fx("tri.g_out").cast<float>(), &dgf, &dpf);
  CHECK(rel_err(dgf.cast<double>(), fx("tri.dgrid")) < 1e-5);
  CHECK(rel_err(dpf.cast<double>(), fx("tri.dpoints")) < 1e-4);
}

TEST_CASE("trilinear: world x reads map x and world y reads map y (not swapped)", "[trilinear]") {
  GridGeometry g;
  g.origin = {-1.0, -1.0, -1.0};  // same origin and voxel on x and y, so that world
  g.voxel = {0.5, 0.5, 0.5};      // (y, x, z) is a valid point of another cell
  g.nx = 7;                       // width != height
  g.ny = 6;
  g.nz = 3;
  g.channels = 2;
  const Index B = 2, b = 1, ix = 5, iy = 1, iz = 2;
  const MapShape map = g.map_shape(B);
  RowMatrix<double> grid = RowMatrix<double>::Zero(map.rows(), g.nz * g.channels);
  // The feature at cell (ix=5, iy=1): row (b, y, x), columns z*C + c.
  grid(map.row(b, iy, ix), iz * g.channels + 0) = 3.0;
  grid(map.row(b, iy, ix), iz * g.channels + 1) = -7.0;
  // A different feature at the transposed cell (ix=1, iy=5), which is what
  // an implementation with x and y swapped would read.
  grid(map.row(b, ix, iy), iz * g.channels + 0) = 11.0;
  grid(map.row(b, ix, iy), iz * g.channels + 1) = 13.0;

  const auto c = g.cell_center(ix, iy, iz);  // world (x, y, z) inside cell (5, 1, 2)
  REQUIRE(c[0] == -1.0 + 5.5 * 0.5);
  REQUIRE(c[1] == -1.0 + 1.5 * 0.5);
  RowMatrix<double> pts(4, 3);
  pts << c[0], c[1], c[2],              // (x, y, z): the cell's centre
      c[0] + 0.2, c[1] - 0.2, c[2],     // still well inside the cell, off-centre
      c[1], c[0], c[2],                 // (y, x, z)
      c[0], c[1], c[2] - 0.5;           // the z level below: empty
  IndexVector bi = IndexVector::Constant(4, b);
  TrilinearSampler<double> tri(g);
  RowMatrix<double> out;
  tri.forward(grid, pts, bi, out);
  CHECK(out(0, 0) == 3.0);
  CHECK(out(0, 1) == -7.0);
  // Off-centre the value is shared with the neighbours (all zero here):
  // (1 - 0.4) along x, (1 - 0.4) along y.
  CHECK(out(1, 0) == Approx(3.0 * 0.6 * 0.6));
  CHECK(out(2, 0) == 11.0);
  CHECK(out(2, 1) == 13.0);
  CHECK(out.row(3).isZero(0.0));
  // The other batch entry holds nothing.
  tri.forward(grid, pts, IndexVector::Zero(4), out);
  CHECK(out.isZero(0.0));
  // Half a cell along +x the value is shared with the x-neighbour, half a
  // cell along +y with the y-neighbour.
  grid(map.row(b, iy, ix + 1), iz * g.channels) = 1.0;  // x-neighbour
  RowMatrix<double> half(2, 3);
  half << c[0] + 0.25, c[1], c[2], c[0], c[1] + 0.25, c[2];
  tri.forward(grid, half, IndexVector::Constant(2, b), out);
  CHECK(out(0, 0) == Approx(2.0));
  CHECK(out(1, 0) == Approx(1.5));
  // The backward scatters into the same cell.
  RowMatrix<double> dg;
  const auto ctx = tri.forward(grid, pts.topRows(1), IndexVector::Constant(1, b), out);
  tri.backward(ctx, RowMatrix<double>::Ones(1, 2), &dg, nullptr);
  CHECK(dg(map.row(b, iy, ix), iz * g.channels) == 1.0);
  CHECK(dg.sum() == 2.0);
}

TEST_CASE("trilinear: backward matches finite differences (grid and points)", "[trilinear]") {
  struct Case {
    Index B, nx, ny, nz, C, P;
  };
  for (const Case cs : {Case{1, 3, 2, 2, 1, 7}, Case{2, 3, 5, 2, 3, 11}, Case{3, 1, 1, 3, 2, 5}}) {
    INFO("B=" << cs.B << " nx=" << cs.nx << " ny=" << cs.ny << " nz=" << cs.nz << " C=" << cs.C);
    GridGeometry g;
    g.origin = {0.3, -1.1, 2.0};
    g.voxel = {0.7, 0.4, 1.3};
    g.nx = cs.nx;
    g.ny = cs.ny;
    g.nz = cs.nz;
    g.channels = cs.C;
    Rng rng(11 + cs.P);
    RowMatrix<double> grid = randn(cs.B * g.ny * g.nx, g.nz * g.channels, rng);
    RowMatrix<double> pts = random_points(g, cs.P, rng);
    const IndexVector bi = random_batch(cs.P, cs.B, rng);
    const RowMatrix<double> G = randn(cs.P, cs.C, rng);
    TrilinearSampler<double> tri(g);
    auto loss = [&] {
      RowMatrix<double> o;
      tri.forward(grid, pts, bi, o, false);
      return (o.array() * G.array()).sum();
    };
    RowMatrix<double> out, dgrid, dpts;
    const auto ctx = tri.forward(grid, pts, bi, out);
    tri.backward(ctx, G, &dgrid, &dpts);
    CHECK(rel_err(dgrid, numeric_grad(loss, grid)) < 1e-6);
    CHECK(rel_err(dpts, numeric_grad(loss, pts, 1e-4)) < 1e-6);
  }
}

TEST_CASE("trilinear: far-away points read zero with zero gradients", "[trilinear]") {
  GridGeometry g;
  g.nx = 2;
  g.ny = 3;
  g.nz = 2;
  g.channels = 2;
  RowMatrix<double> grid = RowMatrix<double>::Ones(g.ny * g.nx, g.nz * g.channels);
  RowMatrix<double> pts(4, 3);
  pts << 1e300, 1.0, 1.0,  //
      1.0, -1e300, 1.0,    //
      1.0, 1.0, 2.0,       // z on the top face: half of the weight falls outside
      -0.5, 1.0, 1.0;      // x one cell below the lowest centre: all weight outside
  IndexVector bi = IndexVector::Zero(4);
  TrilinearSampler<double> tri(g);
  RowMatrix<double> out, dg, dp;
  const auto ctx = tri.forward(grid, pts, bi, out);
  CHECK(out.row(0).isZero(0.0));
  CHECK(out.row(1).isZero(0.0));
  CHECK(out(2, 0) == Approx(0.5));  // z centre of the last level is 1.5: half-way to the pad
  CHECK(out.row(3).isZero(0.0));
  tri.backward(ctx, RowMatrix<double>::Ones(4, 2), &dg, &dp);
  CHECK(dp.row(0).isZero(0.0));
  CHECK(dp.row(1).isZero(0.0));
  CHECK(dg.sum() == Approx(0.5 * 2));  // only point 2 contributes: weights sum to 0.5, C=2
}

TEST_CASE("trilinear: results are bit-identical for 1 and 2 threads", "[trilinear]") {
  GridGeometry g;
  g.origin = {-3.0, -2.0, -1.0};
  g.voxel = {0.5, 0.5, 0.5};
  g.nx = 9;
  g.ny = 7;
  g.nz = 4;
  g.channels = 5;
  Rng rng(3);
  const Index B = 2, P = 3001;  // many points per cell: the scatter-add collides a lot
  const RowMatrix<float> grid = randn(B * g.ny * g.nx, g.nz * g.channels, rng).cast<float>();
  const RowMatrix<float> pts = random_points(g, P, rng, 1.0, 0.0).cast<float>();
  const IndexVector bi = random_batch(P, B, rng);
  const RowMatrix<float> G = randn(P, g.channels, rng).cast<float>();
  RowMatrix<float> out[2], dg[2], dp[2];
  for (int t = 0; t < 2; ++t) {
    TrilinearSampler<float> tri(g, cpu{t + 1});
    const auto ctx = tri.forward(grid, pts, bi, out[t]);
    tri.backward(ctx, G, &dg[t], &dp[t]);
  }
  CHECK(out[0] == out[1]);
  CHECK(dg[0] == dg[1]);
  CHECK(dp[0] == dp[1]);

  // A dgrid that already holds a previous step's gradient (its buffer is
  // reused) gets the same values as a fresh one: it is zeroed first.
  TrilinearSampler<float> tri(g, cpu{2});
  const auto ctx = tri.forward(grid, pts, bi, out[0]);
  RowMatrix<float> reused = RowMatrix<float>::Constant(dg[0].rows(), dg[0].cols(), 9.0f);
  const float* buffer = reused.data();
  tri.backward(ctx, G, &reused, nullptr);
  CHECK(reused == dg[1]);
  CHECK(reused.data() == buffer);
}

TEST_CASE("trilinear: bad shapes, batch indices, points and geometries throw, outputs untouched",
          "[trilinear]") {
  GridGeometry g;
  g.nx = 3;
  g.ny = 2;
  g.nz = 2;
  g.channels = 2;
  const Index B = 2;
  Rng rng(1);
  const RowMatrix<double> grid = randn(B * 6, 4, rng);
  const RowMatrix<double> pts = random_points(g, 4, rng);
  IndexVector bi(4);
  bi << 0, 1, 1, 0;
  TrilinearSampler<double> tri(g);
  const RowMatrix<double> sentinel = RowMatrix<double>::Constant(2, 2, 42.0);
  RowMatrix<double> out = sentinel;
  CHECK_THROWS_AS(tri.forward(grid.leftCols(3), pts, bi, out), vqkit::error);   // cols != nz*C
  CHECK_THROWS_AS(tri.forward(grid.topRows(7), pts, bi, out), vqkit::error);    // rows % (ny*nx)
  CHECK_THROWS_AS(tri.forward(grid.topRows(0), pts, bi, out), vqkit::error);    // B = 0
  CHECK_THROWS_AS(tri.forward(grid, pts.leftCols(2), bi, out), vqkit::error);   // points not (P,3)
  CHECK_THROWS_AS(tri.forward(grid, pts, bi.head(3), out), vqkit::error);       // one index short
  IndexVector bad = bi;
  bad[2] = 2;  // == B
  CHECK_THROWS_AS(tri.forward(grid, pts, bad, out), vqkit::error);
  bad[2] = -1;
  CHECK_THROWS_AS(tri.forward(grid, pts, bad, out), vqkit::error);
  RowMatrix<double> nanpts = pts;
  nanpts(1, 2) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(tri.forward(grid, nanpts, bi, out), vqkit::error);
  nanpts(1, 2) = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(tri.forward(grid, nanpts, bi, out), vqkit::error);
  CHECK(out == sentinel);

  RowMatrix<double> y;
  const auto ctx = tri.forward(grid, pts, bi, y, /*point_grad=*/false);
  RowMatrix<double> dg = sentinel, dp = sentinel;
  CHECK_THROWS_AS(tri.backward(ctx, RowMatrix<double>::Ones(4, 3), &dg, &dp), vqkit::error);
  CHECK_THROWS_AS(tri.backward(ctx, RowMatrix<double>::Ones(3, 2), &dg, nullptr), vqkit::error);
  // no Jacobian kept: the point gradient cannot be given
  CHECK_THROWS_AS(tri.backward(ctx, RowMatrix<double>::Ones(4, 2), &dg, &dp), vqkit::error);
  CHECK(dg == sentinel);
  CHECK(dp == sentinel);
  tri.backward(ctx, RowMatrix<double>::Ones(4, 2), &dg, nullptr);  // the grid gradient is fine
  CHECK(dg.rows() == grid.rows());

  auto bad_geo = [&](auto edit) {
    GridGeometry b = g;
    edit(b);
    CHECK_THROWS_AS(TrilinearSampler<double>(b), vqkit::error);
  };
  bad_geo([](GridGeometry& b) { b.nx = 0; });
  bad_geo([](GridGeometry& b) { b.nz = -1; });
  bad_geo([](GridGeometry& b) { b.channels = 0; });
  bad_geo([](GridGeometry& b) { b.voxel[1] = 0.0; });
  bad_geo([](GridGeometry& b) { b.voxel[2] = -0.5; });
  bad_geo([](GridGeometry& b) { b.origin[0] = std::numeric_limits<double>::quiet_NaN(); });
}

// ---- volume rendering ----------------------------------------------------------

TEST_CASE("volume render: weights, depth and gradients match the torch cumprod formula",
          "[render]") {
  const RowMatrix<double> alpha = fx("render.alpha"), h = fx("render.h");
  VolumeRenderer<double> vr;
  RowMatrix<double> w;
  Vector<double> d;
  const auto ctx = vr.forward(alpha, h, w, d);
  CHECK(rel_err(w, fx("render.w")) < 1e-14);
  CHECK(rel_err(col(d), col(fv("render.depth"))) < 1e-14);
  RowMatrix<double> da, dh;
  vr.backward(ctx, fx("render.g_w"), fv("render.g_d"), &da, &dh);
  // The fixture has opaque samples (alpha = 1) and an empty ray.
  CHECK(rel_err(da, fx("render.dalpha")) < 1e-12);
  CHECK(rel_err(dh, fx("render.dh")) < 1e-12);

  VolumeRenderer<float> vrf;
  RowMatrix<float> wf;
  Vector<float> df;
  const auto ctxf = vrf.forward(alpha.cast<float>(), h.cast<float>(), wf, df);
  CHECK(rel_err(wf.cast<double>(), fx("render.w")) < 1e-5);
  RowMatrix<float> daf, dhf;
  vrf.backward(ctxf, fx("render.g_w").cast<float>(), fv("render.g_d").cast<float>(), &daf, &dhf);
  CHECK(rel_err(daf.cast<double>(), fx("render.dalpha")) < 1e-5);
}

TEST_CASE("volume render: backward matches finite differences", "[render]") {
  for (const Index S : {Index(1), Index(2), Index(5), Index(9)}) {
    const Index R = 3;
    INFO("R=" << R << " S=" << S);
    Rng rng(100 + S);
    RowMatrix<double> alpha(R, S), h(R, S);
    for (Index i = 0; i < alpha.size(); ++i) {
      alpha.data()[i] = 0.05 + 0.9 * rng.uniform();
      h.data()[i] = 1.0 + 20.0 * rng.uniform();
    }
    const RowMatrix<double> Gw = randn(R, S, rng);
    const Vector<double> GD = randn(R, 1, rng);
    VolumeRenderer<double> vr;
    for (int mode = 0; mode < 3; ++mode) {  // both, dw only, dD only
      INFO("mode " << mode);
      const bool use_w = mode != 2, use_d = mode != 1;
      auto loss = [&] {
        RowMatrix<double> w;
        Vector<double> d;
        vr.forward(alpha, h, w, d);
        return (use_w ? (w.array() * Gw.array()).sum() : 0.0) + (use_d ? d.dot(GD) : 0.0);
      };
      RowMatrix<double> w, da, dh;
      Vector<double> d;
      const auto ctx = vr.forward(alpha, h, w, d);
      vr.backward(ctx, use_w ? Gw : RowMatrix<double>(), use_d ? GD : Vector<double>(), &da, &dh);
      CHECK(rel_err(da, numeric_grad(loss, alpha, 1e-4)) < 1e-6);
      CHECK(rel_err(dh, numeric_grad(loss, h)) < 1e-6);
    }
  }
}

TEST_CASE("volume render: bit-identical for 1 and 2 threads, bad inputs throw untouched",
          "[render]") {
  Rng rng(8);
  const Index R = 257, S = 33;
  RowMatrix<float> alpha(R, S), h(R, S);
  for (Index i = 0; i < alpha.size(); ++i) {
    alpha.data()[i] = static_cast<float>(rng.uniform());
    h.data()[i] = static_cast<float>(50 * rng.uniform());
  }
  const RowMatrix<float> Gw = randn(R, S, rng).cast<float>();
  const Vector<float> GD = randn(R, 1, rng).cast<float>();
  RowMatrix<float> w[2], da[2], dh[2];
  Vector<float> d[2];
  for (int t = 0; t < 2; ++t) {
    VolumeRenderer<float> vr(cpu{t + 1});
    const auto ctx = vr.forward(alpha, h, w[t], d[t]);
    vr.backward(ctx, Gw, GD, &da[t], &dh[t]);
  }
  CHECK(w[0] == w[1]);
  CHECK(d[0] == d[1]);
  CHECK(da[0] == da[1]);
  CHECK(dh[0] == dh[1]);

  VolumeRenderer<float> vr;
  const RowMatrix<float> sentinel = RowMatrix<float>::Constant(1, 1, 9.f);
  RowMatrix<float> wo = sentinel;
  Vector<float> dout = Vector<float>::Constant(1, 9.f);
  RowMatrix<float> bad = alpha;
  bad(4, 7) = 1.5f;
  CHECK_THROWS_AS(vr.forward(bad, h, wo, dout), vqkit::error);
  bad(4, 7) = -0.01f;
  CHECK_THROWS_AS(vr.forward(bad, h, wo, dout), vqkit::error);
  bad(4, 7) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(vr.forward(bad, h, wo, dout), vqkit::error);
  RowMatrix<float> badh = h;
  badh(0, 0) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(vr.forward(alpha, badh, wo, dout), vqkit::error);
  CHECK_THROWS_AS(vr.forward(alpha, h.leftCols(S - 1), wo, dout), vqkit::error);
  CHECK_THROWS_AS(vr.forward(alpha.leftCols(0), h.leftCols(0), wo, dout), vqkit::error);
  CHECK(wo == sentinel);
  CHECK(dout == Vector<float>::Constant(1, 9.f));
  const auto ctx = vr.forward(alpha, h, wo, dout);
  RowMatrix<float> da2 = sentinel, dh2 = sentinel;
  CHECK_THROWS_AS(vr.backward(ctx, Gw.leftCols(S - 1), GD, &da2, &dh2), vqkit::error);
  CHECK_THROWS_AS(vr.backward(ctx, Gw, GD.head(R - 1), &da2, &dh2), vqkit::error);
  CHECK(da2 == sentinel);
  CHECK(dh2 == sentinel);
}

// ---- losses --------------------------------------------------------------------

TEST_CASE("losses: L1, BCE with logits and the surface term match PyTorch", "[loss]") {
  RowMatrix<double> g;
  CHECK(l1_loss<double>(fx("l1.pred"), fx("l1.target"), &g) == Approx(fs("l1.loss")).epsilon(1e-14));
  CHECK(rel_err(g, fx("l1.dpred")) < 1e-15);

  const RowMatrix<double> x = fx("bce.logits"), y = fx("bce.targets");
  CHECK(bce_with_logits<double>(x, y, &g) == Approx(fs("bce.loss")).epsilon(1e-13));
  CHECK(rel_err(g, fx("bce.dlogits")) < 1e-13);
  CHECK(bce_with_logits<double>(x, y, &g, 2.5) == Approx(fs("bce_pw.loss")).epsilon(1e-13));
  CHECK(rel_err(g, fx("bce_pw.dlogits")) < 1e-13);
  // float stays finite at logits of +-300
  RowMatrix<float> gf;
  const float lf = bce_with_logits<float>(x.cast<float>(), y.cast<float>(), &gf, 2.5f);
  CHECK(std::isfinite(lf));
  CHECK(gf.allFinite());
  CHECK(lf == Approx(fs("bce_pw.loss")).epsilon(1e-5));
  CHECK(rel_err(gf.cast<double>(), fx("bce_pw.dlogits")) < 1e-5);

  CHECK(surface_loss<double>(fx("surf.w"), fx("surf.h"), fv("surf.d_gt"), &g, 0.4) ==
        Approx(fs("surf.loss")).epsilon(1e-14));
  CHECK(rel_err(g, fx("surf.dw")) < 1e-15);
  // the default eps is 0.4
  CHECK(surface_loss<double>(fx("surf.w"), fx("surf.h"), fv("surf.d_gt"), nullptr) ==
        Approx(fs("surf.loss")).epsilon(1e-14));
}

TEST_CASE("losses: gradients match finite differences", "[loss]") {
  Rng rng(21);
  for (const Index rows : {Index(1), Index(4), Index(7)}) {
    INFO("rows=" << rows);
    RowMatrix<double> pred = randn(rows, 3, rng), target = randn(rows, 3, rng), g;
    l1_loss<double>(pred, target, &g);
    CHECK(rel_err(g, numeric_grad([&] { return l1_loss<double>(pred, target, nullptr); }, pred,
                                  1e-5)) < 1e-6);

    RowMatrix<double> x = randn(rows, 5, rng, 3.0), y(rows, 5);
    for (Index i = 0; i < y.size(); ++i) y.data()[i] = (i % 3 == 0) ? 0.3 : double(rng.below(2));
    for (const double pw : {1.0, 0.5, 3.0}) {
      bce_with_logits<double>(x, y, &g, pw);
      CHECK(rel_err(g, numeric_grad([&] { return bce_with_logits<double>(x, y, nullptr, pw); },
                                    x)) < 1e-6);
    }

    RowMatrix<double> w(rows, 6), h(rows, 6);
    Vector<double> dgt(rows);
    for (Index r = 0; r < rows; ++r) {
      dgt[r] = 5.0 * rng.uniform();
      for (Index i = 0; i < 6; ++i) {
        w(r, i) = rng.uniform();
        h(r, i) = dgt[r] + (i - 2.5) * 0.3;  // some inside, some outside eps = 0.4
      }
    }
    surface_loss<double>(w, h, dgt, &g);
    CHECK((g.array() == 0.0).any());
    CHECK((g.array() != 0.0).any());
    CHECK(rel_err(g, numeric_grad([&] { return surface_loss<double>(w, h, dgt, nullptr); }, w)) <
          1e-6);
  }
}

TEST_CASE("losses: bit-identical for 1 and 2 threads, bad inputs throw untouched", "[loss]") {
  Rng rng(4);
  const Index N = 3001;  // several 4096-entry blocks
  const RowMatrix<float> a = randn(N, 7, rng).cast<float>(), b = randn(N, 7, rng).cast<float>();
  RowMatrix<float> t(N, 7);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = static_cast<float>(rng.uniform());
  const Vector<float> dgt = b.col(0);
  RowMatrix<float> g[2][3];
  float v[2][3];
  for (int th = 0; th < 2; ++th) {
    const cpu be{th + 1};
    v[th][0] = l1_loss<float>(be, a, b, &g[th][0]);
    v[th][1] = bce_with_logits<float>(be, a, t, &g[th][1], 1.7f);
    v[th][2] = surface_loss<float>(be, t, b, dgt, &g[th][2]);
  }
  for (int k = 0; k < 3; ++k) {
    CHECK(v[0][k] == v[1][k]);
    CHECK(g[0][k] == g[1][k]);
  }

  const RowMatrix<float> sentinel = RowMatrix<float>::Constant(2, 2, 5.f);
  RowMatrix<float> gg = sentinel;
  CHECK_THROWS_AS(l1_loss<float>(a, b.leftCols(6), &gg), vqkit::error);
  CHECK_THROWS_AS(l1_loss<float>(a.topRows(0), b.topRows(0), &gg), vqkit::error);
  RowMatrix<float> bad = a;
  bad(3, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(l1_loss<float>(bad, b, &gg), vqkit::error);
  CHECK_THROWS_AS(bce_with_logits<float>(bad, t, &gg), vqkit::error);
  CHECK_THROWS_AS(bce_with_logits<float>(a, t.leftCols(6), &gg), vqkit::error);
  RowMatrix<float> badt = t;
  badt(0, 0) = 1.25f;
  CHECK_THROWS_AS(bce_with_logits<float>(a, badt, &gg), vqkit::error);
  badt(0, 0) = -0.5f;
  CHECK_THROWS_AS(bce_with_logits<float>(a, badt, &gg), vqkit::error);
  CHECK_THROWS_AS(bce_with_logits<float>(a, t, &gg, 0.0f), vqkit::error);
  CHECK_THROWS_AS(bce_with_logits<float>(a, t, &gg, -1.0f), vqkit::error);
  CHECK_THROWS_AS(surface_loss<float>(t, b, dgt.head(N - 1), &gg), vqkit::error);
  CHECK_THROWS_AS(surface_loss<float>(t, b.leftCols(6), dgt, &gg), vqkit::error);
  CHECK_THROWS_AS(surface_loss<float>(t, b, dgt, &gg, -0.1f), vqkit::error);
  CHECK_THROWS_AS(surface_loss<float>(bad, b, dgt, &gg), vqkit::error);
  CHECK(gg == sentinel);
}
