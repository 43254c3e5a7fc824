#include <catch2/catch.hpp>
#include <vqkit/quantizer/dead_codes.hpp>
#include <vqkit/quantizer/memory_bank.hpp>
#include <vqkit/quantizer/metrics.hpp>

#include <cmath>

#include "test_util.hpp"

using namespace vqkit;

TEST_CASE("batch_metrics: perplexity and entropy by hand", "[metrics]") {
  Eigen::VectorXd uniform = Eigen::VectorXd::Constant(8, 5.0);
  auto m = batch_metrics(uniform);
  CHECK(m.perplexity == Approx(8.0));
  CHECK(m.entropy == Approx(std::log(8.0)));
  CHECK(m.normalized_entropy == Approx(1.0));
  CHECK(m.usage == 8);
  CHECK(m.batch_rows == 40);

  Eigen::VectorXd one = Eigen::VectorXd::Zero(8);
  one[3] = 40;
  m = batch_metrics(one);
  CHECK(m.perplexity == Approx(1.0));
  CHECK(m.entropy == Approx(0.0).margin(1e-15));
  CHECK(m.usage == 1);
  CHECK(m.health == Health::collapsed);

  Eigen::VectorXd mixed(4);
  mixed << 1, 1, 2, 0;  // p = 1/4, 1/4, 1/2, 0
  m = batch_metrics(mixed);
  const double H = -(0.25 * std::log(0.25) * 2 + 0.5 * std::log(0.5));
  CHECK(m.entropy == Approx(H));
  CHECK(m.perplexity == Approx(std::exp(H)));
  CHECK(m.normalized_entropy == Approx(H / std::log(4.0)));
  CHECK(m.usage == 3);
  CHECK(m.cluster_size_min == 0);
  CHECK(m.cluster_size_max == 2);
  CHECK(m.cluster_size_mean == Approx(1.0));
}

TEST_CASE("health verdict uses the seed's thresholds scaled to min(K, N)", "[metrics]") {
  // K = 1024, large batch: the seed's own numbers.
  CHECK(health_verdict(199, 900, 1024, 100000) == Health::collapsed);
  CHECK(health_verdict(600, 299, 1024, 100000) == Health::collapsed);
  CHECK(health_verdict(501, 820, 1024, 100000) == Health::healthy);
  CHECK(health_verdict(400, 820, 1024, 100000) == Health::degraded);
  // K = 512: thresholds halve.
  CHECK(health_verdict(260, 420, 512, 100000) == Health::healthy);
  CHECK(health_verdict(90, 420, 512, 100000) == Health::collapsed);
  // A batch of 128 rows cannot show more than 128 codes: judged against 128.
  CHECK(health_verdict(70, 110, 1024, 128) == Health::healthy);
}

TEST_CASE("UsageTracker counts steps since use, dead codes and window usage", "[dead]") {
  UsageTracker u(4);
  Eigen::VectorXd c(4);
  c << 1, 0, 0, 2;
  u.record(c);
  CHECK(u.used_within(1) == 2);
  c << 0, 0, 1, 0;
  for (int s = 0; s < 5; ++s) u.record(c);
  IndexVector expect(4);
  expect << 5, 6, 0, 5;
  CHECK(u.steps_since_used() == expect);
  CHECK(u.dead(5) == 3);
  CHECK(u.dead(6) == 1);
  CHECK(u.used_within(1) == 1);
  CHECK(u.used_within(6) == 3);  // code 1 was never picked
  u.reset(0);
  CHECK(u.steps_since_used()[0] == 0);
  CHECK(u.used_within(6) == 2);
}

TEST_CASE("kmeans_reinit_due follows check_every, min_steps and the fraction", "[dead]") {
  DeadCodeOptions o;  // check_every 100, min_steps 200, 3%
  CHECK_FALSE(kmeans_reinit_due(o, 100, 500, 1000));  // before min_steps
  CHECK_FALSE(kmeans_reinit_due(o, 250, 500, 1000));  // not a check step
  CHECK(kmeans_reinit_due(o, 300, 31, 1000));
  CHECK_FALSE(kmeans_reinit_due(o, 300, 30, 1000));   // exactly 3% is not more
  o.policy = DeadCodePolicy::replace;
  CHECK_FALSE(kmeans_reinit_due(o, 300, 900, 1000));
  CHECK(parse_dead_code_policy("replace") == DeadCodePolicy::replace);
  CHECK_THROWS_WITH(parse_dead_code_policy("sometimes"), Catch::Contains("'sometimes'"));
}

TEST_CASE("decide_dead_codes: each policy's decision from its definition", "[dead]") {
  // Six codes; EMA sizes mean 1.0; code 4 idle for 30 steps, the rest recent.
  Eigen::VectorXd size(6);
  size << 2.5, 0.05, 1.0, 0.09, 2.25, 0.11;
  UsageTracker usage(6);
  Eigen::VectorXd hit(6);
  hit << 0, 0, 0, 0, 1, 0;
  usage.record(hit);
  hit << 1, 1, 1, 1, 0, 1;
  for (int s = 0; s < 30; ++s) usage.record(hit);
  REQUIRE(usage.steps_since_used()[4] == 30);
  DeadCodeInputs<double> in;
  in.step = 300;
  in.dead = 0;
  in.window_usage = 6;
  in.usage_window = 10;
  in.rows_per_step = 100;
  in.steps_since_init = 300;
  in.data_initialized = true;
  in.bank_size = 1000;
  in.usage = &usage;
  in.cluster_size = &size;
  DeadCodeOptions o;
  o.replace_after = 0;  // idle re-seeding off at first
  DeadCodeAction a(6);
  const auto reseed = [&] { return std::vector<Index>(a.reseed.begin(), a.reseed.end()); };

  SECTION("replace: codes below replace_threshold x the mean size, N_k reset to the mean") {
    o.policy = DeadCodePolicy::replace;
    o.replace_threshold = 0.1;  // below 0.1: codes 1 and 3, not 5 (0.11)
    decide_dead_codes(o, in, a);
    CHECK_FALSE(a.reinit);
    CHECK(reseed() == std::vector<Index>{1, 3});
    CHECK(a.reseed_size == Approx(1.0));
    CHECK(a.reseed_from == 100);  // replace_from_steps 1: this step's rows
    o.replace_from_steps = 0;     // the whole bank
    decide_dead_codes(o, in, a);
    CHECK(a.reseed_from == 1000);
    o.replace_from_steps = 20;  // more steps than the bank holds: the whole bank
    decide_dead_codes(o, in, a);
    CHECK(a.reseed_from == 1000);
  }
  SECTION("idle codes are re-seeded under both policies, never under none") {
    o.replace_after = 30;
    o.policy = DeadCodePolicy::kmeans_reinit;
    decide_dead_codes(o, in, a);
    CHECK(reseed() == std::vector<Index>{4});
    o.replace_after = 31;
    decide_dead_codes(o, in, a);
    CHECK(a.reseed.empty());
    o.replace_after = -1;  // automatic: max(window, ceil(10 K / rows)) = 10 steps
    decide_dead_codes(o, in, a);
    CHECK(reseed() == std::vector<Index>{4});
    o.policy = DeadCodePolicy::replace;
    decide_dead_codes(o, in, a);
    CHECK(reseed() == std::vector<Index>{1, 3, 4});
    o.policy = DeadCodePolicy::none;
    decide_dead_codes(o, in, a);
    CHECK(a.reseed.empty());
    CHECK_FALSE(a.reinit);
  }
  SECTION("kmeans_reinit: the clock, the health trigger, and a bank too small") {
    o.policy = DeadCodePolicy::kmeans_reinit;
    in.dead = 1;  // 1 of 6 > 3%, at a check step
    decide_dead_codes(o, in, a);
    CHECK(a.reinit);
    CHECK(a.reseed.empty());
    in.bank_size = 5;  // fewer rows than codes: no k-means
    decide_dead_codes(o, in, a);
    CHECK_FALSE(a.reinit);
    in.bank_size = 1000;
    in.dead = 0;
    in.step = 301;  // not a check step; health: 2 of min(6, 1000) codes in use < 0.5
    in.window_usage = 2;
    o.reinit_below_usage = 0.5;
    decide_dead_codes(o, in, a);
    CHECK(a.reinit);
    in.steps_since_init = 9;  // the window still mixes in the old codebook
    decide_dead_codes(o, in, a);
    CHECK_FALSE(a.reinit);
  }
  SECTION("nothing before the data-driven init, and a decision overwrites the last") {
    o.policy = DeadCodePolicy::replace;
    decide_dead_codes(o, in, a);
    REQUIRE_FALSE(a.reseed.empty());
    in.data_initialized = false;
    decide_dead_codes(o, in, a);
    CHECK(a.reseed.empty());
    CHECK_FALSE(a.reinit);
  }
}

TEST_CASE("MemoryBank is a ring buffer that reports, not hides, overflow", "[bank]") {
  MemoryBank<double> bank(5, 2);
  Rng rng(1);
  RowMatrix<double> a(3, 2);
  a << 1, 1, 2, 2, 3, 3;
  bank.push(a, rng);
  CHECK(bank.size() == 3);
  RowMatrix<double> b(3, 2);
  b << 4, 4, 5, 5, 6, 6;
  bank.push(b, rng);
  CHECK(bank.size() == 5);
  // Ring: row 0 now holds 6 (the oldest, 1, was overwritten).
  CHECK(bank.rows()(0, 0) == 6);
  CHECK(bank.rows()(1, 0) == 2);
  CHECK(bank.overflow_rows() == 0);
  // A batch of 12 rows into a bank of 5: a random subset of 5, in order, 7 counted.
  RowMatrix<double> big(12, 2);
  for (Index i = 0; i < 12; ++i) big.row(i).setConstant(100 + i);
  bank.push(big, rng);
  CHECK(bank.size() == 5);
  CHECK(bank.overflow_rows() == 7);
  for (Index i = 0; i < 5; ++i) {
    CHECK(bank.rows()(i, 0) >= 100);
    if (i > 0) CHECK(bank.rows()(i, 0) > bank.rows()(i - 1, 0));
  }
  RowMatrix<double> wrong(1, 3);
  CHECK_THROWS_WITH(bank.push(wrong, rng), Catch::Contains("3 columns, expected 2"));
  CHECK_THROWS_WITH(MemoryBank<float>(0, 2), Catch::Contains("capacity must be >= 1, got 0"));
}
