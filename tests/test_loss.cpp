#include <catch2/catch.hpp>
#include <vqkit/quantizer/loss.hpp>

#include "test_util.hpp"

using namespace vqkit;

TEST_CASE("vq_loss weights and reductions", "[loss]") {
  RowMatrix<double> r(2, 3);
  r << 1, 2, 0, 0, 0, 3;  // sum of squares 14
  LossOptions o;
  auto l = vq_loss<double>(cpu{}, r, o);
  CHECK(l.distortion == Approx(14.0 / 6));
  CHECK(l.codebook == Approx(0.25 * 14 / 6));
  CHECK(l.commitment == Approx(1.0 * 14 / 6));
  CHECK(l.total == Approx(1.25 * 14 / 6));
  o.reduction = Reduction::sum_over_dim;
  o.codebook_weight = 2.0;
  o.commitment_weight = 0.5;
  l = vq_loss<double>(cpu{}, r, o);
  CHECK(l.distortion == Approx(7.0));
  CHECK(l.codebook == Approx(14.0));
  CHECK(l.commitment == Approx(3.5));
}

TEST_CASE("loss gradients match central finite differences", "[loss]") {
  const auto reduction = GENERATE(Reduction::mean, Reduction::sum_over_dim);
  const Index N = 7, D = 5, K = 3;
  auto x = test::gaussian<double>(N, D, 1);
  auto e = test::gaussian<double>(K, D, 2);
  IndexVector idx(N);
  for (Index i = 0; i < N; ++i) idx[i] = i % K;
  LossOptions o;
  o.reduction = reduction;
  o.codebook_weight = 0.3;
  o.commitment_weight = 1.7;
  auto residual = [&](const RowMatrix<double>& xx, const RowMatrix<double>& ee) {
    RowMatrix<double> r(N, D);
    for (Index i = 0; i < N; ++i) r.row(i) = xx.row(i) - ee.row(idx[i]);
    return r;
  };
  // Commitment term as a function of x (q fixed), codebook term as a function of e (x fixed).
  RowMatrix<double> dx;
  RowMatrix<double> none(0, D);
  vq_input_grad<double>(cpu{}, residual(x, e), none, o, dx);
  RowMatrix<double> de = RowMatrix<double>::Zero(K, D);
  vq_codebook_grad<double>(cpu{}, residual(x, e), idx, o, de);
  const double h = 1e-6;
  for (Index i = 0; i < N; ++i)
    for (Index d = 0; d < D; ++d) {
      auto xp = x, xm = x;
      xp(i, d) += h;
      xm(i, d) -= h;
      const double fd = (vq_loss<double>(cpu{}, residual(xp, e), o).commitment -
                         vq_loss<double>(cpu{}, residual(xm, e), o).commitment) / (2 * h);
      CHECK(dx(i, d) == Approx(fd).epsilon(1e-6).margin(1e-9));
    }
  for (Index k = 0; k < K; ++k)
    for (Index d = 0; d < D; ++d) {
      auto ep = e, em = e;
      ep(k, d) += h;
      em(k, d) -= h;
      const double fd = (vq_loss<double>(cpu{}, residual(x, ep), o).codebook -
                         vq_loss<double>(cpu{}, residual(x, em), o).codebook) / (2 * h);
      CHECK(de(k, d) == Approx(fd).epsilon(1e-6).margin(1e-9));
    }
  // With an upstream gradient the straight-through part passes it unchanged.
  auto g = test::gaussian<double>(N, D, 3);
  RowMatrix<double> dx2;
  vq_input_grad<double>(cpu{}, residual(x, e), g, o, dx2);
  CHECK((dx2 - dx - g).cwiseAbs().maxCoeff() < 1e-14);
}

TEST_CASE("loss options reject negative or non-finite weights", "[loss][errors]") {
  LossOptions o;
  o.codebook_weight = -0.25;
  CHECK_THROWS_WITH(o.validate("cfg"),
                    Catch::Contains("cfg: codebook_weight must be >= 0, got codebook_weight=-0.25"));
  o.codebook_weight = 0.25;
  o.commitment_weight = std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(o.validate("cfg"),
                    Catch::Contains("commitment_weight must be finite, got commitment_weight=inf"));
  o.commitment_weight = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(o.validate("cfg"), Catch::Contains("commitment_weight must be finite"));
}
