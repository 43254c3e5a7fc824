#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>
#include <vqkit/io/checkpoint.hpp>
#include <vqkit/io/config_json.hpp>

#include "field_ranges.hpp"
#include "test_util.hpp"

using namespace vqkit;
namespace st = vqkit::safetensors;
namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;

namespace {

/// A fresh directory under the system temp folder, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("vqkit_test_checkpoint_" + std::to_string(::getpid()) +
                                        "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

Bytes read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_all(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

template <class M>
bool same_bits(const M& a, const M& b) {
  using S = typename M::Scalar;
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), sizeof(S) * static_cast<std::size_t>(a.size())) == 0);
}

/// "" when a and b agree bit for bit in every field, else the first field
/// that differs. The memory bank's storage past its size (never written,
/// never read, saved as zeros) is compared only if whole_bank.
template <class T>
std::string state_diff(const typename VectorQuantizer<T>::State& a,
                       const typename VectorQuantizer<T>::State& b, bool whole_bank) {
  if (!same_bits(a.codes, b.codes)) return "codes";
  if (!same_bits(a.grad, b.grad)) return "grad";
  if (!same_bits(a.ema.cluster_size, b.ema.cluster_size)) return "ema.cluster_size";
  if (!same_bits(a.ema.embed_sum, b.ema.embed_sum)) return "ema.embed_sum";
  if (!same_bits(a.steps_since_used, b.steps_since_used)) return "steps_since_used";
  if (!same_bits(a.used_since_reset, b.used_since_reset)) return "used_since_reset";
  if (a.bank_size != b.bank_size) return "bank_size";
  if (a.bank_head != b.bank_head) return "bank_head";
  if (a.bank_overflow != b.bank_overflow) return "bank_overflow";
  if (whole_bank) {
    if (!same_bits(a.bank, b.bank)) return "bank";
  } else {
    if (a.bank.rows() != b.bank.rows() || a.bank.cols() != b.bank.cols()) return "bank shape";
    const RowMatrix<T> ra = a.bank.topRows(a.bank_size), rb = b.bank.topRows(b.bank_size);
    if (!same_bits(ra, rb)) return "bank rows";
  }
  if (a.rng != b.rng) return "rng";
  if (a.step != b.step) return "step";
  if (a.reinits != b.reinits) return "reinits";
  if (a.replaced != b.replaced) return "replaced";
  if (a.skipped != b.skipped) return "skipped";
  if (a.data_initialized != b.data_initialized) return "data_initialized";
  if (a.init_refined != b.init_refined) return "init_refined";
  if (a.training != b.training) return "training";
  return "";
}

VectorQuantizerConfig train_config(DeadCodePolicy policy) {
  VectorQuantizerConfig c;
  c.codebook_size = 64;
  c.dim = 16;
  c.seed = 11;
  c.memory_bank_size = 512;  // full after 4 steps of 128 rows: the refining init runs too
  c.dead.policy = policy;
  c.dead.dead_after = 3;  // kmeans_reinit: checks every 5 steps from step 5
  c.dead.check_every = 5;
  c.dead.min_steps = 5;
  c.dead.replace_threshold = 0.5;  // replace: fires on the shifted phases below
  return c;
}

/// The batch of step s (1-based): phases of 5 steps of plain, shifted and
/// narrow data, so codes die and the dead-code policies fire in every half
/// of a 60-step run.
template <class T>
RowMatrix<T> batch(int s) {
  RowMatrix<T> x = test::gaussian<T>(128, 16, 1000 + std::uint64_t(s));
  switch ((s / 5) % 3) {
    case 1:
      x.col(0).array() += T(3);
      break;
    case 2:
      x *= T(0.01);
      break;
    default:
      break;
  }
  return x;
}

template <class T>
void train(VectorQuantizer<T>& vq, int first, int last) {
  RowMatrix<T> q;
  for (int s = first; s <= last; ++s) vq.forward(batch<T>(s), q);
}

/// A valid config with every field away from its default (checked in "the
/// config's JSON ...").
VectorQuantizerConfig every_field_changed() {
  VectorQuantizerConfig c;
  c.codebook_size = 300;
  c.dim = 7;
  c.metric = Metric::cosine;
  c.update = CodebookUpdate::gradient;
  c.ema.decay = 0.1 + 0.2;  // 0.30000000000000004: needs all 17 digits
  c.ema.eps = 1.0 / 3.0;
  c.loss.codebook_weight = 1e-300;
  c.loss.commitment_weight = 123456.789;
  c.loss.reduction = Reduction::sum_over_dim;
  c.dead.policy = DeadCodePolicy::none;
  c.dead.dead_after = 9;
  c.dead.check_every = 8;
  c.dead.min_steps = 0;
  c.dead.max_dead_fraction = 0.999;
  c.dead.replace_threshold = 2.5;
  c.dead.reinit_below_usage = 0.125;
  c.dead.replace_after = 17;
  c.dead.replace_from_steps = 3;
  c.ema.warmup_decay = 0.5;
  c.ema.warmup_steps = 1234;
  c.init = InitMethod::normalized;
  c.kmeans_iterations = 0;
  c.kmeans_min_cluster_fraction = 0.0;
  c.memory_bank_size = 301;
  c.init_min_rows = 300;
  c.refine_init = false;
  c.usage_window = 77;
  c.non_finite = NonFinitePolicy::skip;
  c.seed = std::numeric_limits<std::uint64_t>::max();
  c.search.metric = Metric::cosine;
  c.search.row_block = 3;
  c.search.code_block = 5;
  c.search_precision = Precision::bf16_rerank;
  c.gradient_estimator = GradientEstimator::rotation;
  return c;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const vqkit::error& e) {
    return e.what();
  }
  return "no exception";
}

/// f must throw a vqkit::error containing `expected` and leave vq's state
/// exactly as it was.
template <class T>
void require_fails_untouched(VectorQuantizer<T>& vq, const std::function<void()>& f,
                             const std::string& expected) {
  const auto before = vq.state();
  const std::string msg = error_of(f);
  INFO("message: " << msg);
  CHECK_THAT(msg, Catch::Contains(expected));
  CHECK(state_diff<T>(before, vq.state(), true) == "");
}

}  // namespace

TEMPLATE_TEST_CASE("a resumed run continues bit-identically", "[checkpoint][resume]", float,
                   double) {
  using T = TestType;
  const auto policy = GENERATE(DeadCodePolicy::kmeans_reinit, DeadCodePolicy::replace);
  INFO("policy " << to_string(policy));
  const auto cfg = train_config(policy);
  TempDir dir;
  const std::string path = dir / "vq.safetensors";

  // Run A: 30 steps, checkpoint, 30 more.
  VectorQuantizer<T> a(cfg);
  train(a, 1, 30);
  save_checkpoint(path, a, {{"run", "A"}});
  const auto saved = a.state();
  auto fired = [&](const VectorQuantizer<T>& vq) {
    return policy == DeadCodePolicy::replace ? vq.replaced_count() : vq.reinit_count();
  };
  const auto fired_before = fired(a);
  CHECK(fired_before > 0);  // the policy fired before the checkpoint ...
  REQUIRE(saved.bank_size == 512);
  train(a, 31, 60);
  CHECK(fired(a) > fired_before);  // ... and after it

  // Run B: a fresh quantizer, loaded, the same 30 steps.
  VectorQuantizer<T> b(cfg);
  load_checkpoint(path, b);
  CHECK(state_diff<T>(saved, b.state(), true) == "");  // the bank is full: compare all of it
  RowMatrix<T> q;
  VectorQuantizer<T> a2(cfg);  // A again from the saved state, step by step
  a2.set_state(saved);
  for (int s = 31; s <= 60; ++s) {
    const auto x = batch<T>(s);
    const auto ca = a2.forward(x, q);
    const auto cb = b.forward(x, q);
    REQUIRE(ca.indices == cb.indices);
    REQUIRE(ca.loss.total == cb.loss.total);
    REQUIRE(ca.reinitialized == cb.reinitialized);
    REQUIRE(ca.replaced == cb.replaced);
  }
  CHECK(state_diff<T>(a.state(), b.state(), true) == "");
  CHECK(state_diff<T>(a.state(), a2.state(), true) == "");

  // load_quantizer builds the same quantizer from the file's own config.
  auto c = load_quantizer<T>(path);
  CHECK(config_to_metadata(c.config()) == config_to_metadata(cfg));
  CHECK(state_diff<T>(saved, c.state(), true) == "");
  train(c, 31, 60);
  CHECK(state_diff<T>(a.state(), c.state(), true) == "");
}

TEMPLATE_TEST_CASE("in-memory round trip: gradient mode, eval mode, partial bank",
                   "[checkpoint][resume]", float, double) {
  using T = TestType;
  auto cfg = train_config(DeadCodePolicy::replace);
  cfg.update = CodebookUpdate::gradient;
  cfg.init = InitMethod::normalized;
  cfg.loss.reduction = Reduction::sum_over_dim;
  cfg.non_finite = NonFinitePolicy::skip;
  VectorQuantizer<T> a(cfg);
  RowMatrix<T> q, dx;
  RowMatrix<T> bad = batch<T>(1);
  bad(5, 5) = std::numeric_limits<T>::quiet_NaN();
  REQUIRE(a.forward(bad, q).skipped);
  REQUIRE(a.skipped_batches() == 1);
  auto ctx = a.forward(batch<T>(1), q);  // 128 of 512 bank rows
  a.backward(ctx, test::gaussian<T>(128, 16, 5), &dx);
  REQUIRE(a.codebook_grad().norm() > 0);
  a.eval();

  const st::File f = to_safetensors(a);
  VectorQuantizer<T> b(cfg);
  from_safetensors(f, b);
  CHECK(state_diff<T>(a.state(), b.state(), false) == "");
  CHECK_FALSE(b.is_training());
  CHECK(b.skipped_batches() == 1);
  // The unused bank rows are stored as zeros, so the bytes are deterministic.
  const RowMatrix<T> bank = f.matrix<T>("memory_bank.rows");
  CHECK(bank.bottomRows(512 - 128).isZero(0));
  CHECK(st::serialize(to_safetensors(a)) == st::serialize(to_safetensors(b)));

  b.train();
  a.train();
  const auto x = batch<T>(2);
  RowMatrix<T> qa, qb;
  CHECK(a.forward(x, qa).indices == b.forward(x, qb).indices);
  CHECK(state_diff<T>(a.state(), b.state(), false) == "");
}

TEMPLATE_TEST_CASE("the checkpoint is a plain safetensors file", "[checkpoint][format]", float,
                   double) {
  using T = TestType;
  const auto cfg = train_config(DeadCodePolicy::kmeans_reinit);
  VectorQuantizer<T> vq(cfg);
  train(vq, 1, 12);
  TempDir dir;
  const std::string path = dir / "vq.safetensors";
  save_checkpoint(path, vq, {{"run", "exp-7"}, {"note", "résumé"}});

  // Read it without vqkit: 8-byte little-endian length, JSON, data.
  const Bytes bytes = read_all(path);
  REQUIRE(bytes.size() >= 8);
  std::uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | bytes[std::size_t(i)];
  REQUIRE(8 + hlen <= bytes.size());
  CHECK((8 + hlen) % 8 == 0);  // the data starts 8-byte aligned
  const auto j = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(hlen));
  const std::uint8_t* data = bytes.data() + 8 + hlen;

  const std::string F = sizeof(T) == 4 ? "F32" : "F64";
  const std::int64_t K = 64, D = 16, C = 512;
  const std::map<std::string, std::pair<std::string, std::vector<std::int64_t>>> expected = {
      {"codebook", {F, {K, D}}},
      {"codebook_grad", {F, {K, D}}},
      {"ema.cluster_size", {F, {K}}},
      {"ema.embed_sum", {F, {K, D}}},
      {"usage.steps_since_used", {"I64", {K}}},
      {"usage.used_since_reset", {"I64", {K}}},
      {"memory_bank.rows", {F, {C, D}}},
      {"memory_bank.size", {"I64", {}}},
      {"memory_bank.head", {"I64", {}}},
      {"memory_bank.overflow", {"I64", {}}},
      {"rng.state", {"U64", {4}}},
      {"step", {"I64", {}}},
      {"reinits", {"I64", {}}},
      {"replaced", {"I64", {}}},
      {"skipped", {"I64", {}}},
      {"data_initialized", {"I64", {}}},
      {"init_refined", {"I64", {}}},
      {"training", {"I64", {}}},
      {"last_init_step", {"I64", {}}},
  };
  std::set<std::string> names;
  for (const auto& [name, entry] : j.items())
    if (name != "__metadata__") names.insert(name);
  std::set<std::string> expected_names;
  for (const auto& [name, e] : expected) expected_names.insert(name);
  CHECK(names == expected_names);
  for (const auto& [name, e] : expected) {
    INFO("tensor " << name);
    REQUIRE(j.contains(name));
    CHECK(j.at(name).at("dtype") == e.first);
    CHECK(j.at(name).at("shape").template get<std::vector<std::int64_t>>() == e.second);
  }

  // The codebook's raw bytes are vq.codebook(), row-major.
  const auto off = j.at("codebook").at("data_offsets").template get<std::vector<std::uint64_t>>();
  REQUIRE(off.size() == 2);
  REQUIRE(off[1] - off[0] == std::uint64_t(K * D) * sizeof(T));
  REQUIRE(8 + hlen + off[1] <= bytes.size());
  CHECK(std::memcmp(data + off[0], vq.codebook().data(), off[1] - off[0]) == 0);
  // So are the step counter and the RNG words.
  const auto step_off = j.at("step").at("data_offsets").template get<std::vector<std::uint64_t>>();
  std::int64_t step = -1;
  std::memcpy(&step, data + step_off[0], 8);
  CHECK(step == 12);
  const auto rng_off =
      j.at("rng.state").at("data_offsets").template get<std::vector<std::uint64_t>>();
  CHECK(std::memcmp(data + rng_off[0], vq.rng().state().data(), 32) == 0);

  // Metadata: format, scalar type, the full config, the caller's keys.
  const auto& m = j.at("__metadata__");
  CHECK(m.at("format") == "vqkit.quantizer");
  CHECK(m.at("version") == "1");
  CHECK(m.at("scalar") == (sizeof(T) == 4 ? "float32" : "float64"));
  CHECK(m.at("codebook_size") == "64");
  CHECK(m.at("dim") == "16");
  CHECK(m.at("metric") == "l2");
  CHECK(m.at("update") == "ema");
  CHECK(m.at("ema.decay") == "0.99");
  CHECK(m.at("ema.eps") == "1e-05");
  CHECK(m.at("loss.codebook_weight") == "0.25");
  CHECK(m.at("loss.commitment_weight") == "1");
  CHECK(m.at("loss.reduction") == "mean");
  CHECK(m.at("dead.policy") == "kmeans_reinit");
  CHECK(m.at("dead.dead_after") == "3");
  CHECK(m.at("dead.max_dead_fraction") == "0.03");
  CHECK(m.at("init") == "kmeans");
  CHECK(m.at("memory_bank_size") == "512");
  CHECK(m.at("refine_init") == "true");
  CHECK(m.at("seed") == "11");
  CHECK(m.at("search.metric") == "l2");
  CHECK(m.at("search.row_block") == "128");
  CHECK(m.at("run") == "exp-7");
  CHECK(m.at("note") == "résumé");
  // Every config key and nothing else besides format, version, scalar and the extras.
  CHECK(m.size() == config_to_metadata(cfg).size() + 3 + 2);
  std::map<std::string, std::string> meta;
  for (const auto& [k, v] : m.items()) meta[k] = v.template get<std::string>();
  CHECK(config_to_metadata(config_from_metadata(meta)) == config_to_metadata(cfg));
}

TEST_CASE("config metadata round-trips every field exactly", "[checkpoint][config]") {
  const VectorQuantizerConfig c = every_field_changed();
  const auto m = config_to_metadata(c);
  CHECK(m.size() == 34);
  CHECK(m.at("search_precision") == "bf16_rerank");
  CHECK(m.at("gradient_estimator") == "rotation");
  CHECK(m.at("dead.replace_after") == "17");
  CHECK(m.at("ema.warmup_decay") == "0.5");
  CHECK(m.at("ema.decay") == "0.30000000000000004");
  CHECK(m.at("seed") == "18446744073709551615");
  CHECK(m.at("refine_init") == "false");
  CHECK(m.at("dead.policy") == "none");
  CHECK(m.at("non_finite") == "skip");
  const auto back = config_from_metadata(m);
  CHECK(config_to_metadata(back) == m);
  CHECK(back.ema.decay == c.ema.decay);
  CHECK(back.ema.eps == c.ema.eps);
  CHECK(back.loss.codebook_weight == c.loss.codebook_weight);
  CHECK(back.seed == c.seed);
  CHECK(back.search.code_block == 5);

  auto with = [&](const std::string& key, const std::string& value) {
    auto mm = m;
    if (value.empty())
      mm.erase(key);
    else
      mm[key] = value;
    return error_of([&] { config_from_metadata(mm); });
  };
  CHECK_THAT(with("dim", ""), Catch::Contains("lacks the config key 'dim'"));
  CHECK_THAT(with("dim", "7.5"), Catch::Contains("'dim' has the value '7.5', expected an integer"));
  CHECK_THAT(with("ema.decay", "0.5x"), Catch::Contains("'ema.decay' has the value '0.5x'"));
  CHECK_THAT(with("refine_init", "yes"), Catch::Contains("expected true or false"));
  CHECK_THAT(with("metric", "manhattan"), Catch::Contains("'metric' has the value 'manhattan'"));
  CHECK_THAT(with("seed", "-1"), Catch::Contains("'seed' has the value '-1'"));
  CHECK_THAT(with("ema.decay", "1.5"), Catch::Contains("decay=1.5"));  // validate() runs
}

TEST_CASE("the config's JSON comes from its field list: every key, exact round trip, partial "
          "overrides, bad keys and values named", "[checkpoint][config][json]") {
  const VectorQuantizerConfig c = every_field_changed();
  const auto j = config_to_json(c);
  const auto d = config_to_json(VectorQuantizerConfig{});
  // the same keys, in the same order, as the checkpoint metadata
  const auto entries = detail::ckpt::config_entries(c);
  REQUIRE(j.size() == entries.size());
  Index i = 0;
  for (auto it = j.begin(); it != j.end(); ++it, ++i) {
    CHECK(it.key() == entries[std::size_t(i)].first);
    CHECK(*it != d.at(it.key()));  // every_field_changed changes every field
  }
  CHECK(j.at("ema.decay").get<double>() == 0.1 + 0.2);
  CHECK(j.at("seed").get<std::uint64_t>() == std::numeric_limits<std::uint64_t>::max());
  CHECK(j.at("dead.policy") == "none");
  CHECK(j.at("refine_init") == false);
  // exact round trip, also through text
  CHECK(config_to_metadata(config_from_json(j)) == config_to_metadata(c));
  CHECK(config_to_metadata(config_from_json(nlohmann::json::parse(j.dump()))) ==
        config_to_metadata(c));
  // a partial object changes only its keys, on a copy of the base
  const auto p = config_from_json(nlohmann::json::parse(R"({"ema.decay": 0.5, "dead.policy": "replace"})"), c);
  auto expect = c;
  expect.ema.decay = 0.5;
  expect.dead.policy = DeadCodePolicy::replace;
  CHECK(config_to_metadata(p) == config_to_metadata(expect));
  CHECK(config_to_metadata(config_from_json(nlohmann::json::object(), c)) == config_to_metadata(c));

  const auto bad = [&](const char* text) {
    return error_of([&] { config_from_json(nlohmann::json::parse(text), c); });
  };
  CHECK_THAT(bad(R"({"ema.decai": 0.5})"),
             Catch::Contains("unknown key 'ema.decai'") && Catch::Contains("known keys: codebook_size") &&
                 Catch::Contains("ema.decay"));
  CHECK_THAT(bad(R"([1, 2])"), Catch::Contains("expected a JSON object"));
  CHECK_THAT(bad(R"({"ema.decay": "0.5"})"), Catch::Contains(R"(ema.decay="0.5" must be a number)"));
  CHECK_THAT(bad(R"({"dim": 7.5})"), Catch::Contains("dim=7.5 must be an integer"));
  CHECK_THAT(bad(R"({"kmeans_iterations": 3000000000})"),
             Catch::Contains("kmeans_iterations=3000000000 must be an integer in [-2147483648, 2147483647]"));
  CHECK_THAT(bad(R"({"seed": -1})"), Catch::Contains("seed=-1 must be an integer in [0, "));
  CHECK_THAT(bad(R"({"refine_init": 1})"), Catch::Contains("refine_init=1 must be true or false"));
  CHECK_THAT(bad(R"({"gradient_estimator": "rotate"})"),
             Catch::Contains(R"(gradient_estimator="rotate" must be one of straight_through, rotation)"));
  CHECK_THAT(bad(R"({"ema.decay": 1.5})"),
             Catch::Contains("VectorQuantizerConfig: ema.decay must lie in (0, 1), got ema.decay=1.5"));
  // the checks that tie fields together run too (on the default base: k-means init)
  CHECK_THAT(error_of([] { config_from_json(nlohmann::json::parse(R"({"memory_bank_size": 10})")); }),
             Catch::Contains("memory_bank_size (10) must be >= init_min_rows (2048)"));

  // from a file: errors name it
  TempDir dir;
  const std::string path = dir / "vq.json";
  {
    std::ofstream(path) << R"({"codebook_size": 64, "gradient_estimator": "rotation"})";
  }
  const auto f = load_config_json(path);
  CHECK(f.codebook_size == 64);
  CHECK(f.gradient_estimator == GradientEstimator::rotation);
  CHECK(f.dim == VectorQuantizerConfig{}.dim);
  {
    std::ofstream(path) << R"({"codebook_size": 64,})";
  }
  CHECK_THAT(error_of([&] { load_config_json(path); }),
             Catch::Contains("invalid JSON in '" + path + "'"));
  {
    std::ofstream(path) << R"({"usage_window": 0})";
  }
  CHECK_THAT(error_of([&] { load_config_json(path); }),
             Catch::Contains("'" + path + "'") && Catch::Contains("usage_window must be >= 1"));
}

TEST_CASE("the family's configs as JSON: nested level / head objects, exact round trips, partial "
          "overrides at any depth, bad keys and values named", "[checkpoint][config][json]") {
  ResidualVQConfig r;
  r.levels = 3;
  r.shared = true;
  r.quantize_dropout = true;
  r.dropout_min_levels = 2;
  r.seed = 77;
  r.level = every_field_changed();
  r.level.non_finite = NonFinitePolicy::reject;  // (a residual stack requires it)
  GroupedResidualVQConfig g;
  g.groups = 5;
  g.shared = true;
  g.head = r;
  FsqConfig f;
  f.levels = {4, 4, 3};
  f.usage_window = 3;
  f.eps = 0.25;
  LfqConfig l;
  l.dim = 6;
  l.temperature = 0.5;
  l.diversity_gamma = 2;

  // Every config round-trips exactly, also through text; the nested config
  // is its own object, written by the same function.
  const auto round_trip = [](const auto& c) {
    using C = std::remove_cvref_t<decltype(c)>;
    const auto j = config_to_json(c);
    const C back = config_from_json(nlohmann::json::parse(j.dump()), C{});
    return config_to_json(back) == j && j != config_to_json(C{});
  };
  CHECK(round_trip(r));
  CHECK(round_trip(g));
  CHECK(round_trip(f));
  CHECK(round_trip(l));
  const auto jr = config_to_json(r);
  CHECK(jr.at("level") == config_to_json(r.level));
  CHECK(jr.at("levels") == 3);
  CHECK(config_to_json(g).at("head") == jr);
  CHECK(config_to_json(f).at("levels") == nlohmann::json::parse("[4, 4, 3]"));

  // A partial object changes only its keys, at any depth.
  const auto p = config_from_json(nlohmann::json::parse(R"({"levels": 5, "level": {"codebook_size": 64}})"), r);
  CHECK(p.levels == 5);
  CHECK(p.level.codebook_size == 64);
  auto expect = r;
  expect.levels = 5;
  expect.level.codebook_size = 64;
  CHECK(config_to_json(p) == config_to_json(expect));
  CHECK(config_from_json(nlohmann::json::parse(R"({"head": {"level": {"dim": 3}}})"), g).head.level.dim == 3);

  const auto bad = [](const auto& base, const char* text) {
    return error_of([&] { config_from_json(nlohmann::json::parse(text), base); });
  };
  CHECK_THAT(bad(r, R"({"level_": {}})"),
             Catch::Contains("ResidualVQConfig: unknown key 'level_'") &&
                 Catch::Contains("known keys: levels, quantize_dropout, dropout_min_levels, seed, shared, level"));
  CHECK_THAT(bad(r, R"({"level": {"ema.decai": 0.5}})"),
             Catch::Contains("ResidualVQConfig: level: unknown key 'ema.decai'"));
  CHECK_THAT(bad(r, R"({"level": [1]})"), Catch::Contains("ResidualVQConfig: level: expected a JSON object"));
  CHECK_THAT(bad(r, R"({"level": {"ema.decay": 1.5}})"),
             Catch::Contains("ResidualVQConfig: level: VectorQuantizerConfig: ema.decay must lie in (0, 1)"));
  CHECK_THAT(bad(r, R"({"level": {"non_finite": "skip"}})"),
             Catch::Contains("level.non_finite must be reject"));
  CHECK_THAT(bad(r, R"({"dropout_min_levels": 4})"),
             Catch::Contains("dropout_min_levels must lie in [1, levels=3], got dropout_min_levels=4"));
  CHECK_THAT(bad(g, R"({"groups": 0})"), Catch::Contains("groups must be >= 1, got groups=0"));
  CHECK_THAT(bad(g, R"({"head": {"levels": 0}})"),
             Catch::Contains("GroupedResidualVQConfig: head: ResidualVQConfig: levels must be >= 1"));
  CHECK_THAT(bad(f, R"({"levels": 5})"), Catch::Contains("levels=5 must be an array"));
  CHECK_THAT(bad(f, R"({"levels": [8, "5"]})"), Catch::Contains(R"(levels[1]="5" must be an integer)"));
  CHECK_THAT(bad(f, R"({"levels": [8, 1]})"), Catch::Contains("levels[1] must be >= 2, got 1"));
  CHECK_THAT(bad(l, R"({"dim": 31})"), Catch::Contains("LfqConfig: dim must lie in [1, 30], got dim=31"));

  // from a file, typed by its base
  TempDir dir;
  const std::string path = dir / "fsq.json";
  {
    std::ofstream(path) << R"({"levels": [8, 5, 5, 5, 5]})";
  }
  const FsqConfig loaded = load_config_json(path, FsqConfig{});
  CHECK(loaded.levels == std::vector<int>{8, 5, 5, 5, 5});
  CHECK(loaded.eps == FsqConfig{}.eps);
}

TEST_CASE("validation messages come from the field list: each bounded field outside its range "
          "is refused by name", "[checkpoint][config]") {
  // The field list's own ranges, walked (field_ranges.hpp): 23 bounded fields.
  CHECK(test::check_field_ranges(VectorQuantizerConfig{}, "VectorQuantizerConfig") == 23);
  // A few ranges spelled out independently of the list.
  const auto msg = [](auto edit) {
    VectorQuantizerConfig c;
    edit(c);
    return error_of([&] { c.validate(); });
  };
  CHECK_THAT(msg([](auto& c) { c.ema.eps = 0; }), Catch::Contains("ema.eps must be > 0, got ema.eps=0"));
  CHECK_THAT(msg([](auto& c) { c.kmeans_min_cluster_fraction = 1.5; }),
             Catch::Contains("kmeans_min_cluster_fraction must lie in [0, 1], got kmeans_min_cluster_fraction=1.5"));
  CHECK_THAT(msg([](auto& c) { c.dead.max_dead_fraction = 1; }),
             Catch::Contains("dead.max_dead_fraction must lie in [0, 1), got dead.max_dead_fraction=1"));
  CHECK_THAT(msg([](auto& c) { c.search.row_block = 0; }),
             Catch::Contains("search.row_block must be >= 1, got search.row_block=0"));
  CHECK_THAT(msg([](auto& c) { c.loss.commitment_weight = std::numeric_limits<double>::infinity(); }),
             Catch::Contains("loss.commitment_weight must be finite, got loss.commitment_weight=inf"));
  CHECK(msg([](auto&) {}) == "no exception");
}

TEST_CASE("a mismatched checkpoint is rejected, naming the difference, and changes nothing",
          "[checkpoint][errors]") {
  TempDir dir;
  const std::string path = dir / "vq.safetensors";
  const auto cfg = train_config(DeadCodePolicy::kmeans_reinit);
  {
    VectorQuantizer<float> src(cfg);
    train(src, 1, 8);
    save_checkpoint(path, src);
  }

  auto check_config_mismatch = [&](VectorQuantizerConfig other, const std::string& expected) {
    VectorQuantizer<float> target(other);
    train(target, 100, 103);  // a non-trivial state that must survive
    require_fails_untouched(target, [&] { load_checkpoint(path, target); }, expected);
  };
  auto other = cfg;
  other.codebook_size = 32;
  check_config_mismatch(other, "load_checkpoint('" + path +
                                   "'): codebook_size is 64 in the checkpoint but 32 in this "
                                   "quantizer");
  other = cfg;
  other.loss.codebook_weight = 0.3;
  check_config_mismatch(other, "loss.codebook_weight is 0.25 in the checkpoint but 0.3 in this");
  other = cfg;
  other.loss.commitment_weight = 0.5;
  check_config_mismatch(other, "loss.commitment_weight is 1 in the checkpoint but 0.5 in this");
  other = cfg;
  other.dead.policy = DeadCodePolicy::replace;
  check_config_mismatch(other, "dead.policy is kmeans_reinit in the checkpoint but replace in");
  other = cfg;
  other.ema.decay = 0.999;
  check_config_mismatch(other, "ema.decay is 0.99 in the checkpoint but 0.999 in");
  other = cfg;
  other.memory_bank_size = 0;  // the default, 20 * K: a different bank
  check_config_mismatch(other, "memory_bank_size is 512 in the checkpoint but 0 in");
  other = cfg;
  other.search.code_block = 64;
  check_config_mismatch(other, "search.code_block is 512 in the checkpoint but 64 in");
  other = cfg;
  other.seed = 12;
  check_config_mismatch(other, "seed is 11 in the checkpoint but 12 in");

  SECTION("scalar type") {
    VectorQuantizer<double> target(cfg);
    train(target, 100, 103);
    require_fails_untouched(target, [&] { load_checkpoint(path, target); },
                            "the checkpoint holds float32 tensors, but this quantizer uses "
                            "float64");
    CHECK_THAT(error_of([&] { load_quantizer<double>(path); }),
               Catch::Contains("holds float32 tensors"));
  }

  SECTION("equivalent spellings of a value match") {
    st::File f = st::load(path);
    for (const auto& [key, value] : std::map<std::string, std::string>{
             {"loss.codebook_weight", "0.250"}, {"codebook_size", "064"}})
      f.metadata[key] = value;
    VectorQuantizer<float> target(cfg);
    from_safetensors(f, target);
    CHECK(target.step() == 8);
  }
}

TEST_CASE("a damaged checkpoint is rejected and changes nothing", "[checkpoint][errors]") {
  TempDir dir;
  const std::string path = dir / "vq.safetensors";
  const auto cfg = train_config(DeadCodePolicy::replace);
  VectorQuantizer<float> src(cfg);
  train(src, 1, 8);
  save_checkpoint(path, src);
  const Bytes good = read_all(path);
  const st::File good_file = st::parse(good);

  VectorQuantizer<float> target(cfg);
  train(target, 100, 103);

  SECTION("truncated files") {
    for (std::size_t n : {std::size_t(0), std::size_t(4), std::size_t(8), std::size_t(100),
                          good.size() / 2, good.size() - 1}) {
      INFO("truncated to " << n << " of " << good.size() << " bytes");
      write_all(path, Bytes(good.begin(), good.begin() + std::ptrdiff_t(n)));
      require_fails_untouched(target, [&] { load_checkpoint(path, target); }, "safetensors::load");
    }
  }
  SECTION("a missing file") {
    require_fails_untouched(target, [&] { load_checkpoint(dir / "nope.safetensors", target); },
                            "cannot open");
  }
  SECTION("a corrupted header") {
    Bytes bad = good;
    bad[8] = 'x';  // the JSON's opening brace
    write_all(path, bad);
    require_fails_untouched(target, [&] { load_checkpoint(path, target); }, "not valid JSON");
    bad = good;
    bad[0] ^= 0x40;  // the header length
    write_all(path, bad);
    require_fails_untouched(target, [&] { load_checkpoint(path, target); }, "safetensors::load");
  }
  SECTION("a NaN in the codebook's bytes") {
    std::uint64_t hlen = 0;
    std::memcpy(&hlen, good.data(), 8);
    const auto j = nlohmann::json::parse(good.begin() + 8, good.begin() + 8 + std::ptrdiff_t(hlen));
    const auto b = j.at("codebook").at("data_offsets")[0].get<std::size_t>();
    Bytes bad = good;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memcpy(bad.data() + 8 + hlen + b + 4 * 17, &nan, 4);
    write_all(path, bad);
    require_fails_untouched(target, [&] { load_checkpoint(path, target); },
                            "tensor 'codebook' holds a non-finite value");
  }

  auto edited = [&](const std::function<void(st::File&)>& edit, const std::string& expected) {
    st::File f = good_file;
    edit(f);
    require_fails_untouched(target, [&] { from_safetensors(f, target); }, expected);
  };
  auto replaced = [&](const std::string& name, st::Tensor t, const std::string& expected) {
    edited([&](st::File& f) { f.tensors[name] = std::move(t); }, expected);
  };
  auto with_meta = [&](const std::string& key, const std::string& value,
                       const std::string& expected) {
    edited([&](st::File& f) { f.metadata[key] = value; }, expected);
  };
  SECTION("tensors") {
    edited([](st::File& f) { f.tensors.erase("rng.state"); },
           "from_safetensors: the checkpoint has no tensor 'rng.state'");
    replaced("ema.cluster_size", st::from_vector(Vector<float>::Ones(63)),
             "tensor 'ema.cluster_size' has shape [63], expected [64]");
    replaced("codebook", st::from_matrix(RowMatrix<float>::Zero(16, 64)),
             "tensor 'codebook' has shape [16, 64], expected [64, 16]");
    replaced("usage.steps_since_used", st::from_vector(Vector<double>::Zero(64)),
             "tensor 'usage.steps_since_used' has dtype F64, expected I64");
    replaced("step", st::from_vector(std::vector<std::int64_t>{8}),
             "tensor 'step' has shape [1], expected []");
    replaced("step", st::from_scalar<std::int64_t>(-1), "negative counters");
    replaced("skipped", st::from_scalar<std::int64_t>(-3), "skipped -3");
    replaced("memory_bank.head", st::from_scalar<std::int64_t>(512),
             "memory_bank.head is 512, outside [0, 512)");
    replaced("memory_bank.size", st::from_scalar<std::int64_t>(513), "memory_bank.size is 513");
    replaced("training", st::from_scalar<std::int64_t>(2), "'training' must be 0 or 1, got 2");
    replaced("usage.used_since_reset", st::from_vector(IndexVector::Constant(64, 3)),
             "usage.used_since_reset' holds a value other than 0 or 1");
    replaced("usage.steps_since_used", st::from_vector(IndexVector::Constant(64, -1)),
             "usage.steps_since_used' holds a negative value");
    replaced("rng.state", st::from_vector(std::vector<std::uint64_t>(4, 0)), "all zeros");
    replaced("ema.cluster_size", st::from_vector(Vector<float>::Constant(64, -1.0f)),
             "ema.cluster_size' holds a negative value");
    replaced("ema.cluster_size", st::from_vector(Vector<float>::Zero(64)),
             "tensor 'ema.cluster_size' sums to 0");
    edited([](st::File& f) {
      RowMatrix<float> bank = f.matrix<float>("memory_bank.rows");
      bank(3, 2) = std::numeric_limits<float>::infinity();
      f.tensors["memory_bank.rows"] = st::from_matrix(bank);
    }, "tensor 'memory_bank.rows' holds a non-finite value");
    edited([](st::File& f) { f.tensors["codebook"].bytes.pop_back(); },
           "tensor 'codebook' holds 4095 bytes, but its shape needs 4096");
  }
  SECTION("metadata") {
    edited([](st::File& f) { f.metadata.erase("format"); },
           "not a vqkit quantizer checkpoint (metadata 'format' is missing");
    with_meta("format", "something.else", "metadata 'format' is 'something.else'");
    with_meta("version", "2", "unsupported checkpoint version '2'; this vqkit reads version 1");
    edited([](st::File& f) { f.metadata.erase("dead.min_steps"); },
           "lacks the config key 'dead.min_steps' (this quantizer has 5)");
    with_meta("refine_init", "1", "refine_init is 1 in the checkpoint but true in this quantizer");
    with_meta("scalar", "float16",
              "the checkpoint holds float16 tensors, but this quantizer uses float32");
  }
  SECTION("a config larger than the file's tensors is rejected before it allocates") {
    st::File f = good_file;
    f.metadata["codebook_size"] = "1000000";  // 1e6 codes: 4 GB of codebook, bank and EMA
    f.metadata["memory_bank_size"] = "2000000";
    f.metadata["init_min_rows"] = "2000000";
    st::save(path, f);
    CHECK_THAT(error_of([&] { load_quantizer<float>(path); }),
               Catch::Contains("tensor 'codebook' does not have the shape its config implies "
                               "(codebook_size=1000000"));
  }
  SECTION("a plain safetensors file") {
    st::File f;
    f.tensors["codebook"] = st::from_matrix(src.codebook());
    st::save(path, f);
    require_fails_untouched(target, [&] { load_checkpoint(path, target); },
                            "not a vqkit quantizer checkpoint");
    CHECK_THAT(error_of([&] { load_quantizer<float>(path); }),
               Catch::Contains("not a vqkit quantizer checkpoint"));
  }
  // And after all that, the good file still loads.
  write_all(path, good);
  load_checkpoint(path, target);
  CHECK(state_diff<float>(src.state(), target.state(), true) == "");
}

TEST_CASE("a failed save leaves the previous checkpoint intact", "[checkpoint][atomic]") {
  TempDir dir;
  const std::string path = dir / "vq.safetensors";
  const auto cfg = train_config(DeadCodePolicy::kmeans_reinit);
  VectorQuantizer<float> vq(cfg);
  train(vq, 1, 10);
  save_checkpoint(path, vq, {{"epoch", "1"}});
  const auto old_state = vq.state();
  const Bytes old_bytes = read_all(path);
  train(vq, 11, 20);

  auto old_file_intact = [&] {
    CHECK(read_all(path) == old_bytes);
    VectorQuantizer<float> fresh(cfg);
    load_checkpoint(path, fresh);
    CHECK(state_diff<float>(old_state, fresh.state(), true) == "");
    CHECK(st::load(path).metadata.at("epoch") == "1");
  };

  SECTION("the temporary file cannot be created") {
    // save() writes "<path>.tmp.<pid>" first: a directory of that name makes
    // it fail even as root.
    const std::string blocker = path + ".tmp." + std::to_string(::getpid());
    fs::create_directory(blocker);
    CHECK_THAT(error_of([&] { save_checkpoint(path, vq, {{"epoch", "2"}}); }),
               Catch::Contains("cannot create the temporary file"));
    fs::remove(blocker);
    old_file_intact();
  }
  SECTION("extra metadata that reuses a reserved key") {
    for (const char* key : {"codebook_size", "format", "scalar", "loss.codebook_weight"}) {
      CHECK_THAT(error_of([&] { save_checkpoint(path, vq, {{key, "x"}}); }),
                 Catch::Contains(std::string("extra_metadata key '") + key + "' is reserved"));
    }
    old_file_intact();
  }
  SECTION("extra metadata that is not UTF-8") {
    CHECK_THAT(error_of([&] { save_checkpoint(path, vq, {{"note", "\xff\xfe"}}); }),
               Catch::Contains("not valid UTF-8"));
    old_file_intact();
  }
  SECTION("a directory that does not exist") {
    CHECK_THAT(error_of([&] { save_checkpoint(dir / "missing/vq.safetensors", vq); }),
               Catch::Contains("cannot create the temporary file"));
    CHECK_FALSE(fs::exists(dir / "missing"));
    old_file_intact();
  }
  SECTION("a successful save replaces it and leaves no temporary file") {
    save_checkpoint(path, vq, {{"epoch", "2"}});
    VectorQuantizer<float> fresh(cfg);
    load_checkpoint(path, fresh);
    CHECK(state_diff<float>(vq.state(), fresh.state(), true) == "");
    CHECK(st::load(path).metadata.at("epoch") == "2");
  }
  int temp_files = 0;
  for (const auto& e : fs::directory_iterator(dir.path))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) ++temp_files;
  CHECK(temp_files == 0);
}

TEST_CASE("search_precision: saved, legacy checkpoints load as fp32, bf16 training equals fp32",
          "[checkpoint][config]") {
  TempDir dir;
  const std::string path = dir / "vq.safetensors";
  auto cfg = train_config(DeadCodePolicy::replace);
  cfg.dim = 256;  // where the bf16 search pays off
  cfg.search_precision = Precision::bf16_rerank;
  VectorQuantizer<float> bf(cfg);
  auto cfg32 = cfg;
  cfg32.search_precision = Precision::fp32;
  VectorQuantizer<float> fp(cfg32);
  // bf16 + exact re-rank gives the fp32 search's indices and distances, so
  // the two quantizers train identically, bit for bit.
  RowMatrix<float> q1, q2;
  for (int s = 1; s <= 12; ++s) {
    const RowMatrix<float> x = test::gaussian<float>(128, 256, std::uint64_t(s));
    const auto c1 = bf.forward(x, q1);
    const auto c2 = fp.forward(x, q2);
    REQUIRE(c1.indices == c2.indices);
  }
  CHECK(bf.codebook() == fp.codebook());
  save_checkpoint(path, bf);
  st::File f = st::load(path);
  CHECK(f.metadata.at("search_precision") == "bf16_rerank");
  CHECK(config_from_metadata(f.metadata).search_precision == Precision::bf16_rerank);
  VectorQuantizer<float> other(cfg);
  from_safetensors(f, other);
  CHECK(other.codebook() == bf.codebook());
  // A precision that differs is named; an unknown name is rejected.
  CHECK_THAT(error_of([&] { from_safetensors(f, fp); }),
             Catch::Contains("search_precision is bf16_rerank in the checkpoint but fp32"));
  f.metadata["search_precision"] = "int8";
  CHECK_THAT(error_of([&] { config_from_metadata(f.metadata); }),
             Catch::Contains("'search_precision' has the value 'int8'"));
  // A checkpoint written before the key existed loads as fp32.
  f.metadata.erase("search_precision");
  CHECK(config_from_metadata(f.metadata).search_precision == Precision::fp32);
  VectorQuantizer<float> legacy(cfg32);
  from_safetensors(f, legacy);
  CHECK(legacy.codebook() == bf.codebook());
  CHECK_THAT(error_of([&] { from_safetensors(f, bf); }),
             Catch::Contains("search_precision is fp32 in the checkpoint but bf16_rerank"));
}

// Issue 16's fields: saved with the state that drives them (last_init_step);
// a checkpoint written before them loads with every one of them off.
TEST_CASE("moving-encoder fields: saved, legacy checkpoints load with them off",
          "[checkpoint][config]") {
  TempDir dir;
  const std::string path = dir / "vq.safetensors";
  auto cfg = train_config(DeadCodePolicy::kmeans_reinit);
  cfg.dead.reinit_below_usage = 0.3;
  cfg.dead.replace_after = 4;
  cfg.ema.warmup_steps = 20;
  VectorQuantizer<float> vq(cfg);
  RowMatrix<float> q;
  for (int s = 1; s <= 12; ++s) vq.forward(test::gaussian<float>(64, cfg.dim, std::uint64_t(40 + s)), q);
  REQUIRE(vq.last_init_step() > 0);  // the refining init ran after step 0
  save_checkpoint(path, vq);
  st::File f = st::load(path);
  CHECK(f.metadata.at("dead.reinit_below_usage") == "0.3");
  CHECK(f.metadata.at("ema.warmup_steps") == "20");
  VectorQuantizer<float> back(cfg);
  from_safetensors(f, back);
  CHECK(back.last_init_step() == vq.last_init_step());
  CHECK(back.codebook() == vq.codebook());
  // Written before the fields existed: no keys, no last_init_step tensor.
  for (const char* k : {"ema.warmup_decay", "ema.warmup_steps", "dead.reinit_below_usage",
                        "dead.replace_after", "dead.replace_from_steps"})
    f.metadata.erase(k);
  f.tensors.erase("last_init_step");
  const auto legacy_cfg = config_from_metadata(f.metadata);
  CHECK(legacy_cfg.dead.reinit_below_usage == 0.0);
  CHECK(legacy_cfg.dead.replace_after == 0);
  CHECK(legacy_cfg.dead.replace_from_steps == 0);
  CHECK(legacy_cfg.ema.warmup_steps == 0);
  VectorQuantizer<float> legacy(legacy_cfg);
  from_safetensors(f, legacy);
  CHECK(legacy.last_init_step() == 0);
  CHECK(legacy.codebook() == vq.codebook());
  // Into a quantizer with the new defaults it is refused, naming the key.
  CHECK_THAT(error_of([&] { from_safetensors(f, back); }), Catch::Contains("ema.warmup_steps is 0"));
  // A last_init_step past the step count is refused.
  f.tensors["last_init_step"] = st::from_scalar<std::int64_t>(vq.step() + 1);
  VectorQuantizer<float> bad(legacy_cfg);
  CHECK_THAT(error_of([&] { from_safetensors(f, bad); }), Catch::Contains("last_init_step is"));
}
