#include <catch2/catch.hpp>
#include <vqkit/quantizer/nearest_code.hpp>
#include <vqkit/io/vecs.hpp>

#include <limits>
#include <string>

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

// ---- the AVX-512 kernel (compiled on x86-64 whatever the flags; runs on AVX-512F CPUs) ----

TEST_CASE("nearest_code: the fast kernel's results depend neither on its blocking nor on the threads",
          "[search][kernel]") {
#if VQKIT_K512
  if (!avx512_search_supported()) VQKIT_SKIP("this CPU has no AVX-512F: the generic path serves every call");
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
  VQKIT_SKIP("not x86-64 GCC/clang: the generic path serves every call");
#endif
}

TEST_CASE("nearest_code: the fast kernel's shift searches x - shift, bit for bit as a centred copy",
          "[search][kernel]") {
#if VQKIT_K512
  if (!avx512_search_supported()) VQKIT_SKIP("this CPU has no AVX-512F: the generic path serves every call");
  // Rows far from the origin (the case k-means++ seeding centres), ragged
  // shapes, a strided x, several blockings and thread counts.
  for (auto [N, K, D] : {std::array<Index, 3>{1, 1, 1}, std::array<Index, 3>{130, 13, 37},
                         std::array<Index, 3>{300, 64, 128}}) {
    const RowMatrix<float> wide_x = (test::gaussian<float>(N, D + 3, 31).array() + 50.f).matrix();
    ConstMatrixRef<float> x(wide_x.leftCols(D));
    const Eigen::Matrix<float, 1, Eigen::Dynamic> shift =
        (test::gaussian<float>(1, D, 32).array() + 50.f).matrix();
    const RowMatrix<float> centred = x.rowwise() - shift;  // each entry rounded once
    const RowMatrix<float> codes = test::gaussian<float>(K, D, 33);
    IndexVector ref(N);
    Vector<float> refd;
    REQUIRE(detail::nearest_code_avx512(cpu{1}, codes, centred, ref, &refd, SearchOptions{}, nullptr));
    for (auto [mc, kc, kb] : {std::array<Index, 3>{64, 1, 6}, std::array<Index, 3>{128, 100, 600}}) {
      detail::k512::Blocking b;
      b.mc = mc;
      b.kc = kc;
      b.kb = kb;
      for (int threads : {1, 2}) {
        IndexVector idx(N);
        Vector<float> dist;
        SearchWorkspace ws;
        REQUIRE(detail::nearest_code_avx512(cpu{threads}, codes, x, idx, &dist, SearchOptions{}, nullptr,
                                            &b, &ws, shift.data()));
        REQUIRE(idx == ref);
        REQUIRE(dist == refd);
      }
    }
  }
#else
  VQKIT_SKIP("not x86-64 GCC/clang: the generic path serves every call");
#endif
}

TEST_CASE("nearest_code: SearchStats names the kernel; avx512_disabled forces the generic path",
          "[search][kernel]") {
  const auto codes = test::gaussian<float>(40, 24, 41);
  const auto x = test::gaussian<float>(300, 24, 42);
  IndexVector a(x.rows()), b(x.rows());
  SearchStats st;
  SearchMode mode;
  mode.stats = &st;
  nearest_code<float>(cpu{2}, codes, x, a, nullptr, {}, nullptr, mode);
  CHECK(std::string(st.kernel) == (avx512_search_supported() ? "avx512" : "generic"));
  detail::avx512_disabled = true;
  nearest_code<float>(cpu{2}, codes, x, b, nullptr, {}, nullptr, mode);
  detail::avx512_disabled = false;
  CHECK(std::string(st.kernel) == "generic");
  IndexVector ref;
  Vector<double> refd;
  brute_force(codes, x, Metric::l2, ref, refd);
  CHECK(a == ref);
  CHECK(b == ref);
  nearest_code<double>(cpu{2}, codes.cast<double>(), x.cast<double>(), a, nullptr, {}, nullptr, mode);
  CHECK(std::string(st.kernel) == "generic");  // double: always the generic path
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

  // Rows whose squared norm overflows float (finite entries). Unscaled
  // (detail::nearest_code_unchecked), the kernel hands their block to the
  // generic path: the same answer as calling it directly. The public search
  // scales the whole problem by a power of two into float's safe range
  // (see nearest_code.hpp) and finds the nearest codes (brute force).
  auto big_x = test::gaussian<float>(200, 8, 41);
  big_x.row(150).setConstant(3e19f);  // ||x||^2 = 7.2e39 > FLT_MAX
  const auto c2 = test::gaussian<float>(20, 8, 42);
  IndexVector a(200), b(200), ref;
  Vector<double> refd;
  detail::nearest_code_unchecked<float>(cpu{2}, c2, big_x, a, nullptr, SearchOptions{}, nullptr);
  detail::nearest_code_gemm_tiles<float>(cpu{1}, c2, big_x, b, nullptr, SearchOptions{}, nullptr);
  CHECK(a == b);
  SearchStats st;
  nearest_code<float>(cpu{2}, c2, big_x, a, nullptr, SearchOptions{}, nullptr, SearchMode{Precision::fp32, &st});
  CHECK(st.scale_exponent < 0);
  // Reference: argmin of ||e||^2 - 2 x.e in double (the differences
  // x_d - e_d of row 150 round to x_d even in double).
  const auto expanded_ref = [](const RowMatrix<float>& c, const RowMatrix<float>& xx) {
    IndexVector r(xx.rows());
    for (Index i = 0; i < xx.rows(); ++i) {
      double b = std::numeric_limits<double>::infinity();
      for (Index k = 0; k < c.rows(); ++k) {
        const double v = c.row(k).cast<double>().squaredNorm() -
                         2.0 * c.row(k).cast<double>().dot(xx.row(i).cast<double>());
        if (v < b) { b = v; r[i] = k; }
      }
    }
    return r;
  };
  CHECK(a == expanded_ref(c2, big_x));
  // Codes with huge norms: unscaled, the whole search takes the generic path.
  RowMatrix<float> big_c = c2;
  big_c.row(3).setConstant(3e19f);
#if VQKIT_K512
  if (avx512_search_supported())
    REQUIRE_FALSE(detail::nearest_code_avx512(cpu{1}, big_c, big_x, a, nullptr, SearchOptions{}, nullptr));
#endif
  nearest_code<float>(cpu{2}, big_c, big_x, a);
  CHECK(a == expanded_ref(big_c, big_x));
  // Cosine: a code whose squared norm overflows has 1/||e|| = 0 like a zero
  // code, but its dot products can overflow: it must not reach the kernel.
  big_c.row(3).setConstant(1e38f);
  big_x.row(150).setConstant(1e17f);  // ||x||^2 < 1e37: a kernel row
  SearchOptions cosine;
  cosine.metric = Metric::cosine;
#if VQKIT_K512
  if (avx512_search_supported())
    REQUIRE_FALSE(detail::nearest_code_avx512(cpu{1}, big_c, big_x, a, nullptr, cosine, nullptr));
#endif
  detail::nearest_code_unchecked<float>(cpu{2}, big_c, big_x, a, nullptr, cosine, nullptr);
  detail::nearest_code_gemm_tiles<float>(cpu{1}, big_c, big_x, b, nullptr, cosine, nullptr);
  CHECK(a == b);
  nearest_code<float>(cpu{2}, big_c, big_x, a, nullptr, cosine);
  brute_force(big_c, big_x, Metric::cosine, ref, refd);
  CHECK(a == ref);
}

// ---- Precision::bf16_rerank: bf16 dot products + exact fp32 re-rank -----------

namespace {

/// The fp32 and the bf16_rerank search on the same input: indices and
/// distances must be identical (bit for bit), for 1, 2 and 3 threads.
/// Returns the number of re-ranked pairs of the 2-thread run.
Index require_bf16_equals_fp32(const RowMatrix<float>& codes, const RowMatrix<float>& x, Metric metric) {
  SearchOptions opt;
  opt.metric = metric;
  SearchStats fst;
  IndexVector ref(x.rows());
  Vector<float> refd;
  nearest_code<float>(cpu{2}, codes, x, ref, &refd, opt, nullptr, SearchMode{Precision::fp32, &fst});
  CHECK(fst.precision == Precision::fp32);
  Index reranked = 0;
  for (int threads : {2, 1, 3}) {
    SearchStats st;
    IndexVector idx(x.rows());
    Vector<float> dist;
    nearest_code<float>(cpu{threads}, codes, x, idx, &dist, opt, nullptr,
                        SearchMode{Precision::bf16_rerank, &st});
    CHECK(st.precision == (bf16_search_supported() ? Precision::bf16_rerank : Precision::fp32));
    Index bad = 0;
    for (Index i = 0; i < x.rows(); ++i) bad += idx[i] != ref[i] || dist[i] != refd[i];
    REQUIRE(bad == 0);
    if (threads == 2) reranked = st.reranked;
    if (st.precision == Precision::bf16_rerank) CHECK(st.reranked >= x.rows());  // >= 1 per row
  }
  return reranked;
}

}  // namespace

TEST_CASE("bf16_rerank: identical to the fp32 search on random data", "[search][bf16]") {
  if (!bf16_search_supported()) WARN("no AVX512-BF16 here (or no AVX-512 build): the fp32 search serves");
  for (Index D : {1, 17, 32, 33, 64, 100, 256, 784, 1024}) {
    for (auto metric : {Metric::l2, Metric::cosine}) {
      INFO("D = " << D << ", " << to_string(metric));
      const Index N = D >= 512 ? 150 : 333, K = D >= 512 ? 97 : 203;
      const auto codes = test::gaussian<float>(K, D, 100 + std::uint64_t(D));
      const auto x = test::gaussian<float>(N, D, 200 + std::uint64_t(D));
      const Index reranked = require_bf16_equals_fp32(codes, x, metric);
      if (bf16_search_supported() && D >= 32) CHECK(reranked < N * K / 4);  // the bound prunes
    }
  }
}

TEST_CASE("bf16_rerank: near-ties far below bf16's resolution are resolved exactly", "[search][bf16]") {
  // Codes that differ by ~1e-4 relative: bf16 (8-bit significands) cannot
  // tell them apart, so the approximate pass alone would pick by rounding
  // noise; the exact re-rank must reproduce the fp32 winner, and its
  // distances, bit for bit. And exact duplicates: ties to the lowest index.
  for (Index D : {64, 256}) {
    const auto base = test::gaussian<float>(8, D, 7);
    const auto jitter = test::gaussian<float>(96, D, 8, 1e-4);
    RowMatrix<float> codes(104, D);
    for (Index k = 0; k < 96; ++k) codes.row(k) = base.row(k % 8) + jitter.row(k);
    codes.bottomRows(8) = codes.topRows(8);  // codes 96..103 duplicate 0..7
    RowMatrix<float> x = test::gaussian<float>(257, D, 9, 0.01);
    for (Index i = 0; i < x.rows(); ++i) x.row(i) += base.row(i % 8);
    for (auto metric : {Metric::l2, Metric::cosine}) {
      INFO("D = " << D << ", " << to_string(metric));
      const Index reranked = require_bf16_equals_fp32(codes, x, metric);
      if (bf16_search_supported()) CHECK(reranked >= 2 * x.rows());  // near-ties: several candidates
    }
  }
}

TEST_CASE("bf16_rerank: small integers with exact ties", "[search][bf16]") {
  for (Index D : {6, 19, 64, 100}) {
    auto base = test::small_integers<float>(41, D, 3);
    RowMatrix<float> codes(123, D);
    codes << base, base, base;  // codes k, k+41, k+82 are equal
    const auto x = test::small_integers<float>(301, D, 4);
    for (auto metric : {Metric::l2, Metric::cosine}) {
      INFO("D = " << D << ", " << to_string(metric));
      require_bf16_equals_fp32(codes, x, metric);
      SearchOptions opt;
      opt.metric = metric;
      auto r = nearest_code<float>(cpu{2}, codes, x, opt, SearchMode{Precision::bf16_rerank});
      IndexVector ref;
      Vector<double> refd;
      brute_force(codes, x, metric, ref, refd);
      for (Index i = 0; i < x.rows(); ++i) {
        REQUIRE(r.indices[i] < 41);  // the lowest of three equal codes
        if (metric == Metric::l2) REQUIRE(r.indices[i] == ref[i]);  // exact integer arithmetic
      }
    }
  }
}

TEST_CASE("bf16_rerank: identical to fp32 on GloVe and MNIST", "[search][bf16][data]") {
  const std::string glove = test::data_file("vectors/glove100/glove100_base_10k.fvecs");
  const std::string mnist = test::data_file("vectors/mnist10k/mnist10k_784d.bvecs");
  if (glove.empty() || mnist.empty()) VQKIT_SKIP("GloVe or MNIST absent under VQKIT_TEST_DATA_DIR");
  {
    const RowMatrix<float> all = io::read_fvecs(glove, 1800);  // D = 100
    const RowMatrix<float> codes = all.topRows(300), x = all.bottomRows(1500);
    for (auto metric : {Metric::l2, Metric::cosine}) require_bf16_equals_fp32(codes, x, metric);
  }
  {
    const RowMatrix<float> all = io::read_bvecs(mnist, 1400);  // D = 784, pixels 0..255
    const RowMatrix<float> codes = all.topRows(200), x = all.bottomRows(1200);
    for (auto metric : {Metric::l2, Metric::cosine}) require_bf16_equals_fp32(codes, x, metric);
  }
}

TEST_CASE("bf16_rerank: falls back to fp32 without an error, and says so", "[search][bf16]") {
  const auto codes = test::gaussian<float>(50, 40, 1);
  const auto x = test::gaussian<float>(70, 40, 2);
  SearchStats st;
  const SearchMode bf{Precision::bf16_rerank, &st};
  IndexVector ref(70), idx(70);
  nearest_code<float>(cpu{2}, codes, x, ref);
  // CPU feature missing (simulated): the fp32 search runs.
  detail::bf16_disabled = true;
  CHECK_FALSE(bf16_search_supported());
  nearest_code<float>(cpu{2}, codes, x, idx, nullptr, {}, nullptr, bf);
  detail::bf16_disabled = false;
  CHECK(st.precision == Precision::fp32);
  CHECK(st.reranked == 0);
  CHECK(idx == ref);
  // double: always the double search.
  const RowMatrix<double> cd = codes.cast<double>(), xd = x.cast<double>();
  IndexVector idd(70);
  st.precision = Precision::bf16_rerank;
  nearest_code<double>(cpu{2}, cd, xd, idd, nullptr, {}, nullptr, bf);
  CHECK(st.precision == Precision::fp32);
  // Where it runs, it says so.
  nearest_code<float>(cpu{2}, codes, x, idx, nullptr, {}, nullptr, bf);
  CHECK(st.precision == (bf16_search_supported() ? Precision::bf16_rerank : Precision::fp32));
  CHECK(idx == ref);
}
