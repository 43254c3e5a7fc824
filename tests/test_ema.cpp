#include <catch2/catch.hpp>
#include <vqkit/quantizer/cluster_stats.hpp>
#include <vqkit/quantizer/ema.hpp>

#include "test_util.hpp"

using namespace vqkit;

TEST_CASE("cluster_stats equals the one-hot reference, for any thread count", "[ema]") {
  const Index N = 1001, K = 37, D = 9;
  const auto x = test::gaussian<double>(N, D, 1);
  IndexVector idx(N);
  Rng r(2);
  for (Index i = 0; i < N; ++i) idx[i] = Index(r.below(K - 3));  // last 3 codes unused
  // Reference: one-hot matrix product, O(N K D).
  Eigen::MatrixXd onehot = Eigen::MatrixXd::Zero(N, K);
  for (Index i = 0; i < N; ++i) onehot(i, idx[i]) = 1;
  const Eigen::MatrixXd ref_sums = onehot.transpose() * x;
  const Eigen::VectorXd ref_counts = onehot.colwise().sum().transpose();
  auto a = cluster_stats<double>(cpu{1}, x, idx, K);
  auto b = cluster_stats<double>(cpu{2}, x, idx, K);
  CHECK(a.counts.isApprox(ref_counts));
  CHECK((a.sums - ref_sums).cwiseAbs().maxCoeff() < 1e-12);
  CHECK(a.sums == b.sums);  // bit-identical
  CHECK(a.counts == cluster_counts<double>(cpu{}, idx, K));
  idx[5] = K;
  CHECK_THROWS_WITH(cluster_stats<double>(cpu{}, x, idx, K),
                    Catch::Contains("index 37 at row 5 is out of range"));
}

TEST_CASE("ema_update follows the formula with Laplace smoothing", "[ema]") {
  const Index K = 5, D = 3;
  auto codes = test::gaussian<double>(K, D, 3);
  EmaState<double> st;
  Eigen::VectorXd n0(K);
  n0 << 1, 2, 3, 4, 5;
  ema_reset<double>(st, codes, n0);
  for (Index k = 0; k < K; ++k) REQUIRE((st.embed_sum.row(k) - n0[k] * codes.row(k)).norm() < 1e-14);

  ClusterStats<double> batch;
  batch.counts = Eigen::VectorXd(K);
  batch.counts << 3, 0, 1, 0, 2;
  batch.sums = test::gaussian<double>(K, D, 4);
  batch.sums.row(1).setZero();
  batch.sums.row(3).setZero();
  EmaOptions o;
  o.decay = 0.9;
  o.eps = 1e-3;
  const auto old = st;
  ema_update<double>(cpu{}, st, batch, o, codes);
  const Eigen::VectorXd N = 0.9 * old.cluster_size + 0.1 * batch.counts;
  const double tot = N.sum();
  for (Index k = 0; k < K; ++k) {
    CHECK(st.cluster_size[k] == Approx(N[k]));
    const Eigen::RowVectorXd M = 0.9 * old.embed_sum.row(k) + 0.1 * batch.sums.row(k);
    CHECK((st.embed_sum.row(k) - M).norm() < 1e-12);
    const double nhat = (N[k] + 1e-3) / (tot + K * 1e-3) * tot;
    CHECK((codes.row(k) - M / nhat).norm() < 1e-12);
  }
}

TEST_CASE("consistent EMA state keeps unused codes in place (the seed's collapse)", "[ema]") {
  const Index K = 64, D = 16;
  auto codes = test::gaussian<float>(K, D, 5);
  const RowMatrix<float> start = codes;
  EmaState<float> st;
  ema_reset<float>(st, codes, Vector<float>::Ones(K));
  // A batch that uses only code 0.
  const auto x = test::gaussian<float>(100, D, 6);
  IndexVector idx = IndexVector::Zero(100);
  auto batch = cluster_stats<float>(cpu{}, x, idx, K);
  ema_update<float>(cpu{}, st, batch, EmaOptions{}, codes);
  // Unused codes barely move (only the Laplace term), instead of being divided by ~eps.
  for (Index k = 1; k < K; ++k)
    CHECK((codes.row(k) - start.row(k)).norm() < 1e-3 * start.row(k).norm());
  // The seed's inconsistent start, N = 0 and M = e, flings them away:
  auto seed_codes = start;
  EmaState<float> seed{Vector<float>::Zero(K), start};
  ema_update<float>(cpu{}, seed, batch, EmaOptions{}, seed_codes);
  CHECK(seed_codes.row(1).norm() > 1000 * start.row(1).norm());
}

TEST_CASE("ema_reset and ema_reset_code keep M = N e and reject bad values", "[ema]") {
  const Index K = 4, D = 2;
  auto codes = test::gaussian<double>(K, D, 7);
  EmaState<double> st;
  ema_reset<double>(st, codes, Eigen::VectorXd::Constant(K, 2.0));
  Eigen::RowVectorXd v(2);
  v << 3, -1;
  ema_reset_code<double>(st, codes, 2, v, 5.0);
  CHECK(codes.row(2) == v);
  CHECK(st.cluster_size[2] == 5.0);
  CHECK(st.embed_sum.row(2) == 5.0 * v);
  const auto before = st;
  CHECK_THROWS_WITH(ema_reset_code<double>(st, codes, 4, v, 1.0), Catch::Contains("code 4 out of range"));
  CHECK_THROWS_WITH(ema_reset<double>(st, codes, Eigen::VectorXd::Zero(K)), Catch::Contains("> 0"));
  CHECK(st.embed_sum == before.embed_sum);
  ClusterStats<double> b{Eigen::VectorXd::Zero(K), RowMatrix<double>::Zero(K, D)};
  EmaOptions bad;
  bad.decay = 1.0;
  CHECK_THROWS_WITH(ema_update<double>(cpu{}, st, b, bad, codes), Catch::Contains("decay=1"));
  bad.decay = 0.0;
  CHECK_THROWS_WITH(ema_update<double>(cpu{}, st, b, bad, codes), Catch::Contains("decay=0"));
  CHECK(st.embed_sum == before.embed_sum);
}
