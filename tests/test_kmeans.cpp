#include <catch2/catch.hpp>
#include <vqkit/quantizer/init.hpp>
#include <vqkit/quantizer/kmeans.hpp>

#include <algorithm>

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
  auto min_count = [&](double fraction, std::uint64_t seed) {
    Rng rng(seed);
    KMeansOptions o{12, 10};
    o.min_cluster_fraction = fraction;
    return kmeans<double>(cpu{}, data, o, rng).counts.minCoeff();
  };
  // Over seeds (the last assignment may still leave one; 87 of 100 seeds
  // have none with the fraction, 0 of 100 without it):
  int plain_singletons = 0, fraction_clean = 0;
  for (std::uint64_t seed = 0; seed < 20; ++seed) {
    plain_singletons += min_count(0.0, seed) <= 1.0;  // plain k-means: singleton clusters
    fraction_clean += min_count(0.5, seed) >= 2.0;    // no code left on one outlier
  }
  CHECK(plain_singletons == 20);
  CHECK(fraction_clean >= 14);
  Rng rng(1);
  KMeansOptions bad{4, 1};
  bad.min_cluster_fraction = 1.5;
  CHECK_THROWS_WITH(kmeans<double>(cpu{}, data, bad, rng), Catch::Contains("got 1.5"));
}

namespace {

/// Which row of data a centre is (rows of data are distinct here).
template <class T>
Index row_of(const RowMatrix<T>& data, const RowMatrix<T>& c, Index j) {
  for (Index i = 0; i < data.rows(); ++i)
    if (data.row(i) == c.row(j)) return i;
  return -1;
}

/// Exact probability that the k-means++ sequence starts with `prefix`,
/// by the definition: first row uniform, then each row with probability
/// proportional to its squared distance to the nearest centre so far.
double kpp_probability(const RowMatrix<double>& data, const std::vector<Index>& prefix) {
  const Index n = data.rows();
  double p = 1.0 / double(n);
  for (std::size_t t = 1; t < prefix.size(); ++t) {
    std::vector<double> mind(std::size_t(n), 1e300);
    double total = 0;
    for (Index i = 0; i < n; ++i) {
      for (std::size_t s = 0; s < t; ++s)
        mind[std::size_t(i)] = std::min(mind[std::size_t(i)], (data.row(i) - data.row(prefix[s])).squaredNorm());
      total += mind[std::size_t(i)];
    }
    p *= mind[std::size_t(prefix[t])] / total;
  }
  return p;
}

}  // namespace

TEST_CASE("batched k-means++ draws every centre from the k-means++ distribution", "[kmeans]") {
  // 7 distinct rows, k = 5: batches of 1, 1, 2 and 1 centres, so the fourth
  // centre is drawn by rejection from the distances before the third. Its
  // marginal distribution (and that of the third) must match the exact one.
  RowMatrix<double> data(7, 2);
  data << 0, 0, 1, 0, 0, 1.5, 4, 4, 5, 4, -3, 2, 9, -1;
  const Index n = data.rows(), k = 5;
  std::vector<double> exact3(std::size_t(n), 0.0), exact2(std::size_t(n), 0.0);
  for (Index a = 0; a < n; ++a)
    for (Index b = 0; b < n; ++b)
      for (Index c = 0; c < n; ++c)
        for (Index d = 0; d < n; ++d) {
          if (a == b || a == c || a == d || b == c || b == d || c == d) continue;
          const double p = kpp_probability(data, {a, b, c, d});
          exact3[std::size_t(d)] += p;
          exact2[std::size_t(c)] += p;
        }
  for (const bool exact_seeding : {false, true}) {
    const int runs = 20000;
    std::vector<double> freq3(std::size_t(n), 0.0), freq2(std::size_t(n), 0.0);
    Rng rng(17);
    for (int r = 0; r < runs; ++r) {
      const RowMatrix<double> c =
          exact_seeding ? detail::kmeans_plus_plus_exact<double>(cpu{1}, data, k, rng)
                        : detail::kmeans_plus_plus<double>(cpu{1}, data, k, rng, data.cwiseAbs().maxCoeff());
      const Index i3 = row_of(data, c, 3), i2 = row_of(data, c, 2);
      REQUIRE(i3 >= 0);
      REQUIRE(i2 >= 0);
      freq3[std::size_t(i3)] += 1.0 / runs;
      freq2[std::size_t(i2)] += 1.0 / runs;
    }
    for (Index i = 0; i < n; ++i) {
      INFO("exact_seeding " << exact_seeding << ", row " << i);
      const double p3 = exact3[std::size_t(i)], p2 = exact2[std::size_t(i)];
      CHECK(std::abs(freq3[std::size_t(i)] - p3) < 4.5 * std::sqrt(p3 * (1 - p3) / runs) + 1e-3);
      CHECK(std::abs(freq2[std::size_t(i)] - p2) < 4.5 * std::sqrt(p2 * (1 - p2) / runs) + 1e-3);
    }
  }
}

TEST_CASE("batched k-means++ never picks a row equal to a centre (norm-trick cancellation)", "[kmeans]") {
  // 48 distinct points near (1000, ..., 1000), each repeated 8 times,
  // k = 48: the norm trick leaves rounding noise of ~1e-7 ||x||^2 (~30)
  // where the distance is 0, against ~600 between distinct points; every
  // centre must still be a different point.
  const Index pts = 48, reps = 8, D = 300;
  const RowMatrix<float> base = (test::gaussian<float>(pts, D, 21).array() + 1000.f).matrix();
  RowMatrix<float> data(pts * reps, D);
  for (Index i = 0; i < data.rows(); ++i) data.row(i) = base.row(i % pts);
  for (const int threads : {1, 2}) {
    Rng rng(22);
    const auto c = detail::kmeans_plus_plus<float>(cpu{threads}, data, pts, rng, detail::max_abs(data));
    std::vector<int> seen(std::size_t(pts), 0);
    for (Index j = 0; j < pts; ++j) {
      const Index r = row_of(base, c, j);
      REQUIRE(r >= 0);
      ++seen[std::size_t(r)];
    }
    for (Index p = 0; p < pts; ++p) CHECK(seen[std::size_t(p)] == 1);
  }
}

TEST_CASE("batched k-means++ in float: the kernel path (no centred copy) and the generic one agree",
          "[kmeans]") {
  // Data far from the origin, k large enough for batches of 16 and more
  // (searched). The AVX-512 path searches data - mean without forming it;
  // the generic path searches a centred copy. Their distances round
  // differently, so the draws may differ; both must give k distinct rows
  // and about the same inertia after seeding.
  const RowMatrix<float> data = (test::gaussian<float>(2000, 40, 25).array() + 300.f).matrix();
  const Index k = 100;
  double inertia[2];
  for (const bool generic : {false, true}) {
    detail::avx512_disabled = generic;
    double sum = 0;
    for (const std::uint64_t seed : {26, 27, 28}) {
      Rng rng(seed);
      const auto c = detail::kmeans_plus_plus<float>(cpu{2}, data, k, rng, detail::max_abs(data));
      std::vector<Index> rows;
      for (Index j = 0; j < k; ++j) rows.push_back(row_of(data, c, j));
      std::sort(rows.begin(), rows.end());
      CHECK(rows.front() >= 0);
      CHECK(std::adjacent_find(rows.begin(), rows.end()) == rows.end());
      IndexVector idx(data.rows());
      Vector<float> dist;
      nearest_code<float>(cpu{1}, c, data, idx, &dist);
      sum += dist.cast<double>().sum();
    }
    inertia[generic] = sum;
  }
  detail::avx512_disabled = false;
  CHECK(std::abs(inertia[0] / inertia[1] - 1) < 0.05);
}

TEST_CASE("batched k-means++ falls back to the exact seeding outside float's range", "[kmeans]") {
  // Entries of 1e25: squares overflow float; the seeding must match the
  // sequential double one draw for draw (it is that one).
  const auto data = test::gaussian<float>(300, 8, 23, 1e25);
  Rng a(24), b(24);
  const auto c1 = detail::kmeans_plus_plus<float>(cpu{}, data, 20, a, detail::max_abs(data));
  const auto c2 = detail::kmeans_plus_plus_exact<float>(cpu{}, data, 20, b);
  CHECK(c1 == c2);
  CHECK(a.state() == b.state());
}
