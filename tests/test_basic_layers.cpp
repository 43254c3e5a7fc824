// Tests for vqkit/layers/{activations,mlp,residual,embedding}.hpp, and the
// forward values of LayerNorm and GELU (layer_norm.hpp, gelu.hpp) against
// PyTorch: forward values against tests/fixtures/basic.safetensors
// (gen_basic.py) or brute-force formulas, every backward against central
// finite differences of L = sum(G * y) in double precision, float/double
// agreement, OpenMP determinism of the embedding's scatter-add, and rejected
// inputs leaving layers, gradients and outputs unchanged.
#include <catch2/catch.hpp>
#include <vqkit/core/backend.hpp>
#include <vqkit/core/error.hpp>
#include <vqkit/core/random.hpp>
#include <vqkit/io/safetensors.hpp>
#include <vqkit/layers/activations.hpp>
#include <vqkit/layers/embedding.hpp>
#include <vqkit/layers/gelu.hpp>
#include <vqkit/layers/layer_norm.hpp>
#include <vqkit/layers/linear.hpp>
#include <vqkit/layers/mlp.hpp>
#include <vqkit/layers/residual.hpp>

#include "gradcheck.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

using vqkit::Index;
using vqkit::IndexVector;
using vqkit::RowMatrix;
using Catch::Matchers::Contains;

namespace {

using vqkit::test::check_gradients;
using vqkit::test::numeric_grad;
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

}  // namespace

// ------------------------------------------------- fixtures: LN and GELU ---

TEST_CASE("LayerNorm forward matches PyTorch nn.LayerNorm") {
  vqkit::LayerNorm<double> ln(7);
  ln.weight = fx("ln.weight");
  ln.bias = fx("ln.bias");
  RowMatrix<double> y;
  ln.forward(fx("ln.x"), y);
  CHECK(rel_err(y, fx("ln.y")) < 1e-12);

  vqkit::LayerNorm<float> lf(7);
  lf.weight = fx("ln.weight").cast<float>();
  lf.bias = fx("ln.bias").cast<float>();
  RowMatrix<float> yf;
  // float: the row with a 1000 offset loses ~1e-4 relative precision in x itself
  lf.forward(fx("ln.x").topRows(3).cast<float>(), yf);
  CHECK(close_float(yf, fx("ln.y").topRows(3), 1e-5));
}

TEST_CASE("GELU, ReLU and Sigmoid forward match PyTorch") {
  const RowMatrix<double> x = fx("act.x");
  RowMatrix<double> y;
  vqkit::Gelu<double>{}.forward(x, y);
  CHECK(rel_err(y, fx("gelu.y")) < 1e-14);
  vqkit::Relu<double>{}.forward(x, y);
  CHECK(y == fx("relu.y"));
  vqkit::Sigmoid<double>{}.forward(x, y);
  const RowMatrix<double> ref = fx("sigmoid.y");
  for (Index i = 0; i < x.size(); ++i) {
    INFO("x=" << x.data()[i]);
    CHECK(y.data()[i] == Approx(ref.data()[i]).epsilon(1e-14).margin(1e-300));
  }
  CHECK(y.allFinite());

  RowMatrix<float> yf;
  vqkit::Sigmoid<float>{}.forward(x.cast<float>(), yf);
  CHECK(yf.allFinite());
  CHECK(close_float(yf, ref, 1e-6));
  vqkit::Relu<float>{}.forward(x.cast<float>(), yf);
  CHECK(close_float(yf, fx("relu.y"), 1e-6));
}

// ------------------------------------------------------------ activations ---

TEST_CASE("Relu and Sigmoid backward match finite differences") {
  vqkit::Rng rng(3);
  for (Index n : {1, 4, 7})
    for (Index c : {1, 3, 10}) {
      INFO("N=" << n << " C=" << c);
      RowMatrix<double> x = randn(n, c, rng, 2.0);
      // keep ReLU's kink away from the finite-difference stencil (h = 1e-3)
      for (Index i = 0; i < x.size(); ++i)
        if (std::abs(x.data()[i]) < 0.01) x.data()[i] = 0.5;
      vqkit::Relu<double> relu;
      check_gradients(relu, x, rng);
      vqkit::Sigmoid<double> sig;
      check_gradients(sig, x, rng);
    }
}

TEST_CASE("Relu has zero gradient at 0, like PyTorch; Sigmoid saturates without NaN") {
  RowMatrix<double> x(1, 3);
  x << 0.0, -1.0, 2.0;
  vqkit::Relu<double> relu;
  RowMatrix<double> y, dx;
  auto ctx = relu.forward(x, y);
  relu.backward(ctx, RowMatrix<double>::Ones(1, 3), &dx);
  RowMatrix<double> expected(1, 3);
  expected << 0.0, 0.0, 1.0;
  CHECK(dx == expected);

  vqkit::Sigmoid<double> sig;
  x << -800.0, 800.0, 0.0;
  auto sctx = sig.forward(x, y);
  CHECK(y(0, 0) == 0.0);
  CHECK(y(0, 1) == 1.0);
  CHECK(y(0, 2) == 0.5);
  sig.backward(sctx, RowMatrix<double>::Ones(1, 3), &dx);
  CHECK(dx.allFinite());
  CHECK(dx(0, 2) == 0.25);
}

TEST_CASE("activations: aliasing of y with x and dx with dy, wrong dy rejected") {
  vqkit::Rng rng(4);
  const RowMatrix<double> x0 = randn(3, 5, rng);
  const RowMatrix<double> g = randn(3, 5, rng);
  vqkit::Sigmoid<double> sig;
  RowMatrix<double> y_ref, dx_ref;
  auto c_ref = sig.forward(x0, y_ref);
  sig.backward(c_ref, g, &dx_ref);
  RowMatrix<double> buf = x0;
  auto c = sig.forward(buf, buf);
  CHECK(buf == y_ref);
  buf = g;
  sig.backward(c, buf, &buf);
  CHECK(buf == dx_ref);

  vqkit::Relu<double> relu;
  RowMatrix<double> r_ref, rdx_ref;
  auto rc_ref = relu.forward(x0, r_ref);
  relu.backward(rc_ref, g, &rdx_ref);
  buf = x0;
  auto rc = relu.forward(buf, buf);
  CHECK(buf == r_ref);
  buf = g;
  relu.backward(rc, buf, &buf);
  CHECK(buf == rdx_ref);

  RowMatrix<double> dx = sentinel(2, 2);
  CHECK_THROWS_WITH(relu.backward(rc, randn(3, 4, rng), &dx), Contains("dy is 3x4"));
  CHECK_THROWS_WITH(sig.backward(c, randn(2, 5, rng), &dx), Contains("dy is 2x5"));
  CHECK(dx == sentinel(2, 2));
}

// -------------------------------------------------------------------- Mlp ---

TEST_CASE("Mlp lists fc1/fc2 parameters with PyTorch names and draws fc1 then fc2") {
  vqkit::Rng rng(5), ref(5);
  vqkit::Mlp<double> mlp(6, 9, 4, rng, vqkit::Activation::relu);
  vqkit::Linear<double> fc1(6, 9, ref), fc2(9, 4, ref);
  CHECK(mlp.fc1.weight == fc1.weight);
  CHECK(mlp.fc2.bias == fc2.bias);
  auto p = mlp.parameters("blocks.0.mlp.");
  REQUIRE(p.size() == 4);
  CHECK(p[0].name == "blocks.0.mlp.fc1.weight");
  CHECK(p[0].shape == std::vector<Index>{9, 6});
  CHECK(p[0].weight_decay);
  CHECK(p[1].name == "blocks.0.mlp.fc1.bias");
  CHECK_FALSE(p[1].weight_decay);
  CHECK(p[2].name == "blocks.0.mlp.fc2.weight");
  CHECK(p[2].shape == std::vector<Index>{4, 9});
  CHECK(p[3].name == "blocks.0.mlp.fc2.bias");
  CHECK(mlp.in_features() == 6);
  CHECK(mlp.hidden_features() == 9);
  CHECK(mlp.out_features() == 4);
  CHECK_THROWS_WITH(vqkit::Mlp<double>(0, 3, 3, rng), Contains("in=0"));
}

TEST_CASE("Mlp forward matches the brute-force formula for ReLU and exact GELU") {
  vqkit::Rng rng(6);
  const RowMatrix<double> x = randn(5, 3, rng);
  for (auto act : {vqkit::Activation::relu, vqkit::Activation::gelu}) {
    vqkit::Mlp<double> mlp(3, 7, 2, rng, act);
    RowMatrix<double> y;
    mlp.forward(x, y);
    RowMatrix<double> ref(5, 2);
    for (Index n = 0; n < 5; ++n)
      for (Index o = 0; o < 2; ++o) {
        double s = mlp.fc2.bias(0, o);
        for (Index h = 0; h < 7; ++h) {
          double z = mlp.fc1.bias(0, h);
          for (Index c = 0; c < 3; ++c) z += x(n, c) * mlp.fc1.weight(h, c);
          const double a = act == vqkit::Activation::relu
                               ? std::max(z, 0.0)
                               : 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
          s += a * mlp.fc2.weight(o, h);
        }
        ref(n, o) = s;
      }
    CHECK(rel_err(y, ref) < 1e-13);
  }
}

TEST_CASE("Mlp backward matches finite differences") {
  vqkit::Rng rng(7);
  for (auto act : {vqkit::Activation::relu, vqkit::Activation::gelu})
    for (Index n : {1, 5})
      for (Index in : {1, 4})
        for (Index hidden : {3, 8})
          for (Index out : {1, 5}) {
            INFO("act=" << static_cast<int>(act) << " N=" << n << " in=" << in
                        << " hidden=" << hidden << " out=" << out);
            vqkit::Mlp<double> mlp(in, hidden, out, rng, act);
            check_gradients(mlp, randn(n, in, rng), rng);
          }
}

TEST_CASE("Mlp accumulates gradients, works in float, and rejects bad input unchanged") {
  vqkit::Rng rng(8);
  vqkit::Mlp<double> mlp(4, 6, 3, rng, vqkit::Activation::gelu);
  const RowMatrix<double> x = randn(5, 4, rng), g = randn(5, 3, rng);
  RowMatrix<double> y, dx;
  auto ctx = mlp.forward(x, y);
  mlp.backward(ctx, g, &dx);
  const RowMatrix<double> once = mlp.fc1.weight_grad;
  mlp.backward(ctx, g, nullptr);
  CHECK(rel_err(mlp.fc1.weight_grad, 2.0 * once) < 1e-15);
  mlp.zero_grad();
  CHECK(mlp.fc1.weight_grad.isZero(0));
  CHECK(mlp.fc2.bias_grad.isZero(0));

  // float agrees with double
  vqkit::Rng r1(9), r2(9);
  vqkit::Mlp<double> md(4, 6, 3, r1, vqkit::Activation::relu);
  vqkit::Mlp<float> mf(4, 6, 3, r2, vqkit::Activation::relu);
  RowMatrix<float> yf;
  md.forward(x, y);
  mf.forward(x.cast<float>(), yf);
  CHECK(close_float(yf, y));

  // bad shapes: nothing changes
  mlp.backward(ctx, g, nullptr);
  const auto before = snapshot(mlp);
  RowMatrix<double> out = sentinel(2, 2);
  CHECK_THROWS_WITH(mlp.forward(randn(5, 3, rng), out), Contains("expected in_features=4"));
  CHECK(out == sentinel(2, 2));
  CHECK_THROWS_WITH(mlp.backward(ctx, randn(5, 2, rng), &out), Contains("dy is 5x2"));
  CHECK_THROWS_WITH(mlp.backward(ctx, randn(4, 3, rng), &out), Contains("dy is 4x3"));
  // a replaced fc1 weight is caught before fc2's gradients are touched
  const RowMatrix<double> w = mlp.fc1.weight;
  mlp.fc1.weight.resize(6, 5);
  auto mid = snapshot(mlp);
  CHECK_THROWS_WITH(mlp.backward(ctx, g, &out), Contains("fc1.weight is 6x5"));
  CHECK(same(snapshot(mlp), mid));
  mlp.fc1.weight = w;
  CHECK(out == sentinel(2, 2));
  CHECK(same(snapshot(mlp), before));
}

// --------------------------------------------------------------- Residual ---

TEST_CASE("Mlp, Relu and Sigmoid with reused contexts match the allocating forms") {
  vqkit::Rng rng(71);
  for (const auto act : {vqkit::Activation::relu, vqkit::Activation::gelu}) {
    vqkit::Mlp<float> mlp(6, 11, 3, rng, act, vqkit::cpu{2});
    vqkit::Mlp<float>::Context ctx;
    for (const Index n : {Index(9), Index(9), Index(4)}) {  // same size twice, then smaller
      const RowMatrix<float> x = randn(n, 6, rng).cast<float>(), g = randn(n, 3, rng).cast<float>();
      RowMatrix<float> y1, y2, dx1, dx2;
      mlp.zero_grad();
      const auto fresh = mlp.forward(x, y1);
      mlp.backward(fresh, g, &dx1);
      const RowMatrix<float> w1 = mlp.fc1.weight_grad;
      mlp.zero_grad();
      mlp.forward(x, y2, ctx);
      mlp.backward(ctx, g, &dx2);
      CHECK(y1 == y2);
      CHECK(dx1 == dx2);
      CHECK(mlp.fc1.weight_grad == w1);
    }
  }
  vqkit::Relu<float> relu;
  vqkit::Sigmoid<float> sig;
  vqkit::Relu<float>::Context rc;
  vqkit::Sigmoid<float>::Context sc;
  const RowMatrix<float> x = randn(5, 4, rng).cast<float>(), g = randn(5, 4, rng).cast<float>();
  RowMatrix<float> a, b, da, db;
  relu.forward(x, a, rc);
  CHECK(a == x.cwiseMax(0.0f));
  sig.forward(x, b, sc);
  const auto sfresh = sig.forward(x, b);
  CHECK(sc.output == sfresh.output);
  RowMatrix<float> dg = g;  // backward in place: dx is dy
  relu.backward(rc, dg, &dg);
  CHECK(dg == (g.array() * (x.array() > 0.0f).cast<float>()).matrix());
  dg = g;
  sig.backward(sc, dg, &dg);
  CHECK(dg == (g.array() * sc.output.array() * (1.0f - sc.output.array())).matrix());
}

TEST_CASE("Residual forward is x + f(x) and backward fans the gradient out") {
  vqkit::Rng rng(10);
  vqkit::Residual<vqkit::Mlp<double>> res(vqkit::Mlp<double>(5, 8, 5, rng));
  const RowMatrix<double> x = randn(4, 5, rng);
  RowMatrix<double> y, fy;
  res.forward(x, y);
  res.body.forward(x, fy);
  CHECK(y == x + fy);

  for (Index n : {1, 3, 6})
    for (Index c : {1, 4, 7}) {
      INFO("N=" << n << " C=" << c);
      vqkit::Residual<vqkit::Mlp<double>> r(std::in_place, c, 2 * c + 1, c, rng,
                                             vqkit::Activation::gelu);
      check_gradients(r, randn(n, c, rng), rng);
    }

  // two residual blocks in a row chain
  struct Two {
    vqkit::Residual<vqkit::Mlp<double>> a, b;
    struct Context {
      vqkit::Residual<vqkit::Mlp<double>>::Context a, b;
    };
    Context forward(vqkit::ConstMatrixRef<double> x, RowMatrix<double>& y) const {
      Context c;
      c.a = a.forward(x, y);
      c.b = b.forward(y, y);
      return c;
    }
    void backward(const Context& c, vqkit::ConstMatrixRef<double> dy, RowMatrix<double>* dx) {
      RowMatrix<double> d;
      b.backward(c.b, dy, &d);
      a.backward(c.a, d, dx);
    }
    vqkit::ParameterList<double> parameters() {
      vqkit::ParameterList<double> all;
      vqkit::append_parameters(all, a.parameters(), "0.");
      vqkit::append_parameters(all, b.parameters(), "1.");
      return all;
    }
    void zero_grad() {
      a.zero_grad();
      b.zero_grad();
    }
  } two{vqkit::Residual<vqkit::Mlp<double>>(vqkit::Mlp<double>(3, 5, 3, rng)),
        vqkit::Residual<vqkit::Mlp<double>>(vqkit::Mlp<double>(3, 4, 3, rng))};
  check_gradients(two, randn(5, 3, rng), rng);
  CHECK(two.parameters()[0].name == "0.fc1.weight");
}

TEST_CASE("Residual names, aliasing, and rejected shapes") {
  vqkit::Rng rng(11);
  vqkit::Residual<vqkit::Mlp<double>> res(vqkit::Mlp<double>(3, 4, 3, rng));
  CHECK(res.parameters("blocks.1.mlp.")[2].name == "blocks.1.mlp.fc2.weight");

  const RowMatrix<double> x = randn(4, 3, rng), g = randn(4, 3, rng);
  RowMatrix<double> y, dx;
  auto ctx = res.forward(x, y);
  res.zero_grad();
  res.backward(ctx, g, &dx);
  const auto grads = snapshot(res);
  RowMatrix<double> buf = x;
  auto c2 = res.forward(buf, buf);
  CHECK(buf == y);
  res.zero_grad();
  buf = g;
  res.backward(c2, buf, &buf);
  CHECK(buf == dx);
  CHECK(same(snapshot(res), grads));

  // a body that changes the width is refused before y is written
  vqkit::Residual<vqkit::Linear<double>> bad(vqkit::Linear<double>(3, 2, rng));
  RowMatrix<double> out = sentinel(1, 1);
  CHECK_THROWS_WITH(bad.forward(x, out), Contains("the body maps 4x3 to 4x2"));
  CHECK(out == sentinel(1, 1));
  // wrong dy: body's gradients and dx untouched
  CHECK_THROWS_WITH(res.backward(ctx, randn(4, 2, rng), &out), Contains("dy is 4x2"));
  CHECK(same(snapshot(res), grads));
  CHECK(out == sentinel(1, 1));
}

// -------------------------------------------------------------- Embedding ---

TEST_CASE("Embedding forward and table gradient match PyTorch nn.Embedding") {
  vqkit::Rng rng(12);
  vqkit::Embedding<double> emb(6, 4, rng);
  emb.weight = fx("emb.weight");
  const IndexVector idx = fixture().vector<std::int64_t>("emb.idx");
  RowMatrix<double> y;
  auto ctx = emb.forward(idx, y);
  CHECK(y == fx("emb.y"));
  emb.backward(ctx, fx("emb.g"));
  CHECK(rel_err(emb.weight_grad, fx("emb.grad")) < 1e-15);

  vqkit::Embedding<float> ef(6, 4, rng);
  ef.weight = fx("emb.weight").cast<float>();
  RowMatrix<float> yf;
  auto cf = ef.forward(idx, yf);
  CHECK(close_float(yf, fx("emb.y"), 1e-7));
  ef.backward(cf, fx("emb.g").cast<float>());
  CHECK(close_float(ef.weight_grad, fx("emb.grad"), 1e-6));
}

TEST_CASE("Embedding initialises N(0,1) row-major and lists weight without decay") {
  vqkit::Rng rng(13), ref(13);
  vqkit::Embedding<double> emb(50, 40, rng);
  CHECK(emb.weight(0, 0) == ref.normal());
  CHECK(emb.weight(0, 1) == ref.normal());
  CHECK(emb.weight.mean() == Approx(0.0).margin(0.05));
  CHECK(emb.weight.array().square().mean() == Approx(1.0).epsilon(0.1));
  auto p = emb.parameters("z_embed.");
  REQUIRE(p.size() == 1);
  CHECK(p[0].name == "z_embed.weight");
  CHECK(p[0].shape == std::vector<Index>{50, 40});
  CHECK_FALSE(p[0].weight_decay);
  CHECK(emb.weight_grad.isZero(0));
  CHECK_THROWS_WITH(vqkit::Embedding<double>(0, 3, rng), Contains("num_embeddings=0"));
}

TEST_CASE("Embedding backward matches finite differences") {
  vqkit::Rng rng(14);
  for (Index num : {1, 5, 9})
    for (Index dim : {1, 3, 6})
      for (Index n : {1, 7, 20}) {
        INFO("num=" << num << " dim=" << dim << " N=" << n);
        vqkit::Embedding<double> emb(num, dim, rng);
        IndexVector idx(n);
        for (Index i = 0; i < n; ++i) idx[i] = static_cast<std::int64_t>(rng.uniform() * num);
        RowMatrix<double> y;
        auto ctx = emb.forward(idx, y);
        const RowMatrix<double> g = randn(n, dim, rng);
        emb.zero_grad();
        emb.backward(ctx, g);
        const RowMatrix<double> fd = numeric_grad(
            [&] {
              RowMatrix<double> yy;
              emb.forward(idx, yy);
              return (g.array() * yy.array()).sum();
            },
            emb.weight);
        CHECK(rel_err(emb.weight_grad, fd) < 1e-6);
      }
}

TEST_CASE("Embedding scatter-add is bit-identical for 1 and 2 threads") {
  vqkit::Rng rng(15);
  const Index num = 37, dim = 9, n = 20000;
  vqkit::Embedding<float> e1(num, dim, rng, vqkit::cpu{1});
  vqkit::Embedding<float> e2t(num, dim, rng, vqkit::cpu{2});
  e2t.weight = e1.weight;
  IndexVector idx(n);
  for (Index i = 0; i < n; ++i) idx[i] = static_cast<std::int64_t>(rng.uniform() * num);
  const RowMatrix<float> g = randn(n, dim, rng).cast<float>();
  RowMatrix<float> y1, y2;
  auto c1 = e1.forward(idx, y1);
  auto c2 = e2t.forward(idx, y2);
  CHECK(y1 == y2);
  e1.backward(c1, g);
  e2t.backward(c2, g);
  CHECK(e1.weight_grad == e2t.weight_grad);
  // and equal to the plain serial loop in order of n
  RowMatrix<float> ref = RowMatrix<float>::Zero(num, dim);
  for (Index i = 0; i < n; ++i) ref.row(idx[i]) += g.row(i);
  CHECK(e1.weight_grad == ref);
}

TEST_CASE("Embedding rejects out-of-range indices and bad dy, changing nothing") {
  vqkit::Rng rng(16);
  vqkit::Embedding<double> emb(5, 3, rng);
  IndexVector idx(4);
  idx << 0, 4, 2, 1;
  RowMatrix<double> y;
  auto ctx = emb.forward(idx, y);
  emb.backward(ctx, randn(4, 3, rng));
  const auto before = snapshot(emb);

  RowMatrix<double> out = sentinel(2, 2);
  IndexVector bad = idx;
  bad[2] = 5;
  CHECK_THROWS_WITH(emb.forward(bad, out), Contains("index[2]=5") && Contains("num_embeddings=5"));
  bad[2] = -1;
  CHECK_THROWS_WITH(emb.forward(bad, out), Contains("index[2]=-1"));
  CHECK(out == sentinel(2, 2));
  CHECK_THROWS_WITH(emb.backward(ctx, randn(3, 3, rng)), Contains("dy is 3x3"));
  CHECK_THROWS_WITH(emb.backward(ctx, randn(4, 2, rng)), Contains("dy is 4x2"));
  auto tampered = ctx;
  tampered.indices[0] = 9;
  CHECK_THROWS_WITH(emb.backward(tampered, randn(4, 3, rng)), Contains("index[0]=9"));
  CHECK(same(snapshot(emb), before));

  // empty lookup is fine
  IndexVector none(0);
  auto c0 = emb.forward(none, out);
  CHECK(out.rows() == 0);
  CHECK(out.cols() == 3);
  emb.backward(c0, RowMatrix<double>(0, 3));
  CHECK(same(snapshot(emb), before));
}
