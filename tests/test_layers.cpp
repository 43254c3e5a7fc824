// Tests for vqkit/core/gemm.hpp and vqkit/layers/{linear,layer_norm,gelu}.hpp:
// gemm against a double reference for every operand layout (AVX-512 kernel
// and generic path) with thread-count-independent bits; forward values against
// hand-computed numbers, backward against central finite differences of
// L = sum(G * y) in double precision, gradient accumulation, zero_grad,
// float/double agreement, and rejected inputs leaving everything unchanged.
#include <catch2/catch.hpp>
#include <vqkit/core/error.hpp>
#include <vqkit/core/gemm.hpp>
#include <vqkit/core/random.hpp>
#include <vqkit/layers/gelu.hpp>
#include <vqkit/layers/layer_norm.hpp>
#include <vqkit/layers/linear.hpp>

#include "gradcheck.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

using vqkit::Index;
using vqkit::RowMatrix;
using Catch::Matchers::Contains;

namespace {

using vqkit::test::check_gradients;
using vqkit::test::max_abs;
using vqkit::test::randn;
using vqkit::test::rel_err;
using vqkit::test::close_float;
using vqkit::test::same;
using vqkit::test::snapshot;

// A small composed network, to show the contract chains:
// Linear(in, h) -> LayerNorm(h) -> Gelu -> Linear(h, out).
struct TinyNet {
  vqkit::Linear<double> fc1;
  vqkit::LayerNorm<double> ln;
  vqkit::Gelu<double> act;
  vqkit::Linear<double> fc2;

  struct Context {
    vqkit::Linear<double>::Context c1;
    vqkit::LayerNorm<double>::Context c2;
    vqkit::Gelu<double>::Context c3;
    vqkit::Linear<double>::Context c4;
  };

  TinyNet(Index in, Index hidden, Index out, vqkit::Rng& rng)
      : fc1(in, hidden, rng), ln(hidden), fc2(hidden, out, rng) {}

  Context forward(vqkit::ConstMatrixRef<double> x, RowMatrix<double>& y) const {
    Context c;
    RowMatrix<double> h;
    c.c1 = fc1.forward(x, h);
    c.c2 = ln.forward(h, h);
    c.c3 = act.forward(h, h);
    c.c4 = fc2.forward(h, y);
    return c;
  }
  void backward(const Context& c, vqkit::ConstMatrixRef<double> dy, RowMatrix<double>* dx) {
    RowMatrix<double> d;
    fc2.backward(c.c4, dy, &d);
    act.backward(c.c3, d, &d);
    ln.backward(c.c2, d, &d);
    fc1.backward(c.c1, d, dx);
  }
  vqkit::ParameterList<double> parameters() {
    vqkit::ParameterList<double> all;
    vqkit::append_parameters(all, fc1.parameters(), "fc1.");
    vqkit::append_parameters(all, ln.parameters(), "ln.");
    vqkit::append_parameters(all, act.parameters(), "act.");
    vqkit::append_parameters(all, fc2.parameters(), "fc2.");
    return all;
  }
  void zero_grad() {
    fc1.zero_grad();
    ln.zero_grad();
    act.zero_grad();
    fc2.zero_grad();
  }
};

}  // namespace

// ------------------------------------------------------------------ gemm ----

namespace {

// gemm on a random case against a double product; returns c from 1 thread
// and requires 3 threads to give the same bits.
RowMatrix<float> gemm_case(Index M, Index N, Index K, vqkit::Op oa, vqkit::Op ob, bool acc,
                           bool with_bias, vqkit::Rng& rng) {
  using vqkit::Op;
  const RowMatrix<float> a = (oa == Op::none ? randn(M, K, rng) : randn(K, M, rng)).cast<float>();
  const RowMatrix<float> b = (ob == Op::none ? randn(K, N, rng) : randn(N, K, rng)).cast<float>();
  const RowMatrix<float> c0 = randn(M, N, rng).cast<float>();
  const RowMatrix<float> bias = randn(1, N, rng).cast<float>();
  Eigen::MatrixXd A = a.cast<double>(), B = b.cast<double>();
  if (oa == Op::transpose) A.transposeInPlace();
  if (ob == Op::transpose) B.transposeInPlace();
  Eigen::MatrixXd ref = A * B;
  // Each term's rounding is bounded by |a||b|: the error bound scales with it.
  Eigen::MatrixXd mag = A.cwiseAbs() * B.cwiseAbs();
  if (acc) ref += c0.cast<double>(), mag += c0.cast<double>().cwiseAbs();
  else if (with_bias)
    ref.rowwise() += bias.cast<double>().row(0), mag.rowwise() += bias.cast<double>().cwiseAbs().row(0);
  RowMatrix<float> c1 = c0, c3 = c0;
  const float* bp = with_bias ? bias.data() : nullptr;
  vqkit::gemm<float>(vqkit::cpu{1}, oa, a, ob, b, c1, acc, bp);
  vqkit::gemm<float>(vqkit::cpu{3}, oa, a, ob, b, c3, acc, bp);
  INFO("M=" << M << " N=" << N << " K=" << K << " opa=" << int(oa) << " opb=" << int(ob)
            << " acc=" << acc << " bias=" << with_bias);
  const double eps = std::numeric_limits<float>::epsilon();
  const Eigen::ArrayXXd err = (c1.cast<double>() - ref).array().abs();
  CHECK((err <= double(K + 2) * eps * mag.array()).all());
  CHECK(c1 == c3);
  return c1;
}

}  // namespace

TEST_CASE("gemm matches a double product for every layout, with bits independent of threads") {
  using vqkit::Op;
  vqkit::Rng rng(21);
  // Shapes around the kernel's blocking (12-row tiles, 32-column panels,
  // 128-deep k blocks, 480 x 128 tasks) and far from it.
  const Index shapes[][3] = {{1, 1, 1},    {1, 33, 7},    {13, 1, 129},  {12, 32, 128},
                             {25, 65, 257}, {481, 129, 300}, {500, 31, 5}, {7, 300, 1}};
  for (const bool generic : {false, true}) {
    vqkit::detail::avx512_disabled = generic;  // the generic path, as without AVX-512
    for (const auto& s : shapes)
      for (const Op oa : {Op::none, Op::transpose})
        for (const Op ob : {Op::none, Op::transpose})
          for (int mode = 0; mode < 3; ++mode)
            gemm_case(s[0], s[1], s[2], oa, ob, mode == 1, mode == 2, rng);
  }
  vqkit::detail::avx512_disabled = false;
}

TEST_CASE("gemm reads strided views and rejects mismatched shapes before writing") {
  using vqkit::Op;
  vqkit::Rng rng(22);
  const RowMatrix<float> big = randn(40, 50, rng).cast<float>();
  const RowMatrix<float> b = randn(20, 30, rng).cast<float>();
  RowMatrix<float> c(17, 30), ref(17, 30);
  // a = a 17 x 20 block of a wider matrix (row stride 50, offset start).
  vqkit::gemm<float>(vqkit::cpu{2}, Op::none, big.block(3, 5, 17, 20), Op::none, b, c, false);
  ref = (big.block(3, 5, 17, 20).cast<double>() * b.cast<double>()).cast<float>();
  CHECK((c - ref).cwiseAbs().maxCoeff() < 1e-4f);
  // c as a block: the untouched columns stay as they were.
  RowMatrix<float> wide = RowMatrix<float>::Constant(17, 40, 7.0f);
  vqkit::gemm<float>(vqkit::cpu{1}, Op::none, big.block(3, 5, 17, 20), Op::none, b,
                     wide.middleCols(5, 30), false);
  CHECK(wide.middleCols(5, 30) == c);
  CHECK((wide.leftCols(5).array() == 7.0f).all());
  CHECK((wide.rightCols(5).array() == 7.0f).all());

  RowMatrix<float> keep = RowMatrix<float>::Constant(17, 30, 3.0f);
  CHECK_THROWS_WITH(vqkit::gemm<float>(vqkit::cpu{1}, Op::none, big.block(0, 0, 17, 21), Op::none,
                                       b, keep, false),
                    Contains("gemm") && Contains("17x21") && Contains("20x30"));
  CHECK_THROWS_WITH(vqkit::gemm<float>(vqkit::cpu{1}, Op::transpose, big.block(0, 0, 20, 17),
                                       Op::none, b, keep.leftCols(29), true),
                    Contains("c is 17x29") && Contains("expected 17x30"));
  CHECK((keep.array() == 3.0f).all());

  // K = 0: the empty sum, so c = bias (or 0), or c unchanged when accumulating.
  const RowMatrix<float> a0(4, 0), b0(0, 3), bias = randn(1, 3, rng).cast<float>();
  RowMatrix<float> c0 = RowMatrix<float>::Constant(4, 3, 5.0f);
  vqkit::gemm<float>(vqkit::cpu{1}, Op::none, a0, Op::none, b0, c0, true);
  CHECK((c0.array() == 5.0f).all());
  vqkit::gemm<float>(vqkit::cpu{1}, Op::none, a0, Op::none, b0, c0, false, bias.data());
  for (Index i = 0; i < 4; ++i) CHECK(c0.row(i) == bias.row(0));
  vqkit::gemm<float>(vqkit::cpu{1}, Op::none, a0, Op::none, b0, c0, false);
  CHECK(c0.isZero(0));
}

// ---------------------------------------------------------------- Linear ----

TEST_CASE("Linear initialises like PyTorch and lists its parameters") {
  vqkit::Rng rng(11);
  vqkit::Linear<double> fc(64, 32, rng);
  REQUIRE(fc.in_features() == 64);
  REQUIRE(fc.out_features() == 32);
  REQUIRE(fc.has_bias());
  REQUIRE(fc.weight.rows() == 32);
  REQUIRE(fc.weight.cols() == 64);
  REQUIRE(fc.bias.rows() == 1);
  REQUIRE(fc.bias.cols() == 32);
  CHECK(fc.weight_grad.isZero(0));
  CHECK(fc.bias_grad.isZero(0));

  const double k = 1.0 / 8.0;  // 1/sqrt(64)
  CHECK(fc.weight.cwiseAbs().maxCoeff() <= k);
  CHECK(fc.bias.cwiseAbs().maxCoeff() <= k);
  // uniform(-k, k): mean 0, variance k^2/3 (2048 draws)
  CHECK(fc.weight.mean() == Approx(0.0).margin(0.01 * k * 3));
  CHECK((fc.weight.array().square().mean()) == Approx(k * k / 3).epsilon(0.1));

  // Draw order: weight row-major, then bias.
  vqkit::Rng ref(11);
  CHECK(fc.weight(0, 0) == (2.0 * ref.uniform() - 1.0) * k);
  CHECK(fc.weight(0, 1) == (2.0 * ref.uniform() - 1.0) * k);
  for (int i = 2; i < 64 * 32; ++i) ref.uniform();
  CHECK(fc.bias(0, 0) == (2.0 * ref.uniform() - 1.0) * k);

  // Same seed, same layer.
  vqkit::Rng rng2(11);
  vqkit::Linear<double> fc2(64, 32, rng2);
  CHECK(fc2.weight == fc.weight);
  CHECK(fc2.bias == fc.bias);

  auto params = fc.parameters();
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "weight");
  CHECK(params[0].value == &fc.weight);
  CHECK(params[0].grad == &fc.weight_grad);
  CHECK(params[0].shape == std::vector<Index>{32, 64});
  CHECK(params[0].weight_decay);
  CHECK(params[1].name == "bias");
  CHECK(params[1].value == &fc.bias);
  CHECK(params[1].grad == &fc.bias_grad);
  CHECK(params[1].shape == std::vector<Index>{32});
  CHECK_FALSE(params[1].weight_decay);
  CHECK(fc.parameters("proj_in.")[1].name == "proj_in.bias");

  vqkit::Linear<double> nobias(5, 3, rng, false);
  CHECK_FALSE(nobias.has_bias());
  CHECK(nobias.bias.size() == 0);
  REQUIRE(nobias.parameters().size() == 1);
  CHECK(nobias.parameters()[0].name == "weight");
}

TEST_CASE("Linear forward matches hand-computed values") {
  vqkit::Rng rng(1);
  vqkit::Linear<double> fc(2, 3, rng);
  fc.weight << 1, 2,  //
      3, 4,           //
      5, 6;
  fc.bias << 0.5, -1, 2;
  RowMatrix<double> x(2, 2);
  x << 1, -1,  //
      0.5, 2;
  RowMatrix<double> y;
  fc.forward(x, y);
  RowMatrix<double> expected(2, 3);
  // row 0: [1-2+0.5, 3-4-1, 5-6+2]; row 1: [0.5+4+0.5, 1.5+8-1, 2.5+12+2]
  expected << -0.5, -2, 1,  //
      5, 8.5, 16.5;
  CHECK(y == expected);

  vqkit::Linear<double> nb(2, 3, rng, false);
  nb.weight = fc.weight;
  nb.forward(x, y);
  expected.rowwise() -= fc.bias.row(0);
  CHECK(y == expected);
}

TEST_CASE("Linear backward matches finite differences") {
  vqkit::Rng rng(2);
  for (Index n : {1, 3, 7})
    for (Index in : {1, 5, 13})
      for (Index out : {1, 5, 13})
        for (bool bias : {true, false}) {
          INFO("N=" << n << " in=" << in << " out=" << out << " bias=" << bias);
          vqkit::Linear<double> fc(in, out, rng, bias);
          check_gradients(fc, randn(n, in, rng), rng);
        }
}

TEST_CASE("Linear accumulates gradients and zero_grad clears them") {
  vqkit::Rng rng(3);
  vqkit::Linear<double> fc(5, 7, rng);
  const RowMatrix<double> x = randn(3, 5, rng), g = randn(3, 7, rng);
  RowMatrix<double> y;
  const auto ctx = fc.forward(x, y);
  RowMatrix<double> dx1;
  fc.backward(ctx, g, &dx1);
  const RowMatrix<double> gw = fc.weight_grad, gb = fc.bias_grad;
  CHECK_FALSE(gw.isZero(0));
  CHECK_FALSE(gb.isZero(0));
  // Independent reference: dW = G^T X, db = column sums of G, dx = G W.
  CHECK(rel_err(gw, g.transpose() * x) < 1e-14);
  CHECK(rel_err(gb, g.colwise().sum()) < 1e-14);
  CHECK(rel_err(dx1, g * fc.weight) < 1e-14);

  RowMatrix<double> dx2 = RowMatrix<double>::Constant(9, 2, 42.0);  // wrong size, garbage
  fc.backward(ctx, g, &dx2);
  CHECK(rel_err(fc.weight_grad, 2 * gw) < 1e-14);
  CHECK(rel_err(fc.bias_grad, 2 * gb) < 1e-14);
  CHECK(dx2 == dx1);  // overwritten, not accumulated

  fc.backward(ctx, g, nullptr);  // still accumulates without dx
  CHECK(rel_err(fc.weight_grad, 3 * gw) < 1e-14);

  fc.zero_grad();
  CHECK(fc.weight_grad.rows() == 7);
  CHECK(fc.weight_grad.cols() == 5);
  CHECK(fc.weight_grad.isZero(0));
  CHECK(fc.bias_grad.cols() == 7);
  CHECK(fc.bias_grad.isZero(0));
}

TEST_CASE("Linear float matches double") {
  vqkit::Rng rng(4);
  vqkit::Linear<double> d(13, 5, rng);
  vqkit::Linear<float> f(13, 5, rng);
  f.weight = d.weight.cast<float>();
  f.bias = d.bias.cast<float>();
  const RowMatrix<double> x = randn(7, 13, rng), g = randn(7, 5, rng);
  RowMatrix<double> yd, dxd;
  RowMatrix<float> yf, dxf;
  const auto cd = d.forward(x, yd);
  const auto cf = f.forward(x.cast<float>(), yf);
  d.backward(cd, g, &dxd);
  f.backward(cf, g.cast<float>(), &dxf);
  CHECK(close_float(yf, yd));
  CHECK(close_float(dxf, dxd));
  CHECK(close_float(f.weight_grad, d.weight_grad));
  CHECK(close_float(f.bias_grad, d.bias_grad));

  // The same seed gives the same weights up to float rounding.
  vqkit::Rng r1(9), r2(9);
  vqkit::Linear<double> d2(13, 5, r1);
  vqkit::Linear<float> f2(13, 5, r2);
  CHECK(close_float(f2.weight, d2.weight));
  CHECK(close_float(f2.bias, d2.bias));
}

TEST_CASE("Linear gives the same bits on 1 and 2 threads") {
  for (const bool generic : {false, true}) {
    vqkit::detail::avx512_disabled = generic;
    for (const Index n : {Index(5), Index(700)}) {  // one block, and several of every kind
      vqkit::Rng r1(31), r2(31);
      vqkit::Linear<float> one(96, 200, r1, true, vqkit::cpu{1});
      vqkit::Linear<float> two(96, 200, r2, true, vqkit::cpu{2});
      vqkit::Rng rng(32);
      const RowMatrix<float> x = randn(n, 96, rng).cast<float>();
      const RowMatrix<float> g = randn(n, 200, rng).cast<float>();
      RowMatrix<float> y1, y2, dx1, dx2;
      const auto c1 = one.forward(x, y1);
      const auto c2 = two.forward(x, y2);
      one.backward(c1, g, &dx1);
      two.backward(c2, g, &dx2);
      INFO("n=" << n << " generic=" << generic);
      CHECK(y1 == y2);
      CHECK(dx1 == dx2);
      CHECK(one.weight_grad == two.weight_grad);
      CHECK(one.bias_grad == two.bias_grad);
      // and against double arithmetic
      const Eigen::MatrixXd yd =
          (x.cast<double>() * one.weight.cast<double>().transpose()).rowwise() +
          one.bias.cast<double>().row(0);
      CHECK((y1.cast<double>() - yd).cwiseAbs().maxCoeff() < 1e-4);
    }
  }
  vqkit::detail::avx512_disabled = false;
}

TEST_CASE("Linear rejects bad shapes and changes nothing") {
  vqkit::Rng rng(5);
  const auto rng_state = rng.state();
  CHECK_THROWS_AS(vqkit::Linear<double>(0, 4, rng), vqkit::error);
  CHECK_THROWS_AS(vqkit::Linear<double>(4, 0, rng), vqkit::error);
  CHECK_THROWS_AS(vqkit::Linear<double>(-3, 4, rng), vqkit::error);
  CHECK_THROWS_WITH(vqkit::Linear<double>(4, -2, rng),
                    Contains("Linear") && Contains("out_features=-2"));
  CHECK(rng.state() == rng_state);  // nothing drawn

  vqkit::Linear<double> fc(64, 8, rng);
  const RowMatrix<double> x = randn(4, 64, rng);
  RowMatrix<double> y;
  const auto ctx = fc.forward(x, y);
  RowMatrix<double> dx;
  fc.backward(ctx, randn(4, 8, rng), &dx);  // non-zero gradients to protect
  const auto before = snapshot(fc);
  const RowMatrix<double> y_before = y, dx_before = dx;

  CHECK_THROWS_WITH(fc.forward(randn(4, 63, rng), y),
                    "Linear::forward: x has 63 columns, expected in_features=64");
  CHECK_THROWS_AS(fc.forward(RowMatrix<double>(0, 0), y), vqkit::error);
  CHECK(y == y_before);

  CHECK_THROWS_WITH(fc.backward(ctx, randn(4, 7, rng), &dx),
                    Contains("Linear::backward") && Contains("dy is 4x7") &&
                        Contains("expected 4x8"));
  CHECK_THROWS_WITH(fc.backward(ctx, randn(5, 8, rng), &dx), Contains("dy is 5x8"));
  vqkit::Linear<double>::Context bad;
  bad.input = randn(4, 63, rng);
  CHECK_THROWS_WITH(fc.backward(bad, randn(4, 8, rng), &dx),
                    Contains("Linear::backward") && Contains("63 columns"));
  CHECK(dx == dx_before);
  CHECK(same(snapshot(fc), before));

  // A public tensor replaced with the wrong shape is caught, not read past.
  fc.weight.resize(8, 63);
  CHECK_THROWS_WITH(fc.forward(x, y), Contains("weight is 8x63"));
  CHECK(y == y_before);
}

// ------------------------------------------------------------- LayerNorm ----

TEST_CASE("LayerNorm initialises to identity affine and lists its parameters") {
  vqkit::LayerNorm<double> ln(13);
  CHECK(ln.dim() == 13);
  CHECK(ln.eps() == 1e-5);
  CHECK(ln.weight == RowMatrix<double>::Ones(1, 13));
  CHECK(ln.bias == RowMatrix<double>::Zero(1, 13));
  CHECK(ln.weight_grad == RowMatrix<double>::Zero(1, 13));
  CHECK(ln.bias_grad == RowMatrix<double>::Zero(1, 13));
  auto params = ln.parameters("norm.");
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "norm.weight");
  CHECK(params[0].value == &ln.weight);
  CHECK(params[0].grad == &ln.weight_grad);
  CHECK(params[0].shape == std::vector<Index>{13});
  CHECK_FALSE(params[0].weight_decay);
  CHECK(params[1].name == "norm.bias");
  CHECK(params[1].value == &ln.bias);
  CHECK(params[1].grad == &ln.bias_grad);
  CHECK(params[1].shape == std::vector<Index>{13});
  CHECK_FALSE(params[1].weight_decay);
}

TEST_CASE("LayerNorm forward matches hand-computed values") {
  vqkit::LayerNorm<double> ln(4);
  RowMatrix<double> x(3, 4);
  x << 1, 2, 3, 4,  //
      2, 2, 2, 2,   //
      -3, 0, 0, 3;
  RowMatrix<double> y;
  ln.forward(x, y);
  // Row 0: mean 2.5, biased variance (2.25+0.25+0.25+2.25)/4 = 1.25.
  const double s0 = std::sqrt(1.25 + 1e-5);
  // Row 1: constant, variance 0 -> all zeros.
  // Row 2: mean 0, variance (9+0+0+9)/4 = 4.5.
  const double s2 = std::sqrt(4.5 + 1e-5);
  RowMatrix<double> expected(3, 4);
  expected << -1.5 / s0, -0.5 / s0, 0.5 / s0, 1.5 / s0,  //
      0, 0, 0, 0,                                        //
      -3 / s2, 0, 0, 3 / s2;
  CHECK(rel_err(y, expected) < 1e-15);
  // Same as torch.nn.functional.layer_norm(tensor([1., 2., 3., 4.]), (4,)).
  CHECK(y(0, 0) == Approx(-1.3416354).epsilon(1e-7));
  CHECK(y(0, 1) == Approx(-0.4472118).epsilon(1e-7));

  // Affine part: y = xhat * gamma + beta, elementwise.
  ln.weight << 2, -1, 0.5, 0;
  ln.bias << 0.1, 0.2, 0.3, 0.4;
  ln.forward(x, y);
  RowMatrix<double> expected_affine(3, 4);
  expected_affine << -3 / s0 + 0.1, 0.5 / s0 + 0.2, 0.25 / s0 + 0.3, 0.4,  //
      0.1, 0.2, 0.3, 0.4,                                                  //
      -6 / s2 + 0.1, 0.2, 0.3, 0.4;
  CHECK(rel_err(y, expected_affine) < 1e-15);

  // Larger eps enters under the square root.
  vqkit::LayerNorm<double> ln2(4, 0.75);
  ln2.forward(x.topRows(1), y);
  CHECK(y(0, 3) == Approx(1.5 / std::sqrt(2.0)).epsilon(1e-15));
}

TEST_CASE("LayerNorm backward matches finite differences") {
  vqkit::Rng rng(6);
  for (Index n : {1, 3, 7})
    for (Index dim : {1, 2, 5, 13})
      for (double eps : {1e-5, 0.1}) {
        INFO("N=" << n << " dim=" << dim << " eps=" << eps);
        vqkit::LayerNorm<double> ln(dim, eps);
        // Non-trivial affine parameters so every term of backward is exercised.
        ln.weight = randn(1, dim, rng);
        ln.bias = randn(1, dim, rng);
        // Offset and scale the rows, as real activations are.
        RowMatrix<double> x = randn(n, dim, rng, 3.0).array() + 2.0;
        check_gradients(ln, x, rng);
      }
}

TEST_CASE("LayerNorm accumulates gradients and zero_grad clears them") {
  vqkit::Rng rng(7);
  vqkit::LayerNorm<double> ln(5);
  ln.weight = randn(1, 5, rng);
  const RowMatrix<double> x = randn(3, 5, rng), g = randn(3, 5, rng);
  RowMatrix<double> y;
  const auto ctx = ln.forward(x, y);
  RowMatrix<double> dx1;
  ln.backward(ctx, g, &dx1);
  const RowMatrix<double> gw = ln.weight_grad, gb = ln.bias_grad;
  CHECK_FALSE(gw.isZero(0));
  CHECK(rel_err(gb, g.colwise().sum()) < 1e-14);
  // Invariances, row by row: shifting x leaves y unchanged, so dx sums to 0;
  // scaling x - mean changes xhat only through eps, so
  //   dx . xhat = rstd * sum(dxhat * xhat) * eps / (var + eps).
  for (Index r = 0; r < 3; ++r) {
    const RowMatrix<double> xc = x.row(r).array() - x.row(r).mean();
    const double var = xc.squaredNorm() / 5, rstd = 1 / std::sqrt(var + 1e-5);
    const RowMatrix<double> xhat = xc * rstd;
    const double s = (g.row(r).cwiseProduct(ln.weight.row(0))).dot(xhat.row(0));
    CHECK(dx1.row(r).sum() == Approx(0.0).margin(1e-12));
    CHECK(dx1.row(r).dot(xhat.row(0)) == Approx(rstd * s * 1e-5 / (var + 1e-5)).epsilon(1e-6));
  }

  RowMatrix<double> dx2 = RowMatrix<double>::Constant(2, 2, 42.0);
  ln.backward(ctx, g, &dx2);
  CHECK(rel_err(ln.weight_grad, 2 * gw) < 1e-14);
  CHECK(rel_err(ln.bias_grad, 2 * gb) < 1e-14);
  CHECK(dx2 == dx1);

  ln.backward(ctx, g, nullptr);
  CHECK(rel_err(ln.weight_grad, 3 * gw) < 1e-14);
  CHECK(rel_err(ln.bias_grad, 3 * gb) < 1e-14);

  ln.zero_grad();
  CHECK(ln.weight_grad == RowMatrix<double>::Zero(1, 5));
  CHECK(ln.bias_grad == RowMatrix<double>::Zero(1, 5));
}

TEST_CASE("LayerNorm float matches double") {
  vqkit::Rng rng(8);
  vqkit::LayerNorm<double> d(13);
  vqkit::LayerNorm<float> f(13);
  d.weight = randn(1, 13, rng);
  d.bias = randn(1, 13, rng);
  f.weight = d.weight.cast<float>();
  f.bias = d.bias.cast<float>();
  const RowMatrix<double> x = randn(7, 13, rng), g = randn(7, 13, rng);
  RowMatrix<double> yd, dxd;
  RowMatrix<float> yf, dxf;
  const auto cd = d.forward(x, yd);
  const auto cf = f.forward(x.cast<float>(), yf);
  d.backward(cd, g, &dxd);
  f.backward(cf, g.cast<float>(), &dxf);
  CHECK(close_float(yf, yd));
  CHECK(close_float(dxf, dxd));
  CHECK(close_float(f.weight_grad, d.weight_grad));
  CHECK(close_float(f.bias_grad, d.bias_grad));
}

TEST_CASE("LayerNorm gives the same bits on 1 and 2 threads, dx aliasing dy included") {
  // 700 x 96 is past the size where rows and columns are split over threads.
  const Index n = 700, c = 96;
  vqkit::Rng rng(9);
  vqkit::LayerNorm<float> one(c, 1e-5f, vqkit::cpu{1}), two(c, 1e-5f, vqkit::cpu{2});
  vqkit::LayerNorm<double> ref(c);
  ref.weight = randn(1, c, rng);
  ref.bias = randn(1, c, rng);
  one.weight = two.weight = ref.weight.cast<float>();
  one.bias = two.bias = ref.bias.cast<float>();
  const RowMatrix<double> x = randn(n, c, rng), g = randn(n, c, rng);
  RowMatrix<float> y1, y2, dx1;
  const auto c1 = one.forward(x.cast<float>(), y1);
  const auto c2 = two.forward(x.cast<float>(), y2);
  one.backward(c1, g.cast<float>(), &dx1);
  RowMatrix<float> dx2 = g.cast<float>();
  two.backward(c2, dx2, &dx2);  // dx overwrites dy
  CHECK(y1 == y2);
  CHECK(dx1 == dx2);
  CHECK(one.weight_grad == two.weight_grad);
  CHECK(one.bias_grad == two.bias_grad);
  // and against double arithmetic
  RowMatrix<double> yd, dxd;
  const auto cd = ref.forward(x, yd);
  ref.backward(cd, g, &dxd);
  CHECK(close_float(y1, yd));
  CHECK(close_float(dx1, dxd));
  // (sums of 700 float terms)
  CHECK(close_float(one.weight_grad, ref.weight_grad, 1e-4));
  CHECK(close_float(one.bias_grad, ref.bias_grad, 1e-4));
}

TEST_CASE("LayerNorm rejects bad arguments and changes nothing") {
  CHECK_THROWS_WITH(vqkit::LayerNorm<double>(0), Contains("LayerNorm") && Contains("dim=0"));
  CHECK_THROWS_AS(vqkit::LayerNorm<double>(-1), vqkit::error);
  CHECK_THROWS_WITH(vqkit::LayerNorm<double>(4, 0.0), Contains("eps=0"));
  CHECK_THROWS_AS(vqkit::LayerNorm<double>(4, -1e-5), vqkit::error);
  CHECK_THROWS_AS(vqkit::LayerNorm<float>(4, -1.0f), vqkit::error);
  CHECK_THROWS_AS(vqkit::LayerNorm<double>(4, std::numeric_limits<double>::quiet_NaN()),
                  vqkit::error);

  vqkit::Rng rng(9);
  vqkit::LayerNorm<double> ln(6);
  ln.weight = randn(1, 6, rng);
  const RowMatrix<double> x = randn(3, 6, rng);
  RowMatrix<double> y;
  const auto ctx = ln.forward(x, y);
  RowMatrix<double> dx;
  ln.backward(ctx, randn(3, 6, rng), &dx);
  const auto before = snapshot(ln);
  const RowMatrix<double> y_before = y, dx_before = dx;

  CHECK_THROWS_WITH(ln.forward(randn(3, 5, rng), y),
                    "LayerNorm::forward: x has 5 columns, expected dim=6");
  CHECK(y == y_before);
  CHECK_THROWS_WITH(ln.backward(ctx, randn(3, 5, rng), &dx),
                    Contains("LayerNorm::backward") && Contains("dy is 3x5"));
  CHECK_THROWS_WITH(ln.backward(ctx, randn(2, 6, rng), &dx), Contains("dy is 2x6"));
  auto bad = ctx;
  bad.rstd.resize(2);
  CHECK_THROWS_WITH(ln.backward(bad, randn(3, 6, rng), &dx), Contains("LayerNorm::backward"));
  auto bad2 = ctx;
  bad2.input = randn(3, 7, rng);
  CHECK_THROWS_WITH(ln.backward(bad2, randn(3, 6, rng), &dx), Contains("7 columns"));
  CHECK(dx == dx_before);
  CHECK(same(snapshot(ln), before));

  ln.bias.resize(1, 5);
  CHECK_THROWS_WITH(ln.forward(x, y), Contains("bias is 1x5"));
  CHECK(y == y_before);
}

// ------------------------------------------------------------------ Gelu ----

TEST_CASE("Gelu forward is the exact erf GELU") {
  vqkit::Gelu<double> gelu;
  RowMatrix<double> x(2, 4);
  x << 1, -1, 0, 2,  //
      -3, 0.5, 10, -10;
  RowMatrix<double> y;
  gelu.forward(x, y);
  CHECK(y(0, 0) == Approx(0.8413447460685429).epsilon(1e-15));
  CHECK(y(0, 1) == Approx(-0.15865525393145707).epsilon(1e-15));
  CHECK(y(0, 2) == 0.0);
  CHECK(y(0, 3) == Approx(2 * 0.9772498680518208).epsilon(1e-15));      // 2 Phi(2)
  CHECK(y(1, 0) == Approx(-3 * 0.0013498980316300946).epsilon(1e-13));  // -3 Phi(-3)
  CHECK(y(1, 1) == Approx(0.5 * 0.6914624612740131).epsilon(1e-15));    // 0.5 Phi(0.5)
  CHECK(y(1, 2) == Approx(10.0).epsilon(1e-15));
  // -10 Phi(-10) = -10 * 7.619853024160527e-24: still accurate far in the tail.
  CHECK(y(1, 3) == Approx(-7.619853024160527e-23).epsilon(1e-12));
  // The tanh approximation would give 0.8411919906082768 at 1.
  CHECK(std::abs(y(0, 0) - 0.8411919906082768) > 1e-4);

  // Derivative at known points: Phi(x) + x phi(x).
  CHECK(vqkit::Gelu<double>::derivative(0.0) == Approx(0.5).epsilon(1e-15));
  CHECK(vqkit::Gelu<double>::derivative(1.0) ==
        Approx(0.8413447460685429 + 0.24197072451914337).epsilon(1e-15));
}

TEST_CASE("Gelu backward matches finite differences") {
  vqkit::Rng rng(10);
  for (Index n : {1, 3, 7})
    for (Index c : {1, 5, 13}) {
      INFO("N=" << n << " C=" << c);
      vqkit::Gelu<double> gelu;
      check_gradients(gelu, randn(n, c, rng, 2.0), rng);
    }
}

TEST_CASE("Gelu has no parameters and overwrites dx") {
  vqkit::Rng rng(11);
  vqkit::Gelu<double> gelu;
  CHECK(gelu.parameters().empty());
  CHECK(gelu.parameters("act.").empty());
  gelu.zero_grad();  // a no-op, callable like any layer's
  const RowMatrix<double> x = randn(3, 5, rng), g = randn(3, 5, rng);
  RowMatrix<double> y;
  const auto ctx = gelu.forward(x, y);
  RowMatrix<double> dx1, dx2 = RowMatrix<double>::Constant(1, 1, 42.0);
  gelu.backward(ctx, g, &dx1);
  gelu.backward(ctx, g, &dx2);
  CHECK(dx2 == dx1);
  gelu.backward(ctx, g, nullptr);
}

TEST_CASE("Gelu float matches double") {
  vqkit::Rng rng(12);
  vqkit::Gelu<double> d;
  vqkit::Gelu<float> f;
  const RowMatrix<double> x = randn(7, 13, rng, 3.0), g = randn(7, 13, rng);
  RowMatrix<double> yd, dxd;
  RowMatrix<float> yf, dxf;
  const auto cd = d.forward(x, yd);
  const auto cf = f.forward(x.cast<float>(), yf);
  d.backward(cd, g, &dxd);
  f.backward(cf, g.cast<float>(), &dxf);
  CHECK(close_float(yf, yd));
  CHECK(close_float(dxf, dxd));
}

TEST_CASE("Gelu float keeps ~1 ulp relative precision, tail included, on any thread count") {
  // Every float from -14 to 14 in steps of 2^-10 (28673 values, padded to
  // 2^17 + 5 by repetition so the threaded path and a partial vector run),
  // against std::erfc in double; both kernels: AVX-512 (where the CPU has it,
  // whatever this program's flags) and the generic Eigen one.
  const Index n = (Index(1) << 17) + 5;
  RowMatrix<float> x(1, n), g(1, n);
  for (Index i = 0; i < n; ++i) {
    x(0, i) = -14.0f + float(i % 28673) / 1024.0f;
    g(0, i) = 1.0f + float(i % 7);
  }
  for (const bool generic : {false, true}) {
    vqkit::detail::avx512_disabled = generic;
    INFO((generic ? "generic kernel" : vqkit::detail::cpu_has_avx512f() ? "AVX-512 kernel" : "generic kernel (no AVX-512 here)"));
    RowMatrix<float> y1, y2, d1, d2;
    vqkit::Gelu<float> one(vqkit::cpu{1}), two(vqkit::cpu{2});
    const auto c1 = one.forward(x, y1);
    const auto c2 = two.forward(x, y2);
    one.backward(c1, g, &d1);
    two.backward(c2, g, &d2);
    CHECK(y1 == y2);
    CHECK(d1 == d2);
    double worst_y = 0, worst_d = 0;
    for (Index i = 0; i < n; ++i) {
      const double v = x(0, i);
      const double yd = vqkit::Gelu<double>::value(v);
      const double dd = double(g(0, i)) * vqkit::Gelu<double>::derivative(v);
      // gelu' = Phi(x) + x phi(x) crosses 0 near x = -0.75: its error is
      // relative to the size of the two terms
      const double terms = double(g(0, i)) * (0.5 * std::erfc(-v / std::sqrt(2.0)) +
                                              std::abs(v) * std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI));
      // relative error in units of float's epsilon, where the value is a normal float
      if (std::abs(yd) > 1e-37) worst_y = std::max(worst_y, std::abs(y1(0, i) - yd) / std::abs(yd));
      if (terms > 1e-37) worst_d = std::max(worst_d, std::abs(d1(0, i) - dd) / terms);
    }
    const double eps = std::numeric_limits<float>::epsilon();
    INFO("worst relative error: forward " << worst_y / eps << " eps, backward " << worst_d / eps << " eps");
    CHECK(worst_y <= 2 * eps);
    CHECK(worst_d <= 2 * eps);
  }
  vqkit::detail::avx512_disabled = false;
}

TEST_CASE("Gelu float: both kernels agree on special values") {
  // inf, -inf (0 * inf: NaN, as the scalar formula gives), NaN, +-0,
  // subnormals, and values past exp's range, in a 21-value row (one full
  // 16-lane group and a masked remainder).
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  RowMatrix<float> x(1, 21);
  x << inf, -inf, nan, 0.0f, -0.0f, 1e-40f, -1e-40f, 1e-30f, -1e-30f, 40.0f, -40.0f, 1e30f, -1e30f,
      3.0e38f, -3.0e38f, 0.5f, -0.5f, 7.0f, -7.0f, 1e-3f, -1e-3f;
  const RowMatrix<float> g = RowMatrix<float>::Constant(1, 21, 1.5f);
  RowMatrix<float> y[2], d[2];
  for (const int generic : {0, 1}) {
    vqkit::detail::avx512_disabled = generic == 1;
    vqkit::Gelu<float> gelu;
    const auto ctx = gelu.forward(x, y[generic]);
    gelu.backward(ctx, g, &d[generic]);
  }
  vqkit::detail::avx512_disabled = false;
  for (Index i = 0; i < x.cols(); ++i) {
    INFO("x = " << x(0, i) << ": y " << y[0](0, i) << " / " << y[1](0, i) << ", dx " << d[0](0, i)
                << " / " << d[1](0, i));
    for (const auto* m : {&y, &d}) {
      const float a = (*m)[0](0, i), b = (*m)[1](0, i);
      if (std::isinf(x(0, i)) && m == &d) {
        // gelu'(+-inf): the formula's inf * exp(-inf) is NaN in double and in
        // the AVX-512 kernel; Eigen's exp stops at exp(-708) > 0, so its
        // kernel says +-inf. Both report the overflow as non-finite.
        CHECK(!std::isfinite(a));
        CHECK(!std::isfinite(b));
      } else {
        CHECK(((std::isnan(a) && std::isnan(b)) || a == b ||
               std::abs(a - b) <= 2 * std::numeric_limits<float>::epsilon() * std::abs(b)));
      }
    }
    // and both against the double formula where it is a number
    const double yd = vqkit::Gelu<double>::value(x(0, i));
    if (!std::isnan(yd) && std::abs(yd) < 3e38) CHECK(y[0](0, i) == Approx(yd).epsilon(1e-6).margin(1e-38));
  }
  CHECK(y[0](0, 0) == inf);
  CHECK(y[0](0, 3) == 0.0f);
  CHECK(std::isnan(y[0](0, 2)));
}

TEST_CASE("Gelu rejects a mismatched dy and changes nothing") {
  vqkit::Rng rng(13);
  vqkit::Gelu<double> gelu;
  RowMatrix<double> y;
  const auto ctx = gelu.forward(randn(3, 5, rng), y);
  RowMatrix<double> dx = RowMatrix<double>::Constant(3, 5, 7.0);
  const RowMatrix<double> dx_before = dx;
  CHECK_THROWS_WITH(gelu.backward(ctx, randn(3, 4, rng), &dx),
                    "Gelu::backward: dy is 3x4, expected 3x5 (the forward input's shape)");
  CHECK_THROWS_AS(gelu.backward(ctx, randn(4, 5, rng), &dx), vqkit::error);
  CHECK(dx == dx_before);
}

// ----------------------------------------------------------- composition ----

TEST_CASE("Layers compose and accept outputs aliasing their inputs") {
  vqkit::Rng rng(14);
  // In-place forward (y is x) and in-place backward (dx is dy) give the
  // same numbers as separate buffers, for every layer.
  vqkit::Linear<double> sq(6, 6, rng);  // in == out: the case where aliasing bites
  vqkit::LayerNorm<double> ln(6);
  ln.weight = randn(1, 6, rng);
  vqkit::Gelu<double> gelu;
  const RowMatrix<double> x = randn(4, 6, rng), g = randn(4, 6, rng);

  auto check_inplace = [&](auto& layer) {
    RowMatrix<double> y, dx;
    const auto ctx = layer.forward(x, y);
    layer.backward(ctx, g, &dx);
    RowMatrix<double> buf = x;
    const auto ctx2 = layer.forward(buf, buf);
    CHECK(buf == y);
    buf = g;
    layer.backward(ctx2, buf, &buf);
    CHECK(buf == dx);
  };
  check_inplace(sq);
  check_inplace(ln);
  check_inplace(gelu);

  // A whole network Linear -> LayerNorm -> Gelu -> Linear, checked end to end.
  for (Index n : {1, 3}) {
    INFO("N=" << n);
    TinyNet net(5, 13, 3, rng);
    net.ln.weight = randn(1, 13, rng);
    net.ln.bias = randn(1, 13, rng);
    check_gradients(net, randn(n, 5, rng), rng);
  }
}
