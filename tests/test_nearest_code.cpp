#include <catch2/catch.hpp>
#include <vqkit/quantizer/nearest_code.hpp>

#include <limits>

#include "test_util.hpp"

using namespace vqkit;

namespace {

// Brute force in double: exact squared distances, first minimum wins.
template <class T>
void brute_force(const RowMatrix<T>& codes, const RowMatrix<T>& x, Metric metric,
                 IndexVector& idx, Vector<double>& best) {
  idx.resize(x.rows());
  best.resize(x.rows());
  for (Index i = 0; i < x.rows(); ++i) {
    double b = std::numeric_limits<double>::infinity();
    Index a = 0;
    const Eigen::RowVectorXd xi = x.row(i).template cast<double>();
    for (Index k = 0; k < codes.rows(); ++k) {
      const Eigen::RowVectorXd e = codes.row(k).template cast<double>();
      double v;
      if (metric == Metric::l2) {
        v = (xi - e).squaredNorm();
      } else {
        const double ne = e.norm(), nx = xi.norm();
        v = 1.0 - ((ne > 0 && nx > 0) ? xi.dot(e) / (ne * nx) : 0.0);
      }
      if (v < b) { b = v; a = k; }
    }
    idx[i] = a;
    best[i] = b;
  }
}

}  // namespace

TEMPLATE_TEST_CASE("nearest_code matches brute force on random data", "[search]", float, double) {
  const auto metric = GENERATE(Metric::l2, Metric::cosine);
  const auto shape = GENERATE(std::array<Index, 3>{1, 1, 1}, std::array<Index, 3>{7, 5, 3},
                              std::array<Index, 3>{300, 77, 33},
                              std::array<Index, 3>{1000, 1100, 16});
  const auto [N, K, D] = shape;
  const auto codes = test::gaussian<TestType>(K, D, 11);
  const auto x = test::gaussian<TestType>(N, D, 12);
  IndexVector ref;
  Vector<double> refd;
  brute_force(codes, x, metric, ref, refd);

  SearchOptions opt;
  opt.metric = metric;
  opt.row_block = 64;
  opt.code_block = 100;  // several tiles, ragged edges
  auto r = nearest_code<TestType>(cpu{}, codes, x, opt);
  REQUIRE(r.indices.size() == N);
  const double tol = std::is_same_v<TestType, float> ? 1e-4 : 1e-10;
  Index mismatches = 0;
  for (Index i = 0; i < N; ++i) {
    if (r.indices[i] != ref[i]) {
      // Only a near-tie may differ by rounding: the chosen code must be as close.
      ++mismatches;
      const Eigen::RowVectorXd xi = x.row(i).template cast<double>();
      const Eigen::RowVectorXd e = codes.row(r.indices[i]).template cast<double>();
      const double v = metric == Metric::l2 ? (xi - e).squaredNorm()
                                            : 1.0 - xi.dot(e) / (xi.norm() * e.norm());
      REQUIRE(v <= refd[i] + tol * (1 + std::abs(refd[i])));
    }
    CHECK(double(r.distances[i]) == Approx(refd[i]).margin(tol * 10 * (1 + refd[i])));
  }
  CHECK(mismatches <= N / 100);
  if (std::is_same_v<TestType, double>) CHECK(mismatches == 0);
}

TEST_CASE("nearest_code breaks ties to the lowest index", "[search]") {
  // Duplicate codes and integer data: exact ties in float arithmetic.
  auto base = test::small_integers<float>(20, 6, 3);
  RowMatrix<float> codes(60, 6);
  codes << base, base, base;  // codes k, k+20, k+40 are equal
  const auto x = test::small_integers<float>(500, 6, 4);
  for (auto metric : {Metric::l2, Metric::cosine}) {
    SearchOptions opt;
    opt.metric = metric;
    opt.code_block = 7;
    auto r = nearest_code<float>(cpu{}, codes, x, opt);
    IndexVector ref;
    Vector<double> refd;
    brute_force(codes, x, metric, ref, refd);
    for (Index i = 0; i < x.rows(); ++i) {
      REQUIRE(r.indices[i] < 20);
      REQUIRE(r.indices[i] == ref[i]);
    }
  }
  // Equidistant codes: x = 0, codes +-1 on one axis -> index 0.
  RowMatrix<float> two(2, 1);
  two << 1.f, -1.f;
  RowMatrix<float> zero = RowMatrix<float>::Zero(3, 1);
  auto r = nearest_code<float>(cpu{}, two, zero);
  CHECK((r.indices.array() == 0).all());
}

TEST_CASE("nearest_code results do not depend on the thread count or tiling", "[search]") {
  const auto codes = test::gaussian<float>(513, 40, 5);
  const auto x = test::gaussian<float>(2049, 40, 6);
  auto one = nearest_code<float>(cpu{1}, codes, x);
  auto two = nearest_code<float>(cpu{2}, codes, x);
  REQUIRE(one.indices == two.indices);
  REQUIRE(one.distances == two.distances);
  SearchOptions other;
  other.row_block = 31;
  other.code_block = 1000;
  auto three = nearest_code<float>(cpu{2}, codes, x, other);
  IndexVector ref;
  Vector<double> refd;
  brute_force(codes, x, Metric::l2, ref, refd);
  Index diff = (three.indices.array() != ref.array()).count();
  CHECK(diff <= 2);
}

TEST_CASE("nearest_code reads the caller's memory through Map without a copy", "[search]") {
  std::vector<float> buf(64 * 8), cb(16 * 8);
  Rng r(9);
  for (auto& v : buf) v = float(r.normal());
  for (auto& v : cb) v = float(r.normal());
  auto x = map_rows(buf.data(), 64, 8);
  auto codes = map_rows(cb.data(), 16, 8);
  ConstMatrixRef<float> ref(x);
  CHECK(ref.data() == buf.data());  // bound in place
  IndexVector idx(64);
  nearest_code<float>(cpu{}, codes, x, idx);
  IndexVector bi;
  Vector<double> bd;
  brute_force(RowMatrix<float>(codes), RowMatrix<float>(x), Metric::l2, bi, bd);
  CHECK(idx == bi);
}

TEST_CASE("nearest_code rejects bad input with a message naming the value", "[search][errors]") {
  const auto codes = test::gaussian<float>(8, 4, 1);
  IndexVector idx(5);
  auto msg = [&](auto&& f) {
    try {
      f();
    } catch (const vqkit::error& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  RowMatrix<float> wrong = test::gaussian<float>(5, 3, 2);
  CHECK_THAT(msg([&] { nearest_code<float>(cpu{}, codes, wrong, idx); }),
             Catch::Contains("3 columns, expected 4"));
  RowMatrix<float> empty(0, 4);
  IndexVector none(0);
  CHECK_THAT(msg([&] { nearest_code<float>(cpu{}, codes, empty, none); }),
             Catch::Contains("empty batch"));
  RowMatrix<float> nan = test::gaussian<float>(5, 4, 2);
  nan(3, 2) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THAT(msg([&] { nearest_code<float>(cpu{}, codes, nan, idx); }),
             Catch::Contains("row 3, column 2"));
  RowMatrix<float> inf = test::gaussian<float>(5, 4, 2);
  inf(0, 0) = std::numeric_limits<float>::infinity();
  CHECK_THAT(msg([&] { nearest_code<float>(cpu{}, codes, inf, idx); }),
             Catch::Contains("non-finite"));
  RowMatrix<float> nocodes(0, 4);
  CHECK_THAT(msg([&] { nearest_code<float>(cpu{}, nocodes, nan, idx); }),
             Catch::Contains("K=0"));
  IndexVector small(2);
  RowMatrix<float> ok = test::gaussian<float>(5, 4, 2);
  CHECK_THAT(msg([&] { nearest_code<float>(cpu{}, codes, ok, small); }),
             Catch::Contains("indices has size 2, expected N=5"));
}

// ---- the AVX-512 kernel (built with -march=native on an AVX-512 machine) ----

TEST_CASE("nearest_code: the fast kernel's results depend neither on its blocking nor on the threads",
          "[search][kernel]") {
#if defined(__AVX512F__)
  // Ragged everything: rows not a multiple of the 64-row panel, codes not a
  // multiple of the 6-code tile, dimensions not a multiple of 16; strided
  // inputs (blocks of wider matrices).
  for (auto metric : {Metric::l2, Metric::cosine}) {
    for (auto [N, K, D] : {std::array<Index, 3>{1, 1, 1}, std::array<Index, 3>{65, 7, 17},
                           std::array<Index, 3>{300, 77, 33}, std::array<Index, 3>{130, 13, 300}}) {
      const RowMatrix<float> wide_codes = test::gaussian<float>(K, D + 5, 21);
      const RowMatrix<float> wide_x = test::gaussian<float>(N, D + 3, 22);
      ConstMatrixRef<float> codes(wide_codes.leftCols(D)), x(wide_x.leftCols(D));
      if (K > 1) REQUIRE(codes.outerStride() == D + 5);  // bound in place, strided
      SearchOptions opt;
      opt.metric = metric;
      IndexVector ref(N);
      Vector<float> refd;
      REQUIRE(detail::nearest_code_avx512(cpu{1}, codes, x, ref, &refd, opt, nullptr));
      for (auto [mc, kc, kb] : {std::array<Index, 3>{64, 1, 6}, std::array<Index, 3>{128, 16, 12},
                                std::array<Index, 3>{64, 100, 600}, std::array<Index, 3>{256, 7, 30}}) {
        detail::k512::Blocking b;
        b.mc = mc;
        b.kc = kc;
        b.kb = kb;
        for (int threads : {1, 2, 3}) {
          IndexVector idx(N);
          Vector<float> dist;
          REQUIRE(detail::nearest_code_avx512(cpu{threads}, codes, x, idx, &dist, opt, nullptr, &b));
          REQUIRE(idx == ref);
          REQUIRE(dist == refd);  // bit-identical
        }
      }
      // And it is what the public function returns.
      IndexVector pub(N);
      Vector<float> pubd;
      nearest_code<float>(cpu{2}, codes, x, pub, &pubd, opt);
      REQUIRE(pub == ref);
      REQUIRE(pubd == refd);
    }
  }
#else
  WARN("built without AVX-512: the generic path serves every call");
#endif
}

TEST_CASE("nearest_code: the fast kernel equals the generic path where arithmetic is exact",
          "[search][kernel]") {
  // Small integers: every dot product and norm is exact, so both paths see
  // the same values and ties, and must pick the same (lowest) index.
  RowMatrix<float> codes(203, 19);
  const auto base = test::small_integers<float>(101, 19, 31);
  codes << base, base, test::small_integers<float>(1, 19, 32);  // duplicates: exact ties
  const auto x = test::small_integers<float>(517, 19, 33);
  for (auto metric : {Metric::l2, Metric::cosine}) {
    SearchOptions opt;
    opt.metric = metric;
    IndexVector fast(x.rows()), generic(x.rows());
    Vector<float> fd, gd;
    nearest_code<float>(cpu{2}, codes, x, fast, &fd, opt);
    detail::nearest_code_gemm_tiles<float>(cpu{2}, codes, x, generic, &gd, opt, nullptr);
    REQUIRE(fast == generic);
    if (metric == Metric::l2) REQUIRE(fd == gd);  // exact integers
    IndexVector ref;
    Vector<double> refd;
    brute_force(codes, x, metric, ref, refd);
    if (metric == Metric::l2) REQUIRE(fast == ref);
  }
}

TEST_CASE("nearest_code: zero vectors, and norms near float's range, are handled", "[search][kernel]") {
  // Cosine: a zero code has cosine 0 with everything, a zero row too.
  RowMatrix<float> codes(3, 4);
  codes << 0, 0, 0, 0, 1, 0, 0, 0, -1, 0, 0, 0;
  RowMatrix<float> x(3, 4);
  x << 0, 0, 0, 0, 2, 1, 0, 0, -3, 0, 1, 0;
  SearchOptions cos;
  cos.metric = Metric::cosine;
  auto r = nearest_code<float>(cpu{}, codes, x, cos);
  CHECK(r.indices[0] == 0);  // every cosine is 0: the lowest index
  CHECK(r.distances[0] == 1.f);
  CHECK(r.indices[1] == 1);
  CHECK(r.indices[2] == 2);

  // Rows whose squared norm overflows float (finite entries): searched by the
  // generic path, same answer as calling it directly.
  auto big_x = test::gaussian<float>(200, 8, 41);
  big_x.row(150).setConstant(3e19f);  // ||x||^2 = 7.2e39 > FLT_MAX
  const auto c2 = test::gaussian<float>(20, 8, 42);
  IndexVector a(200), b(200);
  nearest_code<float>(cpu{2}, c2, big_x, a);
  detail::nearest_code_gemm_tiles<float>(cpu{1}, c2, big_x, b, nullptr, SearchOptions{}, nullptr);
  CHECK(a == b);
  // Codes with huge norms: the whole search takes the generic path.
  RowMatrix<float> big_c = c2;
  big_c.row(3).setConstant(3e19f);
  nearest_code<float>(cpu{2}, big_c, big_x, a);
  detail::nearest_code_gemm_tiles<float>(cpu{1}, big_c, big_x, b, nullptr, SearchOptions{}, nullptr);
  CHECK(a == b);
  // Cosine: a code whose squared norm overflows has 1/||e|| = 0 like a zero
  // code, but its dot products can overflow: it must not reach the kernel.
  big_c.row(3).setConstant(1e38f);
  big_x.row(150).setConstant(1e17f);  // ||x||^2 < 1e37: a kernel row
  SearchOptions cosine;
  cosine.metric = Metric::cosine;
#if defined(__AVX512F__)
  REQUIRE_FALSE(detail::nearest_code_avx512(cpu{1}, big_c, big_x, a, nullptr, cosine, nullptr));
#endif
  nearest_code<float>(cpu{2}, big_c, big_x, a, nullptr, cosine);
  detail::nearest_code_gemm_tiles<float>(cpu{1}, big_c, big_x, b, nullptr, cosine, nullptr);
  CHECK(a == b);
}
