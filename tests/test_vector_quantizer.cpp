#include <algorithm>
#include <vector>

#include <catch2/catch.hpp>
#include <vqkit/io/vecs.hpp>
#include <vqkit/layers/vector_quantizer.hpp>
#include <vqkit/util/moving_clusters.hpp>

#include "test_util.hpp"

using namespace vqkit;

namespace {

VectorQuantizerConfig small_config(Index K = 32, Index D = 8) {
  VectorQuantizerConfig c;
  c.codebook_size = K;
  c.dim = D;
  c.seed = 3;
  return c;
}

template <class T>
bool same_state(const typename VectorQuantizer<T>::State& a, const typename VectorQuantizer<T>::State& b) {
  return a.codes == b.codes && a.grad == b.grad && a.ema.cluster_size == b.ema.cluster_size &&
         a.ema.embed_sum == b.ema.embed_sum && a.steps_since_used == b.steps_since_used &&
         a.used_since_reset == b.used_since_reset && a.bank == b.bank &&
         a.bank_size == b.bank_size && a.bank_head == b.bank_head && a.rng == b.rng &&
         a.step == b.step && a.reinits == b.reinits && a.replaced == b.replaced &&
         a.data_initialized == b.data_initialized && a.last_init_step == b.last_init_step;
}

template <class T>
void require_consistent(const VectorQuantizer<T>& vq, double tol) {
  const auto& st = vq.ema_state();
  for (Index k = 0; k < vq.codebook_size(); ++k) {
    const auto expect = (st.cluster_size[k] * vq.codebook().row(k)).eval();
    REQUIRE((st.embed_sum.row(k) - expect).norm() <= tol * (1 + expect.norm()));
  }
}

}  // namespace

TEST_CASE("forward returns the nearest codes of the pre-update codebook", "[vq]") {
  VectorQuantizer<double> vq(small_config());
  const auto x = test::gaussian<double>(200, 8, 1);
  const RowMatrix<double> before = vq.codebook();
  // Run the k-means init first so the step below is a plain EMA step.
  RowMatrix<double> q;
  vq.forward(x, q);
  const RowMatrix<double> codes = vq.codebook();
  const auto x2 = test::gaussian<double>(150, 8, 2);
  auto ctx = vq.forward(x2, q);
  auto ref = nearest_code<double>(cpu{}, codes, x2);
  REQUIRE(ctx.indices == ref.indices);
  REQUIRE(q.rows() == 150);
  for (Index i = 0; i < 150; ++i) REQUIRE(q.row(i) == codes.row(ctx.indices[i]));
  REQUIRE((ctx.residual - (x2 - q)).norm() == 0);
  CHECK(ctx.loss.distortion == Approx(ref.distances.sum() / (150.0 * 8)));
  CHECK(ctx.loss.codebook == Approx(0.25 * ctx.loss.distortion));
  CHECK(ctx.loss.commitment == Approx(ctx.loss.distortion));
  CHECK(vq.codebook() != codes);  // the EMA step moved the codes
  CHECK(vq.step() == 2);
  CHECK(before != codes);         // the k-means init replaced the normalised one
}

TEST_CASE("EMA state stays consistent through init, k-means init and re-init", "[vq][invariant]") {
  auto cfg = small_config();
  cfg.dead.dead_after = 3;
  cfg.dead.check_every = 5;
  cfg.dead.min_steps = 5;
  VectorQuantizer<double> vq(cfg);
  require_consistent(vq, 1e-15);  // normalised init: N = 1, M = e
  RowMatrix<double> q;
  auto ctx = vq.forward(test::gaussian<double>(100, 8, 4), q);
  CHECK(ctx.data_initialized);
  // Feed a narrow cluster so that most codes die, until the policy fires.
  bool fired = false;
  for (int s = 0; s < 10 && !fired; ++s) {
    RowMatrix<double> narrow = test::gaussian<double>(100, 8, 10 + s, 0.01);
    ctx = vq.forward(narrow, q);
    fired = ctx.reinitialized;
  }
  REQUIRE(fired);
  CHECK(vq.step() % 5 == 0);
  CHECK(vq.reinit_count() == 1);
  require_consistent(vq, 1e-12);
  CHECK(vq.usage().dead(cfg.dead.dead_after) == 0);  // counters restart with the new codebook
}

TEST_CASE("the replace policy resets e, N and M together after the EMA step", "[vq][invariant]") {
  auto cfg = small_config();
  cfg.dead.policy = DeadCodePolicy::replace;
  cfg.dead.replace_threshold = 0.5;
  VectorQuantizer<double> vq(cfg);
  RowMatrix<double> q;
  // The first step may replace codes too (k-means init, then the policy).
  Index replaced = vq.forward(test::gaussian<double>(200, 8, 5), q).replaced;
  for (int s = 0; s < 40; ++s) {
    // Shifted data: codes on the far side stop being used and are replaced.
    RowMatrix<double> x = test::gaussian<double>(200, 8, 20 + s);
    x.col(0).array() += 3.0;
    auto ctx = vq.forward(x, q);
    replaced += ctx.replaced;
    if (ctx.replaced > 0) {
      // A code reset in this step (counters at zero, unused since) is a row
      // of the bank, with M = N e exactly: the EMA step did not touch it.
      const auto& bank = vq.memory_bank();
      const auto& st = vq.ema_state();
      Index reset = 0;
      for (Index k = 0; k < vq.codebook_size(); ++k) {
        if (vq.usage().steps_since_used()[k] != 0 || vq.usage().used_since_reset()[k] != 0) continue;
        ++reset;
        CHECK(st.embed_sum.row(k) == st.cluster_size[k] * vq.codebook().row(k));
        bool in_bank = false;
        for (Index r = 0; r < bank.size() && !in_bank; ++r)
          in_bank = bank.rows().row(r) == vq.codebook().row(k);
        CHECK(in_bank);
      }
      CHECK(reset == ctx.replaced);
    }
  }
  CHECK(replaced > 0);
  CHECK(vq.replaced_count() == replaced);
}

TEST_CASE("the data-driven init waits until the bank holds enough rows", "[vq]") {
  auto cfg = small_config(64, 8);
  VectorQuantizer<float> vq(cfg);
  const RowMatrix<float> normalised = vq.codebook();
  RowMatrix<float> q;
  // Default init_min_rows = 2 K = 128 rows: the 8th batch of 16 rows.
  for (int s = 1; s <= 8; ++s) {
    auto ctx = vq.forward(test::gaussian<float>(16, 8, 30 + s), q);  // 16 rows < 64 codes
    CHECK(ctx.data_initialized == (s == 8));
    CHECK(vq.data_initialized() == (s == 8));
  }
  CHECK(vq.codebook() != normalised);
  CHECK_FALSE(vq.init_refined());  // the bank (20 K = 1280 rows) is not full yet
  for (int s = 9; s <= 80; ++s) {
    auto ctx = vq.forward(test::gaussian<float>(16, 8, 30 + s), q);
    CHECK(ctx.data_initialized == (s == 80));  // 80 x 16 = 1280: the refinement
  }
  CHECK(vq.init_refined());
}

TEST_CASE("eval mode changes no state", "[vq]") {
  VectorQuantizer<float> vq(small_config());
  RowMatrix<float> q;
  vq.forward(test::gaussian<float>(100, 8, 1), q);
  const auto before = vq.state();
  vq.eval();
  auto ctx = vq.forward(test::gaussian<float>(50, 8, 2), q);
  CHECK_FALSE(ctx.training);
  CHECK(same_state<float>(before, vq.state()));
  CHECK(ctx.metrics.batch_rows == 50);
}

TEST_CASE("backward: straight-through plus commitment, codebook gradient by finite differences",
          "[vq][grad]") {
  auto cfg = small_config(6, 5);
  cfg.update = CodebookUpdate::gradient;
  cfg.init = InitMethod::normalized;
  cfg.loss.codebook_weight = 0.4;
  cfg.loss.commitment_weight = 1.3;
  const auto reduction = GENERATE(Reduction::mean, Reduction::sum_over_dim);
  cfg.loss.reduction = reduction;
  VectorQuantizer<double> vq(cfg);
  vq.eval();  // nothing moves between the evaluations below
  const auto x = test::gaussian<double>(9, 5, 7, 2.0);
  RowMatrix<double> q;
  auto ctx = vq.forward(x, q);
  const auto g = test::gaussian<double>(9, 5, 8);
  RowMatrix<double> dx;
  vq.zero_grad();
  vq.backward(ctx, g, &dx);
  const double h = 1e-4;  // the loss is quadratic: central differences are exact up to rounding
  auto loss_at = [&](const RowMatrix<double>& xx) {
    RowMatrix<double> qq;
    auto c = vq.forward(xx, qq);
    REQUIRE(c.indices == ctx.indices);  // the perturbation keeps the assignment
    return c.loss;
  };
  for (Index i = 0; i < x.rows(); ++i)
    for (Index d = 0; d < x.cols(); ++d) {
      auto xp = x, xm = x;
      xp(i, d) += h;
      xm(i, d) -= h;
      const double fd = (loss_at(xp).commitment - loss_at(xm).commitment) / (2 * h);
      CHECK(dx(i, d) - g(i, d) == Approx(fd).epsilon(1e-6).margin(1e-9));
    }
  // Codebook gradient: d/de of the codebook term, through set_codebook.
  const RowMatrix<double> e = vq.codebook();
  const RowMatrix<double> de = vq.codebook_grad();
  for (Index k = 0; k < e.rows(); ++k)
    for (Index d = 0; d < e.cols(); ++d) {
      auto ep = e, em = e;
      ep(k, d) += h;
      em(k, d) -= h;
      vq.set_codebook(ep);
      const double lp = loss_at(x).codebook;
      vq.set_codebook(em);
      const double lm = loss_at(x).codebook;
      CHECK(de(k, d) == Approx((lp - lm) / (2 * h)).epsilon(1e-6).margin(1e-9));
    }
  // Parameters are exposed in gradient mode only, and gradients accumulate.
  auto params = vq.parameters();
  REQUIRE(params.size() == 1);
  CHECK(params[0].name == "codebook");
  CHECK_FALSE(params[0].weight_decay);
  vq.set_codebook(e);
  vq.backward(ctx, g, nullptr);
  CHECK((vq.codebook_grad() - 2 * de).norm() < 1e-12);
}

TEST_CASE("state() / set_state() continue bit-identically", "[vq][state]") {
  auto cfg = small_config(32, 8);
  cfg.dead.policy = DeadCodePolicy::replace;
  VectorQuantizer<float> a(cfg);
  RowMatrix<float> q;
  for (int s = 0; s < 10; ++s) a.forward(test::gaussian<float>(64, 8, 40 + s), q);
  VectorQuantizer<float> b(cfg);
  b.set_state(a.state());
  for (int s = 0; s < 10; ++s) {
    const auto x = test::gaussian<float>(64, 8, 60 + s);
    auto ca = a.forward(x, q);
    auto cb = b.forward(x, q);
    REQUIRE(ca.indices == cb.indices);
  }
  CHECK(same_state<float>(a.state(), b.state()));
}

TEST_CASE("a copy continues bit-identically and independently of the original, in both search "
          "precisions", "[vq][state]") {
  for (auto precision : {Precision::fp32, Precision::bf16_rerank}) {
    auto cfg = small_config(32, 64);  // (D = 64: the search kernels run)
    cfg.search_precision = precision;
    cfg.dead.policy = DeadCodePolicy::replace;
    VectorQuantizer<float> a(cfg, cpu{2});
    RowMatrix<float> q, qb;
    for (int s = 0; s < 10; ++s) a.forward(test::gaussian<float>(96, 64, 40 + s), q);
    VectorQuantizer<float> b = a;  // (the kernels' scratch starts empty in the copy)
    CHECK(same_state<float>(a.state(), b.state()));
    VectorQuantizer<float> c(cfg);
    c = a;
    for (int s = 0; s < 10; ++s) {
      const auto x = test::gaussian<float>(96, 64, 60 + s);
      auto ca = a.forward(x, q);
      auto cb = b.forward(x, qb);
      REQUIRE(ca.indices == cb.indices);
      REQUIRE(q == qb);
    }
    CHECK(same_state<float>(a.state(), b.state()));
    CHECK(c.step() == 10);  // the copy did not move with the original
    CHECK(a.step() == 20);
  }
}

TEST_CASE("results are bit-identical for 1 and 2 threads", "[vq][determinism]") {
  auto cfg = small_config(128, 16);
  VectorQuantizer<float> one(cfg, cpu{1}), two(cfg, cpu{2});
  RowMatrix<float> q;
  for (int s = 0; s < 15; ++s) {
    const auto x = test::gaussian<float>(500, 16, 70 + s);
    one.forward(x, q);
    two.forward(x, q);
  }
  CHECK(same_state<float>(one.state(), two.state()));
}

TEST_CASE("bad input is rejected with a clear message and no state change", "[vq][errors]") {
  VectorQuantizer<float> vq(small_config());
  RowMatrix<float> q;
  vq.forward(test::gaussian<float>(100, 8, 1), q);
  const auto before = vq.state();
  auto msg = [&](const RowMatrix<float>& x) {
    try {
      vq.forward(x, q);
    } catch (const vqkit::error& e) {
      return std::string(e.what());
    }
    return std::string("no exception");
  };
  CHECK_THAT(msg(test::gaussian<float>(10, 7, 2)), Catch::Contains("7 columns, expected 8"));
  CHECK_THAT(msg(RowMatrix<float>(0, 8)), Catch::Contains("empty batch"));
  auto nan = test::gaussian<float>(10, 8, 3);
  nan(6, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THAT(msg(nan), Catch::Contains("non-finite value (nan) at row 6, column 1"));
  auto inf = test::gaussian<float>(10, 8, 3);
  inf(2, 7) = -std::numeric_limits<float>::infinity();
  CHECK_THAT(msg(inf), Catch::Contains("(-inf) at row 2, column 7"));
  CHECK(same_state<float>(before, vq.state()));

  auto ctx = vq.forward(test::gaussian<float>(10, 8, 4), q);
  RowMatrix<float> dx;
  CHECK_THROWS_WITH(vq.backward(ctx, test::gaussian<float>(9, 8, 5), &dx),
                    Catch::Contains("dq is 9x8, expected 10x8"));

  auto bad = small_config();
  bad.codebook_size = 0;
  CHECK_THROWS_WITH(VectorQuantizer<float>(bad),
                    Catch::Contains("codebook_size must be >= 1, got codebook_size=0"));
  bad = small_config();
  bad.ema.decay = 1.5;
  CHECK_THROWS_WITH(VectorQuantizer<float>(bad), Catch::Contains("decay=1.5"));
  bad.ema.decay = 0.0;
  CHECK_THROWS_WITH(VectorQuantizer<float>(bad), Catch::Contains("decay=0"));
  bad = small_config();
  bad.dim = 0;
  CHECK_THROWS_WITH(VectorQuantizer<float>(bad), Catch::Contains("dim must be >= 1, got dim=0"));
  bad = small_config();
  bad.memory_bank_size = 10;  // smaller than K = 32
  CHECK_THROWS_WITH(VectorQuantizer<float>(bad), Catch::Contains("memory_bank_size (10)"));

  VectorQuantizer<float> other(small_config(16, 8));
  CHECK_THROWS_WITH(vq.set_state(other.state()), Catch::Contains("codebook is 16x8, expected 32x8"));
  CHECK(same_state<float>(vq.state(), vq.state()));
}

// The collapse regression of the core issue: real GloVe vectors, K = 512,
// 4096 rows per step, 300 steps, default settings. The seed's PyTorch
// quantizer keeps 3 of 512 codes one step after its k-means init.
TEST_CASE("collapse regression: GloVe, K=512, 300 steps keep >= 90% usage", "[vq][regression]") {
  const auto path = test::data_file("vectors/glove100/glove100_base_10k.fvecs");
  if (path.empty()) VQKIT_SKIP("GloVe data not found under VQKIT_TEST_DATA_DIR");
  const auto data = io::read_fvecs(path);
  REQUIRE(data.rows() == 10000);
  VectorQuantizerConfig cfg;
  cfg.codebook_size = 512;
  cfg.dim = 100;
  VectorQuantizer<float> vq(cfg);
  Rng pick(2024);
  RowMatrix<float> x(4096, 100), q;
  double min_usage = 1e9, first_loss = 0, last_loss = 0;
  VectorQuantizer<float>::Context ctx;
  for (int step = 1; step <= 300; ++step) {
    for (Index i = 0; i < x.rows(); ++i) x.row(i) = data.row(Index(pick.below(10000)));
    ctx = vq.forward(x, q);
    if (step == 2) first_loss = ctx.loss.total;
    if (step > 1) min_usage = std::min(min_usage, double(ctx.metrics.usage));
    REQUIRE(std::isfinite(ctx.loss.total));
  }
  last_loss = ctx.loss.total;
  INFO("min usage " << min_usage << ", final perplexity " << ctx.metrics.perplexity
                    << ", loss " << first_loss << " -> " << last_loss);
  CHECK(min_usage >= 0.9 * 512);
  CHECK(ctx.metrics.perplexity >= 0.8 * 512);
  CHECK(ctx.metrics.window_usage >= 0.98 * 512);
  CHECK(last_loss < first_loss);
  CHECK(ctx.metrics.health == Health::healthy);
}

TEST_CASE("NonFinitePolicy::skip skips and counts a bad batch, changing nothing else", "[vq][errors]") {
  auto cfg = small_config();
  cfg.non_finite = NonFinitePolicy::skip;
  VectorQuantizer<float> vq(cfg);
  RowMatrix<float> q;
  vq.forward(test::gaussian<float>(100, 8, 1), q);
  const auto before = vq.state();
  auto bad = test::gaussian<float>(10, 8, 2);
  bad(3, 3) = std::numeric_limits<float>::quiet_NaN();
  auto ctx = vq.forward(bad, q);
  CHECK(ctx.skipped);
  CHECK(ctx.indices.size() == 0);
  CHECK(vq.skipped_batches() == 1);
  auto after = vq.state();
  CHECK(after.skipped == 1);
  after.skipped = 0;
  CHECK(same_state<float>(before, after));
  RowMatrix<float> dx;
  vq.backward(ctx, test::gaussian<float>(10, 8, 3), &dx);
  CHECK(dx.rows() == 10);
  CHECK(dx.isZero());
  // Shape errors are still errors.
  CHECK_THROWS_WITH(vq.forward(test::gaussian<float>(10, 5, 4), q), Catch::Contains("5 columns"));
}

TEST_CASE("the cosine metric picks the code of largest cosine", "[vq]") {
  auto cfg = small_config(16, 6);
  cfg.metric = Metric::cosine;
  cfg.init = InitMethod::normalized;
  VectorQuantizer<double> vq(cfg);
  // Scale codes unevenly so that L2 and cosine disagree.
  RowMatrix<double> codes = vq.codebook();
  for (Index k = 0; k < 16; ++k) codes.row(k) *= double(1 + k % 5);
  vq.set_codebook(codes);
  vq.eval();
  const auto x = test::gaussian<double>(300, 6, 9);
  RowMatrix<double> q;
  auto ctx = vq.forward(x, q);
  SearchOptions cos;
  cos.metric = Metric::cosine;
  auto ref = nearest_code<double>(cpu{}, codes, x, cos);
  auto l2 = nearest_code<double>(cpu{}, codes, x);
  CHECK(ctx.indices == ref.indices);
  CHECK(ctx.indices != l2.indices);
}

TEST_CASE("forward with a reused context: a rejected batch leaves the context as it was", "[vq][errors]") {
  auto cfg = small_config();
  VectorQuantizer<float> vq(cfg);
  RowMatrix<float> q;
  VectorQuantizer<float>::Context ctx;
  vq.forward(test::gaussian<float>(50, cfg.dim, 1), q, ctx);
  const IndexVector indices = ctx.indices;
  const RowMatrix<float> residual = ctx.residual;
  const double loss = ctx.loss.total;
  RowMatrix<float> bad = test::gaussian<float>(50, cfg.dim, 2);
  bad(7, 1) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(vq.forward(bad, q, ctx), Catch::Contains("row 7, column 1"));
  CHECK(ctx.indices == indices);
  CHECK(ctx.residual == residual);
  CHECK(ctx.loss.total == loss);
  // And a good batch after it matches the allocating form.
  VectorQuantizer<float> twin(cfg);
  twin.forward(test::gaussian<float>(50, cfg.dim, 1), q);
  const RowMatrix<float> x = test::gaussian<float>(50, cfg.dim, 3);
  vq.forward(x, q, ctx);
  RowMatrix<float> q2;
  const auto c2 = twin.forward(x, q2);
  CHECK(ctx.indices == c2.indices);
  CHECK(ctx.residual == c2.residual);
  CHECK(q == q2);
  CHECK(vq.codebook() == twin.codebook());
}

// ---- issue 16: a moving encoder ---------------------------------------------------

namespace {

struct StreamRun {
  Index min_after50 = 0;    ///< window usage, min over steps 51..
  double mean_last50 = 0;   ///< window usage, mean over the last 50 steps
};

/// Trains on util/moving_clusters.hpp's stream (K = 256 codes, 256 tokens of
/// 32 dims per step around 48 drifting clusters) for 200 steps.
StreamRun run_moving_stream(VectorQuantizerConfig cfg) {
  cfg.codebook_size = 256;
  cfg.dim = 32;
  cfg.memory_bank_size = 5120;  // 20 steps of tokens, as the seed's 20 K for K = 1024
  MovingClustersOptions so;
  so.dim = 32;
  so.tokens = 256;
  MovingClusters stream(so);
  VectorQuantizer<float> vq(cfg, cpu{1});
  RowMatrix<float> x, q;
  VectorQuantizer<float>::Context ctx;
  StreamRun r;
  r.min_after50 = cfg.codebook_size;
  for (int t = 1; t <= 200; ++t) {
    stream.next(x);
    vq.forward(x, q, ctx);
    if (t > 50) r.min_after50 = std::min(r.min_after50, ctx.metrics.window_usage);
    if (t > 150) r.mean_last50 += double(ctx.metrics.window_usage) / 50.0;
  }
  return r;
}

/// Plain EMA steps: no refining init, no dead-code handling.
VectorQuantizerConfig plain_ema_config() {
  auto c = small_config(16, 4);
  c.refine_init = false;
  c.dead.policy = DeadCodePolicy::none;
  c.dead.replace_after = 0;
  return c;
}

/// n rows around one point (spread `spread`, column `col` shifted by `shift`).
RowMatrix<double> narrow_batch(Index n, Index D, std::uint64_t seed, double spread, Index col,
                               double shift) {
  RowMatrix<double> x = test::gaussian<double>(n, D, seed) * spread;
  x.col(col).array() += shift;
  return x;
}

}  // namespace

// The seed's quantizer settings (EMA 0.99, kmeans_reinit every 100 steps
// from step 200 once > 3% of the codes are 256 steps idle, a bank of 20
// steps of tokens) on a stream whose tokens drift like a young encoder's:
// with the seed's behaviour the codebook is down to one code by step 50 and
// the clock never fires; with the defaults (idle codes re-seeded from the
// newest tokens) it stays in use. Measured: seed 1 of 256; defaults min
// 212 (83%), mean 230 (90%) (bench/collapse_stream --K 256 --tokens 256
// --dim 32 --steps 200 --bank 5120).
TEST_CASE("collapse regression: a moving encoder's stream, seed settings (issue 16)",
          "[vq][regression]") {
  VectorQuantizerConfig seed;
  seed.ema.decay = 0.99;
  seed.dead.policy = DeadCodePolicy::kmeans_reinit;
  SECTION("the library's defaults keep the codebook in use") {
    const auto r = run_moving_stream(seed);
    INFO("window usage min after step 50 " << r.min_after50 << ", mean of the last 50 " << r.mean_last50);
    CHECK(r.min_after50 >= 0.5 * 256);
    CHECK(r.mean_last50 >= 0.75 * 256);
  }
  SECTION("the seed's behaviour (no idle re-seeding, whole-bank draws) collapses") {
    auto off = seed;
    off.dead.replace_after = 0;
    off.dead.replace_from_steps = 0;
    const auto r = run_moving_stream(off);
    INFO("window usage min after step 50 " << r.min_after50 << ", mean of the last 50 " << r.mean_last50);
    CHECK(r.min_after50 < 0.1 * 256);
  }
}

TEST_CASE("replace_after re-seeds exactly the idle codes, from this step's rows", "[vq][invariant]") {
  auto cfg = small_config(32, 8);
  cfg.dead.replace_after = 3;
  cfg.dead.replace_from_steps = 1;  // draw from the newest 100 rows: this step's batch
  VectorQuantizer<double> vq(cfg);
  RowMatrix<double> q;
  vq.forward(test::gaussian<double>(100, 8, 70), q);  // k-means init
  REQUIRE(vq.data_initialized());
  Index replaced = 0;
  for (int s = 0; s < 12; ++s) {
    // A narrow, shifted batch: most codes go unused.
    const RowMatrix<double> x = narrow_batch(100, 8, std::uint64_t(71 + s), 0.2, 1, 2.0);
    const IndexVector since_before = vq.usage().steps_since_used();
    const auto ctx = vq.forward(x, q);
    REQUIRE_FALSE(ctx.reinitialized);
    IndexVector hits = IndexVector::Zero(32);
    for (Index i = 0; i < ctx.indices.size(); ++i) hits[ctx.indices[i]] = 1;
    Index expected = 0;
    for (Index k = 0; k < 32; ++k) {
      const bool idle = hits[k] == 0 && since_before[k] + 1 >= 3;
      expected += idle;
      if (!idle) continue;
      // Reset in this step: counters at zero, M = N e, the code one of x's rows.
      CHECK(vq.usage().steps_since_used()[k] == 0);
      CHECK(vq.usage().used_since_reset()[k] == 0);
      CHECK(vq.ema_state().embed_sum.row(k) == vq.ema_state().cluster_size[k] * vq.codebook().row(k));
      bool in_batch = false;
      for (Index r = 0; r < x.rows() && !in_batch; ++r) in_batch = x.row(r) == vq.codebook().row(k);
      CHECK(in_batch);
    }
    CHECK(ctx.replaced == expected);
    replaced += ctx.replaced;
  }
  CHECK(replaced > 0);
  CHECK(vq.replaced_count() == replaced);
  // 0 turns it off: the same run replaces nothing.
  cfg.dead.replace_after = 0;
  VectorQuantizer<double> off(cfg);
  off.forward(test::gaussian<double>(100, 8, 70), q);
  for (int s = 0; s < 12; ++s)
    CHECK(off.forward(narrow_batch(100, 8, std::uint64_t(71 + s), 0.2, 1, 2.0), q).replaced == 0);
  // Automatic (-1): max(usage_window, ceil(10 K / rows per step)).
  DeadCodeOptions o;
  CHECK(o.replace_after == -1);
  CHECK(o.replace_after_steps(512, 512, 10) == 10);
  CHECK(o.replace_after_steps(1024, 512, 10) == 20);
  CHECK(o.replace_after_steps(1024, 16384, 10) == 10);
  o.replace_after = 7;
  CHECK(o.replace_after_steps(1024, 1, 10) == 7);
}

TEST_CASE("the health trigger re-runs k-means once a full window shows low usage", "[vq]") {
  auto cfg = small_config(32, 8);
  cfg.refine_init = false;
  cfg.usage_window = 5;
  cfg.dead.replace_after = 0;  // only the trigger acts
  cfg.dead.reinit_below_usage = 0.5;
  VectorQuantizer<double> vq(cfg);
  RowMatrix<double> q;
  auto ctx = vq.forward(test::gaussian<double>(100, 8, 90), q);  // k-means init at step 1
  REQUIRE(ctx.data_initialized);
  CHECK(vq.last_init_step() == 0);
  CHECK(ctx.metrics.steps_since_init == 1);
  for (int t = 2; t <= 6; ++t) {
    // Every row near one point: one or two codes in use.
    ctx = vq.forward(narrow_batch(100, 8, std::uint64_t(90 + t), 1e-3, 0, 0.5), q);
    // The window (5 steps) must hold the new codebook only before the check.
    CHECK(ctx.reinitialized == (t == 6));
  }
  CHECK(vq.reinit_count() == 1);
  CHECK(vq.last_init_step() == 6);
  CHECK(kmeans_health_reinit_due(cfg.dead, 2, 5, 500.0, 5, 32));
  CHECK_FALSE(kmeans_health_reinit_due(cfg.dead, 2, 5, 500.0, 4, 32));   // window not full yet
  CHECK_FALSE(kmeans_health_reinit_due(cfg.dead, 16, 5, 500.0, 5, 32));  // 16 = 0.5 * 32
  CHECK_FALSE(kmeans_health_reinit_due(cfg.dead, 2, 5, 3.0, 5, 32));  // 2 of at most 3
  // Off (0): the same run never re-initialises before the clock.
  cfg.dead.reinit_below_usage = 0;
  VectorQuantizer<double> off(cfg);
  off.forward(test::gaussian<double>(100, 8, 90), q);
  for (int t = 2; t <= 8; ++t)
    CHECK_FALSE(off.forward(narrow_batch(100, 8, std::uint64_t(90 + t), 1e-3, 0, 0.5), q).reinitialized);
}

TEST_CASE("EMA decay warm-up: memory grows linearly from warmup_decay to decay", "[vq][ema]") {
  EmaOptions o;
  o.decay = 0.99;
  o.warmup_decay = 0.8;
  o.warmup_steps = 100;
  CHECK(o.decay_at(0) == Approx(0.8));
  CHECK(1.0 / (1.0 - o.decay_at(50)) == Approx((5.0 + 100.0) / 2));
  CHECK(o.decay_at(100) == 0.99);
  CHECK(o.decay_at(1000) == 0.99);
  for (int t = 1; t <= 100; ++t) CHECK(o.decay_at(t) > o.decay_at(t - 1));
  o.warmup_steps = 0;
  CHECK(o.decay_at(0) == 0.99);
  // The layer uses g_t at its step t: N <- g_t N + (1 - g_t) n.
  auto cfg = plain_ema_config();
  cfg.ema.warmup_steps = 10;
  VectorQuantizer<double> vq(cfg);
  RowMatrix<double> q;
  vq.forward(test::gaussian<double>(64, 4, 5), q);  // step 0: init, then g_0
  for (int t = 1; t <= 3; ++t) {
    const Vector<double> before = vq.ema_state().cluster_size;
    const auto ctx = vq.forward(test::gaussian<double>(64, 4, std::uint64_t(5 + t)), q);
    Vector<double> n = Vector<double>::Zero(16);
    for (Index i = 0; i < ctx.indices.size(); ++i) n[ctx.indices[i]] += 1;
    const double g = cfg.ema.decay_at(t);
    CHECK(ctx.metrics.ema_decay == g);
    CHECK((vq.ema_state().cluster_size - (g * before + (1 - g) * n)).norm() <= 1e-12);
  }
}

TEST_CASE("lag_fraction: the codes' offset from their clusters, sampling noise removed", "[vq]") {
  VectorQuantizer<double> vq(plain_ema_config());
  RowMatrix<double> q;
  vq.forward(test::gaussian<double>(400, 4, 8), q);  // k-means init
  // Reference, written out row by row: per code with n >= 2 rows, n |m - e|^2
  // minus the scatter about m over n - 1; over the whole squared error.
  const auto reference = [&](const RowMatrix<double>& x, const RowMatrix<double>& codes) {
    const auto nn = nearest_code<double>(cpu{}, codes, x);
    double lag = 0, total = 0;
    for (Index k = 0; k < 16; ++k) {
      std::vector<Index> rows;
      for (Index i = 0; i < x.rows(); ++i)
        if (nn.indices[i] == k) rows.push_back(i);
      Eigen::RowVectorXd m = Eigen::RowVectorXd::Zero(4);
      for (Index i : rows) m += x.row(i);
      double err = 0, scatter = 0;
      if (!rows.empty()) m /= double(rows.size());
      for (Index i : rows) {
        err += (x.row(i) - codes.row(k)).squaredNorm();
        scatter += (x.row(i) - m).squaredNorm();
      }
      total += err;
      const double n = double(rows.size());
      if (n >= 2) lag += n * (m - codes.row(k)).squaredNorm() - scatter / (n - 1);
    }
    return std::clamp(lag / total, 0.0, 1.0);
  };
  // Rows from the same distribution as the init: the codes sit on their
  // clusters, little lag. The same rows moved by 5 sigma: nearly all lag.
  const RowMatrix<double> x = test::gaussian<double>(400, 4, 9);
  RowMatrix<double> codes = vq.codebook();
  auto ctx = vq.forward(x, q);
  CHECK(ctx.metrics.lag_fraction == Approx(reference(x, codes)).margin(1e-12));
  CHECK(ctx.metrics.lag_fraction < 0.2);
  RowMatrix<double> moved = test::gaussian<double>(400, 4, 10);
  moved.array() += 5.0;
  codes = vq.codebook();
  ctx = vq.forward(moved, q);
  CHECK(ctx.metrics.lag_fraction == Approx(reference(moved, codes)).margin(1e-12));
  CHECK(ctx.metrics.lag_fraction > 0.8);
  vq.eval();
  CHECK(vq.forward(moved, q).metrics.lag_fraction == 0);  // training steps only
}

TEST_CASE("issue 16's config fields reject bad values, naming them", "[vq][errors]") {
  const auto fails = [](auto edit, const char* text) {
    auto c = small_config();
    edit(c);
    CHECK_THROWS_WITH(VectorQuantizer<float>(c), Catch::Contains(text));
  };
  fails([](auto& c) { c.dead.reinit_below_usage = 1.0; },
        "dead.reinit_below_usage must lie in [0, 1), got dead.reinit_below_usage=1");
  fails([](auto& c) { c.dead.reinit_below_usage = -0.1; }, "dead.reinit_below_usage must lie in [0, 1)");
  fails([](auto& c) { c.dead.replace_after = -2; },
        "dead.replace_after must be >= 0 (steps) or -1 (automatic), got dead.replace_after=-2");
  fails([](auto& c) { c.dead.replace_from_steps = -1; },
        "dead.replace_from_steps must be >= 0, got dead.replace_from_steps=-1");
  fails([](auto& c) { c.ema.warmup_decay = 1.0; },
        "ema.warmup_decay must lie in (0, 1), got ema.warmup_decay=1");
  fails([](auto& c) { c.ema.warmup_steps = -5; }, "ema.warmup_steps must be >= 0, got ema.warmup_steps=-5");
}

TEST_CASE("bank_staleness: the bank's oldest rows against the batch, in units of its spread", "[vq]") {
  auto cfg = plain_ema_config();
  cfg.memory_bank_size = 64;  // four steps of 16 rows
  cfg.init_min_rows = 32;
  VectorQuantizer<double> vq(cfg);
  RowMatrix<double> q;
  std::vector<RowMatrix<double>> seen;
  for (int t = 0; t < 8; ++t) {
    RowMatrix<double> x = test::gaussian<double>(16, 4, std::uint64_t(200 + t));
    x.col(2).array() += 0.5 * t;  // a drifting stream
    // Reference: before this step's push the oldest 16 rows are the batch of
    // step max(0, t - 4) (the bank holds 4 steps).
    double expect = 0;
    if (t > 0) {
      const RowMatrix<double>& old = seen[std::size_t(std::max(0, t - 4))];
      const Eigen::RowVectorXd mo = old.colwise().mean(), mx = x.colwise().mean();
      const double spread = std::sqrt((x.rowwise() - mx).squaredNorm() / 16.0);
      expect = (mo - mx).norm() / spread;
    }
    const auto ctx = vq.forward(x, q);
    CHECK(ctx.metrics.bank_staleness == Approx(expect).margin(1e-12));
    seen.push_back(x);
  }
  // Grows with the drift: a batch 6 units past the bank's oldest rows.
  CHECK(vq.forward(narrow_batch(16, 4, 300, 1.0, 2, 8.0), q).metrics.bank_staleness > 1.0);
  vq.eval();
  CHECK(vq.forward(narrow_batch(16, 4, 301, 1.0, 2, 4.0), q).metrics.bank_staleness == 0);
}
