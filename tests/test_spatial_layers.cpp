// Tests for vqkit/layers/{segment_sum,patch}.hpp: segment sums and scatter to
// a dense map against PyTorch's index_add_ / index_put_(accumulate=True),
// space-to-depth against a brute-force index formula, PatchEmbed,
// PatchMerging and PatchUpsample against PyTorch reshape/permute + nn.Linear +
// nn.LayerNorm (tests/fixtures/basic.safetensors, gen_basic.py), every
// backward against central finite differences in double, 1 vs 2 OpenMP
// threads bit-identical, and rejected inputs leaving everything unchanged.
#include <catch2/catch.hpp>
#include <vqkit/core/backend.hpp>
#include <vqkit/core/error.hpp>
#include <vqkit/core/random.hpp>
#include <vqkit/io/safetensors.hpp>
#include <vqkit/core/map_shape.hpp>
#include <vqkit/layers/embedding.hpp>
#include <vqkit/layers/patch.hpp>
#include <vqkit/layers/residual.hpp>
#include <vqkit/layers/segment_sum.hpp>

#include "gradcheck.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

using vqkit::Index;
using vqkit::IndexVector;
using vqkit::MapShape;
using vqkit::RowMatrix;
using vqkit::SubpixelOrder;
using Catch::Matchers::Contains;
using Coords = RowMatrix<std::int64_t>;

namespace {

using vqkit::test::check_gradients;
using vqkit::test::randn;
using vqkit::test::rel_err;
using vqkit::test::close_float;
using vqkit::test::same;
using vqkit::test::snapshot;

const vqkit::safetensors::File& fixture() {
  static const vqkit::safetensors::File f =
      vqkit::safetensors::load(vqkit::test::fixture_file("basic.safetensors"));
  return f;
}
RowMatrix<double> fx(const std::string& name) { return fixture().matrix<double>(name); }

RowMatrix<double> sentinel(Index r, Index c) { return RowMatrix<double>::Constant(r, c, 42.0); }

// A layer whose forward takes extra arguments after y, bound to fixed ones,
// so that check_gradients sees the plain forward(x, y) contract.
template <class Layer, class... Extra>
struct Bound {
  Layer& layer;
  std::tuple<Extra...> extra;
  auto forward(vqkit::ConstMatrixRef<double> x, RowMatrix<double>& y) const {
    return std::apply([&](const auto&... e) { return layer.forward(x, y, e...); }, extra);
  }
  template <class Ctx>
  void backward(const Ctx& c, vqkit::ConstMatrixRef<double> dy, RowMatrix<double>* dx) {
    layer.backward(c, dy, dx);
  }
  vqkit::ParameterList<double> parameters() { return layer.parameters(); }
  void zero_grad() { layer.zero_grad(); }
};
template <class Layer, class... Extra>
Bound<Layer, Extra...> bind(Layer& l, Extra... e) {
  return {l, std::tuple<Extra...>(e...)};
}

IndexVector random_ids(Index n, Index s, vqkit::Rng& rng) {
  IndexVector ids(n);
  for (Index i = 0; i < n; ++i) ids[i] = static_cast<std::int64_t>(rng.uniform() * s);
  return ids;
}

Coords random_coords(Index n, const MapShape& m, vqkit::Rng& rng) {
  Coords c(n, 3);
  for (Index i = 0; i < n; ++i) {
    c(i, 0) = static_cast<std::int64_t>(rng.uniform() * m.batch);
    c(i, 1) = static_cast<std::int64_t>(rng.uniform() * m.height);
    c(i, 2) = static_cast<std::int64_t>(rng.uniform() * m.width);
  }
  return c;
}

}  // namespace

// ------------------------------------------------------------ segment sum ---

TEST_CASE("segment_sum matches torch index_add_, empty segments zero") {
  const RowMatrix<double> x = fx("seg.x");
  const IndexVector ids = fixture().vector<std::int64_t>("seg.ids");
  RowMatrix<double> y;
  vqkit::segment_sum<double>(vqkit::cpu{}, x, ids, 6, y);
  CHECK(rel_err(y, fx("seg.y")) < 1e-15);
  CHECK(y.row(4).isZero(0));

  vqkit::SegmentSum<double> layer;
  RowMatrix<double> y2 = x;
  layer.forward(y2, y2, ids, 6);  // y may alias x
  CHECK(y2 == y);

  RowMatrix<float> yf;
  vqkit::segment_sum<float>(vqkit::cpu{}, x.cast<float>(), ids, 6, yf);
  CHECK(close_float(yf, fx("seg.y"), 1e-6));

  // accumulating form
  RowMatrix<double> acc = RowMatrix<double>::Ones(6, 3);
  vqkit::segment_sum_add<double>(vqkit::cpu{}, x, ids, acc);
  CHECK(rel_err(acc, fx("seg.y") + RowMatrix<double>::Ones(6, 3)) < 1e-15);
}

TEST_CASE("scatter_to_map matches torch index_put_ with accumulate") {
  const RowMatrix<double> x = fx("scatter.x");
  const Coords coords = fixture().matrix<std::int64_t>("scatter.coords");
  const MapShape m{2, 3, 4};
  RowMatrix<double> y;
  vqkit::scatter_to_map<double>(vqkit::cpu{}, x, coords, m, y);
  REQUIRE(y.rows() == 24);
  CHECK(rel_err(y, fx("scatter.y")) < 1e-15);
  // (b=1, y=2, x=3) appears twice: summed; row (1*3 + 2)*4 + 3 = 23
  CHECK(y.row(23) == x.row(1) + x.row(3));
  CHECK(y.row(m.row(0, 0, 1)).isZero(0));

  vqkit::ScatterToMap<double> layer;
  RowMatrix<double> y2;
  layer.forward(x, y2, coords, m);
  CHECK(y2 == y);
}

TEST_CASE("SegmentSum and ScatterToMap backward (gathers) match finite differences") {
  vqkit::Rng rng(21);
  for (Index n : {1, 6, 13})
    for (Index c : {1, 4})
      for (Index s : {1, 5, 17}) {
        INFO("N=" << n << " C=" << c << " S=" << s);
        vqkit::SegmentSum<double> layer;
        auto b = bind(layer, random_ids(n, s, rng), s);
        check_gradients(b, randn(n, c, rng), rng);
      }
  for (MapShape m : {MapShape{1, 3, 5}, MapShape{2, 4, 3}, MapShape{3, 1, 1}})
    for (Index n : {1, 9}) {
      INFO("map " << m.batch << "x" << m.height << "x" << m.width << " N=" << n);
      vqkit::ScatterToMap<double> layer;
      auto b = bind(layer, random_coords(n, m, rng), m);
      check_gradients(b, randn(n, 3, rng), rng);
    }
}

TEST_CASE("segment sums and gathers are bit-identical for 1 and 2 threads") {
  vqkit::Rng rng(22);
  const Index n = 30000, c = 5, s = 777;
  const RowMatrix<float> x = randn(n, c, rng).cast<float>();
  const IndexVector ids = random_ids(n, s, rng);
  RowMatrix<float> y1, y2;
  vqkit::segment_sum<float>(vqkit::cpu{1}, x, ids, s, y1);
  vqkit::segment_sum<float>(vqkit::cpu{2}, x, ids, s, y2);
  CHECK(y1 == y2);
  RowMatrix<float> ref = RowMatrix<float>::Zero(s, c);  // serial loop in order of n
  for (Index i = 0; i < n; ++i) ref.row(ids[i]) += x.row(i);
  CHECK(y1 == ref);

  const MapShape m{2, 64, 48};
  const Coords coords = random_coords(n, m, rng);
  vqkit::ScatterToMap<float> l1(vqkit::cpu{1}), l2(vqkit::cpu{2});
  RowMatrix<float> d1, d2, g1, g2;
  auto c1 = l1.forward(x, d1, coords, m);
  auto c2 = l2.forward(x, d2, coords, m);
  CHECK(d1 == d2);
  const RowMatrix<float> dy = randn(m.rows(), c, rng).cast<float>();
  l1.backward(c1, dy, &g1);
  l2.backward(c2, dy, &g2);
  CHECK(g1 == g2);
  for (Index i = 0; i < n; i += 997)
    CHECK(g1.row(i) == dy.row(m.row(coords(i, 0), coords(i, 1), coords(i, 2))));
}

TEST_CASE("segment sums reject bad ids and coordinates, changing nothing") {
  vqkit::Rng rng(23);
  const RowMatrix<double> x = randn(5, 2, rng);
  IndexVector ids(5);
  ids << 0, 3, 1, 3, 2;
  RowMatrix<double> y = sentinel(1, 1);
  IndexVector bad = ids;
  bad[3] = 4;
  CHECK_THROWS_WITH(vqkit::segment_sum<double>(vqkit::cpu{}, x, bad, 4, y),
                    Contains("ids[3]=4") && Contains("num_segments=4"));
  bad[3] = -2;
  CHECK_THROWS_WITH(vqkit::segment_sum<double>(vqkit::cpu{}, x, bad, 4, y), Contains("ids[3]=-2"));
  CHECK_THROWS_WITH(vqkit::segment_sum<double>(vqkit::cpu{}, x, ids.head(4), 4, y),
                    Contains("ids has 4 entries"));
  CHECK_THROWS_WITH(vqkit::segment_sum<double>(vqkit::cpu{}, x, ids, -1, y),
                    Contains("num_segments=-1"));
  CHECK(y == sentinel(1, 1));
  RowMatrix<double> acc = sentinel(4, 2);
  bad[3] = 4;
  CHECK_THROWS_WITH(vqkit::segment_sum_add<double>(vqkit::cpu{}, x, bad, acc), Contains("ids[3]=4"));
  CHECK(acc == sentinel(4, 2));

  vqkit::SegmentSum<double> layer;
  auto ctx = layer.forward(x, y, ids, 4);
  RowMatrix<double> dx = sentinel(1, 1);
  CHECK_THROWS_WITH(layer.backward(ctx, randn(5, 2, rng), &dx), Contains("dy is 5x2"));
  CHECK(dx == sentinel(1, 1));

  const MapShape m{2, 3, 4};
  Coords coords(5, 3);
  coords << 0, 0, 0,  //
      1, 2, 3,        //
      0, 1, 2,        //
      1, 0, 4,        // x = 4 is outside width 4
      0, 2, 1;
  vqkit::ScatterToMap<double> sc;
  y = sentinel(1, 1);
  CHECK_THROWS_WITH(sc.forward(x, y, coords, m),
                    Contains("coords[3]=(b=1, y=0, x=4)") && Contains("width=4"));
  coords(3, 2) = 0;
  coords(1, 0) = 2;
  CHECK_THROWS_WITH(sc.forward(x, y, coords, m), Contains("coords[1]=(b=2"));
  coords(1, 0) = 1;
  CHECK_THROWS_WITH(sc.forward(x, y, coords.topRows(4), m), Contains("coords has 4 rows"));
  CHECK_THROWS_WITH(sc.forward(x, y, coords, MapShape{2, 0, 4}), Contains("height=0"));
  CHECK(y == sentinel(1, 1));
  auto sctx = sc.forward(x, y, coords, m);
  CHECK_THROWS_WITH(sc.backward(sctx, randn(23, 2, rng), &dx), Contains("dy is 23x2"));
  CHECK(dx == sentinel(1, 1));
}

// ------------------------------------------------------- space to depth ---

TEST_CASE("space_to_depth follows the documented slot order and depth_to_space inverts it") {
  vqkit::Rng rng(24);
  for (Index p : {1, 2, 3})
    for (auto order : {SubpixelOrder::row_major, SubpixelOrder::swin}) {
      const MapShape m{2, 2 * p, 3 * p};
      const Index c = 3;
      const RowMatrix<double> x = randn(m.rows(), c, rng);
      const RowMatrix<double> z = vqkit::space_to_depth<double>(x, m, p, order);
      REQUIRE(z.rows() == m.rows() / (p * p));
      REQUIRE(z.cols() == p * p * c);
      const MapShape cs{2, 2, 3};
      for (Index b = 0; b < 2; ++b)
        for (Index Y = 0; Y < 2; ++Y)
          for (Index X = 0; X < 3; ++X)
            for (Index dy = 0; dy < p; ++dy)
              for (Index dx = 0; dx < p; ++dx)
                for (Index ch = 0; ch < c; ++ch) {
                  const Index slot = order == SubpixelOrder::row_major ? dy * p + dx : dx * p + dy;
                  CHECK(z(cs.row(b, Y, X), slot * c + ch) ==
                        x(m.row(b, Y * p + dy, X * p + dx), ch));
                }
      CHECK(vqkit::depth_to_space<double>(z, m, p, order) == x);
    }
  const RowMatrix<double> x = randn(2 * 5 * 4, 2, rng);
  CHECK_THROWS_WITH(vqkit::space_to_depth<double>(x, MapShape{2, 5, 4}, 2),
                    Contains("height=5 width=4 is not divisible by patch_size=2"));
  CHECK_THROWS_WITH(vqkit::space_to_depth<double>(x, MapShape{2, 4, 4}, 2), Contains("input has 40 rows"));
}

TEST_CASE("space_to_depth and depth_to_space into a buffer move the same values on 2 threads") {
  // Large enough for the rows to be split over threads.
  vqkit::Rng rng(25);
  const MapShape m{2, 64, 32};
  const RowMatrix<float> x = randn(m.rows(), 16, rng).cast<float>();
  for (auto order : {SubpixelOrder::row_major, SubpixelOrder::swin}) {
    RowMatrix<float> z1, z2, back;
    vqkit::space_to_depth<float>(x, m, 4, order, z1);
    vqkit::space_to_depth<float>(x, m, 4, order, z2, vqkit::cpu{2});
    CHECK(z1 == z2);
    vqkit::depth_to_space<float>(z2, m, 4, order, back, vqkit::cpu{2});
    CHECK(back == x);
  }
}

// ------------------------------------------------------------- PatchEmbed ---

TEST_CASE("PatchEmbed matches torch reshape/permute + nn.Linear + nn.LayerNorm") {
  struct Case {
    const char* name;
    MapShape m;
    Index c, p, e;
  };
  for (const Case& k : {Case{"embed2", {2, 4, 6}, 3, 2, 5}, Case{"embed3", {1, 6, 9}, 2, 3, 4}}) {
    INFO(k.name);
    const std::string n = k.name;
    vqkit::Rng rng(25);
    vqkit::PatchEmbed<double> pe(k.c, k.e, k.p, rng);
    pe.proj.weight = fx(n + ".proj.weight");
    pe.proj.bias = fx(n + ".proj.bias");
    pe.norm.weight = fx(n + ".norm.weight");
    pe.norm.bias = fx(n + ".norm.bias");
    RowMatrix<double> y;
    pe.forward(fx(n + ".x"), y, k.m);
    CHECK(rel_err(y, fx(n + ".y")) < 1e-12);
    CHECK(pe.output_shape(k.m) == MapShape{k.m.batch, k.m.height / k.p, k.m.width / k.p});

    vqkit::PatchEmbed<float> pf(k.c, k.e, k.p, rng);
    pf.proj.weight = pe.proj.weight.cast<float>();
    pf.proj.bias = pe.proj.bias.cast<float>();
    pf.norm.weight = pe.norm.weight.cast<float>();
    pf.norm.bias = pe.norm.bias.cast<float>();
    RowMatrix<float> yf;
    pf.forward(fx(n + ".x").cast<float>(), yf, k.m);
    CHECK(close_float(yf, fx(n + ".y"), 1e-4));
  }
}

TEST_CASE("PatchEmbed backward matches finite differences") {
  vqkit::Rng rng(26);
  struct Case {
    MapShape m;
    Index c, p, e;
  };
  for (const Case& k : {Case{{1, 2, 2}, 1, 2, 3}, Case{{2, 3, 6}, 2, 3, 5}, Case{{1, 4, 2}, 3, 2, 4},
                        Case{{3, 1, 1}, 2, 1, 3}}) {
    INFO("map " << k.m.batch << "x" << k.m.height << "x" << k.m.width << " C=" << k.c
                << " p=" << k.p << " E=" << k.e);
    vqkit::PatchEmbed<double> pe(k.c, k.e, k.p, rng);
    pe.norm.weight = 1.0 + 0.3 * randn(1, k.e, rng).array();
    pe.norm.bias = 0.3 * randn(1, k.e, rng);
    auto b = bind(pe, k.m);
    check_gradients(b, randn(k.m.rows(), k.c, rng), rng);
  }
}

TEST_CASE("PatchEmbed names its parameters and rejects bad input, changing nothing") {
  vqkit::Rng rng(27);
  vqkit::PatchEmbed<double> pe(3, 8, 4, rng);
  auto p = pe.parameters("patch_embed.");
  REQUIRE(p.size() == 4);
  CHECK(p[0].name == "patch_embed.proj.weight");
  CHECK(p[0].shape == std::vector<Index>{8, 48});
  CHECK(p[2].name == "patch_embed.norm.weight");
  CHECK_FALSE(p[2].weight_decay);
  CHECK_THROWS_WITH(vqkit::PatchEmbed<double>(3, 8, 0, rng), Contains("patch_size=0"));

  const MapShape m{1, 8, 4};
  const RowMatrix<double> x = randn(32, 3, rng);
  RowMatrix<double> y, dx;
  auto ctx = pe.forward(x, y, m);
  pe.backward(ctx, randn(2, 8, rng), &dx);
  const auto before = snapshot(pe);
  RowMatrix<double> out = sentinel(1, 1);
  CHECK_THROWS_WITH(pe.forward(randn(24, 3, rng), out, MapShape{1, 6, 4}),
                    Contains("height=6 width=4 is not divisible by patch_size=4"));
  CHECK_THROWS_WITH(pe.forward(x, out, MapShape{1, 4, 4}), Contains("input has 32 rows"));
  CHECK_THROWS_WITH(pe.forward(randn(32, 2, rng), out, m), Contains("expected in_channels=3"));
  CHECK(out == sentinel(1, 1));
  CHECK_THROWS_WITH(pe.backward(ctx, randn(2, 7, rng), &out), Contains("dy is 2x7"));
  CHECK_THROWS_WITH(pe.backward(ctx, randn(3, 8, rng), &out), Contains("dy is 3x8"));
  auto tampered = ctx;
  tampered.norm.mean.resize(1);
  CHECK_THROWS_WITH(pe.backward(tampered, randn(2, 8, rng), &out), Contains("context"));
  CHECK(out == sentinel(1, 1));
  CHECK(same(snapshot(pe), before));
}

// ----------------------------------------------------------- PatchMerging ---

TEST_CASE("PatchMerging matches Swin's 2x2 cat + LayerNorm + Linear in PyTorch") {
  vqkit::Rng rng(28);
  vqkit::PatchMerging<double> pm(3, rng);
  pm.norm.weight = fx("merge.norm.weight");
  pm.norm.bias = fx("merge.norm.bias");
  pm.reduction.weight = fx("merge.reduction.weight");
  RowMatrix<double> y;
  const MapShape m{2, 4, 6};
  pm.forward(fx("merge.x"), y, m);
  CHECK(rel_err(y, fx("merge.y")) < 1e-12);
  CHECK(pm.output_shape(m) == MapShape{2, 2, 3});

  auto p = pm.parameters("layers.0.downsample.");
  REQUIRE(p.size() == 3);
  CHECK(p[0].name == "layers.0.downsample.norm.weight");
  CHECK(p[1].name == "layers.0.downsample.norm.bias");
  CHECK(p[2].name == "layers.0.downsample.reduction.weight");
  CHECK(p[2].shape == std::vector<Index>{6, 12});
  CHECK(p[2].weight_decay);
  CHECK_FALSE(pm.reduction.has_bias());

  vqkit::PatchMerging<float> pf(3, rng);
  pf.norm.weight = pm.norm.weight.cast<float>();
  pf.norm.bias = pm.norm.bias.cast<float>();
  pf.reduction.weight = pm.reduction.weight.cast<float>();
  RowMatrix<float> yf;
  pf.forward(fx("merge.x").cast<float>(), yf, m);
  CHECK(close_float(yf, fx("merge.y"), 1e-4));
}

TEST_CASE("PatchMerging backward matches finite differences; odd maps rejected") {
  vqkit::Rng rng(29);
  for (MapShape m : {MapShape{1, 2, 2}, MapShape{2, 2, 4}, MapShape{1, 6, 2}})
    for (Index c : {1, 3}) {
      INFO("map " << m.batch << "x" << m.height << "x" << m.width << " C=" << c);
      vqkit::PatchMerging<double> pm(c, rng);
      pm.norm.weight = 1.0 + 0.3 * randn(1, 4 * c, rng).array();
      pm.norm.bias = 0.3 * randn(1, 4 * c, rng);
      auto b = bind(pm, m);
      check_gradients(b, randn(m.rows(), c, rng), rng);
    }

  vqkit::PatchMerging<double> pm(2, rng);
  const MapShape m{1, 4, 4};
  RowMatrix<double> y, dx;
  auto ctx = pm.forward(randn(16, 2, rng), y, m);
  pm.backward(ctx, randn(4, 4, rng), &dx);
  const auto before = snapshot(pm);
  RowMatrix<double> out = sentinel(1, 1);
  CHECK_THROWS_WITH(pm.forward(randn(12, 2, rng), out, MapShape{1, 3, 4}),
                    Contains("height=3 width=4 is not divisible by patch_size=2"));
  CHECK_THROWS_WITH(pm.forward(randn(16, 3, rng), out, m), Contains("expected channels=2"));
  CHECK(out == sentinel(1, 1));
  CHECK_THROWS_WITH(pm.backward(ctx, randn(4, 3, rng), &out), Contains("dy is 4x3"));
  CHECK(out == sentinel(1, 1));
  CHECK(same(snapshot(pm), before));
}

// ---------------------------------------------------------- PatchUpsample ---

TEST_CASE("PatchUpsample matches torch Linear + reshape/permute depth-to-space + LayerNorm") {
  vqkit::Rng rng(30);
  vqkit::PatchUpsample<double> pu(4, 3, rng);
  pu.proj.weight = fx("up.proj.weight");
  pu.proj.bias = fx("up.proj.bias");
  pu.norm.weight = fx("up.norm.weight");
  pu.norm.bias = fx("up.norm.bias");
  const MapShape m{2, 3, 2};
  RowMatrix<double> y;
  pu.forward(fx("up.x"), y, m);
  CHECK(rel_err(y, fx("up.y")) < 1e-12);
  CHECK(pu.output_shape(m) == MapShape{2, 6, 4});
  auto p = pu.parameters();
  REQUIRE(p.size() == 4);
  CHECK(p[0].name == "proj.weight");
  CHECK(p[0].shape == std::vector<Index>{12, 4});
  CHECK(p[3].name == "norm.bias");

  vqkit::PatchUpsample<float> pf(4, 3, rng);
  pf.proj.weight = pu.proj.weight.cast<float>();
  pf.proj.bias = pu.proj.bias.cast<float>();
  pf.norm.weight = pu.norm.weight.cast<float>();
  pf.norm.bias = pu.norm.bias.cast<float>();
  RowMatrix<float> yf;
  pf.forward(fx("up.x").cast<float>(), yf, m);
  CHECK(close_float(yf, fx("up.y"), 1e-4));
}

TEST_CASE("PatchUpsample backward matches finite differences; bad input changes nothing") {
  vqkit::Rng rng(31);
  for (MapShape m : {MapShape{1, 1, 1}, MapShape{2, 1, 3}, MapShape{1, 3, 2}})
    for (Index c : {1, 4})
      for (Index co : {1, 3}) {
        INFO("map " << m.batch << "x" << m.height << "x" << m.width << " C=" << c
                    << " C'=" << co);
        vqkit::PatchUpsample<double> pu(c, co, rng);
        pu.norm.weight = 1.0 + 0.3 * randn(1, co, rng).array();
        pu.norm.bias = 0.3 * randn(1, co, rng);
        auto b = bind(pu, m);
        check_gradients(b, randn(m.rows(), c, rng), rng);
      }

  vqkit::PatchUpsample<double> pu(3, 2, rng);
  const MapShape m{1, 2, 3};
  RowMatrix<double> y, dx;
  auto ctx = pu.forward(randn(6, 3, rng), y, m);
  pu.backward(ctx, randn(24, 2, rng), &dx);
  const auto before = snapshot(pu);
  RowMatrix<double> out = sentinel(1, 1);
  CHECK_THROWS_WITH(pu.forward(randn(5, 3, rng), out, m), Contains("input has 5 rows"));
  CHECK_THROWS_WITH(pu.forward(randn(6, 2, rng), out, m), Contains("expected in_channels=3"));
  CHECK(out == sentinel(1, 1));
  CHECK_THROWS_WITH(pu.backward(ctx, randn(6, 2, rng), &out), Contains("dy is 6x2"));
  CHECK(out == sentinel(1, 1));
  CHECK(same(snapshot(pu), before));
}

// ------------------------------------------------------ PositionEmbedding ---

TEST_CASE("PositionEmbedding adds its table to every map of the batch") {
  vqkit::Rng rng(32), ref(32);
  vqkit::PositionEmbedding<double> pos(3, 5, 4, rng);
  CHECK(pos.weight.rows() == 15);
  CHECK(pos.weight.cwiseAbs().maxCoeff() <= 0.04);
  double z = ref.normal();
  while (std::abs(z) > 2.0) z = ref.normal();
  CHECK(pos.weight(0, 0) == 0.02 * z);
  auto p = pos.parameters("absolute_pos_embed.");
  REQUIRE(p.size() == 1);
  CHECK(p[0].name == "absolute_pos_embed.weight");
  CHECK(p[0].shape == std::vector<Index>{15, 4});
  CHECK_FALSE(p[0].weight_decay);

  const MapShape m{2, 3, 5};
  const RowMatrix<double> x = randn(30, 4, rng);
  RowMatrix<double> y;
  pos.forward(x, y, m);
  for (Index b = 0; b < 2; ++b)
    for (Index yy = 0; yy < 3; ++yy)
      for (Index xx = 0; xx < 5; ++xx)
        CHECK(y.row(m.row(b, yy, xx)) == x.row(m.row(b, yy, xx)) + pos.weight.row(yy * 5 + xx));

  for (MapShape mm : {MapShape{1, 3, 5}, MapShape{3, 3, 5}}) {
    vqkit::PositionEmbedding<double> pe(3, 5, 2, rng);
    auto b = bind(pe, mm);
    check_gradients(b, randn(mm.rows(), 2, rng), rng);
  }

  RowMatrix<double> dx;
  auto ctx = pos.forward(x, y, m);
  pos.backward(ctx, randn(30, 4, rng), &dx);
  const auto before = snapshot(pos);
  RowMatrix<double> out = sentinel(1, 1);
  CHECK_THROWS_WITH(pos.forward(randn(30, 4, rng), out, MapShape{2, 5, 3}),
                    Contains("input map is height=5 width=3"));
  CHECK_THROWS_WITH(pos.forward(randn(30, 3, rng), out, m), Contains("with 3 channels"));
  CHECK(out == sentinel(1, 1));
  CHECK_THROWS_WITH(pos.backward(ctx, randn(15, 4, rng), &out), Contains("dy is 15x4"));
  CHECK(out == sentinel(1, 1));
  CHECK(same(snapshot(pos), before));
}

TEST_CASE("Residual passes a MapShape through to its body") {
  vqkit::Rng rng(33);
  vqkit::Residual<vqkit::PositionEmbedding<double>> res(std::in_place, 2, 3, 4, rng);
  const MapShape m{2, 2, 3};
  const RowMatrix<double> x = randn(12, 4, rng);
  RowMatrix<double> y, py;
  res.forward(x, y, m);
  res.body.forward(x, py, m);
  CHECK(y == x + py);
  auto b = bind(res, m);
  check_gradients(b, x, rng);
  // a shape-changing body is refused
  vqkit::Residual<vqkit::PatchMerging<double>> bad(std::in_place, 4, rng);
  RowMatrix<double> out = sentinel(1, 1);
  CHECK_THROWS_WITH(bad.forward(randn(16, 4, rng), out, MapShape{1, 4, 4}),
                    Contains("the body maps 16x4 to 4x8"));
  CHECK(out == sentinel(1, 1));
}

// The forward(x, y, shape, ctx) overloads write each sub-layer's output
// straight into the next one's context and keep the backward scratch: a
// context that last held a batch of another size, then one of the same size,
// must give the bits of a fresh context on a fresh layer (outputs, dL/dx,
// every gradient), with y aliasing x and dx aliasing dy.
TEST_CASE("patch layers and Embedding: a reused context gives the bits of a fresh one") {
  struct Out {
    RowMatrix<float> y, dx;
    std::vector<RowMatrix<float>> grads;
  };
  auto compare = [](const Out& a, const Out& b) {
    CHECK(a.y == b.y);
    CHECK(a.dx == b.dx);
    REQUIRE(a.grads.size() == b.grads.size());
    for (std::size_t i = 0; i < a.grads.size(); ++i) CHECK(a.grads[i] == b.grads[i]);
  };
  // Forward (y aliasing x), zero_grad, backward (dx aliasing dy); dL/dy random.
  auto call = [](auto& l, auto& ctx, const MapShape& s, Index c, std::uint64_t seed) {
    vqkit::Rng r(seed);
    Out o;
    o.y = randn(s.rows(), c, r).cast<float>();
    l.forward(o.y, o.y, s, ctx);
    l.zero_grad();
    RowMatrix<float> d = randn(o.y.rows(), o.y.cols(), r).cast<float>();
    l.backward(ctx, d, &d);
    o.dx = d;
    for (auto& p : l.parameters()) o.grads.push_back(*p.grad);
    return o;
  };
  auto check = [&](auto make, Index c, const MapShape& big, const MapShape& small) {
    auto reused = make();
    typename decltype(reused)::Context ctx;
    call(reused, ctx, big, c, 5);
    for (std::uint64_t seed : {6, 7}) {  // resized, then reused as is
      INFO("seed " << seed);
      const Out a = call(reused, ctx, small, c, seed);
      auto fresh = make();
      typename decltype(fresh)::Context fresh_ctx;
      compare(a, call(fresh, fresh_ctx, small, c, seed));
    }
  };
  SECTION("PatchEmbed") {
    check([] { vqkit::Rng r(9); return vqkit::PatchEmbed<float>(3, 8, 2, r); }, 3,
          MapShape{2, 8, 6}, MapShape{1, 4, 6});
  }
  SECTION("PatchMerging") {
    check([] { vqkit::Rng r(9); return vqkit::PatchMerging<float>(4, r); }, 4,
          MapShape{2, 8, 6}, MapShape{1, 4, 6});
  }
  SECTION("PatchUpsample") {
    check([] { vqkit::Rng r(9); return vqkit::PatchUpsample<float>(6, 4, r); }, 6,
          MapShape{2, 4, 3}, MapShape{1, 2, 3});
  }
  SECTION("Embedding") {
    vqkit::Rng r(9);
    vqkit::Embedding<float> reused(7, 5, r), fresh = reused;
    vqkit::Embedding<float>::Context ctx, fresh_ctx;
    auto run = [](vqkit::Embedding<float>& l, vqkit::Embedding<float>::Context& c, Index n,
                  std::uint64_t seed) {
      vqkit::Rng g(seed);
      IndexVector idx(n);
      for (Index i = 0; i < n; ++i) idx[i] = Index(g.below(7));
      Out o;
      l.forward(idx, o.y, c);
      l.zero_grad();
      l.backward(c, randn(n, 5, g).cast<float>());
      o.grads.push_back(l.weight_grad);
      return o;
    };
    run(reused, ctx, 40, 5);
    compare(run(reused, ctx, 12, 6), run(fresh, fresh_ctx, 12, 6));
    // y is the table itself: the rows are read before it is overwritten.
    vqkit::Embedding<float> self(7, 5, r);
    const RowMatrix<float> table = self.weight;
    IndexVector idx(3);
    idx << 2, 0, 2;
    self.forward(idx, self.weight, ctx);
    REQUIRE(self.weight.rows() == 3);
    CHECK(self.weight.row(0) == table.row(2));
    CHECK(self.weight.row(1) == table.row(0));
  }
}
