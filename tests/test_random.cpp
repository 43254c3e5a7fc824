#include <catch2/catch.hpp>
#include <vqkit/core/random.hpp>

#include <cmath>
#include <vector>

TEST_CASE("Rng is reproducible and its state round-trips") {
  vqkit::Rng a(42), b(42), c(43);
  REQUIRE(a.next() == b.next());
  REQUIRE(a.next() != c.next());
  const auto saved = a.state();
  const auto x = a.next();
  vqkit::Rng d;
  d.set_state(saved);
  REQUIRE(d.next() == x);
}

TEST_CASE("Rng draws have the right moments") {
  vqkit::Rng r(7);
  const int n = 200000;
  double su = 0, sn = 0, sn2 = 0;
  std::vector<int> hist(10, 0);
  for (int i = 0; i < n; ++i) {
    const double u = r.uniform();
    REQUIRE(u >= 0.0);
    REQUIRE(u < 1.0);
    su += u;
    const double z = r.normal();
    sn += z;
    sn2 += z * z;
    ++hist[r.below(10)];
  }
  CHECK(su / n == Approx(0.5).margin(0.005));
  CHECK(sn / n == Approx(0.0).margin(0.01));
  CHECK(sn2 / n == Approx(1.0).margin(0.01));
  for (int h : hist) CHECK(h == Approx(n / 10).margin(n / 100));
}
