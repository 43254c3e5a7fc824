// Data-parallel training without MPI: ranks are threads of this process,
// joined by ThreadReducer (below), so every distributed code path of the
// quantizer runs in the plain test suite. test_distributed_mpi.cpp runs the
// same scenarios over MPI (ctest label "mpi").
#include <catch2/catch.hpp>

#include <barrier>
#include <cstring>
#include <exception>
#include <functional>
#include <thread>

#include <vqkit/distributed/reducer.hpp>
#include <vqkit/io/checkpoint.hpp>
#include <vqkit/vqkit.hpp>

#include "test_distributed_util.hpp"

// The core headers (the interface included) must not pull in MPI.
#if defined(MPI_VERSION) || defined(OMPI_MPI_H)
#error "a vqkit core header includes <mpi.h>"
#endif

using namespace vqkit;

namespace {

/// Shared by the ranks of one ThreadReducer group.
struct ThreadGroup {
  explicit ThreadGroup(int n) : size(n), barrier(n), buffers(std::size_t(n)) {}
  int size;
  std::barrier<> barrier;
  std::vector<const void*> buffers;  ///< each rank's buffer during a collective
};

/// A Reducer whose ranks are threads. Sums run in rank order on every rank,
/// so every rank gets the same bits.
class ThreadReducer final : public Reducer {
 public:
  ThreadReducer(ThreadGroup& g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_.size; }

 protected:
  void do_all_reduce_sum(void* data, std::size_t n, ElementType t) override {
    switch (t) {
      case ElementType::f32: return sum<float>(data, n);
      case ElementType::f64: return sum<double>(data, n);
      case ElementType::i64: return sum<std::int64_t>(data, n);
    }
  }
  void do_broadcast(void* data, std::size_t n, ElementType t, int root) override {
    publish(data);
    if (rank_ != root) std::memcpy(data, g_.buffers[std::size_t(root)], n * element_size(t));
    g_.barrier.arrive_and_wait();
  }
  void do_all_gather(const void* mine, const std::size_t* counts, void* all,
                     ElementType t) override {
    publish(mine);
    auto* out = static_cast<char*>(all);
    for (int r = 0; r < g_.size; ++r) {
      const std::size_t bytes = counts[r] * element_size(t);
      if (bytes > 0) std::memcpy(out, g_.buffers[std::size_t(r)], bytes);
      out += bytes;
    }
    g_.barrier.arrive_and_wait();  // nobody reuses a buffer before all have read it
  }

 private:
  void publish(const void* p) {
    g_.buffers[std::size_t(rank_)] = p;
    g_.barrier.arrive_and_wait();
  }
  template <class U>
  void sum(void* data, std::size_t n) {
    publish(data);
    std::vector<U> s(n, U(0));
    for (int r = 0; r < g_.size; ++r) {
      const U* b = static_cast<const U*>(g_.buffers[std::size_t(r)]);
      for (std::size_t i = 0; i < n; ++i) s[i] += b[i];
    }
    g_.barrier.arrive_and_wait();
    std::copy(s.begin(), s.end(), static_cast<U*>(data));
  }

  ThreadGroup& g_;
  int rank_;
};

/// Runs f(reducer) on P threads, one per rank; rethrows the first error.
/// (Catch2's assertions are not thread-safe: f records, the caller checks.)
template <class F>
void run_ranks(int P, F f) {
  ThreadGroup g(P);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(P));
  std::vector<std::thread> threads;
  for (int r = 0; r < P; ++r)
    threads.emplace_back([&, r] {
      ThreadReducer reducer(g, r);
      try {
        f(reducer);
      } catch (...) {
        errors[std::size_t(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

template <class T>
std::vector<test::Run<T>> train_ranks(const test::Scenario& sc, int P) {
  std::vector<test::Run<T>> runs(static_cast<std::size_t>(P));
  run_ranks(P, [&](Reducer& r) { runs[std::size_t(r.rank())] = test::train<T>(sc, &r); });
  return runs;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const vqkit::error& e) {
    return e.what();
  }
  return "no exception";
}

}  // namespace

TEMPLATE_TEST_CASE("two ranks given half of every batch each match one process through k-means "
                   "init and refine and a dead-code re-init and a skipped batch",
                   "[distributed]", float, double) {
  const auto sc = test::reinit_scenario();
  const auto ref = test::train<TestType>(sc, nullptr);
  // The scenario covers what it should.
  REQUIRE(ref.steps[0].data_initialized);
  REQUIRE(test::init_count(ref) == 2);  // and the refine when the bank fills
  REQUIRE(ref.state.init_refined);
  REQUIRE(ref.state.reinits >= 1);
  REQUIRE(ref.state.skipped == 1);

  const auto runs = train_ranks<TestType>(sc, 2);
  CHECK(test::state_difference<TestType>(runs[0].state, runs[1].state) == "");
  CHECK(test::run_difference(runs[0], ref, 1e-6) == "");
  CHECK(test::run_difference(runs[1], ref, 1e-6) == "");
}

TEST_CASE("three ranks with uneven slices match one process", "[distributed]") {
  auto sc = test::reinit_scenario();
  sc.rows = 97;  // slices of 32, 32 and 33 rows
  const auto ref = test::train<double>(sc, nullptr);
  REQUIRE(ref.state.reinits >= 1);
  const auto runs = train_ranks<double>(sc, 3);
  CHECK(test::state_difference<double>(runs[0].state, runs[1].state) == "");
  CHECK(test::state_difference<double>(runs[0].state, runs[2].state) == "");
  CHECK(test::run_difference(runs[0], ref, 1e-6) == "");
}

TEST_CASE("masked batches under a reducer match one process given the whole batch and mask",
          "[distributed][mask]") {
  // Padded rows (NaN on even steps) are in no statistic; at step 5 the last
  // rank's slice has no real row (it still takes part), at step 6 no rank
  // has one (nothing changes); step 4 has a NaN real row (every rank skips).
  auto sc = test::reinit_scenario();
  sc.masked = true;
  const auto ref = test::train<double>(sc, nullptr);
  REQUIRE(ref.steps[0].data_initialized);
  REQUIRE(ref.state.reinits >= 1);
  REQUIRE(ref.state.skipped == 1);
  REQUIRE(ref.steps[6].batch_rows == 0);
  for (int P : {2, 3}) {
    INFO(P << " ranks");
    const auto runs = train_ranks<double>(sc, P);
    for (int r = 1; r < P; ++r)
      CHECK(test::state_difference<double>(runs[0].state, runs[std::size_t(r)].state) == "");
    CHECK(test::run_difference(runs[0], ref, 1e-6) == "");
    for (int s = 0; s < sc.steps; ++s) {
      if (s == 4) continue;  // skipped: no indices
      INFO("step " << s);
      IndexVector all(0);
      double distortion = 0;
      for (const auto& run : runs) {
        all.conservativeResize(all.size() + run.indices[std::size_t(s)].size());
        all.tail(run.indices[std::size_t(s)].size()) = run.indices[std::size_t(s)];
        distortion += run.distortion[std::size_t(s)];
      }
      CHECK(all == ref.indices[std::size_t(s)]);  // -1 on the padded rows
      CHECK(distortion == Approx(ref.distortion[std::size_t(s)]).epsilon(1e-9));
    }
  }
  // After the all-padded step 6 the reference's step counter did not move.
  CHECK(ref.state.step == sc.steps - 2);  // (steps 4, skipped, and 6 did not count)
}

TEST_CASE("a masked slice's bad mask makes every rank throw and changes nothing",
          "[distributed][mask][errors]") {
  auto cfg = test::reinit_scenario().cfg;
  cfg.non_finite = NonFinitePolicy::reject;
  std::vector<std::string> msg(2), nan_msg(2), unchanged(2);
  run_ranks(2, [&](Reducer& r) {
    const auto me = std::size_t(r.rank());
    VectorQuantizer<double> vq(cfg, cpu{1});
    vq.set_reducer(&r);
    RowMatrix<double> q;
    VectorQuantizer<double>::Context ctx;
    for (int s = 0; s < 3; ++s)
      vq.forward(test::gaussian<double>(50, 8, 10 * me + s), RowMask::Constant(50, true), q, ctx);
    vq.sync_memory_bank();
    const auto before = vq.state();
    RowMatrix<double> x = test::gaussian<double>(50, 8, 99 + me);
    msg[me] = message_of([&] { vq.forward(x, RowMask::Constant(me == 0 ? 49 : 50, true), q, ctx); });
    RowMask m = RowMask::Constant(50, true);
    m[3] = false;
    x(3, 0) = std::numeric_limits<double>::quiet_NaN();  // padded: fine
    if (me == 1) x(9, 4) = std::numeric_limits<double>::infinity();  // real: rejected
    nan_msg[me] = message_of([&] { vq.forward(x, m, q, ctx); });
    vq.sync_memory_bank();
    unchanged[me] = test::state_difference<double>(before, vq.state());
  });
  CHECK_THAT(msg[0], Catch::Contains("the row mask has 49 entries, the batch 50 rows"));
  CHECK_THAT(msg[1], Catch::Contains("rank 0 rejected its slice"));
  CHECK_THAT(nan_msg[1], Catch::Contains("non-finite value (inf) at row 9, column 4"));
  CHECK_THAT(nan_msg[0], Catch::Contains("rank 1 rejected its slice"));
  CHECK(unchanged[0] == "");
  CHECK(unchanged[1] == "");
}

TEST_CASE("the replace policy with a bank smaller than the batch matches one process",
          "[distributed]") {
  const auto sc = test::replace_scenario();
  const auto ref = test::train<float>(sc, nullptr);
  REQUIRE(ref.state.replaced > 0);
  REQUIRE(ref.state.bank_overflow > 0);
  const auto runs = train_ranks<float>(sc, 2);
  CHECK(test::state_difference<float>(runs[0].state, runs[1].state) == "");
  CHECK(test::run_difference(runs[0], ref, 1e-6) == "");
}

TEST_CASE("gradient mode (counts all-reduced) matches one process", "[distributed]") {
  const auto sc = test::gradient_scenario();
  const auto ref = test::train<double>(sc, nullptr);
  REQUIRE(ref.state.replaced > 0);
  const auto runs = train_ranks<double>(sc, 2);
  CHECK(test::state_difference<double>(runs[0].state, runs[1].state) == "");
  CHECK(test::run_difference(runs[0], ref, 1e-6) == "");
}

TEST_CASE("a rank's bad slice makes every rank throw and changes nothing",
          "[distributed][errors]") {
  auto cfg = test::reinit_scenario().cfg;
  cfg.non_finite = NonFinitePolicy::reject;
  std::vector<std::string> nan_msg(2), shape_msg(2), unchanged(2);
  std::vector<VectorQuantizer<float>::State> end(2);
  run_ranks(2, [&](Reducer& r) {
    const auto me = std::size_t(r.rank());
    VectorQuantizer<float> vq(cfg, cpu{1});
    vq.set_reducer(&r);
    RowMatrix<float> q;
    for (int s = 0; s < 3; ++s) vq.forward(test::gaussian<float>(50, 8, 10 * me + s), q);
    vq.sync_memory_bank();
    const auto before = vq.state();
    RowMatrix<float> x = test::gaussian<float>(50, 8, 99 + me);
    if (me == 1) x(7, 2) = std::numeric_limits<float>::quiet_NaN();
    nan_msg[me] = message_of([&] { vq.forward(x, q); });
    const RowMatrix<float> narrow = test::gaussian<float>(50, me == 0 ? 7 : 8, 5);
    shape_msg[me] = message_of([&] { vq.forward(narrow, q); });
    vq.sync_memory_bank();
    unchanged[me] = test::state_difference<float>(before, vq.state());
    vq.forward(test::gaussian<float>(50, 8, 200 + me), q);  // the ranks are still in step
    vq.sync_memory_bank();
    end[me] = vq.state();
  });
  CHECK_THAT(nan_msg[1], Catch::Contains("non-finite value (nan) at row 7, column 2"));
  CHECK_THAT(nan_msg[0], Catch::Contains("rank 1 rejected its slice"));
  CHECK_THAT(shape_msg[0], Catch::Contains("7 columns, expected 8"));
  CHECK_THAT(shape_msg[1], Catch::Contains("rank 0 rejected its slice"));
  CHECK(unchanged[0] == "");
  CHECK(unchanged[1] == "");
  CHECK(test::state_difference<float>(end[0], end[1]) == "");
}

TEST_CASE("set_reducer throws on every rank when the ranks' quantizers differ",
          "[distributed][errors]") {
  std::vector<std::string> msg(2);
  run_ranks(2, [&](Reducer& r) {
    auto cfg = test::reinit_scenario().cfg;
    cfg.seed = std::uint64_t(r.rank());  // the classic mistake
    VectorQuantizer<float> vq(cfg, cpu{1});
    msg[std::size_t(r.rank())] = message_of([&] { vq.set_reducer(&r); });
    if (vq.reducer() != nullptr) msg[std::size_t(r.rank())] += " (attached anyway)";
  });
  for (const auto& m : msg)
    CHECK_THAT(m, Catch::Contains("the quantizer of rank 1 differs from rank 0's"));
}

TEST_CASE("eval-mode forward is local: one rank may run it alone", "[distributed]") {
  const auto sc = test::reinit_scenario();
  std::vector<VectorQuantizer<double>::State> end(2);
  run_ranks(2, [&](Reducer& r) {
    VectorQuantizer<double> vq(sc.cfg, cpu{1});
    vq.set_reducer(&r);
    RowMatrix<double> q;
    for (int s = 0; s < 8; ++s) {
      const auto x = test::scenario_batch<double>(sc, s);
      const auto [first, count] = test::slice_of(sc.rows, r.rank(), 2);
      vq.forward(x.middleRows(first, count), q);
      if (r.rank() == 0) {  // a local evaluation, no collective
        vq.eval();
        vq.forward(test::gaussian<double>(10 + s, 8, 300), q);
        vq.train();
      }
    }
    vq.sync_memory_bank();
    end[std::size_t(r.rank())] = vq.state();
  });
  CHECK(test::state_difference<double>(end[0], end[1]) == "");
}

TEST_CASE("checkpoints under a reducer: after a sync every rank saves the same bytes and resumes "
          "in step",
          "[distributed][checkpoint]") {
  const auto sc = test::reinit_scenario();
  const auto straight = train_ranks<double>(sc, 2);  // the same run, not interrupted
  std::vector<std::string> refused(2);
  std::vector<std::vector<std::uint8_t>> bytes(2);
  std::vector<VectorQuantizer<double>::State> end(2);
  run_ranks(2, [&](Reducer& r) {
    const auto me = std::size_t(r.rank());
    const auto range = test::slice_of(sc.rows, r.rank(), 2);  // (first row, rows)
    auto slice = [&](int s) {
      const RowMatrix<double> x = test::scenario_batch<double>(sc, s);
      return RowMatrix<double>(x.middleRows(range.first, range.second));
    };
    VectorQuantizer<double> vq(sc.cfg, cpu{1});
    vq.set_reducer(&r);
    RowMatrix<double> q;
    int s = 0;
    for (; s < 12; ++s) vq.forward(slice(s), q);
    refused[me] = message_of([&] { (void)vq.state(); });
    vq.sync_memory_bank();
    bytes[me] = safetensors::serialize(to_safetensors(vq));  // rank 0 would write it
    // Every rank loads the checkpoint into a new quantizer, then attaches it.
    VectorQuantizer<double> back(sc.cfg, cpu{1});
    from_safetensors(safetensors::parse(bytes[me]), back);
    back.set_reducer(&r);
    for (; s < sc.steps; ++s) back.forward(slice(s), q);
    back.sync_memory_bank();
    end[me] = back.state();
  });
  CHECK_THAT(refused[0], Catch::Contains("call sync_memory_bank() on every rank first"));
  CHECK(bytes[0] == bytes[1]);
  CHECK(test::state_difference<double>(end[0], end[1]) == "");
  CHECK(test::state_difference<double>(end[0], straight[0].state) == "");
}

TEST_CASE("a reducer of size 1 is the single-process path", "[distributed]") {
  const auto sc = test::reinit_scenario();
  LocalReducer local;
  VectorQuantizer<float> vq(sc.cfg, cpu{1});
  vq.set_reducer(&local);
  CHECK(vq.reducer() == nullptr);
  const auto with = test::train<float>(sc, &local);
  const auto without = test::train<float>(sc, nullptr);
  CHECK(test::state_difference<float>(with.state, without.state) == "");

  // LocalReducer's collectives leave data as it is; a gather copies.
  std::vector<double> v{1.5, -2.0};
  local.all_reduce_sum(std::span<double>(v));
  local.broadcast(std::span<double>(v));
  CHECK(v == std::vector<double>{1.5, -2.0});
  std::vector<std::int64_t> all(2);
  const std::vector<std::size_t> counts{2};
  local.all_gather(std::span<const std::int64_t>(std::vector<std::int64_t>{4, 5}),
                   std::span<const std::size_t>(counts), std::span<std::int64_t>(all));
  CHECK(all == std::vector<std::int64_t>{4, 5});
  CHECK_THAT(message_of([&] {
               local.all_gather(std::span<const std::int64_t>(all.data(), 1),
                                std::span<const std::size_t>(counts), std::span<std::int64_t>(all));
             }),
             Catch::Contains("rank 0 contributes 1 elements, counts says 2"));
}

// ---- the composites: ResidualVQ and GroupedVQ under a reducer ----------------------

namespace {

/// "" when P ranks' runs match one process: every level's state identical
/// across ranks and within 1e-6 of the reference (codebook, EMA state and
/// bank rows; Rng, counters exact), every step's indices (the slices in
/// rank order) equal.
template <class Q>
std::string composite_difference(const std::vector<test::CompositeRun<Q>>& runs, const test::CompositeRun<Q>& ref) {
  std::ostringstream os;
  const auto want = test::level_states(ref.state);
  for (std::size_t r = 0; r < runs.size(); ++r) {
    const auto got = test::level_states(runs[r].state);
    if (got.size() != want.size()) return "level count differs";
    for (std::size_t l = 0; l < want.size(); ++l) {
      const auto across = test::state_difference<double>(got[l], test::level_states(runs[0].state)[l]);
      if (!across.empty()) os << "rank " << r << " level " << l << " vs rank 0: " << across << "; ";
      const auto d = test::level_difference(got[l], want[l], 1e-6);
      if (!d.empty()) os << "rank " << r << " level " << l << ": " << d;
    }
  }
  for (std::size_t s = 0; s < ref.indices.size(); ++s) {
    IndexMatrix all(0, ref.indices[s].cols());
    for (const auto& run : runs) {
      const auto& part = run.indices[s];
      all.conservativeResize(all.rows() + part.rows(), Eigen::NoChange);
      all.bottomRows(part.rows()) = part;
    }
    if (all != ref.indices[s]) {
      os << "step " << s << ": indices differ; ";
      break;
    }
  }
  return os.str();
}

template <class Q, class Config>
std::string composite_check(const Config& cfg, const test::Scenario& sc, int P) {
  const auto ref = test::train_composite<Q>(cfg, sc, nullptr);
  std::vector<test::CompositeRun<Q>> runs(static_cast<std::size_t>(P));
  run_ranks(P, [&](Reducer& r) { runs[std::size_t(r.rank())] = test::train_composite<Q>(cfg, sc, &r); });
  return composite_difference(runs, ref);
}

ResidualVQConfig rvq_config(bool shared, bool dropout) {
  ResidualVQConfig c;
  c.levels = 3;
  c.level = test::reinit_scenario().cfg;  // k-means init, refine, re-inits
  c.level.non_finite = NonFinitePolicy::reject;
  c.shared = shared;
  c.quantize_dropout = dropout;
  c.seed = 11;
  return c;
}

}  // namespace

TEST_CASE("ResidualVQ and GroupedVQ under a reducer match one process given the whole batch",
          "[distributed][composite]") {
  auto sc = test::reinit_scenario();
  sc.nan_step = -1;  // (the composites reject non-finite rows)
  auto masked = sc;
  masked.masked = true;  // incl. a step whose last slice is all padding, and an all-padded step

  // The reference exercises the levels' k-means init, refine and re-init.
  const auto ref = test::train_composite<ResidualVQ<double>>(rvq_config(false, true), sc, nullptr);
  const auto lv = test::level_states(ref.state);
  REQUIRE(lv[0].data_initialized);
  REQUIRE(lv[0].init_refined);
  REQUIRE(lv[0].reinits >= 1);
  int dropped = 0;  // steps where dropout left the last level out
  for (const auto& idx : ref.indices) dropped += (idx.col(2).array() < 0).all() ? 1 : 0;
  REQUIRE(dropped > 0);
  REQUIRE(dropped < sc.steps);

  SECTION("residual, separate codebooks, quantize dropout, masked, 2 and 3 ranks") {
    for (int P : {2, 3}) {
      INFO(P << " ranks");
      CHECK(composite_check<ResidualVQ<double>>(rvq_config(false, true), masked, P) == "");
    }
  }
  SECTION("residual, one shared codebook") {
    CHECK(composite_check<ResidualVQ<double>>(rvq_config(true, false), sc, 2) == "");
  }
  SECTION("grouped, separate and shared heads, masked") {
    GroupedVQConfig g;
    g.groups = 2;
    g.head = rvq_config(false, false).level;
    CHECK(composite_check<GroupedVQ<double>>(g, masked, 2) == "");
    g.shared = true;
    CHECK(composite_check<GroupedVQ<double>>(g, masked, 3) == "");
  }
  SECTION("grouped residual with dropout") {
    GroupedResidualVQConfig g;
    g.groups = 2;
    g.head = rvq_config(false, true);
    CHECK(composite_check<GroupedResidualVQ<double>>(g, sc, 2) == "");
  }
}

TEST_CASE("a composite's bad slice, or ranks that differ, make every rank throw and change nothing",
          "[distributed][composite][errors]") {
  const auto cfg = rvq_config(false, true);
  std::vector<std::string> nan_msg(2), mask_msg(2), unsynced(2), unchanged(2), differ(2);
  std::vector<ResidualVQ<double>::State> end(2);
  std::vector<bool> attached(2, true);
  run_ranks(2, [&](Reducer& r) {
    const auto me = std::size_t(r.rank());
    ResidualVQ<double> q(cfg, cpu{1});
    q.set_reducer(&r);
    RowMatrix<double> out;
    ResidualVQ<double>::Context ctx;
    for (int s = 0; s < 4; ++s) q.forward(test::gaussian<double>(40, 8, 10 * me + s), out, ctx);
    unsynced[me] = message_of([&] { (void)q.state(); });
    q.sync_memory_bank();
    const auto before = q.state();
    RowMatrix<double> x = test::gaussian<double>(40, 8, 99 + me);
    if (me == 1) x(5, 3) = std::numeric_limits<double>::quiet_NaN();
    nan_msg[me] = message_of([&] { q.forward(x, out, ctx); });  // before the dropout draw
    mask_msg[me] = message_of(
        [&] { q.forward(test::gaussian<double>(40, 8, 7), RowMask::Constant(me == 0 ? 39 : 40, true), out, ctx); });
    q.sync_memory_bank();
    const auto after = q.state();
    for (std::size_t l = 0; l < before.levels.size(); ++l)
      unchanged[me] += test::state_difference<double>(before.levels[l], after.levels[l]);
    if (before.rng != after.rng) unchanged[me] += "rng";
    if (me == 0) {  // eval is local: one rank alone
      q.eval();
      q.forward(test::gaussian<double>(9, 8, 300), out, ctx);
      q.train();
    }
    q.forward(test::gaussian<double>(40, 8, 200 + me), out, ctx);  // still in step
    q.sync_memory_bank();
    end[me] = q.state();

    auto other = cfg;
    other.seed = me;  // different dropout draws
    ResidualVQ<double> wrong(other, cpu{1});
    differ[me] = message_of([&] { wrong.set_reducer(&r); });
    attached[me] = wrong.reducer() != nullptr || wrong.level(0).reducer() != nullptr;
  });
  CHECK_THAT(unsynced[0], Catch::Contains("sync_memory_bank"));
  CHECK_THAT(nan_msg[1], Catch::Contains("non-finite value (nan) at row 5, column 3"));
  CHECK_THAT(nan_msg[0], Catch::Contains("rank 1 rejected its slice"));
  CHECK_THAT(mask_msg[0], Catch::Contains("the row mask has 39 entries, the batch 40 rows"));
  CHECK_THAT(mask_msg[1], Catch::Contains("rank 0 rejected its slice"));
  CHECK(unchanged[0] == "");
  CHECK(unchanged[1] == "");
  const auto a = test::level_states(end[0]), b = test::level_states(end[1]);
  for (std::size_t l = 0; l < a.size(); ++l) CHECK(test::state_difference<double>(a[l], b[l]) == "");
  CHECK(end[0].rng == end[1].rng);
  for (int r = 0; r < 2; ++r) {
    CHECK_THAT(differ[std::size_t(r)], Catch::Contains("ResidualVQ::set_reducer") &&
                                           Catch::Contains("rank 1 differs from rank 0's"));
    CHECK_FALSE(attached[std::size_t(r)]);
  }
}

// ---- FSQ and LFQ under a reducer -------------------------------------------------

namespace {

struct GridStep {
  IndexVector indices;
  RowMatrix<double> out, dx;
  CodebookMetrics metrics;
  Index real = 0;  ///< this slice's real rows
  double per_sample = 0, codebook = 0, commitment = 0;  ///< LFQ's loss terms
};
template <class Q>
struct GridRun {
  std::vector<GridStep> steps;
  typename Q::State state;
};

/// 12 masked steps of 60 rows (test::scenario_mask: at step 5 the last
/// half is padding, at step 6 every row), the whole batch without a
/// reducer, this rank's slice with one; dx is FSQ's slope (dout = 1) or
/// LFQ's loss gradient (no dout).
template <class Q, class Config>
GridRun<Q> train_grid(const Config& cfg, Reducer* reducer) {
  test::Scenario sc;
  sc.rows = 60;
  Q q(cfg);
  q.set_reducer(reducer);
  GridRun<Q> run;
  for (int s = 0; s < 12; ++s) {
    const RowMatrix<double> x = test::gaussian<double>(sc.rows, q.dim(), 500 + std::uint64_t(s));
    Index first = 0, count = sc.rows;
    if (reducer) std::tie(first, count) = test::slice_of(sc.rows, reducer->rank(), reducer->size());
    const RowMask m = test::scenario_mask(sc, s).segment(first, count);
    GridStep st;
    typename Q::Context ctx;
    q.forward(x.middleRows(first, count), m, st.out, ctx);
    st.indices = ctx.indices;
    st.metrics = ctx.metrics;
    st.real = Index(m.count());
    if constexpr (std::is_same_v<Q, LFQ<double>>) {
      q.backward(ctx, RowMatrix<double>(0, q.dim()), &st.dx);
      st.per_sample = ctx.loss.per_sample_entropy;
      st.codebook = ctx.loss.codebook_entropy;
      st.commitment = ctx.loss.commitment;
    } else {
      q.backward(ctx, RowMatrix<double>::Ones(count, q.dim()), &st.dx);
    }
    run.steps.push_back(std::move(st));
  }
  run.state = q.state();
  q.set_reducer(nullptr);
  return run;
}

/// "" when P ranks match one process: indices and outputs row for row,
/// metrics and usage state of the whole batch, LFQ's codebook entropy equal
/// and its per-rank means and gradients those of one process rescaled to
/// the rank's rows (n / n_r).
template <class Q>
std::string grid_difference(const std::vector<GridRun<Q>>& runs, const GridRun<Q>& ref) {
  std::ostringstream os;
  const auto near = [](double a, double b) { return std::abs(a - b) <= 1e-12 * std::max(1.0, std::abs(b)); };
  for (std::size_t s = 0; s < ref.steps.size(); ++s) {
    const GridStep& want = ref.steps[s];
    Index first = 0;
    double per_sample = 0, commitment = 0;
    for (std::size_t r = 0; r < runs.size(); ++r) {
      const GridStep& got = runs[r].steps[s];
      const Index rows = got.indices.size();
      if (got.indices != want.indices.segment(first, rows)) os << "step " << s << " rank " << r << ": indices; ";
      if (got.out != want.out.middleRows(first, rows)) os << "step " << s << " rank " << r << ": out; ";
      const auto &a = got.metrics, &b = want.metrics;
      if (a.usage != b.usage || a.window_usage != b.window_usage || a.batch_rows != b.batch_rows ||
          !near(a.perplexity, b.perplexity))
        os << "step " << s << " rank " << r << ": metrics; ";
      if (got.real > 0) {  // gradients: one process's, times n / n_r (FSQ: 1)
        const double scale = std::is_same_v<Q, LFQ<double>> ? double(want.real) / double(got.real) : 1.0;
        const RowMatrix<double> expect = scale * want.dx.middleRows(first, rows);
        if (!test::close(got.dx, expect, 1e-9)) os << "step " << s << " rank " << r << ": dx; ";
      } else if (got.dx.cwiseAbs().maxCoeff() != 0) {
        os << "step " << s << " rank " << r << ": dx of padded rows; ";
      }
      if (!near(got.codebook, want.codebook)) os << "step " << s << " rank " << r << ": codebook entropy; ";
      per_sample += got.per_sample * double(got.real);
      commitment += got.commitment * double(got.real);
      first += rows;
    }
    if (want.real > 0 && (!near(per_sample / double(want.real), want.per_sample) ||
                          !near(commitment / double(want.real), want.commitment)))
      os << "step " << s << ": the ranks' per-sample entropy or commitment, weighed by rows; ";
  }
  for (std::size_t r = 0; r < runs.size(); ++r) {
    const auto &a = runs[r].state, &b = ref.state;
    if (a.steps_since_used != b.steps_since_used || a.used_since_reset != b.used_since_reset ||
        a.step != b.step)
      os << "rank " << r << ": usage state; ";
  }
  return os.str();
}

template <class Q, class Config>
std::string grid_check(const Config& cfg, int P) {
  const auto ref = train_grid<Q>(cfg, nullptr);
  std::vector<GridRun<Q>> runs(static_cast<std::size_t>(P));
  run_ranks(P, [&](Reducer& r) { runs[std::size_t(r.rank())] = train_grid<Q>(cfg, &r); });
  return grid_difference(runs, ref);
}

LfqConfig lfq_config() {
  LfqConfig c;
  c.dim = 6;
  c.temperature = 2.0;  // soft enough that every term has a gradient
  c.entropy_weight = 0.1;
  c.usage_window = 3;
  return c;
}

}  // namespace

TEST_CASE("FSQ and LFQ under a reducer: the whole batch's usage and codebook entropy, per-rank "
          "means and gradients", "[distributed][grid]") {
  FsqConfig f;
  f.levels = {5, 4, 3};
  f.usage_window = 3;
  // The reference has what the comparison needs: an LFQ entropy gradient.
  const auto ref = train_grid<LFQ<double>>(lfq_config(), nullptr);
  REQUIRE(ref.steps[0].dx.cwiseAbs().maxCoeff() > 0);
  REQUIRE(ref.steps[0].codebook > 0);
  REQUIRE(ref.steps[6].real == 0);
  for (int P : {2, 3}) {
    INFO(P << " ranks");
    CHECK(grid_check<FSQ<double>>(f, P) == "");
    CHECK(grid_check<LFQ<double>>(lfq_config(), P) == "");
  }
}

TEST_CASE("FSQ and LFQ under a reducer: a bad slice or differing ranks make every rank throw",
          "[distributed][grid][errors]") {
  std::vector<std::string> nan_msg(2), differ(2);
  std::vector<LFQ<double>::State> before(2), after(2);
  run_ranks(2, [&](Reducer& r) {
    const auto me = std::size_t(r.rank());
    LFQ<double> q(lfq_config());
    q.set_reducer(&r);
    RowMatrix<double> out;
    LFQ<double>::Context ctx;
    q.forward(test::gaussian<double>(20, 6, 3 + me), out, ctx);
    before[me] = q.state();
    RowMatrix<double> z = test::gaussian<double>(20, 6, 9 + me);
    if (me == 0) z(2, 1) = std::numeric_limits<double>::infinity();
    nan_msg[me] = message_of([&] { q.forward(z, out, ctx); });
    after[me] = q.state();
    q.forward(test::gaussian<double>(20, 6, 11 + me), out, ctx);  // still in step

    FsqConfig f;
    f.levels = me == 0 ? std::vector<int>{5, 4} : std::vector<int>{4, 5};  // same K, other grid
    FSQ<double> wrong(f);
    differ[me] = message_of([&] { wrong.set_reducer(&r); });
    if (wrong.reducer() != nullptr) differ[me] += " (attached anyway)";
  });
  CHECK_THAT(nan_msg[0], Catch::Contains("z holds a non-finite value (inf) at row 2, column 1"));
  CHECK_THAT(nan_msg[1], Catch::Contains("rank 0 rejected its slice"));
  for (std::size_t r = 0; r < 2; ++r) {
    CHECK(before[r].step == after[r].step);
    CHECK(before[r].steps_since_used == after[r].steps_since_used);
    CHECK_THAT(differ[r], Catch::Contains("FSQ::set_reducer") && Catch::Contains("rank 1 differs from rank 0's") &&
                              !Catch::Contains("attached anyway"));
  }
}
