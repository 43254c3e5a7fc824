#include <catch2/catch.hpp>
#include <vqkit/quantizer/init.hpp>
#include <vqkit/quantizer/kmeans.hpp>

#include "test_util.hpp"

using namespace vqkit;

TEST_CASE("normalized_init gives norm sqrt(D) and spread directions", "[init]") {
  Rng r(1);
  auto e = normalized_init<double>(500, 64, r);
  for (Index k = 0; k < e.rows(); ++k) CHECK(e.row(k).norm() == Approx(8.0));
  // Mean direction near zero (isotropic).
  CHECK(e.colwise().mean().norm() < 1.0);
  CHECK_THROWS_WITH(normalized_init<float>(0, 3, r), Catch::Contains("K=0"));
}

TEST_CASE("kmeans recovers well-separated clusters", "[kmeans]") {
  const Index k = 8, D = 5, per = 50;
  auto centres = test::gaussian<double>(k, D, 2, 20.0);
  RowMatrix<double> data(k * per, D);
  Rng r(3);
  for (Index c = 0; c < k; ++c)
    for (Index i = 0; i < per; ++i)
      for (Index d = 0; d < D; ++d) data(c * per + i, d) = centres(c, d) + 0.1 * r.normal();
  Rng rng(4);
  auto km = kmeans<double>(cpu{}, data, KMeansOptions{k, 10}, rng);
  CHECK(km.counts.sum() == Approx(double(k * per)));
  for (Index c = 0; c < k; ++c) {
    double best = 1e300;
    for (Index j = 0; j < k; ++j) best = std::min(best, (km.centroids.row(j) - centres.row(c)).norm());
    CHECK(best < 0.2);
    CHECK(km.counts[c] == Approx(double(per)));
  }
  // Inertia equals the brute-force sum of squared distances to the nearest centroid.
  double inertia = 0;
  for (Index i = 0; i < data.rows(); ++i) {
    double b = 1e300;
    for (Index j = 0; j < k; ++j) b = std::min(b, (data.row(i) - km.centroids.row(j)).squaredNorm());
    inertia += b;
  }
  CHECK(km.inertia == Approx(inertia).epsilon(1e-9));
}

TEST_CASE("Lloyd iterations never raise the inertia", "[kmeans]") {
  const auto data = test::gaussian<float>(2000, 12, 5);
  double prev = 1e300;
  for (int it : {0, 1, 3, 10}) {
    Rng rng(6);
    auto km = kmeans<float>(cpu{}, data, KMeansOptions{40, it}, rng);
    CHECK(km.inertia <= prev * (1 + 1e-6));
    prev = km.inertia;
  }
}

TEST_CASE("kmeans splits the largest cluster instead of leaving an empty one", "[kmeans]") {
  // 30 identical rows and 2 distinct ones, 5 clusters: seeding must repeat
  // a point, so clusters go empty and must be re-seeded from the largest.
  RowMatrix<double> data = RowMatrix<double>::Zero(32, 3);
  data.row(30) << 5, 5, 5;
  data.row(31) << -5, 0, 1;
  data.topRows(30).rowwise() += Eigen::RowVector3d(1, 2, 3);
  Rng rng(7);
  auto km = kmeans<double>(cpu{}, data, KMeansOptions{5, 5}, rng);
  CHECK(km.empty_splits > 0);
  CHECK((km.counts.array() > 0).all());
  CHECK(km.counts.sum() == Approx(32));
  for (Index j = 0; j < 5; ++j) CHECK(km.centroids.row(j).norm() > 1.0);  // never zero
}

TEST_CASE("kmeans is deterministic and thread-count independent", "[kmeans]") {
  const auto data = test::gaussian<float>(3000, 20, 8);
  Rng a(9), b(9);
  auto k1 = kmeans<float>(cpu{1}, data, KMeansOptions{64, 5}, a);
  auto k2 = kmeans<float>(cpu{2}, data, KMeansOptions{64, 5}, b);
  CHECK(k1.centroids == k2.centroids);
  CHECK(k1.counts == k2.counts);
  CHECK(a.state() == b.state());
}

TEST_CASE("kmeans rejects bad arguments", "[kmeans][errors]") {
  const auto data = test::gaussian<float>(10, 3, 1);
  Rng rng(1);
  const auto before = rng.state();
  CHECK_THROWS_WITH(kmeans<float>(cpu{}, data, KMeansOptions{11, 3}, rng),
                    Catch::Contains("n=10 samples for k=11"));
  CHECK_THROWS_WITH(kmeans<float>(cpu{}, data, KMeansOptions{0, 3}, rng), Catch::Contains("k=0"));
  CHECK_THROWS_WITH(kmeans<float>(cpu{}, data, KMeansOptions{2, -1}, rng),
                    Catch::Contains("iterations must be >= 0, got -1"));
  auto nan = data;
  nan(4, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(kmeans<float>(cpu{}, nan, KMeansOptions{2, 3}, rng),
                    Catch::Contains("row 4, column 1"));
  CHECK(rng.state() == before);
}

TEST_CASE("min_cluster_fraction keeps centres off isolated outliers", "[kmeans]") {
  // A dense blob of 600 rows plus 6 far outliers; k-means++ seeds outliers
  // first (largest D^2), leaving codes that own a single row.
  RowMatrix<double> data(606, 4);
  data.topRows(600) = test::gaussian<double>(600, 4, 11);
  data.bottomRows(6) = test::gaussian<double>(6, 4, 12, 50.0);
  auto min_count = [&](double fraction) {
    Rng rng(13);
    KMeansOptions o{12, 10};
    o.min_cluster_fraction = fraction;
    return kmeans<double>(cpu{}, data, o, rng).counts.minCoeff();
  };
  CHECK(min_count(0.0) <= 1.0);  // plain k-means: singleton clusters
  CHECK(min_count(0.5) >= 2.0);  // no code left on one outlier
  Rng rng(1);
  KMeansOptions bad{4, 1};
  bad.min_cluster_fraction = 1.5;
  CHECK_THROWS_WITH(kmeans<double>(cpu{}, data, bad, rng), Catch::Contains("got 1.5"));
}
