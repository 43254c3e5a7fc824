// Reliability: non-finite input, extreme values and sizes, determinism.
// (The basic NaN/-Inf rejection and NonFinitePolicy::skip cases live in
// test_vector_quantizer.cpp; save/load resumption in test_checkpoint.cpp.)
// See docs/reliability.md for the guarantees these tests back.
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>
#include <vqkit/io/checkpoint.hpp>
#include <vqkit/vqkit.hpp>

#include "test_util.hpp"

using namespace vqkit;
using Bytes = std::vector<std::uint8_t>;

namespace {

template <class M>
bool same_bits(const M& a, const M& b) {
  using S = typename M::Scalar;
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), sizeof(S) * static_cast<std::size_t>(a.size())) == 0);
}

/// "" when the two states agree bit for bit in every field, else the first
/// field that differs.
template <class T>
std::string state_diff(const typename VectorQuantizer<T>::State& a,
                       const typename VectorQuantizer<T>::State& b) {
  if (!same_bits(a.codes, b.codes)) return "codes";
  if (!same_bits(a.grad, b.grad)) return "grad";
  if (!same_bits(a.ema.cluster_size, b.ema.cluster_size)) return "ema.cluster_size";
  if (!same_bits(a.ema.embed_sum, b.ema.embed_sum)) return "ema.embed_sum";
  if (!same_bits(a.steps_since_used, b.steps_since_used)) return "steps_since_used";
  if (!same_bits(a.used_since_reset, b.used_since_reset)) return "used_since_reset";
  if (!same_bits(a.bank, b.bank)) return "bank";
  if (a.bank_size != b.bank_size || a.bank_head != b.bank_head) return "bank size/head";
  if (a.bank_overflow != b.bank_overflow) return "bank_overflow";
  if (a.rng != b.rng) return "rng";
  if (a.step != b.step || a.reinits != b.reinits || a.replaced != b.replaced) return "counters";
  if (a.skipped != b.skipped) return "skipped";
  if (a.data_initialized != b.data_initialized || a.init_refined != b.init_refined) return "flags";
  if (a.training != b.training) return "training";
  return "";
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const vqkit::error& e) {
    return e.what();
  }
  return "no exception";
}

/// Squared L2 distances in double from row x to every code.
template <class T>
std::vector<double> distances(const RowMatrix<T>& codes, const T* x) {
  const Index K = codes.rows(), D = codes.cols();
  std::vector<double> d(static_cast<std::size_t>(K));
  for (Index k = 0; k < K; ++k) {
    const T* e = codes.data() + k * D;
    double s = 0;
    for (Index j = 0; j < D; ++j) {
      const double r = double(x[j]) - double(e[j]);
      s += r * r;
    }
    d[static_cast<std::size_t>(k)] = s;
  }
  return d;
}

/// Checks each row's chosen code against brute force in double: its distance
/// is the smallest up to rel (relative) + abs; returns how many rows chose
/// exactly the brute-force argmin (first minimum; near-ties may differ).
template <class T>
Index check_nearest(const RowMatrix<T>& codes, const RowMatrix<T>& x, const IndexVector& idx,
                    double rel, double abs = 0) {
  REQUIRE(idx.size() == x.rows());
  Index exact = 0;
  for (Index i = 0; i < x.rows(); ++i) {
    REQUIRE(idx[i] >= 0);
    REQUIRE(idx[i] < codes.rows());
    const auto d = distances(codes, x.data() + i * x.cols());
    std::size_t best = 0;
    for (std::size_t k = 1; k < d.size(); ++k)
      if (d[k] < d[best]) best = k;
    const double got = d[static_cast<std::size_t>(idx[i])];
    INFO("row " << i << ": chose " << idx[i] << " at " << got << ", best " << best << " at "
                << d[best]);
    REQUIRE(got <= d[best] * (1 + rel) + abs);
    if (static_cast<std::size_t>(idx[i]) == best) ++exact;
  }
  return exact;
}

/// Mean squared distance per element (the default Reduction::mean) of the
/// chosen codes, in double.
template <class T>
double brute_distortion(const RowMatrix<T>& codes, const RowMatrix<T>& x, const IndexVector& idx) {
  double s = 0;
  for (Index i = 0; i < x.rows(); ++i)
    s += distances(codes, x.data() + i * x.cols())[static_cast<std::size_t>(idx[i])];
  return s / (double(x.rows()) * double(x.cols()));
}

template <class T>
void require_finite_state(const VectorQuantizer<T>& vq) {
  REQUIRE(vq.codebook().allFinite());
  REQUIRE(vq.ema_state().cluster_size.allFinite());
  REQUIRE(vq.ema_state().embed_sum.allFinite());
  REQUIRE(vq.codebook_grad().allFinite());
}

/// K Gaussian centres at `scale` and N rows, each a random centre plus noise
/// of 5% of the scale (sample_seed picks the rows and the noise).
template <class T>
struct Clusters {
  RowMatrix<T> centres, x;
};
template <class T>
Clusters<T> clusters(Index K, Index N, Index D, double scale, std::uint64_t seed,
                     std::uint64_t sample_seed = 0) {
  Clusters<T> c;
  const RowMatrix<double> base = test::gaussian<double>(K, D, seed);
  c.centres = (base * scale).template cast<T>();
  const RowMatrix<double> noise = test::gaussian<double>(N, D, seed + 1000 + sample_seed, 0.05);
  Rng pick(seed + 2000 + sample_seed);
  c.x.resize(N, D);
  for (Index i = 0; i < N; ++i)
    c.x.row(i) = ((base.row(Index(pick.below(std::uint64_t(K)))) + noise.row(i)) * scale)
                     .template cast<T>();
  return c;
}

/// Absolute slack for distances of unit-scale data: rounding of the search's
/// ||e||^2 - 2 x.e expansion in T.
template <class T>
constexpr double unit_abs = std::is_same_v<T, float> ? 1e-4 : 1e-12;

VectorQuantizerConfig small_config(Index K, Index D, std::uint64_t seed = 3) {
  VectorQuantizerConfig c;
  c.codebook_size = K;
  c.dim = D;
  c.seed = seed;
  return c;
}

}  // namespace

// ---- non-finite input -----------------------------------------------------------

TEMPLATE_TEST_CASE("NaN and +-Inf are rejected in train, gradient and eval mode, naming the entry",
                   "[reliability][nonfinite]", float, double) {
  using T = TestType;
  const auto mode = GENERATE(as<std::string>{}, "train-ema", "train-gradient", "eval");
  const T bad = GENERATE(std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                         -std::numeric_limits<T>::infinity());
  INFO("mode " << mode << ", value " << bad);
  auto cfg = small_config(16, 6);
  if (mode == "train-gradient") cfg.update = CodebookUpdate::gradient;
  VectorQuantizer<T> vq(cfg), twin(cfg);
  RowMatrix<T> q;
  vq.forward(test::gaussian<T>(40, 6, 1), q);
  twin.forward(test::gaussian<T>(40, 6, 1), q);
  if (mode == "eval") {
    vq.eval();
    twin.eval();
  }
  const auto before = vq.state();
  RowMatrix<T> x = test::gaussian<T>(20, 6, 2);
  x(13, 4) = bad;
  const std::string msg = error_of([&] { vq.forward(x, q); });
  CHECK_THAT(msg, Catch::StartsWith("VectorQuantizer::forward: x holds a non-finite value (") &&
                      Catch::EndsWith(") at row 13, column 4"));
  CHECK(state_diff<T>(before, vq.state()) == "");
  // The rejected batch left no trace: the next batch gives what a quantizer
  // that never saw it gives.
  const auto good = test::gaussian<T>(20, 6, 3);
  RowMatrix<T> q1, q2;
  const auto c1 = vq.forward(good, q1);
  const auto c2 = twin.forward(good, q2);
  CHECK(c1.indices == c2.indices);
  CHECK(state_diff<T>(vq.state(), twin.state()) == "");
}

TEMPLATE_TEST_CASE("set_codebook and the primitives reject non-finite values", "[reliability][nonfinite]",
                   float, double) {
  using T = TestType;
  const T nan = std::numeric_limits<T>::quiet_NaN(), inf = std::numeric_limits<T>::infinity();
  VectorQuantizer<T> vq(small_config(8, 4));
  const auto before = vq.state();
  RowMatrix<T> codes = test::gaussian<T>(8, 4, 1);
  codes(5, 2) = inf;
  CHECK_THAT(error_of([&] { vq.set_codebook(codes); }),
             Catch::Contains("set_codebook: codes holds a non-finite value (inf) at row 5, column 2"));
  CHECK(state_diff<T>(before, vq.state()) == "");

  codes(5, 2) = nan;
  const RowMatrix<T> x = test::gaussian<T>(10, 4, 2);
  IndexVector idx(10);
  CHECK_THAT(error_of([&] { nearest_code<T>(cpu{}, codes, x, idx); }),
             Catch::Contains("nearest_code: codes holds a non-finite value"));
  RowMatrix<T> data = test::gaussian<T>(30, 4, 3);
  data(29, 0) = -inf;
  KMeansOptions ko;
  ko.k = 4;
  Rng rng(1);
  const auto rng_before = rng.state();
  CHECK_THAT(error_of([&] { kmeans<T>(cpu{}, data, ko, rng); }),
             Catch::Contains("kmeans: data holds a non-finite value (-inf) at row 29, column 0"));
  CHECK(rng.state() == rng_before);
  EmaState<T> st;
  Vector<T> counts = Vector<T>::Ones(8);
  counts[3] = nan;
  CHECK_THAT(error_of([&] { ema_reset<T>(st, test::gaussian<T>(8, 4, 4), counts); }),
             Catch::Contains("every initial cluster size must be > 0"));
  CHECK(st.cluster_size.size() == 0);
}

TEMPLATE_TEST_CASE("NonFinitePolicy::skip: a skipped batch leaves no trace but the count",
                   "[reliability][nonfinite]", float, double) {
  using T = TestType;
  auto cfg = small_config(16, 6);
  cfg.non_finite = NonFinitePolicy::skip;
  auto strict = cfg;
  strict.non_finite = NonFinitePolicy::reject;
  VectorQuantizer<T> vq(cfg), never(strict);
  RowMatrix<T> q;
  for (int s = 0; s < 3; ++s) {
    vq.forward(test::gaussian<T>(30, 6, 10 + std::uint64_t(s)), q);
    never.forward(test::gaussian<T>(30, 6, 10 + std::uint64_t(s)), q);
  }
  // Finite batches go through as under the default policy.
  CHECK(state_diff<T>(vq.state(), never.state()) == "");

  RowMatrix<T> bad = test::gaussian<T>(30, 6, 20);
  bad(0, 0) = std::numeric_limits<T>::infinity();
  bad(29, 5) = std::numeric_limits<T>::quiet_NaN();
  auto ctx = vq.forward(bad, q);
  CHECK(ctx.skipped);
  CHECK(ctx.training);
  CHECK(q.rows() == 0);
  CHECK(vq.skipped_batches() == 1);
  for (int s = 0; s < 3; ++s) {
    const auto x = test::gaussian<T>(30, 6, 30 + std::uint64_t(s));
    RowMatrix<T> qa, qb;
    CHECK(vq.forward(x, qa).indices == never.forward(x, qb).indices);
    CHECK(same_bits(qa, qb));
  }
  auto a = vq.state();
  CHECK(a.skipped == 1);
  a.skipped = 0;
  CHECK(state_diff<T>(a, never.state()) == "");

  // In eval mode a skipped batch changes nothing at all, not even the count
  // (eval mode never changes the state).
  vq.eval();
  const auto before = vq.state();
  ctx = vq.forward(bad, q);
  CHECK(ctx.skipped);
  CHECK_FALSE(ctx.training);
  CHECK(state_diff<T>(before, vq.state()) == "");
}

// ---- extreme values -------------------------------------------------------------

TEMPLATE_TEST_CASE("huge inputs (1e18 entries): nearest codes match brute force, nothing overflows",
                   "[reliability][range]", float, double) {
  using T = TestType;
  // float's squared norms reach FLT_MAX ~ 3.4e38 at D ~ 340 for entries of
  // 1e18 (see docs/reliability.md): stay below; double has room to spare.
  const int pick = GENERATE(0, 1, 2);
  const Index D = std::is_same_v<T, float> ? std::array<Index, 3>{1, 8, 64}[pick]
                                           : std::array<Index, 3>{1, 8, 512}[pick];
  INFO("D = " << D);
  const Index K = 16, N = 256;
  const double scale = 1e18;
  const auto c = clusters<T>(K, N, D, scale, 7);
  IndexVector idx(N);
  Vector<T> dist;
  nearest_code<T>(cpu{}, c.centres, c.x, idx, &dist);
  CHECK(check_nearest(c.centres, c.x, idx, 1e-5) >= N - 2);  // D = 1 may hold a near-tie
  REQUIRE(dist.allFinite());
  for (Index i = 0; i < N; ++i) {
    const double ref = distances(c.centres, c.x.data() + i * D)[std::size_t(idx[i])];
    const double xn2 = c.x.row(i).template cast<double>().squaredNorm();
    CHECK(std::abs(double(dist[i]) - ref) <= 1e-5 * (ref + xn2));  // the expansion's rounding
  }

  // The quantizer: k-means init on the first batch, the refining k-means
  // when the bank (20 K = 320 rows) fills on the second, then EMA steps.
  VectorQuantizer<T> vq(small_config(K, D), cpu{2});
  RowMatrix<T> q;
  auto ctx = vq.forward(c.x, q);
  REQUIRE(ctx.data_initialized);
  require_finite_state(vq);
  int checked = 0;
  for (int s = 1; s <= 4; ++s) {
    const RowMatrix<T> x = clusters<T>(K, N, D, scale, 7, std::uint64_t(s)).x;  // same centres
    const RowMatrix<T> codes = vq.codebook();
    ctx = vq.forward(x, q);
    require_finite_state(vq);
    if (ctx.data_initialized) continue;  // the search used the new k-means codes
    ++checked;
    check_nearest(codes, x, ctx.indices, 1e-4);
    REQUIRE(std::isfinite(ctx.loss.total));
    CHECK(ctx.loss.distortion == Approx(brute_distortion(codes, x, ctx.indices)).epsilon(1e-4));
    require_finite_state(vq);
    CHECK(ctx.metrics.usage >= 12);  // no collapse: k-means found (nearly) all 16 clusters
  }
  CHECK(checked >= 3);
}

TEMPLATE_TEST_CASE("tiny and subnormal inputs give defined results", "[reliability][range]", float,
                   double) {
  using T = TestType;
  const Index K = 16, N = 200, D = 8;
  SECTION("tiny but with normal squares: exact as at unit scale") {
    const double scale = std::is_same_v<T, float> ? 1e-15 : 1e-150;
    const auto c = clusters<T>(K, N, D, scale, 9);
    IndexVector idx(N);
    nearest_code<T>(cpu{}, c.centres, c.x, idx);
    CHECK(check_nearest(c.centres, c.x, idx, 1e-5) == N);
    VectorQuantizer<T> vq(small_config(K, D), cpu{2});
    RowMatrix<T> q;
    vq.forward(c.x, q);  // k-means init
    vq.forward(c.x, q);  // the bank (320 rows) fills: refining k-means
    const RowMatrix<T> codes = vq.codebook();
    const auto ctx = vq.forward(c.x, q);
    REQUIRE_FALSE(ctx.data_initialized);
    check_nearest(codes, c.x, ctx.indices, 1e-4);
    CHECK(ctx.metrics.usage >= 12);
    CHECK(ctx.loss.distortion == Approx(brute_distortion(codes, c.x, ctx.indices)).epsilon(1e-4));
    require_finite_state(vq);
  }
  SECTION("subnormal: finite codes and loss, indices in range") {
    // Squared distances underflow to 0 in T: every code is at distance 0 and
    // the search returns the lowest index (its tie rule). The loss, summed
    // in double, stays exact for float input.
    const double scale = std::is_same_v<T, float> ? 1e-41 : 1e-310;
    const auto c = clusters<T>(K, N, D, scale, 11);
    REQUIRE(std::fpclassify(c.x(0, 0)) == FP_SUBNORMAL);
    IndexVector idx(N);
    Vector<T> dist;
    nearest_code<T>(cpu{}, c.centres, c.x, idx, &dist);
    for (Index i = 0; i < N; ++i) {
      REQUIRE(idx[i] >= 0);
      REQUIRE(idx[i] < K);
    }
    CHECK(dist.allFinite());
    CHECK((dist.array() >= T(0)).all());
    VectorQuantizer<T> vq(small_config(K, D), cpu{2});
    RowMatrix<T> q;
    for (int s = 0; s < 3; ++s) {
      const auto ctx = vq.forward(c.x, q);
      REQUIRE(std::isfinite(ctx.loss.total));
      REQUIRE(ctx.loss.total >= 0);
      REQUIRE(ctx.loss.total < 1e-60);
      require_finite_state(vq);
      REQUIRE(std::isfinite(ctx.metrics.perplexity));
    }
  }
}

// Float input whose squared norms or dot products leave float's range:
// nearest_code scales x and the codes by one power of two (exact) into its
// safe band (docs/reliability.md, "Numbers"); before that fix the search
// returned far codes here (ties of inf, or of 0 for subnormal input).
// Checked against brute force in double; also through k-means (its seeding
// computes distances in double) and the whole quantizer.
TEST_CASE("float search outside float's squared range still finds the nearest code",
          "[reliability][range][nearest_code_range]") {
  struct Case {
    Index D;
    double scale;
  };
  const Case cases[] = {{512, 1e18}, {8, 1e19}, {8, 1e-41}, {300, 1e-41}, {64, 1e-30}, {1, 1e19}};
  for (const auto& c : cases) {
    INFO("D = " << c.D << ", scale " << c.scale);
    const auto cl = clusters<float>(16, 256, c.D, c.scale, 7);
    for (auto precision : {Precision::fp32, Precision::bf16_rerank}) {
      IndexVector idx(256);
      Vector<float> dist;
      SearchStats st;
      nearest_code<float>(cpu{2}, cl.centres, cl.x, idx, &dist, SearchOptions{}, nullptr,
                          SearchMode{precision, &st});
      CHECK(st.scale_exponent != 0);
      CHECK(check_nearest(cl.centres, cl.x, idx, 1e-4) >= 254);
      // Distances: the expansion's rounding at the scaled problem, scaled
      // back (subnormal input: the true distances, ~1e-84, underflow to 0).
      for (Index i = 0; i < 256; ++i) {
        const double ref = distances(cl.centres, cl.x.data() + i * c.D)[std::size_t(idx[i])];
        const double xn2 = cl.x.row(i).template cast<double>().squaredNorm();
        REQUIRE(std::isfinite(dist[i]));
        CHECK(std::abs(double(dist[i]) - ref) <= 1e-5 * (ref + xn2) + 1e-45);
      }
    }
    // k-means: the seeding and the Lloyd searches; the final assignment is
    // the nearest centroid (brute force) and the inertia its distortion.
    KMeansOptions ko;
    ko.k = 16;
    ko.iterations = 3;
    Rng rng(5);
    const auto km = kmeans<float>(cpu{2}, cl.x, ko, rng);
    REQUIRE(km.centroids.allFinite());
    IndexVector a(256);
    nearest_code<float>(cpu{1}, km.centroids, cl.x, a);
    check_nearest(km.centroids, cl.x, a, 1e-4);
    CHECK((km.counts.array() > 0).all());
    CHECK(km.empty_splits <= 4);  // 16 well-separated clusters: the seeding finds (nearly) all
  }
}

TEST_CASE("inside float's safe range the search is not rescaled (bit-identical results)",
          "[reliability][range][nearest_code_range]") {
  // Powers of two of every size inside the band give the same indices, and
  // distances scaled by the square of the factor, exactly (the arithmetic
  // only shifts exponents); the band's edges are 2^-40 and 4 D m^2 <= 2^100.
  const auto base = clusters<float>(16, 300, 37, 1.0, 3);
  IndexVector ref(300);
  Vector<float> refd;
  SearchStats st;
  const SearchOptions opt;
  const SearchMode mode{Precision::fp32, &st};
  nearest_code<float>(cpu{2}, base.centres, base.x, ref, &refd, opt, nullptr, mode);
  CHECK(st.scale_exponent == 0);
  for (int e : {-36, -20, 20, 40, 46, 47, 60, -60, -100}) {
    INFO("scale 2^" << e);
    const RowMatrix<float> c = base.centres.unaryExpr([e](float v) { return std::ldexp(v, e); });
    const RowMatrix<float> x = base.x.unaryExpr([e](float v) { return std::ldexp(v, e); });
    IndexVector idx(300);
    Vector<float> d;
    nearest_code<float>(cpu{2}, c, x, idx, &d, opt, nullptr, mode);
    const double m = double(std::max(detail::max_abs(c), detail::max_abs(x)));
    const bool in_band = m >= 0x1p-40 && 4.0 * 64 * m * m <= 0x1p100;  // 64 >= D = 37
    if (in_band) CHECK(st.scale_exponent == 0);
    if (m * m * 4 * 37 > 0x1p100 || m < 0x1p-40) CHECK(st.scale_exponent != 0);
    CHECK(idx == ref);
    for (Index i = 0; i < 300; ++i)
      CHECK(d[i] == std::ldexp(refd[i], 2 * e));  // the same arithmetic, shifted
  }
}

// ---- extreme sizes --------------------------------------------------------------

TEMPLATE_TEST_CASE("D = 1: L2 and cosine", "[reliability][sizes]", float, double) {
  using T = TestType;
  const auto metric = GENERATE(Metric::l2, Metric::cosine);
  auto cfg = small_config(8, 1);
  cfg.metric = metric;
  VectorQuantizer<T> vq(cfg, cpu{2});
  RowMatrix<T> q;
  vq.forward(test::gaussian<T>(300, 1, 1), q);  // k-means init
  for (int s = 0; s < 5; ++s) {
    const auto x = test::gaussian<T>(300, 1, 2 + std::uint64_t(s));
    const RowMatrix<T> codes = vq.codebook();
    const auto ctx = vq.forward(x, q);
    if (metric == Metric::l2) {
      check_nearest(codes, x, ctx.indices, 1e-5, unit_abs<T>);
      CHECK(ctx.loss.distortion == Approx(brute_distortion(codes, x, ctx.indices)).epsilon(1e-5));
    } else {
      // In one dimension the cosine is the sign: a row picks a code of its sign.
      for (Index i = 0; i < x.rows(); ++i)
        if (x(i, 0) != T(0) && (codes.array() > T(0)).any() && (codes.array() < T(0)).any())
          REQUIRE((x(i, 0) > T(0)) == (codes(ctx.indices[i], 0) > T(0)));
    }
    require_finite_state(vq);
  }
}

TEMPLATE_TEST_CASE("K = 1: one code at the data mean, metrics of a single code", "[reliability][sizes]",
                   float, double) {
  using T = TestType;
  const auto policy =
      GENERATE(DeadCodePolicy::kmeans_reinit, DeadCodePolicy::replace, DeadCodePolicy::none);
  auto cfg = small_config(1, 5);
  cfg.dead.policy = policy;
  VectorQuantizer<T> vq(cfg, cpu{2});
  RowMatrix<T> q, dx;
  for (int s = 0; s < 6; ++s) {
    const auto x = test::gaussian<T>(50, 5, 40 + std::uint64_t(s), 2.0);
    const RowMatrix<T> codes = vq.codebook();
    const auto ctx = vq.forward(x, q);
    REQUIRE((ctx.indices.array() == 0).all());
    if (s == 0) {
      // The bank (20 K = 20 rows) keeps 20 of the 50 rows; k-means with k = 1
      // over them is their mean m, with N = 50 (rows per step), M = 50 m.
      // The EMA step then gives (0.99 * 50 m + 0.01 * sum(x)) / 50.
      REQUIRE(ctx.data_initialized);
      REQUIRE(vq.memory_bank().size() == 20);
      const Eigen::Matrix<double, 1, Eigen::Dynamic> bank_mean =
          vq.memory_bank().rows().template cast<double>().colwise().mean();
      const Eigen::Matrix<double, 1, Eigen::Dynamic> expect =
          0.99 * bank_mean + 0.01 * x.template cast<double>().colwise().mean();
      CHECK((vq.codebook().template cast<double>() - expect).norm() <= 1e-5 * (1 + expect.norm()));
    } else {
      CHECK(ctx.loss.distortion == Approx(brute_distortion(codes, x, ctx.indices)).epsilon(1e-6));
    }
    CHECK(ctx.metrics.usage == 1);
    CHECK(ctx.metrics.perplexity == 1.0);
    CHECK(ctx.metrics.entropy == 0.0);
    CHECK(ctx.metrics.normalized_entropy == 1.0);
    CHECK(ctx.metrics.dead == 0);
    CHECK(ctx.metrics.health == Health::healthy);
    vq.backward(ctx, RowMatrix<T>(0, 5), &dx);
    REQUIRE(dx.allFinite());
    require_finite_state(vq);
  }
  CHECK(vq.reinit_count() == 0);
  CHECK(vq.replaced_count() == 0);
}

TEST_CASE("K = 65536 with N = 512 and N = 1", "[reliability][sizes]") {
  const Index K = 65536, D = 4;
  auto cfg = small_config(K, D);  // k-means init waits for 2 K bank rows: normalised codes serve
  VectorQuantizer<float> vq(cfg, cpu{2});
  RowMatrix<float> q;
  const auto x = test::gaussian<float>(512, D, 1, 2.0);
  const RowMatrix<float> codes = vq.codebook();
  auto ctx = vq.forward(x, q);
  CHECK_FALSE(ctx.data_initialized);
  check_nearest(codes, x, ctx.indices, 1e-5, unit_abs<float>);
  CHECK(ctx.loss.distortion == Approx(brute_distortion(codes, x, ctx.indices)).epsilon(1e-5));
  CHECK(ctx.metrics.usage <= 512);
  CHECK(ctx.metrics.usage >= 400);  // 512 rows among 65536 codes rarely share one
  CHECK(std::isfinite(ctx.metrics.perplexity));
  CHECK(ctx.metrics.health == Health::healthy);  // judged against min(K, N) = 512
  require_finite_state(vq);

  const auto one = test::gaussian<float>(1, D, 2);
  const RowMatrix<float> codes2 = vq.codebook();
  ctx = vq.forward(one, q);
  check_nearest(codes2, one, ctx.indices, 1e-5, unit_abs<float>);
  CHECK(ctx.metrics.usage == 1);
  CHECK(ctx.metrics.perplexity == 1.0);
  require_finite_state(vq);
  CHECK(vq.step() == 2);
}

TEMPLATE_TEST_CASE("N = 1: single-row batches, through the k-means init", "[reliability][sizes]",
                   float, double) {
  using T = TestType;
  const Index K = 16, D = 8;
  VectorQuantizer<T> vq(small_config(K, D), cpu{2});
  RowMatrix<T> q, dx;
  bool initialized = false;
  for (int s = 0; s < 40; ++s) {
    const auto x = test::gaussian<T>(1, D, 60 + std::uint64_t(s));
    const RowMatrix<T> codes = vq.codebook();
    const auto ctx = vq.forward(x, q);
    initialized = initialized || ctx.data_initialized;
    if (!ctx.data_initialized) {
      check_nearest(codes, x, ctx.indices, 1e-5, unit_abs<T>);
      CHECK(ctx.loss.distortion == Approx(brute_distortion(codes, x, ctx.indices)).epsilon(1e-5));
    }
    CHECK(ctx.metrics.batch_rows == 1);
    CHECK(ctx.metrics.usage == 1);
    CHECK(ctx.metrics.perplexity == 1.0);
    CHECK(ctx.metrics.health == Health::healthy);
    const auto dq = test::gaussian<T>(1, D, 90 + std::uint64_t(s));
    vq.backward(ctx, dq, &dx);
    // dx = dq + 2 commitment_weight r / (N D)
    const RowMatrix<T> expect = dq + (T(2) / T(D)) * ctx.residual;
    CHECK((dx - expect).norm() <= T(1e-5) * (T(1) + expect.norm()));
    require_finite_state(vq);
  }
  CHECK(initialized);  // the 32nd row filled init_rows() = 2 K
}

// ---- configuration limits ----------------------------------------------------------

TEST_CASE("configs whose sizes would overflow are rejected", "[reliability][config]") {
  auto cfg = small_config(8, 4);
  cfg.codebook_size = Index(1) << 62;  // 20 * K, the default bank, would overflow
  CHECK_THROWS_AS(cfg.validate(), vqkit::error);
  cfg.codebook_size = std::numeric_limits<Index>::max();
  CHECK_THROWS_AS(cfg.validate(), vqkit::error);
  // From checkpoint metadata too (load_quantizer's first step).
  auto meta = config_to_metadata(small_config(8, 4));
  meta["codebook_size"] = std::to_string(std::numeric_limits<Index>::max());
  CHECK_THROWS_AS(config_from_metadata(meta), vqkit::error);
}

TEST_CASE("a checkpoint with counters at the int64 limit is refused", "[reliability][checkpoint]") {
  // Such counters cannot come from a real run, and the next step would
  // overflow them.
  const auto cfg = small_config(4, 3);
  VectorQuantizer<float> src(cfg);
  RowMatrix<float> q;
  src.forward(test::gaussian<float>(10, 3, 1), q);
  const auto big = std::numeric_limits<std::int64_t>::max();
  for (const std::string name : {"step", "reinits", "replaced", "skipped"}) {
    auto f = to_safetensors(src);
    f.tensors[name] = safetensors::from_scalar<std::int64_t>(big);
    VectorQuantizer<float> vq(cfg);
    const auto before = vq.state();
    CHECK_THAT(error_of([&] { from_safetensors(f, vq); }), Catch::Contains("counter"));
    CHECK(state_diff<float>(before, vq.state()) == "");
  }
  auto f = to_safetensors(src);
  f.tensors["usage.steps_since_used"] = safetensors::from_vector(std::vector<std::int64_t>(4, big));
  VectorQuantizer<float> vq(cfg);
  CHECK_THAT(error_of([&] { from_safetensors(f, vq); }), Catch::Contains("steps_since_used"));
}

TEST_CASE("a checkpoint's unused bank rows are zeroed on load and an impossible ring position is refused",
          "[reliability][checkpoint]") {
  auto cfg = small_config(4, 3);
  cfg.memory_bank_size = 64;
  VectorQuantizer<float> src(cfg);
  RowMatrix<float> q;
  src.forward(test::gaussian<float>(10, 3, 1), q);  // the bank holds 10 of 64 rows
  REQUIRE(src.memory_bank().size() == 10);
  const Bytes expect = safetensors::serialize(to_safetensors(src));

  // Garbage (even NaN) in rows no step reads is not data: accepted, and
  // dropped, so the loaded quantizer saves the very same bytes.
  auto f = to_safetensors(src);
  RowMatrix<float> rows = f.matrix<float>("memory_bank.rows");
  rows.bottomRows(54).setConstant(std::numeric_limits<float>::quiet_NaN());
  rows(63, 2) = 7.0f;
  f.tensors["memory_bank.rows"] = safetensors::from_matrix(rows);
  VectorQuantizer<float> vq(cfg);
  from_safetensors(f, vq);
  CHECK(vq.memory_bank().storage().bottomRows(54).isZero(0));
  CHECK(safetensors::serialize(to_safetensors(vq)) == expect);

  // A partly filled bank whose head is not at its end cannot come from a
  // run: the next push would expose an unwritten row.
  f = to_safetensors(src);
  f.tensors["memory_bank.head"] = safetensors::from_scalar<std::int64_t>(5);
  VectorQuantizer<float> other(cfg);
  const auto before = other.state();
  CHECK_THAT(error_of([&] { from_safetensors(f, other); }),
             Catch::Contains("head 5 must equal size 10"));
  CHECK(state_diff<float>(before, other.state()) == "");
}

TEST_CASE("error messages stay short whatever the hostile input", "[reliability][io]") {
  // nlohmann's parse errors quote the last token read; a header can make it
  // as long as itself.
  const std::string header = "{\"" + std::string(100000, 'a');
  Bytes b(8 + header.size());
  const std::uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  std::memcpy(b.data() + 8, header.data(), header.size());
  const std::string msg = error_of([&] { safetensors::parse(b); });
  CHECK_THAT(msg, Catch::Contains("header is not valid JSON") && Catch::Contains("line 1"));
  CHECK(msg.size() < 600);
}

// ---- determinism ----------------------------------------------------------------

namespace {

struct DetCase {
  const char* name;
  bool use_double;
  std::function<void(VectorQuantizerConfig&)> tweak;
  Index rows;  // per step
};

template <class T>
void run_thread_determinism(const DetCase& dc) {
  auto cfg = small_config(64, 12, 21);
  cfg.memory_bank_size = 256;
  cfg.dead.dead_after = 3;
  cfg.dead.check_every = 4;
  cfg.dead.min_steps = 4;
  cfg.dead.replace_threshold = 0.5;
  dc.tweak(cfg);
  VectorQuantizer<T> one(cfg, cpu{1}), two(cfg, cpu{2}), dflt(cfg, cpu{0});
  RowMatrix<T> q1, q2, q0, dx1, dx2, dx0;
  for (int s = 0; s < 16; ++s) {
    RowMatrix<T> x = test::gaussian<T>(dc.rows, 12, 500 + std::uint64_t(s));
    if (s % 4 == 3) x *= T(0.01);  // narrow phases: codes die, the policies fire
    const auto c1 = one.forward(x, q1);
    const auto c2 = two.forward(x, q2);
    const auto c0 = dflt.forward(x, q0);
    REQUIRE(c1.indices == c2.indices);
    REQUIRE(c1.indices == c0.indices);
    REQUIRE(c1.loss.total == c2.loss.total);
    REQUIRE(c1.loss.total == c0.loss.total);
    const auto g = test::gaussian<T>(dc.rows, 12, 900 + std::uint64_t(s));
    one.backward(c1, g, &dx1);
    two.backward(c2, g, &dx2);
    dflt.backward(c0, g, &dx0);
    REQUIRE(same_bits(dx1, dx2));
    REQUIRE(same_bits(dx1, dx0));
    REQUIRE(state_diff<T>(one.state(), two.state()) == "");
    REQUIRE(state_diff<T>(one.state(), dflt.state()) == "");
  }
  CHECK(safetensors::serialize(to_safetensors(one)) == safetensors::serialize(to_safetensors(two)));
}

}  // namespace

TEST_CASE("1, 2 and OpenMP's default threads give bit-identical runs beyond the basic case",
          "[reliability][determinism]") {
  const DetCase cases[] = {
      {"double, L2, kmeans_reinit, batches larger than the bank", true,
       [](VectorQuantizerConfig&) {}, 300},
      {"float, cosine, replace", false,
       [](VectorQuantizerConfig& c) {
         c.metric = Metric::cosine;
         c.dead.policy = DeadCodePolicy::replace;
       },
       200},
      {"double, gradient updates, sum_over_dim, replace", true,
       [](VectorQuantizerConfig& c) {
         c.update = CodebookUpdate::gradient;
         c.loss.reduction = Reduction::sum_over_dim;
         c.dead.policy = DeadCodePolicy::replace;
       },
       100},
      {"float, normalized init only, no dead-code policy", false,
       [](VectorQuantizerConfig& c) {
         c.init = InitMethod::normalized;
         c.dead.policy = DeadCodePolicy::none;
       },
       150},
  };
  for (const auto& dc : cases) {
    INFO(dc.name);
    if (dc.use_double)
      run_thread_determinism<double>(dc);
    else
      run_thread_determinism<float>(dc);
  }
}

TEMPLATE_TEST_CASE("a checkpoint moves between thread counts without changing a bit",
                   "[reliability][determinism][checkpoint]", float, double) {
  using T = TestType;
  auto cfg = small_config(64, 16, 31);
  cfg.memory_bank_size = 512;
  cfg.dead.dead_after = 3;
  cfg.dead.check_every = 5;
  cfg.dead.min_steps = 5;
  auto batch = [](int s) {
    RowMatrix<T> x = test::gaussian<T>(128, 16, 700 + std::uint64_t(s));
    if ((s / 5) % 2 == 1) x *= T(0.01);
    return x;
  };
  RowMatrix<T> q;
  VectorQuantizer<T> a(cfg, cpu{1}), b(cfg, cpu{2});
  for (int s = 0; s < 12; ++s) {
    a.forward(batch(s), q);
    b.forward(batch(s), q);
  }
  const Bytes saved = safetensors::serialize(to_safetensors(a));
  REQUIRE(saved == safetensors::serialize(to_safetensors(b)));  // same bytes from 1 and 2 threads
  // Saved by the 1-thread run, resumed with 2 threads (and the reverse).
  VectorQuantizer<T> a2(cfg, cpu{2}), b1(cfg, cpu{1});
  from_safetensors(safetensors::parse(saved), a2);
  from_safetensors(to_safetensors(b), b1);
  for (int s = 12; s < 30; ++s) {
    const auto x = batch(s);
    RowMatrix<T> qa, qb;
    const auto ca = a.forward(x, qa);
    const auto cb = a2.forward(x, qb);
    REQUIRE(ca.indices == cb.indices);
    REQUIRE(ca.reinitialized == cb.reinitialized);
    b1.forward(x, q);
  }
  CHECK(a.reinit_count() > 0);
  CHECK(state_diff<T>(a.state(), a2.state()) == "");
  CHECK(state_diff<T>(a.state(), b1.state()) == "");
  CHECK(safetensors::serialize(to_safetensors(a)) == safetensors::serialize(to_safetensors(a2)));
}

TEST_CASE("the same seed and data give the same bytes, another seed does not",
          "[reliability][determinism]") {
  auto run = [](std::uint64_t seed) {
    auto cfg = small_config(32, 8, seed);
    cfg.memory_bank_size = 128;
    VectorQuantizer<float> vq(cfg);
    RowMatrix<float> q;
    for (int s = 0; s < 6; ++s) vq.forward(test::gaussian<float>(64, 8, 800 + std::uint64_t(s)), q);
    return safetensors::serialize(to_safetensors(vq));
  };
  const Bytes first = run(5);
  CHECK(run(5) == first);
  const Bytes other = run(6);
  CHECK(other != first);
  // The seed is part of the config, so the files differ in metadata too;
  // the codebooks themselves differ as well.
  const auto f1 = safetensors::parse(first), f2 = safetensors::parse(other);
  CHECK_FALSE(same_bits(f1.matrix<float>("codebook"), f2.matrix<float>("codebook")));
}
