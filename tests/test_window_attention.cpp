// Tests for vqkit/layers/window_attention.hpp and vqkit/layers/swin_block.hpp:
// backward against central finite differences of L = sum(G * y) in double
// (attention with and without shift, odd window counts, several head counts;
// Swin block and stage, every parameter including the bias table); forward
// values and autograd gradients against PyTorch references
// (tests/fixtures/gen_attention.py); which tokens may influence which under
// the shifted-window mask, by brute-force perturbation; parameter names;
// rejected inputs leaving everything unchanged; bit-identical results for 1
// and 2 threads.
#include <catch2/catch.hpp>
#include <vqkit/core/error.hpp>
#include <vqkit/core/random.hpp>
#include <vqkit/io/safetensors.hpp>
#include <vqkit/layers/swin_block.hpp>
#include <vqkit/layers/window_attention.hpp>

#include "gradcheck.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

using vqkit::ConstMatrixRef;
using vqkit::Index;
using vqkit::MapShape;
using vqkit::ParameterList;
using vqkit::Rng;
using vqkit::RowMatrix;
using Catch::Matchers::Contains;

namespace {

using vqkit::test::check_gradients;
using vqkit::test::randn;
using vqkit::test::rel_err;

using Attn = vqkit::WindowAttention<double>;
using Block = vqkit::SwinBlock<double>;
using Stage = vqkit::SwinStage<double>;

// Binds the map shape (and the attention's shift) so that the standard
// forward(x, y) / backward contract of gradcheck.hpp applies.
template <class L>
struct OnMap {
  L& layer;
  MapShape shape;
  Index shift = 0;
  using Context = typename L::Context;

  Context forward(ConstMatrixRef<double> x, RowMatrix<double>& y) const {
    if constexpr (std::is_same_v<L, Attn>)
      return layer.forward(x, y, shape, shift);
    else
      return layer.forward(x, y, shape);
  }
  void backward(const Context& c, ConstMatrixRef<double> dy, RowMatrix<double>* dx) {
    layer.backward(c, dy, dx);
  }
  ParameterList<double> parameters() { return layer.parameters(); }
  void zero_grad() { layer.zero_grad(); }
};

// Every parameter redrawn N(0, scale^2): nonzero biases, bias table and norm
// shifts, so that each gradient is exercised.
template <class L>
void randomize(L& layer, Rng& rng, double scale = 0.5) {
  for (auto& p : layer.parameters())
    *p.value = randn(p.value->rows(), p.value->cols(), rng, scale);
}

template <class L>
std::vector<RowMatrix<double>> snapshot(L& layer) {
  std::vector<RowMatrix<double>> s;
  for (auto& p : layer.parameters()) {
    s.push_back(*p.value);
    s.push_back(*p.grad);
  }
  return s;
}

bool same(const std::vector<RowMatrix<double>>& a, const std::vector<RowMatrix<double>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].rows() != b[i].rows() || a[i].cols() != b[i].cols() || a[i] != b[i]) return false;
  return true;
}

const vqkit::safetensors::File& fixture() {
  static const vqkit::safetensors::File f =
      vqkit::safetensors::load(vqkit::test::fixture_file("attention.safetensors"));
  return f;
}

std::vector<Index> config(const std::string& name) {
  const auto v = fixture().vector<std::int64_t>(name + ".config");
  return std::vector<Index>(v.data(), v.data() + v.size());
}

// Loads every listed parameter from the fixture, by its name.
template <class T>
void load(ParameterList<T> params) {
  const auto& f = fixture();
  for (auto& p : params) {
    INFO("parameter " << p.name);
    RowMatrix<double> m;
    if (f.at(p.name).shape.size() == 1)
      m = f.vector<double>(p.name).transpose();
    else
      m = f.matrix<double>(p.name);
    REQUIRE(m.rows() == p.value->rows());
    REQUIRE(m.cols() == p.value->cols());
    *p.value = m.cast<T>();
  }
}

// Compares the gradients of L = sum(g * y) with the fixture's autograd ones.
template <class L>
void check_fixture_grads(L& layer, const typename L::Context& ctx, const std::string& name) {
  const auto& f = fixture();
  layer.zero_grad();
  RowMatrix<double> dx;
  layer.backward(ctx, f.matrix<double>(name + ".g"), &dx);
  CHECK(rel_err(dx, f.matrix<double>(name + ".dx")) < 1e-10);
  for (auto& p : layer.parameters(name + ".")) {
    const std::string key = name + ".grad." + p.name.substr(name.size() + 1);
    INFO("gradient " << key);
    RowMatrix<double> ref;
    if (f.at(key).shape.size() == 1)
      ref = f.vector<double>(key).transpose();
    else
      ref = f.matrix<double>(key);
    CHECK(rel_err(*p.grad, ref) < 1e-10);
  }
}

struct AttnCase {
  Index B, H, W, C, heads, window, shift;
};

}  // namespace

TEST_CASE("window attention: backward matches finite differences", "[window_attention]") {
  const AttnCase cases[] = {
      {1, 2, 6, 6, 3, 2, 1},  // 3 windows (odd), 3 heads, shifted
      {2, 4, 4, 4, 1, 2, 0},  // batch 2, 8 windows, 1 head, no shift
      {1, 9, 3, 4, 2, 3, 1},  // odd window 3, 3 windows, shifted
      {1, 4, 8, 8, 4, 4, 2},  // 4 heads, 2 windows, shifted
      {1, 4, 4, 4, 2, 4, 2},  // one window, shifted: the mask splits it in four
      {2, 3, 6, 6, 2, 3, 0},  // batch 2, 2x3 map of windows, no shift
  };
  for (const auto& c : cases) {
    INFO("B=" << c.B << " H=" << c.H << " W=" << c.W << " C=" << c.C << " heads=" << c.heads
              << " window=" << c.window << " shift=" << c.shift);
    Rng rng(100 + c.H * 7 + c.W + c.heads);
    Attn attn(c.C, c.heads, c.window, rng);
    randomize(attn, rng);
    const MapShape shape{c.B, c.H, c.W};
    OnMap<Attn> adapter{attn, shape, c.shift};
    check_gradients(adapter, randn(shape.rows(), c.C, rng), rng);
  }
}

TEST_CASE("window attention: gradients accumulate, zero_grad clears them", "[window_attention]") {
  Rng rng(7);
  Attn attn(4, 2, 2, rng);
  randomize(attn, rng);
  const MapShape shape{1, 4, 6};
  const RowMatrix<double> x = randn(shape.rows(), 4, rng), g = randn(shape.rows(), 4, rng);
  RowMatrix<double> y, dx;
  const auto ctx = attn.forward(x, y, shape, 1);
  attn.backward(ctx, g, &dx);
  std::vector<RowMatrix<double>> once;
  for (auto& p : attn.parameters()) once.push_back(*p.grad);
  attn.backward(ctx, g, nullptr);
  std::size_t i = 0;
  for (auto& p : attn.parameters()) {
    INFO(p.name);
    CHECK(vqkit::test::max_abs(once[i]) > 0);
    CHECK(rel_err(*p.grad, 2.0 * once[i++]) < 1e-15);
  }
  attn.zero_grad();
  for (auto& p : attn.parameters()) CHECK(vqkit::test::max_abs(*p.grad) == 0.0);
}

TEST_CASE("window attention: a token sees exactly its window, without wrap-around",
          "[window_attention]") {
  // y_p depends on x_q iff p and q fall into the same window of the rolled
  // map and lie on the same side of every wrap-around seam (their offset in
  // the rolled map equals their offset in the original map). Checked by
  // perturbing every input token and watching every output token.
  struct Case {
    MapShape shape;
    Index window, shift;
  };
  const Case cases[] = {{{1, 8, 8}, 4, 2}, {{2, 4, 8}, 4, 2}, {{1, 6, 6}, 3, 1}, {{1, 4, 4}, 2, 0}};
  for (const auto& c : cases) {
    const MapShape s = c.shape;
    const Index w = c.window, sh = c.shift;
    INFO("H=" << s.height << " W=" << s.width << " B=" << s.batch << " shift=" << sh);
    Rng rng(11);
    Attn attn(4, 2, w, rng);
    randomize(attn, rng);
    const RowMatrix<double> x = randn(s.rows(), 4, rng);
    RowMatrix<double> y0, y1;
    attn.forward(x, y0, s, sh);
    auto coords = [&](Index r, Index& b, Index& yy, Index& xx) {
      b = r / s.cells();
      yy = (r / s.width) % s.height;
      xx = r % s.width;
    };
    auto wrap = [](Index v, Index n) { return ((v % n) + n) % n; };
    Index mismatches = 0, dependent = 0;
    for (Index q = 0; q < s.rows(); ++q) {
      RowMatrix<double> xq = x;
      xq.row(q).array() += 1.0;
      attn.forward(xq, y1, s, sh);
      Index bq, yq, xq_;
      coords(q, bq, yq, xq_);
      const Index Yq = wrap(yq - sh, s.height), Xq = wrap(xq_ - sh, s.width);
      for (Index p = 0; p < s.rows(); ++p) {
        Index bp, yp, xp;
        coords(p, bp, yp, xp);
        const Index Yp = wrap(yp - sh, s.height), Xp = wrap(xp - sh, s.width);
        const bool same_window = bp == bq && Yp / w == Yq / w && Xp / w == Xq / w;
        const bool no_wrap = (Yp - Yq) == (yp - yq) && (Xp - Xq) == (xp - xq_);
        const bool expected = same_window && no_wrap;
        const bool changed = y1.row(p) != y0.row(p);
        dependent += changed;
        mismatches += changed != expected;
      }
    }
    CHECK(mismatches == 0);
    CHECK(dependent > s.rows());  // not trivially diagonal
  }
}

TEST_CASE("window attention: forward and gradients match PyTorch", "[window_attention][fixture]") {
  for (const std::string name : {"attn0", "attn1", "attn2"}) {
    INFO("fixture case " << name);
    const auto c = config(name);  // B, H, W, C, heads, window, shift
    const MapShape shape{c[0], c[1], c[2]};
    const auto& f = fixture();
    const RowMatrix<double> x = f.matrix<double>(name + ".x"), yref = f.matrix<double>(name + ".y");
    Rng rng(1);
    Attn attn(c[3], c[4], c[5], rng);
    load(attn.parameters(name + "."));
    RowMatrix<double> y;
    const auto ctx = attn.forward(x, y, shape, c[6]);
    CHECK(rel_err(y, yref) < 1e-12);

    vqkit::WindowAttention<float> attnf(c[3], c[4], c[5], rng);
    load(attnf.parameters(name + "."));
    RowMatrix<float> yf;
    attnf.forward(x.cast<float>(), yf, shape, c[6]);
    CHECK(rel_err(yf.cast<double>(), yref) < 1e-5);

    if (f.contains(name + ".g")) check_fixture_grads(attn, ctx, name);
  }
}

TEST_CASE("swin block: backward matches finite differences", "[swin_block]") {
  struct Case {
    MapShape shape;
    Index C, heads, window, shift;
  };
  const Case cases[] = {
      {{1, 4, 6}, 8, 2, 2, 1},  // shifted block, 6 windows
      {{2, 2, 6}, 4, 1, 2, 0},  // batch 2, 3 windows per map, no shift
      {{1, 6, 9}, 6, 3, 3, 1},  // odd window, 3 heads, shifted
      {{1, 2, 4}, 4, 2, 2, 1},  // one window high: the shift is dropped
  };
  for (const auto& c : cases) {
    INFO("H=" << c.shape.height << " W=" << c.shape.width << " C=" << c.C << " heads=" << c.heads
              << " window=" << c.window << " shift=" << c.shift);
    Rng rng(300 + c.C + c.shape.width);
    Block block(c.C, c.heads, c.window, c.shift, rng);
    randomize(block, rng);
    for (auto& p : block.parameters())  // norm scales around 1
      if (p.name.find("norm") == 0 && p.name.find("weight") != std::string::npos)
        p.value->array() += 1.0;
    OnMap<Block> adapter{block, c.shape};
    check_gradients(adapter, randn(c.shape.rows(), c.C, rng), rng);
  }
}

TEST_CASE("swin stage: backward matches finite differences", "[swin_block]") {
  Rng rng(5);
  Stage stage(4, 3, 2, 2, rng);  // blocks shifted 0, 1, 0
  randomize(stage, rng);
  const MapShape shape{1, 4, 4};
  OnMap<Stage> adapter{stage, shape};
  check_gradients(adapter, randn(shape.rows(), 4, rng), rng);
}

TEST_CASE("swin block and stage: forward and gradients match PyTorch",
          "[swin_block][fixture]") {
  const auto& f = fixture();
  for (const std::string name : {"block0", "block1"}) {
    INFO("fixture case " << name);
    const auto c = config(name);  // B, H, W, C, heads, window, shift, mlp_ratio
    const MapShape shape{c[0], c[1], c[2]};
    const RowMatrix<double> x = f.matrix<double>(name + ".x"), yref = f.matrix<double>(name + ".y");
    Rng rng(2);
    Block block(c[3], c[4], c[5], c[6], rng, c[7]);
    load(block.parameters(name + "."));
    RowMatrix<double> y;
    const auto ctx = block.forward(x, y, shape);
    CHECK(ctx.shift == (std::min(shape.height, shape.width) <= c[5] ? 0 : c[6]));
    CHECK(rel_err(y, yref) < 1e-12);

    vqkit::SwinBlock<float> blockf(c[3], c[4], c[5], c[6], rng, c[7]);
    load(blockf.parameters(name + "."));
    RowMatrix<float> yf;
    blockf.forward(x.cast<float>(), yf, shape);
    CHECK(rel_err(yf.cast<double>(), yref) < 1e-5);
    if (f.contains(name + ".g")) check_fixture_grads(block, ctx, name);
  }
  {
    const std::string name = "stage0";
    const auto c = config(name);  // B, H, W, C, heads, window, depth, mlp_ratio
    const MapShape shape{c[0], c[1], c[2]};
    Rng rng(3);
    Stage stage(c[3], c[6], c[4], c[5], rng, c[7]);
    load(stage.parameters(name + "."));
    RowMatrix<double> y;
    const auto ctx = stage.forward(f.matrix<double>(name + ".x"), y, shape);
    CHECK(rel_err(y, f.matrix<double>(name + ".y")) < 1e-12);
    check_fixture_grads(stage, ctx, name);
  }
}

TEST_CASE("swin stage: parameter names, shapes and weight-decay flags as in timm",
          "[swin_block]") {
  Rng rng(1);
  vqkit::SwinStage<float> stage(8, 2, 2, 4, rng);
  CHECK(stage.blocks[0].shift() == 0);
  CHECK(stage.blocks[1].shift() == 2);
  const auto params = stage.parameters("layers.1.");
  const std::vector<std::string> names = {
      "norm1.weight", "norm1.bias", "attn.relative_position_bias_table", "attn.qkv.weight",
      "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
      "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"};
  const std::vector<std::vector<Index>> shapes = {{8}, {8}, {49, 2}, {24, 8}, {24}, {8, 8}, {8},
                                                  {8}, {8}, {32, 8}, {32}, {8, 32}, {8}};
  REQUIRE(params.size() == 2 * names.size());
  for (std::size_t b = 0; b < 2; ++b)
    for (std::size_t i = 0; i < names.size(); ++i) {
      const auto& p = params[b * names.size() + i];
      CHECK(p.name == "layers.1.blocks." + std::to_string(b) + "." + names[i]);
      CHECK(p.shape == shapes[i]);
      CHECK(p.weight_decay == (names[i].find(".weight") != std::string::npos &&
                               names[i].find("norm") == std::string::npos));
      Index numel = 1;
      for (Index d : p.shape) numel *= d;
      CHECK(p.value->size() == numel);
      CHECK(p.grad->size() == numel);
    }
}

TEST_CASE("window attention: bad configurations and inputs throw, changing nothing",
          "[window_attention]") {
  Rng rng(9);
  CHECK_THROWS_WITH(Attn(6, 4, 2, rng), Contains("dim=6") && Contains("heads=4"));
  CHECK_THROWS_WITH(Attn(6, 0, 2, rng), Contains("heads=0"));
  CHECK_THROWS_WITH(Attn(0, 1, 2, rng), Contains("dim=0"));
  CHECK_THROWS_WITH(Attn(4, 2, 0, rng), Contains("window=0"));

  Attn attn(4, 2, 3, rng);
  randomize(attn, rng);
  const MapShape shape{1, 6, 3};
  const RowMatrix<double> x = randn(shape.rows(), 4, rng);
  RowMatrix<double> y;
  const auto ctx = attn.forward(x, y, shape, 1);
  attn.backward(ctx, randn(shape.rows(), 4, rng), nullptr);  // nonzero grads
  const auto before = snapshot(attn);
  const RowMatrix<double> sentinel = RowMatrix<double>::Constant(2, 2, 42.0);

  RowMatrix<double> out = sentinel;
  CHECK_THROWS_WITH(attn.forward(randn(24, 4, rng), out, {1, 6, 4}, 1),
                    Contains("window=3") && Contains("width=4"));
  CHECK_THROWS_WITH(attn.forward(x, out, {1, 3, 3}, 1), Contains("rows"));
  CHECK_THROWS_WITH(attn.forward(randn(18, 5, rng), out, shape, 1), Contains("dim=4"));
  CHECK_THROWS_WITH(attn.forward(x, out, shape, 3), Contains("shift=3"));
  CHECK_THROWS_WITH(attn.forward(x, out, shape, -1), Contains("shift=-1"));
  CHECK_THROWS_WITH(attn.forward(x, out, {0, 6, 3}, 1), Contains("batch=0"));
  CHECK(out == sentinel);

  RowMatrix<double> dx = sentinel;
  CHECK_THROWS_WITH(attn.backward(ctx, randn(18, 3, rng), &dx), Contains("dy is 18x3"));
  CHECK_THROWS_WITH(attn.backward(ctx, randn(17, 4, rng), &dx), Contains("dy is 17x4"));
  auto bad = ctx;
  bad.probs.resize(1, 1);
  CHECK_THROWS_WITH(attn.backward(bad, randn(18, 4, rng), &dx), Contains("probabilities"));
  CHECK(dx == sentinel);
  CHECK(same(snapshot(attn), before));

  // A replaced tensor of the wrong shape is refused before anything is written.
  attn.relative_position_bias_table.resize(24, 2);
  CHECK_THROWS_WITH(attn.forward(x, out, shape, 1), Contains("relative_position_bias_table"));
  CHECK_THROWS_WITH(attn.backward(ctx, randn(18, 4, rng), &dx),
                    Contains("relative_position_bias_table"));
  CHECK(out == sentinel);
  CHECK(dx == sentinel);
  CHECK(attn.qkv.weight_grad == before[3]);
  CHECK(attn.proj.weight_grad == before[7]);
}

TEST_CASE("swin block and stage: bad configurations and inputs throw, changing nothing",
          "[swin_block]") {
  Rng rng(10);
  CHECK_THROWS_WITH(Block(8, 2, 4, 1, rng), Contains("shift=1"));
  CHECK_THROWS_WITH(Block(8, 3, 4, 2, rng), Contains("heads=3"));
  CHECK_THROWS_WITH(Block(8, 2, 4, 2, rng, 0), Contains("mlp_ratio=0"));
  CHECK_THROWS_WITH(Stage(8, 0, 2, 4, rng), Contains("depth=0"));

  Stage stage(4, 2, 2, 2, rng);
  randomize(stage, rng);
  const MapShape shape{1, 4, 6};
  const RowMatrix<double> x = randn(shape.rows(), 4, rng);
  RowMatrix<double> y;
  const auto ctx = stage.forward(x, y, shape);
  stage.backward(ctx, randn(shape.rows(), 4, rng), nullptr);
  const auto before = snapshot(stage);
  const RowMatrix<double> sentinel = RowMatrix<double>::Constant(2, 2, -3.0);

  RowMatrix<double> out = sentinel, dx = sentinel;
  CHECK_THROWS_WITH(stage.forward(randn(15, 4, rng), out, {1, 3, 5}), Contains("window=2"));
  CHECK_THROWS_WITH(stage.forward(randn(24, 3, rng), out, shape), Contains("dim=4"));
  CHECK_THROWS_WITH(stage.blocks[1].forward(x, out, {1, 4, 5}), Contains("rows"));
  CHECK_THROWS_WITH(stage.backward(ctx, randn(24, 5, rng), &dx), Contains("dy is 24x5"));
  CHECK_THROWS_WITH(stage.blocks[0].backward(ctx.blocks[0], randn(23, 4, rng), &dx),
                    Contains("dy is 23x4"));
  auto bad = ctx;
  bad.blocks[0].fc1.input.resize(3, 3);  // block 0 runs last in backward
  CHECK_THROWS_WITH(stage.backward(bad, randn(24, 4, rng), &dx), Contains("mlp.fc1"));
  bad = ctx;
  bad.blocks.pop_back();
  CHECK_THROWS_WITH(stage.backward(bad, randn(24, 4, rng), &dx), Contains("depth=2"));
  CHECK(out == sentinel);
  CHECK(dx == sentinel);
  CHECK(same(snapshot(stage), before));

  // A bad tensor in the block that backward reaches last: nothing is written.
  stage.blocks[0].norm1.weight.resize(1, 3);
  CHECK_THROWS_WITH(stage.backward(ctx, randn(24, 4, rng), &dx), Contains("norm1.weight"));
  CHECK(dx == sentinel);
  CHECK(stage.blocks[1].fc2.weight_grad == before[before.size() - 3]);
}

TEST_CASE("window attention and swin block: 1 and 2 threads give identical bits",
          "[window_attention][swin_block][threads]") {
#ifdef _OPENMP
  const int saved = omp_get_max_threads();
#endif
  struct Out {
    RowMatrix<float> y, dx;
    std::vector<RowMatrix<float>> grads;
  };
  auto run = [](int threads, bool block, MapShape shape, Index C, Index heads, Index w) {
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    Rng rng(77);
    RowMatrix<float> x(shape.rows(), C), g(shape.rows(), C);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(rng.normal());
    for (Index i = 0; i < g.size(); ++i) g.data()[i] = float(rng.normal());
    Out o;
    const vqkit::cpu be{threads};
    if (block) {
      vqkit::SwinBlock<float> l(C, heads, w, w / 2, rng, 4, be);
      const auto ctx = l.forward(x, o.y, shape);
      l.backward(ctx, g, &o.dx);
      for (auto& p : l.parameters()) o.grads.push_back(*p.grad);
    } else {
      vqkit::WindowAttention<float> l(C, heads, w, rng, be);
      for (auto& p : l.parameters())  // a visible bias table
        for (Index i = 0; i < p.value->size(); ++i) p.value->data()[i] += 0.3f * float(rng.normal());
      const auto ctx = l.forward(x, o.y, shape, w / 2);
      l.backward(ctx, g, &o.dx);
      for (auto& p : l.parameters()) o.grads.push_back(*p.grad);
    }
    return o;
  };
  struct Case {
    bool block;
    MapShape shape;
    Index C, heads, w;
  };
  const Case cases[] = {{false, {2, 16, 16}, 32, 4, 4},
                        {false, {1, 24, 16}, 24, 3, 8},
                        {true, {1, 32, 32}, 32, 4, 8},
                        {true, {1, 16, 16}, 64, 8, 8}};
  for (const auto& c : cases) {
    INFO((c.block ? "block" : "attention") << " H=" << c.shape.height << " W=" << c.shape.width
                                           << " C=" << c.C);
    const Out a = run(1, c.block, c.shape, c.C, c.heads, c.w);
    const Out b = run(2, c.block, c.shape, c.C, c.heads, c.w);
#ifdef _OPENMP
    CHECK(omp_get_max_threads() == 2);  // the layers restore the caller's setting
#endif
    CHECK(a.y == b.y);
    CHECK(a.dx == b.dx);
    REQUIRE(a.grads.size() == b.grads.size());
    for (std::size_t i = 0; i < a.grads.size(); ++i) CHECK(a.grads[i] == b.grads[i]);
  }
#ifdef _OPENMP
  omp_set_num_threads(saved);
#endif
}

// The forward(x, y, shape, ctx) overloads reuse the caller's context and the
// layer's backward scratch from call to call: a context that last held a
// batch of another size, then one of the same size, must give the bits of a
// fresh context on a fresh layer (outputs, dL/dx, every gradient), with dx
// aliasing dy as a training loop passes it.
TEST_CASE("swin stage, block and attention: a reused context gives the bits of a fresh one",
          "[window_attention][swin_block]") {
  const Index C = 16, heads = 2, w = 4;
  const MapShape big{2, 8, 12}, small{1, 8, 8};
  struct Out {
    RowMatrix<float> y, dx;
    std::vector<RowMatrix<float>> grads;
  };
  auto data = [&](const MapShape& s, std::uint64_t seed) {
    Rng r(seed);
    RowMatrix<float> x(s.rows(), C), g(s.rows(), C);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(r.normal());
    for (Index i = 0; i < g.size(); ++i) g.data()[i] = float(r.normal());
    return std::make_pair(x, g);
  };
  // One call on layer l with context ctx: forward, zero_grad, backward with
  // dx aliasing dy.
  auto call = [&](auto& l, auto& ctx, const MapShape& s, std::uint64_t seed, auto&& fwd) {
    auto [x, g] = data(s, seed);
    Out o;
    fwd(l, x, o.y, s, ctx);
    l.zero_grad();
    RowMatrix<float> d = g;
    l.backward(ctx, d, &d);
    o.dx = d;
    for (auto& p : l.parameters()) o.grads.push_back(*p.grad);
    return o;
  };
  auto compare = [](const Out& a, const Out& b) {
    CHECK(a.y == b.y);
    CHECK(a.dx == b.dx);
    REQUIRE(a.grads.size() == b.grads.size());
    for (std::size_t i = 0; i < a.grads.size(); ++i) CHECK(a.grads[i] == b.grads[i]);
  };
  auto check = [&](auto make, auto&& fwd) {
    auto reused = make();
    auto fresh = make();
    typename decltype(reused)::Context ctx, fresh_ctx;
    call(reused, ctx, big, 5, fwd);                          // buffers of another size
    const Out a = call(reused, ctx, small, 6, fwd);          // resized
    const Out b = call(fresh, fresh_ctx, small, 6, fwd);     // fresh
    compare(a, b);
    const Out c = call(reused, ctx, small, 7, fwd);          // same size: reused as is
    auto fresh2 = make();
    typename decltype(reused)::Context fresh_ctx2;
    compare(c, call(fresh2, fresh_ctx2, small, 7, fwd));
  };
  SECTION("attention") {
    check([&] { Rng r(3); return vqkit::WindowAttention<float>(C, heads, w, r); },
          [](auto& l, const auto& x, auto& y, const MapShape& s, auto& ctx) {
            l.forward(x, y, s, w / 2, ctx);
          });
  }
  SECTION("block") {
    check([&] { Rng r(3); return vqkit::SwinBlock<float>(C, heads, w, w / 2, r); },
          [](auto& l, const auto& x, auto& y, const MapShape& s, auto& ctx) {
            l.forward(x, y, s, ctx);
          });
  }
  SECTION("stage, y aliasing x") {
    check([&] { Rng r(3); return vqkit::SwinStage<float>(C, 2, heads, w, r); },
          [](auto& l, const auto& x, auto& y, const MapShape& s, auto& ctx) {
            y = x;
            l.forward(y, y, s, ctx);
          });
  }
}
