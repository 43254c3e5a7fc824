// Data-parallel training over MPI. Runs under mpirun (ctest -L mpi runs it
// with two ranks): every rank gets its slice of every batch (rank 0 the first
// rows), and must end bit-identical to every other rank and equal (1e-6
// relative) to one process that sees the whole batch, which every rank also
// runs locally as the reference.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <mpi.h>

#include <vqkit/distributed/mpi.hpp>

#include "test_distributed_util.hpp"

using namespace vqkit;

namespace {

MpiReducer* world = nullptr;  // set by main()

/// Collective: whether `ok` holds on every rank.
bool on_every_rank(bool ok) {
  std::int64_t bad = ok ? 0 : 1;
  world->all_reduce_sum(std::span<std::int64_t>(&bad, 1));
  return bad == 0;
}

/// Collective: whether every rank's state is bit-identical to rank 0's (the
/// codebook compared value by value, the rest by fingerprint).
template <class T>
bool same_on_every_rank(const typename VectorQuantizer<T>::State& s) {
  const auto P = std::size_t(world->size());
  const std::vector<std::size_t> counts(P, std::size_t(s.codes.size()));
  std::vector<T> all(P * std::size_t(s.codes.size()));
  world->all_gather(std::span<const T>(s.codes.data(), std::size_t(s.codes.size())),
                    std::span<const std::size_t>(counts), std::span<T>(all));
  bool same = true;
  for (std::size_t r = 1; r < P; ++r)
    same = same && std::equal(all.begin(), all.begin() + std::ptrdiff_t(counts[0]),
                              all.begin() + std::ptrdiff_t(r * counts[0]));
  detail::Fingerprint f;
  for (const auto* m : {&s.codes, &s.ema.embed_sum, &s.bank}) f.matrix(*m);
  f.matrix(s.ema.cluster_size);
  f.matrix(s.steps_since_used);
  f.matrix(s.used_since_reset);
  f.values(s.bank_size, s.bank_head, s.bank_overflow, s.rng, s.step, s.reinits, s.replaced,
           s.skipped, s.data_initialized, s.init_refined);
  std::int64_t root = std::int64_t(f.value()), mine = root;
  world->broadcast(std::span<std::int64_t>(&root, 1), 0);
  return on_every_rank(same && root == mine);
}

template <class T>
void check_scenario(const test::Scenario& sc) {
  const auto ref = test::train<T>(sc, nullptr);
  const auto run = test::train<T>(sc, world);
  CHECK(same_on_every_rank<T>(run.state));
  const std::string diff = test::run_difference(run, ref, 1e-6);
  INFO("rank " << world->rank() << ": " << diff);
  CHECK(on_every_rank(diff.empty()));
}

}  // namespace

TEST_CASE("MpiReducer: sums bit-identical on every rank and broadcast and uneven gather", "[mpi]") {
  const int P = world->size(), me = world->rank();
  REQUIRE(P >= 2);
  std::int64_t n = me + 1;
  world->all_reduce_sum(std::span<std::int64_t>(&n, 1));
  CHECK(n == std::int64_t(P) * (P + 1) / 2);

  std::vector<float> v(1000);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = 0.1f * float(me + 1) * float(i) + 1e-3f;
  world->all_reduce_sum(std::span<float>(v));
  std::vector<float> b = v;
  world->broadcast(std::span<float>(b), P - 1);
  CHECK(on_every_rank(b == v));  // every rank got the same bits as the last one

  std::vector<std::size_t> counts(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) counts[std::size_t(r)] = std::size_t(r + 1);
  const std::vector<double> mine(std::size_t(me + 1), double(me));
  std::vector<double> all(std::size_t(P * (P + 1) / 2));
  world->all_gather(std::span<const double>(mine), std::span<const std::size_t>(counts),
                    std::span<double>(all));
  std::vector<double> expect;
  for (int r = 0; r < P; ++r) expect.insert(expect.end(), std::size_t(r + 1), double(r));
  CHECK(all == expect);
}

TEMPLATE_TEST_CASE("two ranks match one process through k-means init and refine and a dead-code "
                   "re-init and a skipped batch",
                   "[mpi]", float, double) {
  const auto sc = test::reinit_scenario();
  check_scenario<TestType>(sc);
  const auto ref = test::train<TestType>(sc, nullptr);
  CHECK(ref.state.reinits >= 1);  // the scenario forces a re-init
  CHECK(test::init_count(ref) == 2);  // the k-means init and its refine
}

TEST_CASE("the replace policy with a bank smaller than the batch matches one process", "[mpi]") {
  check_scenario<float>(test::replace_scenario());
}

TEST_CASE("gradient mode matches one process", "[mpi]") {
  check_scenario<double>(test::gradient_scenario());
}

TEST_CASE("a non-finite slice on the last rank makes every rank throw", "[mpi][errors]") {
  auto cfg = test::reinit_scenario().cfg;
  cfg.non_finite = NonFinitePolicy::reject;
  VectorQuantizer<float> vq(cfg, cpu{1});
  vq.set_reducer(world);
  RowMatrix<float> q;
  RowMatrix<float> x = test::gaussian<float>(40, 8, 7 + std::uint64_t(world->rank()));
  const bool last = world->rank() == world->size() - 1;
  if (last) x(3, 4) = std::numeric_limits<float>::infinity();
  std::string msg = "no exception";
  try {
    vq.forward(x, q);
  } catch (const vqkit::error& e) {
    msg = e.what();
  }
  CHECK_THAT(msg, Catch::Contains(last ? "non-finite value (inf) at row 3, column 4"
                                       : "rejected its slice"));
  x(3, 4) = 0;
  vq.forward(x, q);  // still in step
  vq.sync_memory_bank();
  CHECK(same_on_every_rank<float>(vq.state()));
  vq.set_reducer(nullptr);
}

TEST_CASE("a residual stack with quantize dropout and row masks matches one process", "[mpi]") {
  ResidualVQConfig cfg;
  cfg.levels = 3;
  cfg.level = test::reinit_scenario().cfg;
  cfg.level.non_finite = NonFinitePolicy::reject;
  cfg.quantize_dropout = true;
  cfg.seed = 11;
  auto sc = test::reinit_scenario();
  sc.nan_step = -1;
  sc.masked = true;
  const auto ref = test::train_composite<ResidualVQ<double>>(cfg, sc, nullptr);
  const auto run = test::train_composite<ResidualVQ<double>>(cfg, sc, world);
  const auto want = test::level_states(ref.state), got = test::level_states(run.state);
  REQUIRE(got.size() == want.size());
  for (std::size_t l = 0; l < got.size(); ++l) {
    CHECK(same_on_every_rank<double>(got[l]));
    const std::string diff = test::level_difference(got[l], want[l], 1e-6);
    INFO("rank " << world->rank() << ", level " << l << ": " << diff);
    CHECK(on_every_rank(diff.empty()));
  }
  CHECK(on_every_rank(run.state.rng == ref.state.rng));
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  std::int64_t failed = 0;
  {
    MpiReducer reducer;
    world = &reducer;
    failed = Catch::Session().run(argc, argv) != 0 ? 1 : 0;
    reducer.all_reduce_sum(std::span<std::int64_t>(&failed, 1));  // fail if any rank failed
    world = nullptr;
  }
  MPI_Finalize();
  return failed == 0 ? 0 : 1;
}
