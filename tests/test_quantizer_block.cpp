#include <catch2/catch.hpp>
#include <vqkit/layers/quantizer_block.hpp>

#include "test_util.hpp"

using namespace vqkit;

// The seed's "Testing the fix" snippet, in C++:
//   vq = VectorQuantizerFixed(dim=256, codebook_size=1024, codebook_dim=1024)
//   x = torch.randn(2, 64, 256); quantized, indices, loss, metrics = vq(x)
TEST_CASE("the seed's snippet: (2, 64, 256) in, (2, 64, 256) and (2, 64) out", "[block]") {
  QuantizerBlockConfig cfg;
  cfg.dim = 256;
  cfg.quantizer.codebook_size = 1024;
  cfg.quantizer.dim = 1024;
  QuantizerBlock<float> block(cfg);
  const Index B = 2, T = 64;
  const auto x = test::gaussian<float>(B * T, 256, 1);
  RowMatrix<float> y;
  auto ctx = block.forward(x, y);
  CHECK(y.rows() == B * T);
  CHECK(y.cols() == 256);
  REQUIRE(ctx.vq.indices.size() == B * T);
  CHECK((ctx.vq.indices.array() >= 0).all());
  CHECK((ctx.vq.indices.array() < 1024).all());
  CHECK(std::isfinite(ctx.vq.loss.total));
  CHECK(ctx.vq.loss.total > 0);
  CHECK(ctx.vq.metrics.usage >= 1);
  CHECK(ctx.vq.metrics.usage <= 128);
  CHECK(ctx.vq.metrics.perplexity >= 1.0);
  // 128 vectors cannot initialise 1024 codes: the normalised init serves
  // until the memory bank holds 1024 rows.
  CHECK_FALSE(ctx.vq.data_initialized);
  CHECK_FALSE(block.quantizer.data_initialized());
  const Eigen::Map<const RowMatrix<std::int64_t>> indices(ctx.vq.indices.data(), B, T);
  CHECK(indices.rows() == 2);
  CHECK(indices.cols() == 64);
}

TEST_CASE("block backward: chain rule with the straight-through quantizer", "[block][grad]") {
  QuantizerBlockConfig cfg;
  cfg.dim = 6;
  cfg.quantizer.codebook_size = 5;
  cfg.quantizer.dim = 4;
  cfg.quantizer.init = InitMethod::normalized;
  cfg.quantizer.loss.commitment_weight = 0.7;
  QuantizerBlock<double> block(cfg);
  block.eval();
  // Non-trivial affine LayerNorm.
  block.norm.weight = test::gaussian<double>(1, 6, 3);
  block.norm.bias = test::gaussian<double>(1, 6, 4);
  const auto x = test::gaussian<double>(7, 6, 5);
  const auto g = test::gaussian<double>(7, 6, 6);
  RowMatrix<double> y;
  auto ctx = block.forward(x, y);

  // Pre-quantizer features z(x) = proj_in(gelu(norm(x))).
  auto z_of = [&](const RowMatrix<double>& xx) {
    RowMatrix<double> a, b;
    block.norm.forward(xx, a);
    block.act.forward(a, b);
    block.proj_in.forward(b, a);
    return a;
  };
  const double h = 1e-6;
  // (1) No upstream gradient: dx is the gradient of the commitment term
  // through the encoder chain, with the assignment fixed.
  RowMatrix<double> dx0;
  block.zero_grad();
  block.backward(ctx, RowMatrix<double>::Zero(7, 6), &dx0);
  // (2) The straight-through part: dx(g) - dx(0) = d/dx <g, proj_out(z(x))>.
  RowMatrix<double> dxg;
  block.backward(ctx, g, &dxg);
  for (Index i = 0; i < 7; ++i)
    for (Index d = 0; d < 6; ++d) {
      auto xp = x, xm = x;
      xp(i, d) += h;
      xm(i, d) -= h;
      RowMatrix<double> qq;
      auto cp = block.quantizer.forward(z_of(xp), qq);
      auto cm = block.quantizer.forward(z_of(xm), qq);
      REQUIRE(cp.indices == ctx.vq.indices);
      REQUIRE(cm.indices == ctx.vq.indices);
      const double fd_commit = (cp.loss.commitment - cm.loss.commitment) / (2 * h);
      CHECK(dx0(i, d) == Approx(fd_commit).epsilon(1e-6).margin(1e-8));
      RowMatrix<double> yp, ym;
      block.proj_out.forward(z_of(xp), yp);
      block.proj_out.forward(z_of(xm), ym);
      const double fd_st = ((yp - ym).cwiseProduct(g)).sum() / (2 * h);
      CHECK(dxg(i, d) - dx0(i, d) == Approx(fd_st).epsilon(1e-6).margin(1e-8));
    }
  auto params = block.parameters();
  std::vector<std::string> names;
  for (auto& p : params) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"norm.weight", "norm.bias", "proj_in.weight",
                                          "proj_in.bias", "proj_out.weight", "proj_out.bias"});
}

// Gaussian input through the full block (dim 256 -> 1024, K = 1024), 4096
// tokens per step, 100 steps: codes used over the last 10 steps stay >= 90%
// of K. (The seed's block keeps 2 of 1024 codes on this workload.)
TEST_CASE("collapse regression: Gaussian input through the full block, K=1024", "[block][regression]") {
  QuantizerBlockConfig cfg;
  cfg.dim = 256;
  cfg.quantizer.codebook_size = 1024;
  cfg.quantizer.dim = 1024;
  QuantizerBlock<float> block(cfg);
  RowMatrix<float> y;
  Index min_window = 1024;
  typename QuantizerBlock<float>::Context ctx;
  for (int step = 1; step <= 100; ++step) {
    ctx = block.forward(test::gaussian<float>(4096, 256, 1000 + step), y);
    if (step == 1) CHECK(ctx.vq.data_initialized);
    if (step > 90) min_window = std::min(min_window, ctx.vq.metrics.window_usage);
  }
  INFO("window usage min over the last 10 steps " << min_window << ", batch usage "
                                                  << ctx.vq.metrics.usage << ", perplexity "
                                                  << ctx.vq.metrics.perplexity);
  CHECK(min_window >= 0.9 * 1024);
  CHECK(ctx.vq.metrics.health == Health::healthy);
}
