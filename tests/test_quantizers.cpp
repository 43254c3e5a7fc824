// Tests for the quantizer family beside VectorQuantizer: FSQ and LFQ
// (layers/fsq.hpp, layers/lfq.hpp) against PyTorch fixtures written from the
// papers (tests/fixtures/gen_quantizers.py) and central finite differences in
// double; ResidualVQ and GroupedVQ against their definitions composed by hand
// from independent VectorQuantizers; encode/decode round trips, row masks
// (a masked batch = the batch of its real rows), state round trips and bad
// inputs leaving state unchanged; the rotation trick against a fixture;
// checkpoint files (io/family_checkpoint.hpp) that resume bit-identically.
#include <catch2/catch.hpp>
#include <vqkit/core/error.hpp>
#include <vqkit/core/random.hpp>
#include <vqkit/io/family_checkpoint.hpp>
#include <vqkit/io/safetensors.hpp>
#include <vqkit/layers/fsq.hpp>
#include <vqkit/layers/grouped_vq.hpp>
#include <vqkit/layers/lfq.hpp>
#include <vqkit/layers/residual_vq.hpp>
#include <vqkit/layers/vector_quantizer.hpp>

#include "field_ranges.hpp"
#include "gradcheck.hpp"
#include "test_util.hpp"

#include <filesystem>
#include <set>
#include <string>
#include <vector>

using vqkit::Index;
using vqkit::IndexMatrix;
using vqkit::IndexVector;
using vqkit::RowMask;
using vqkit::RowMatrix;
using Catch::Matchers::Contains;

namespace {

using vqkit::test::numeric_grad;
using vqkit::test::rel_err;

const vqkit::safetensors::File& fixture() {
  static const vqkit::safetensors::File f =
      vqkit::safetensors::load(vqkit::test::fixture_file("quantizers.safetensors"));
  return f;
}
RowMatrix<double> fx(const std::string& name) { return fixture().matrix<double>(name); }
IndexVector fx_idx(const std::string& name) { return fixture().vector<std::int64_t>(name); }

/// Rows drawn around C cluster centres (a stand-in for real embeddings).
RowMatrix<double> clustered(Index N, Index D, Index C, std::uint64_t seed) {
  vqkit::Rng rng(seed);
  const RowMatrix<double> centres = vqkit::test::gaussian<double>(C, D, seed + 1, 3.0);
  RowMatrix<double> x(N, D);
  for (Index i = 0; i < N; ++i)
    for (Index j = 0; j < D; ++j) x(i, j) = centres(Index(rng.below(std::uint64_t(C))), j) + rng.normal();
  return x;
}

vqkit::VectorQuantizerConfig small_vq(Index K, Index D, std::uint64_t seed = 1) {
  vqkit::VectorQuantizerConfig c;
  c.codebook_size = K;
  c.dim = D;
  c.seed = seed;
  c.memory_bank_size = 8 * K;
  c.init_min_rows = 2 * K;
  return c;
}

RowMask mask_of(std::initializer_list<int> bits) {
  RowMask m(Index(bits.size()));
  Index i = 0;
  for (int b : bits) m[i++] = b != 0;
  return m;
}

}  // namespace

// ------------------------------------------------------------------- FSQ ---

TEST_CASE("the family's configs: each bounded field of the field list is refused by name") {
  // Bounded fields: FSQ usage_window, eps; LFQ dim, codebook_scale,
  // temperature, the three weights, usage_window; RVQ levels,
  // dropout_min_levels; grouped groups.
  CHECK(vqkit::test::check_field_ranges(vqkit::FsqConfig{}, "FsqConfig") == 2);
  CHECK(vqkit::test::check_field_ranges(vqkit::LfqConfig{}, "LfqConfig") == 7);
  vqkit::ResidualVQConfig rc;
  rc.levels = 3;
  CHECK(vqkit::test::check_field_ranges(rc, "ResidualVQConfig") == 2);
  CHECK(vqkit::test::check_field_ranges(vqkit::GroupedVQConfig{}, "GroupedVQConfig") == 1);
  // the checkpoint keys are the same list
  std::vector<std::string> keys;
  const vqkit::LfqConfig lc;
  vqkit::LfqConfig::visit_fields(lc, [&](const vqkit::FieldKey& k, const auto&) {
    keys.push_back(k.str());
  });
  const auto meta = vqkit::detail::family_ckpt::meta(lc);
  REQUIRE(meta.size() == keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) CHECK(meta[i].first == keys[i]);
  CHECK(vqkit::detail::family_ckpt::meta(vqkit::FsqConfig{})[0].second == "8,5,5,5");
}

TEST_CASE("FSQ forward, indices and straight-through gradient match PyTorch") {
  const auto lv = fixture().matrix<std::int64_t>("fsq.levels");
  vqkit::FsqConfig cfg;
  cfg.levels.clear();
  for (Index j = 0; j < lv.cols(); ++j) cfg.levels.push_back(int(lv(0, j)));
  vqkit::FSQ<double> fsq(cfg);
  const RowMatrix<double> z = fx("fsq.z");
  RowMatrix<double> out, dz;
  auto ctx = fsq.forward(z, out);
  CHECK(rel_err(out, fx("fsq.out")) < 1e-15);
  CHECK(ctx.indices == fx_idx("fsq.indices"));
  fsq.backward(ctx, fx("fsq.G"), &dz);
  CHECK(rel_err(dz, fx("fsq.dz")) < 1e-12);
  // encode / decode: the same indices, and back to the same grid vectors
  CHECK(fsq.encode(z) == ctx.indices);
  CHECK(fsq.decode(ctx.indices) == out);
  // the gradient is the derivative of the pre-round output (finite differences)
  RowMatrix<double> zz = z, G = fx("fsq.G");
  zz.row(0).setConstant(0.3);  // (the fixture's saturated row has a ~0 slope)
  fsq.forward(zz, out, ctx);
  fsq.backward(ctx, G, &dz);
  const RowMatrix<double> num = numeric_grad([&] { return (G.cwiseProduct(fsq.bounded(zz))).sum(); }, zz, 1e-4);
  CHECK(rel_err(dz, num) < 1e-9);
}

TEST_CASE("FSQ decode covers the whole grid once, metrics count codes, masks drop rows") {
  vqkit::FsqConfig cfg;
  cfg.levels = {4, 3, 2};
  vqkit::FSQ<double> fsq(cfg);
  const Index K = fsq.codebook_size();
  REQUIRE(K == 24);
  IndexVector all(K);
  for (Index k = 0; k < K; ++k) all[k] = k;
  const RowMatrix<double> grid = fsq.decode(all);
  // every grid vector is distinct, and re-encodes to its own index (take a
  // point inside its cell: atanh of the level's position before the bound)
  std::set<std::vector<double>> distinct;
  for (Index k = 0; k < K; ++k) distinct.insert({grid(k, 0), grid(k, 1), grid(k, 2)});
  CHECK(Index(distinct.size()) == K);
  // a batch with known codes: z far inside each cell (tanh's inverse)
  RowMatrix<double> z(K, 3);
  for (Index k = 0; k < K; ++k)
    for (Index j = 0; j < 3; ++j) {
      const int L = cfg.levels[std::size_t(j)];
      const double hl = (L - 1) * (1 + cfg.eps) / 2, off = L % 2 == 0 ? 0.5 : 0.0;
      const double level = grid(k, j) * (L / 2);
      z(k, j) = std::atanh((level + off) / hl) - std::atanh(off / hl);
    }
  RowMatrix<double> out;
  auto ctx = fsq.forward(z, out);
  CHECK(ctx.indices == all);
  CHECK(out == grid);
  CHECK(ctx.metrics.usage == K);
  CHECK(ctx.metrics.perplexity == Approx(double(K)));
  CHECK(ctx.metrics.window_usage == K);

  // mask: padded rows (NaN allowed) get -1, zero output and gradient, no count
  RowMatrix<double> zm = z.topRows(4);
  zm.row(1).setConstant(std::nan(""));
  const RowMask m = mask_of({1, 0, 1, 1});
  vqkit::FSQ<double>::Context mc;
  fsq.forward(zm, m, out, mc);
  CHECK(mc.indices[1] == -1);
  CHECK(out.row(1).isZero());
  CHECK(mc.metrics.batch_rows == 3);
  RowMatrix<double> dz;
  fsq.backward(mc, RowMatrix<double>::Ones(4, 3), &dz);
  CHECK(dz.row(1).isZero());
  CHECK(dz.row(0).cwiseAbs().minCoeff() > 0);
}

TEST_CASE("FSQ rejects bad configs, inputs and indices by name") {
  vqkit::FsqConfig cfg;
  cfg.levels = {8, 1, 5};
  CHECK_THROWS_WITH(vqkit::FSQ<float>(cfg), Contains("levels[1] must be >= 2, got 1"));
  cfg.levels = {4096, 4096, 4};
  CHECK_THROWS_WITH(vqkit::FSQ<float>(cfg), Contains("exceeds 2^24"));
  cfg.levels = {8, 5};
  vqkit::FSQ<float> fsq(cfg);
  RowMatrix<float> out;
  CHECK_THROWS_WITH(fsq.forward(RowMatrix<float>::Zero(3, 3), out), Contains("3 columns, expected 2"));
  RowMatrix<float> bad = RowMatrix<float>::Zero(2, 2);
  bad(1, 0) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(fsq.forward(bad, out), Contains("row 1, column 0"));
  CHECK(fsq.step() == 0);
  vqkit::FSQ<float>::Context ctx;
  CHECK_THROWS_WITH(fsq.forward(RowMatrix<float>::Zero(2, 2), mask_of({1}), out, ctx),
                    Contains("the row mask has 1 entries, the batch 2 rows"));
  IndexVector idx(3);
  idx << 0, 40, 2;
  CHECK_THROWS_WITH(fsq.decode(idx), Contains("index 40 at position 1 is outside [0, 40)"));
}

// ------------------------------------------------------------------- LFQ ---

TEST_CASE("LFQ forward, losses and gradients match PyTorch's softmax over all codes") {
  for (const std::string name : {"lfq_a", "lfq_b"}) {
    INFO(name);
    const RowMatrix<double> p = fx(name + ".params"), z = fx(name + ".z");
    vqkit::LfqConfig cfg;
    cfg.dim = z.cols();
    cfg.codebook_scale = p(0, 0);
    cfg.temperature = p(0, 1);
    cfg.entropy_weight = p(0, 2);
    cfg.diversity_gamma = p(0, 3);
    cfg.commitment_weight = p(0, 4);
    vqkit::LFQ<double> lfq(cfg);
    RowMatrix<double> out, dz;
    auto ctx = lfq.forward(z, out);
    CHECK(out == fx(name + ".out"));
    CHECK(ctx.indices == fx_idx(name + ".indices"));
    const RowMatrix<double> loss = fx(name + ".loss");
    CHECK(ctx.loss.per_sample_entropy == Approx(loss(0, 0)).epsilon(1e-12));
    CHECK(ctx.loss.codebook_entropy == Approx(loss(0, 1)).epsilon(1e-12));
    CHECK(ctx.loss.commitment == Approx(loss(0, 2)).epsilon(1e-12));
    CHECK(ctx.loss.total == Approx(loss(0, 3)).epsilon(1e-12));
    lfq.backward(ctx, fx(name + ".G"), &dz);
    CHECK(rel_err(dz, fx(name + ".dz")) < 1e-10);
    CHECK(lfq.encode(z) == ctx.indices);
    CHECK(lfq.decode(ctx.indices) == out);

    // finite differences of the loss alone (signs stay put for h << |z|)
    RowMatrix<double> zz = z;
    lfq.eval();
    auto lctx = lfq.forward(zz, out);
    lfq.backward(lctx, RowMatrix<double>(0, z.cols()), &dz);
    const RowMatrix<double> num = numeric_grad(
        [&] {
          RowMatrix<double> o;
          return lfq.forward(zz, o).loss.total;
        },
        zz, 1e-5);
    CHECK(rel_err(dz, num) < 1e-7);
  }
}

TEST_CASE("LFQ with a mask equals LFQ on the real rows; bad input changes nothing") {
  vqkit::LfqConfig cfg;
  cfg.dim = 4;
  cfg.temperature = 0.5;
  vqkit::LFQ<double> a(cfg), b(cfg);
  RowMatrix<double> z = vqkit::test::gaussian<double>(6, 4, 7);
  const RowMask m = mask_of({1, 1, 0, 1, 0, 1});
  RowMatrix<double> real(4, 4);
  real << z.row(0), z.row(1), z.row(3), z.row(5);
  z.row(2).setConstant(std::nan(""));
  RowMatrix<double> oa, ob, da, db;
  vqkit::LFQ<double>::Context ca;
  a.forward(z, m, oa, ca);
  auto cb = b.forward(real, ob);
  CHECK(ca.loss.total == cb.loss.total);
  CHECK(ca.indices[2] == -1);
  CHECK(ca.metrics.usage == cb.metrics.usage);
  a.backward(ca, RowMatrix<double>::Ones(6, 4), &da);
  b.backward(cb, RowMatrix<double>::Ones(4, 4), &db);
  CHECK(da.row(3) == db.row(2));
  CHECK(da.row(2).isZero());
  CHECK(a.usage().steps_since_used() == b.usage().steps_since_used());

  vqkit::LfqConfig bad = cfg;
  bad.dim = 21;
  CHECK_THROWS_WITH(vqkit::LFQ<float>(bad), Contains("dim must lie in [1, 20]"));
  bad = cfg;
  bad.temperature = 0;
  CHECK_THROWS_WITH(vqkit::LFQ<float>(bad), Contains("LfqConfig: temperature must be > 0, got temperature=0"));
  bad = cfg;
  bad.entropy_weight = 0;
  bad.dim = 31;
  CHECK_THROWS_WITH(vqkit::LFQ<float>(bad), Contains("dim must lie in [1, 30], got dim=31"));
  const auto before = a.step();
  CHECK_THROWS_WITH(a.forward(z, oa), Contains("row 2"));
  CHECK(a.step() == before);
  IndexVector idx(1);
  idx << 16;
  CHECK_THROWS_WITH(a.decode(idx), Contains("index 16 at position 0 is outside [0, 16)"));
}

// ------------------------------------------- VectorQuantizer: encode, decode, masks ---

TEST_CASE("VectorQuantizer encode/decode equal an eval forward and change nothing") {
  vqkit::VectorQuantizer<float> vq(small_vq(16, 8));
  const RowMatrix<float> x = clustered(64, 8, 6, 3).cast<float>();
  RowMatrix<float> q;
  for (int s = 0; s < 3; ++s) vq.forward(x, q);
  const auto before = vq.state();
  const IndexVector idx = vq.encode(x);
  CHECK(vq.step() == before.step);
  CHECK(vq.codebook() == before.codes);
  vq.eval();
  auto ctx = vq.forward(x, q);
  CHECK(idx == ctx.indices);
  CHECK(vq.decode(idx) == q);
  IndexVector bad = idx;
  bad[5] = 16;
  CHECK_THROWS_WITH(vq.decode(bad), Contains("index 16 at position 5 is outside [0, 16)"));
  bad[5] = -1;  // padding decodes to zero
  CHECK(vq.decode(bad).row(5).isZero());
}

TEST_CASE("VectorQuantizer with a row mask trains exactly as on the real rows alone") {
  for (auto update : {vqkit::CodebookUpdate::ema, vqkit::CodebookUpdate::gradient}) {
    auto cfg = small_vq(8, 4);
    cfg.update = update;
    vqkit::VectorQuantizer<double> masked(cfg), plain(cfg);
    for (int s = 0; s < 6; ++s) {
      RowMatrix<double> x = clustered(40, 4, 5, 10 + s);
      RowMask m(40);
      for (Index i = 0; i < 40; ++i) m[i] = (i * 7 + s) % 5 != 0;
      RowMatrix<double> real(m.count(), 4);
      for (Index i = 0, n = 0; i < 40; ++i)
        if (m[i]) real.row(n++) = x.row(i);
      for (Index i = 0; i < 40; ++i)
        if (!m[i]) x.row(i).setConstant(1e30);  // padding that would wreck every statistic
      RowMatrix<double> qm, qp, dm, dp;
      decltype(masked)::Context cm;
      masked.forward(x, m, qm, cm);
      auto cp = plain.forward(real, qp);
      CHECK(cm.loss.total == cp.loss.total);
      CHECK(cm.metrics.perplexity == cp.metrics.perplexity);
      const RowMatrix<double> G = vqkit::test::gaussian<double>(40, 4, 99 + s);
      RowMatrix<double> Gr(real.rows(), 4);
      for (Index i = 0, n = 0; i < 40; ++i)
        if (m[i]) Gr.row(n++) = G.row(i);
      masked.backward(cm, G, &dm);
      plain.backward(cp, Gr, &dp);
      for (Index i = 0, n = 0; i < 40; ++i) {
        if (m[i]) {
          CHECK(cm.indices[i] == cp.indices[n]);
          CHECK(qm.row(i) == qp.row(n));
          CHECK(dm.row(i) == dp.row(n));
          ++n;
        } else {
          CHECK(cm.indices[i] == -1);
          CHECK(qm.row(i).isZero());
          CHECK(dm.row(i).isZero());
        }
      }
    }
    CHECK(masked.codebook() == plain.codebook());
    CHECK(masked.codebook_grad() == plain.codebook_grad());
    CHECK(masked.memory_bank().storage() == plain.memory_bank().storage());
  }
  // wrong mask length: rejected, nothing changes; an all-padding batch changes nothing
  vqkit::VectorQuantizer<double> vq(small_vq(8, 4));
  RowMatrix<double> q;
  decltype(vq)::Context ctx;
  CHECK_THROWS_WITH(vq.forward(RowMatrix<double>::Zero(5, 4), mask_of({1, 0}), q, ctx),
                    Contains("the row mask has 2 entries, the batch 5 rows"));
  vq.forward(RowMatrix<double>::Zero(2, 4), mask_of({0, 0}), q, ctx);
  CHECK(vq.step() == 0);
  CHECK(vq.memory_bank().size() == 0);
  CHECK((ctx.indices.array() == -1).all());
}

// ------------------------------------------------------------ ResidualVQ ---

TEST_CASE("ResidualVQ: levels quantize the residuals, MSE falls at every level, round trips") {
  vqkit::ResidualVQConfig cfg;
  cfg.levels = 4;
  cfg.level = small_vq(16, 6, 5);
  vqkit::ResidualVQ<double> rvq(cfg);
  // the same stack by hand from independent quantizers
  std::vector<vqkit::VectorQuantizer<double>> hand;
  for (Index l = 0; l < 4; ++l) {
    auto c = cfg.level;
    c.seed = cfg.level.seed + std::uint64_t(l);
    hand.emplace_back(c);
  }
  RowMatrix<double> x, out;
  for (int s = 0; s < 8; ++s) {
    x = clustered(128, 6, 40, 100 + s);
    auto ctx = rvq.forward(x, out);
    RowMatrix<double> r = x, sum = RowMatrix<double>::Zero(128, 6), q, dx, dhand, g;
    const RowMatrix<double> G = vqkit::test::gaussian<double>(128, 6, 7 + s);
    dhand = G;
    for (Index l = 0; l < 4; ++l) {
      auto c = hand[std::size_t(l)].forward(r, q);
      CHECK(c.indices == ctx.indices.col(l));
      hand[std::size_t(l)].backward(c, RowMatrix<double>(0, 6), &g);
      dhand += g;
      sum += q;
      r -= q;
    }
    CHECK(out == sum);
    rvq.backward(ctx, G, &dx);
    CHECK(rel_err(dx, dhand) < 1e-14);
  }
  rvq.eval();
  {
    // one vector repeated: every level picks one code, a collapsed batch
    const RowMatrix<double> same = clustered(1, 6, 1, 5).replicate(128, 1);
    auto hc = rvq.forward(same, out);
    CHECK(hc.level[0].metrics.health == vqkit::Health::collapsed);
    CHECK(decltype(rvq)::health(hc) == vqkit::Health::collapsed);
    hc = rvq.forward(clustered(512, 6, 40, 998), out);
    CHECK(decltype(rvq)::health(hc) != vqkit::Health::collapsed);
  }
  x = clustered(512, 6, 40, 999);
  const IndexMatrix idx = rvq.encode(x);
  auto ctx = rvq.forward(x, out);
  CHECK(idx == ctx.indices);
  CHECK(rel_err(rvq.decode(idx), out) < 1e-14);
  // the error falls with every added level
  double prev = x.squaredNorm();
  RowMatrix<double> partial = RowMatrix<double>::Zero(512, 6);
  for (Index l = 0; l < 4; ++l) {
    partial += rvq.level(l).decode(idx.col(l));
    const double mse = (x - partial).squaredNorm();
    CHECK(mse < prev);
    prev = mse;
  }
  IndexMatrix bad = idx;
  bad(3, 2) = 16;
  CHECK_THROWS_WITH(rvq.decode(bad), Contains("index 16 at position 3"));
  CHECK_THROWS_WITH(rvq.decode(IndexMatrix::Zero(2, 3)), Contains("3 columns, expected one per level (4)"));
}

TEST_CASE("ResidualVQ with a shared codebook is one quantizer called once per level") {
  vqkit::ResidualVQConfig cfg;
  cfg.levels = 3;
  cfg.shared = true;
  cfg.level = small_vq(16, 6, 5);
  vqkit::ResidualVQ<double> rvq(cfg);
  CHECK(rvq.codebooks() == 1);
  CHECK(&rvq.level(0) == &rvq.level(2));
  CHECK_THROWS_WITH(rvq.level(3), Contains("level 3 is outside [0, 3)"));
  vqkit::VectorQuantizer<double> hand(cfg.level);  // the definition: one codebook, Q calls
  RowMatrix<double> x, out;
  for (int s = 0; s < 8; ++s) {
    x = clustered(128, 6, 40, 100 + s);
    auto ctx = rvq.forward(x, out);
    RowMatrix<double> r = x, sum = RowMatrix<double>::Zero(128, 6), q, dx, g;
    const RowMatrix<double> G = vqkit::test::gaussian<double>(128, 6, 7 + s);
    RowMatrix<double> dhand = G;
    std::vector<vqkit::VectorQuantizer<double>::Context> hc(3);
    for (Index l = 0; l < 3; ++l) {
      hand.forward(r, q, hc[std::size_t(l)]);
      CHECK(hc[std::size_t(l)].indices == ctx.indices.col(l));
      sum += q;
      r -= q;
    }
    for (Index l = 0; l < 3; ++l) {
      hand.backward(hc[std::size_t(l)], RowMatrix<double>(0, 6), &g);
      dhand += g;
    }
    CHECK(out == sum);
    CHECK(rvq.level(0).codebook() == hand.codebook());
    rvq.backward(ctx, G, &dx);
    CHECK(rel_err(dx, dhand) < 1e-14);
  }
  CHECK(rvq.level(1).step() == 24);  // a step per level call
  rvq.eval();
  x = clustered(256, 6, 40, 999);
  const IndexMatrix idx = rvq.encode(x);
  CHECK(idx == rvq.forward(x, out).indices);
  CHECK(rel_err(rvq.decode(idx), out) < 1e-14);
  CHECK((idx.array() < 16).all());  // every level draws from the one codebook of 16
}

TEST_CASE("ResidualVQ: quantize dropout, state round trip, bad input changes nothing") {
  vqkit::ResidualVQConfig cfg;
  cfg.levels = 3;
  cfg.level = small_vq(8, 4, 2);
  cfg.quantize_dropout = true;
  cfg.seed = 11;
  vqkit::ResidualVQ<double> rvq(cfg);
  RowMatrix<double> out;
  std::set<Index> seen;
  for (int s = 0; s < 16; ++s) {
    const std::int64_t top_before = rvq.level(2).step();
    auto ctx = rvq.forward(clustered(48, 4, 6, 200 + s), out);
    seen.insert(ctx.active);
    CHECK(Index(ctx.level.size()) == ctx.active);
    CHECK(rvq.level(2).step() == top_before + (ctx.active == 3 ? 1 : 0));
    for (Index l = ctx.active; l < 3; ++l) CHECK((ctx.indices.col(l).array() == -1).all());
  }
  CHECK(seen == std::set<Index>{1, 2, 3});

  // a copy restored from state() continues bit-identically
  vqkit::ResidualVQ<double> copy(cfg);
  copy.set_state(rvq.state());
  RowMatrix<double> o2;
  for (int s = 0; s < 4; ++s) {
    const RowMatrix<double> x = clustered(48, 4, 6, 300 + s);
    auto a = rvq.forward(x, out);
    auto b = copy.forward(x, o2);
    CHECK(a.indices == b.indices);
    CHECK(out == o2);
  }
  for (Index l = 0; l < 3; ++l) CHECK(rvq.level(l).codebook() == copy.level(l).codebook());

  // a state whose last level is bad: rejected, no level changed
  auto st = rvq.state();
  const auto codes0 = copy.level(0).codebook();
  st.levels[0].codes.setZero();
  st.levels[2].codes.resize(3, 4);
  CHECK_THROWS_WITH(copy.set_state(st), Contains("codebook is 3x4, expected 8x4"));
  CHECK(copy.level(0).codebook() == codes0);
  // non-finite input: rejected before any level runs
  RowMatrix<double> bad = clustered(8, 4, 2, 5);
  bad(6, 3) = std::nan("");
  const auto step0 = rvq.level(0).step();
  CHECK_THROWS_WITH(rvq.forward(bad, out), Contains("row 6"));
  CHECK(rvq.level(0).step() == step0);
  cfg.dropout_min_levels = 4;
  CHECK_THROWS_WITH(vqkit::ResidualVQ<double>(cfg), Contains("dropout_min_levels must lie in [1, levels=3], got dropout_min_levels=4"));
}

// ------------------------------------------------------------- GroupedVQ ---

TEST_CASE("GroupedVQ: separate heads are independent quantizers, shared is one over the heads") {
  const Index N = 64, G = 3, d = 4;
  const RowMatrix<double> dout = vqkit::test::gaussian<double>(N, G * d, 3);
  for (bool shared : {false, true}) {
    INFO("shared " << shared);
    vqkit::GroupedVQConfig cfg;
    cfg.groups = G;
    cfg.shared = shared;
    cfg.head = small_vq(8, d, 4);
    vqkit::GroupedVQ<double> gvq(cfg);
    std::vector<vqkit::VectorQuantizer<double>> hand;
    for (Index g = 0; g < (shared ? 1 : G); ++g) {
      auto c = cfg.head;
      c.seed += std::uint64_t(g);
      hand.emplace_back(c);
    }
    RowMatrix<double> out, dx;
    for (int s = 0; s < 5; ++s) {
      const RowMatrix<double> x = clustered(N, G * d, 10, 50 + s);
      auto ctx = gvq.forward(x, out);
      gvq.backward(ctx, dout, &dx);
      RowMatrix<double> q, g_;
      if (shared) {
        const RowMatrix<double> heads = Eigen::Map<const RowMatrix<double>>(x.data(), N * G, d);
        const RowMatrix<double> dheads = Eigen::Map<const RowMatrix<double>>(dout.data(), N * G, d);
        auto c = hand[0].forward(heads, q);
        hand[0].backward(c, dheads, &g_);
        CHECK(out == Eigen::Map<const RowMatrix<double>>(q.data(), N, G * d));
        CHECK(dx == Eigen::Map<const RowMatrix<double>>(g_.data(), N, G * d));
        CHECK(ctx.indices == Eigen::Map<const IndexMatrix>(c.indices.data(), N, G));
      } else {
        for (Index g = 0; g < G; ++g) {
          auto c = hand[std::size_t(g)].forward(RowMatrix<double>(x.middleCols(g * d, d)), q);
          hand[std::size_t(g)].backward(c, RowMatrix<double>(dout.middleCols(g * d, d)), &g_);
          CHECK(out.middleCols(g * d, d) == q);
          CHECK(dx.middleCols(g * d, d) == g_);
          CHECK(ctx.indices.col(g) == c.indices);
        }
      }
    }
    gvq.eval();
    const RowMatrix<double> x = clustered(N, G * d, 10, 77);
    {
      auto hc = gvq.forward(x, out);
      vqkit::Health worst = vqkit::Health::healthy;
      for (const auto& c : hc.head) worst = std::max(worst, c.metrics.health);
      CHECK(decltype(gvq)::health(hc) == worst);
    }
    auto ctx = gvq.forward(x, out);
    const IndexMatrix idx = gvq.encode(x);
    CHECK(idx == ctx.indices);
    CHECK(gvq.decode(idx) == out);
    // masked rows: -1 in every head, zero output
    RowMask m = RowMask::Constant(N, true);
    m[3] = false;
    decltype(gvq)::Context mc;
    gvq.forward(x, m, out, mc);
    CHECK((mc.indices.row(3).array() == -1).all());
    CHECK(out.row(3).isZero());
    CHECK_THROWS_WITH(gvq.forward(RowMatrix<double>::Zero(2, 5), out),
                      Contains("5 columns, expected 12"));
    // A view of wider rows (outer stride > D) gives what its copy gives.
    const RowMatrix<double> wide = clustered(N, G * d + 3, 10, 78);
    const RowMatrix<double> copy = wide.leftCols(G * d);
    vqkit::GroupedVQ<double> viewed(cfg), copied(cfg);
    RowMatrix<double> out2, dx2;
    auto c1 = viewed.forward(wide.leftCols(G * d), out);
    auto c2 = copied.forward(copy, out2);
    CHECK(out == out2);
    CHECK(c1.indices == c2.indices);
    const RowMatrix<double> dwide = vqkit::test::gaussian<double>(N, G * d + 3, 4);
    viewed.backward(c1, dwide.leftCols(G * d), &dx);
    copied.backward(c2, RowMatrix<double>(dwide.leftCols(G * d)), &dx2);
    CHECK(dx == dx2);
    CHECK(viewed.encode(wide.leftCols(G * d)) == copied.encode(copy));
  }
}

TEST_CASE("GroupedResidualVQ: each head a residual stack (or one shared), by hand") {
  const Index N = 48, G = 2, d = 3, Q = 3;
  const RowMatrix<double> dout = vqkit::test::gaussian<double>(N, G * d, 5);
  for (bool shared : {false, true}) {
    INFO("shared " << shared);
    vqkit::GroupedResidualVQConfig cfg;
    cfg.groups = G;
    cfg.shared = shared;
    cfg.head.levels = Q;
    cfg.head.level = small_vq(8, d, 11);
    vqkit::GroupedResidualVQ<double> gr(cfg);
    CHECK(gr.codes_per_head() == Q);
    // by hand: head g is a ResidualVQ whose levels are seeded 11 + g Q + l
    std::vector<vqkit::ResidualVQ<double>> hand;
    for (Index g = 0; g < (shared ? 1 : G); ++g) {
      vqkit::ResidualVQConfig c = cfg.head;
      c.level.seed = 11 + std::uint64_t(g * Q);
      c.seed = std::uint64_t(g);
      hand.emplace_back(c);
    }
    RowMatrix<double> out, dx, q, g_;
    for (int s = 0; s < 5; ++s) {
      const RowMatrix<double> x = clustered(N, G * d, 10, 60 + s);
      auto ctx = gr.forward(x, out);
      REQUIRE(ctx.indices.cols() == G * Q);
      gr.backward(ctx, dout, &dx);
      if (shared) {
        auto c = hand[0].forward(RowMatrix<double>(Eigen::Map<const RowMatrix<double>>(x.data(), N * G, d)), q);
        hand[0].backward(c, RowMatrix<double>(Eigen::Map<const RowMatrix<double>>(dout.data(), N * G, d)), &g_);
        CHECK(out == Eigen::Map<const RowMatrix<double>>(q.data(), N, G * d));
        CHECK(dx == Eigen::Map<const RowMatrix<double>>(g_.data(), N, G * d));
        CHECK(ctx.indices == Eigen::Map<const IndexMatrix>(c.indices.data(), N, G * Q));
      } else {
        for (Index g = 0; g < G; ++g) {
          auto c = hand[std::size_t(g)].forward(RowMatrix<double>(x.middleCols(g * d, d)), q);
          hand[std::size_t(g)].backward(c, RowMatrix<double>(dout.middleCols(g * d, d)), &g_);
          CHECK(out.middleCols(g * d, d) == q);
          CHECK(dx.middleCols(g * d, d) == g_);
          CHECK(ctx.indices.middleCols(g * Q, Q) == c.indices);
        }
      }
    }
    CHECK(decltype(gr)::health(gr.forward(clustered(N, G * d, 10, 70), out)) != vqkit::Health::collapsed);
    gr.eval();
    const RowMatrix<double> x = clustered(N, G * d, 10, 71);
    const IndexMatrix idx = gr.encode(x);
    CHECK(idx == gr.forward(x, out).indices);
    CHECK(rel_err(gr.decode(idx), out) < 1e-14);
    IndexMatrix bad = idx;
    bad(2, G * Q - 1) = 8;
    CHECK_THROWS_WITH(gr.decode(bad), Contains("index 8 at position"));
    CHECK_THROWS_WITH(gr.decode(IndexMatrix::Zero(2, G)), Contains("expected 3 per head (6)"));
    // masked rows: -1 in every level of every head, zero output
    RowMask m = RowMask::Constant(N, true);
    m[5] = false;
    decltype(gr)::Context mc;
    gr.forward(x, m, out, mc);
    CHECK((mc.indices.row(5).array() == -1).all());
    CHECK(out.row(5).isZero());
  }
}

// -------------------------------------------------------- rotation trick ---

TEST_CASE("rotation trick gradient matches PyTorch; the layer uses it, degenerate rows fall back") {
  const RowMatrix<double> e = fx("rot.e"), q = fx("rot.q"), G = fx("rot.G");
  CHECK(rel_err(fx("rot.out"), q) < 1e-12);  // (the fixture's forward: sg(lambda R) e = q)
  RowMatrix<double> de;
  vqkit::rotation_trick_grad<double>(e - q, q, G, de);
  CHECK(rel_err(de, fx("rot.de")) < 1e-12);
  // no unique rotation: x = 0, q = 0, q = -c x -> straight-through
  RowMatrix<double> x2(3, 2), q2(3, 2), g2(3, 2);
  x2 << 0, 0, 1, 2, 1, 2;
  q2 << 1, 1, 0, 0, -2, -4;
  g2 << 1, 2, 3, 4, 5, 6;
  vqkit::rotation_trick_grad<double>(x2 - q2, q2, g2, de);
  CHECK(de == g2);

  // in the layer: dx = rotated dq + the commitment term, masked rows zero
  auto cfg = small_vq(8, 5);
  cfg.gradient_estimator = vqkit::GradientEstimator::rotation;
  vqkit::VectorQuantizer<double> vq(cfg);
  const RowMatrix<double> x = clustered(32, 5, 4, 8);
  RowMatrix<double> out, dx, rot;
  auto ctx = vq.forward(x, out);
  const RowMatrix<double> dq = vqkit::test::gaussian<double>(32, 5, 12);
  vq.backward(ctx, dq, &dx);
  vqkit::rotation_trick_grad<double>(x - out, out, dq, rot);
  const RowMatrix<double> expect = rot + (2.0 * cfg.loss.commitment_weight / (32.0 * 5.0)) * (x - out);
  CHECK(rel_err(dx, expect) < 1e-14);
  CHECK(rel_err(dx, dq + (2.0 * cfg.loss.commitment_weight / (32.0 * 5.0)) * (x - out)) > 1e-3);
  RowMask m = RowMask::Constant(32, true);
  m[7] = false;
  decltype(vq)::Context mc;
  vq.forward(x, m, out, mc);
  vq.backward(mc, dq, &dx);
  CHECK(dx.row(7).isZero());
  CHECK(dx.row(8).cwiseAbs().maxCoeff() > 0);

  // the estimator is part of the checkpointed config
  const auto file = vqkit::to_safetensors(vq);
  CHECK(file.metadata.at("gradient_estimator") == "rotation");
  vqkit::VectorQuantizer<double> plain(small_vq(8, 5));
  CHECK_THROWS_WITH(vqkit::from_safetensors(file, plain),
                    Contains("gradient_estimator is rotation in the checkpoint but straight_through"));
  vqkit::VectorQuantizer<double> same(cfg);
  vqkit::from_safetensors(file, same);
  CHECK(same.codebook() == vq.codebook());
  auto legacy = file;  // a file from before the key loads as straight_through
  legacy.metadata.erase("gradient_estimator");
  CHECK(vqkit::config_from_metadata(legacy.metadata).gradient_estimator ==
        vqkit::GradientEstimator::straight_through);
}

// ------------------------------------------------------------ checkpoints ---

TEST_CASE("family checkpoints: files round trip and continue bit-identically; bad files change nothing") {
  const std::string dir = (std::filesystem::temp_directory_path() / "vqkit_family_ckpt").string();
  std::filesystem::create_directories(dir);
  RowMatrix<double> out, o2;

  vqkit::ResidualVQConfig rc;
  rc.levels = 3;
  rc.level = small_vq(8, 4, 3);
  rc.quantize_dropout = true;
  vqkit::ResidualVQ<double> rvq(rc), rvq2(rc);
  for (int s = 0; s < 5; ++s) rvq.forward(clustered(40, 4, 5, 400 + s), out);
  vqkit::save_checkpoint(dir + "/rvq.safetensors", rvq);
  vqkit::load_checkpoint(dir + "/rvq.safetensors", rvq2);
  for (int s = 0; s < 3; ++s) {
    const RowMatrix<double> x = clustered(40, 4, 5, 500 + s);
    auto a = rvq.forward(x, out);
    auto b = rvq2.forward(x, o2);
    CHECK(a.indices == b.indices);
    CHECK(out == o2);
  }
  // a different config is named; the layer is unchanged
  auto rc3 = rc;
  rc3.dropout_min_levels = 2;
  vqkit::ResidualVQ<double> other(rc3);
  const auto before = other.level(0).codebook();
  CHECK_THROWS_WITH(vqkit::load_checkpoint(dir + "/rvq.safetensors", other),
                    Contains("dropout_min_levels is 1 in the checkpoint but 2 in this layer"));
  CHECK(other.level(0).codebook() == before);
  // a damaged level (the last one) is named; no level changes
  auto f = vqkit::to_safetensors(rvq);
  f.tensors.at("level.2.codebook").shape = {4, 8};
  const auto codes0 = rvq2.level(0).codebook();
  CHECK_THROWS_WITH(vqkit::from_safetensors(f, rvq2), Contains("level.2"));
  CHECK(rvq2.level(0).codebook() == codes0);
  // a file from before the shared codebook (no "shared" key) has separate ones
  auto legacy = vqkit::to_safetensors(rvq);
  REQUIRE(legacy.metadata.erase("shared") == 1);
  vqkit::ResidualVQ<double> rvq3(rc);
  vqkit::from_safetensors(legacy, rvq3);
  CHECK(rvq3.level(2).codebook() == rvq.level(2).codebook());
  // shared: one quantizer stored (as level 0); a separate-codebook layer refuses it
  auto rs = rc;
  rs.shared = true;
  vqkit::ResidualVQ<double> sh1(rs), sh2(rs);
  for (int s = 0; s < 4; ++s) sh1.forward(clustered(40, 4, 5, 800 + s), out);
  const auto sf = vqkit::to_safetensors(sh1);
  CHECK(sf.tensors.count("level.0.codebook") == 1);
  CHECK(sf.tensors.count("level.1.codebook") == 0);
  vqkit::from_safetensors(sf, sh2);
  const RowMatrix<double> xs = clustered(40, 4, 5, 900);
  CHECK(sh1.forward(xs, out).indices == sh2.forward(xs, o2).indices);
  CHECK(out == o2);
  CHECK_THROWS_WITH(vqkit::from_safetensors(sf, rvq3), Contains("shared is true in the checkpoint but false"));

  for (bool shared : {false, true}) {
    vqkit::GroupedVQConfig gc;
    gc.groups = 2;
    gc.shared = shared;
    gc.head = small_vq(8, 3, 6);
    vqkit::GroupedVQ<double> g1(gc), g2(gc);
    for (int s = 0; s < 4; ++s) g1.forward(clustered(30, 6, 4, 600 + s), out);
    vqkit::save_checkpoint(dir + "/gvq.safetensors", g1);
    vqkit::load_checkpoint(dir + "/gvq.safetensors", g2);
    const RowMatrix<double> x = clustered(30, 6, 4, 700);
    CHECK(g1.forward(x, out).indices == g2.forward(x, o2).indices);
    CHECK(g1.head(1).codebook() == g2.head(1).codebook());
  }

  {  // grouped residual: its own format, the residual heads nested
    vqkit::GroupedResidualVQConfig gc;
    gc.groups = 2;
    gc.head.levels = 2;
    gc.head.level = small_vq(8, 3, 6);
    vqkit::GroupedResidualVQ<double> g1(gc), g2(gc);
    for (int s = 0; s < 4; ++s) g1.forward(clustered(30, 6, 4, 610 + s), out);
    vqkit::save_checkpoint(dir + "/grvq.safetensors", g1);
    vqkit::load_checkpoint(dir + "/grvq.safetensors", g2);
    const RowMatrix<double> x = clustered(30, 6, 4, 710);
    CHECK(g1.forward(x, out).indices == g2.forward(x, o2).indices);
    CHECK(out == o2);
    CHECK(g2.head(1).level(1).codebook() == g1.head(1).level(1).codebook());
    CHECK_THROWS_WITH(vqkit::load_checkpoint(dir + "/gvq.safetensors", g2),
                      Contains("not a vqkit.grouped_residual_vq checkpoint"));
  }

  vqkit::FsqConfig fcfg;
  fcfg.levels = {5, 4};
  vqkit::FSQ<double> f1(fcfg), f2(fcfg);
  f1.forward(vqkit::test::gaussian<double>(20, 2, 1), out);
  vqkit::save_checkpoint(dir + "/fsq.safetensors", f1);
  vqkit::load_checkpoint(dir + "/fsq.safetensors", f2);
  CHECK(f2.step() == 1);
  CHECK(f2.usage().steps_since_used() == f1.usage().steps_since_used());
  fcfg.levels = {5, 5};
  vqkit::FSQ<double> f3(fcfg);
  CHECK_THROWS_WITH(vqkit::load_checkpoint(dir + "/fsq.safetensors", f3),
                    Contains("levels is 5,4 in the checkpoint but 5,5 in this layer"));

  vqkit::LfqConfig lcfg;
  lcfg.dim = 3;
  vqkit::LFQ<double> l1(lcfg), l2(lcfg);
  l1.forward(vqkit::test::gaussian<double>(20, 3, 2), out);
  vqkit::save_checkpoint(dir + "/lfq.safetensors", l1);
  vqkit::load_checkpoint(dir + "/lfq.safetensors", l2);
  CHECK(l2.usage().used_since_reset() == l1.usage().used_since_reset());
  CHECK_THROWS_WITH(vqkit::load_checkpoint(dir + "/fsq.safetensors", l2), Contains("not a vqkit.lfq checkpoint"));
  std::filesystem::remove_all(dir);
}
