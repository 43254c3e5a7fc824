// Tests of include/vqkit/tokenizer/config.hpp (presets against design.md §3,
// JSON round trip, rejected keys and values, the example files) and of the
// training tooling in include/vqkit/util/progress.hpp.
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>
#include <vqkit/tokenizer/config.hpp>
#include <vqkit/util/progress.hpp>

using namespace vqkit;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("vqkit_test_tokcfg_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const std::string kExamples = std::string(VQKIT_FIXTURE_DIR) + "/../../examples/configs/";

}  // namespace

TEST_CASE("paper preset carries design.md §3's numbers") {
  const TokenizerConfig c = TokenizerConfig::paper();
  CHECK(c.roi_x_min == -80.0);
  CHECK(c.roi_x_max == 80.0);
  CHECK(c.roi_y_min == -80.0);
  CHECK(c.roi_y_max == 80.0);
  CHECK(c.roi_z_min == -4.5);
  CHECK(c.roi_z_max == 4.5);
  CHECK(c.voxels_x == 1024);
  CHECK(c.voxels_y == 1024);
  CHECK(c.voxels_z == 64);
  CHECK(c.pointnet_dim == 16);
  CHECK(c.bev_dim == 64);
  CHECK(c.patch_size == 4);
  CHECK(c.embed_dim == 128);
  CHECK(c.window_size == 8);
  CHECK(c.num_heads == 8);
  CHECK(c.stage1_depth == 2);
  CHECK(c.stage2_depth == 6);
  CHECK(c.merged_dim == 256);
  CHECK(c.codebook_size == 1024);
  CHECK(c.code_dim == 1024);
  CHECK(c.token_grid_x() == 128);  // "VQ ... on a 128x128 token grid"
  CHECK(c.token_grid_y() == 128);
  CHECK(c.feature_grid_xy == 512);  // (512, 512, 64, 16) feature grid
  CHECK(c.feature_grid_z == 64);
  CHECK(c.feature_channels == 16);
  CHECK(c.occupancy_pool == 8);  // max-pooled 8x in BEV
  CHECK(c.depth_eps == 0.4);
  // The seed's fix and the paper: codebook term 0.25, commitment term 1.0.
  CHECK(c.codebook_weight == 0.25);
  CHECK(c.commitment_weight == 1.0);
  CHECK(c.lr == 1e-3);
  CHECK(c.beta2 == 0.95);
  CHECK(c.weight_decay == 1e-4);
  CHECK(c.warmup_steps == 4000);
  CHECK(c.grad_clip == 0.1);
  CHECK(c.batch_size == 16);
  CHECK_NOTHROW(c.validate());
  const auto g = c.voxel_grid();
  CHECK(g.nx == 1024);
  CHECK(g.size_x() == Approx(0.15625));
  const auto q = c.quantizer_config();
  CHECK(q.codebook_size == 1024);
  CHECK(q.dim == 1024);
  CHECK(q.loss.codebook_weight == 0.25);
  CHECK(q.loss.commitment_weight == 1.0);
  CHECK(q.search_precision == vqkit::Precision::fp32);
  CHECK_NOTHROW(q.validate());
  // The search precision goes through JSON into the quantizer's config.
  const auto b = TokenizerConfig::parse(R"({"preset": "paper", "vq_search_precision": "bf16_rerank"})");
  CHECK(b.vq_search_precision == "bf16_rerank");
  CHECK(b.quantizer_config().search_precision == vqkit::Precision::bf16_rerank);
  CHECK(TokenizerConfig::parse(b.to_json().dump()) == b);
}

TEST_CASE("small preset: the CPU config of design.md §3 and docs/tokenizer.md") {
  const TokenizerConfig c = TokenizerConfig::small();
  CHECK(c.roi_x_min == -25.6);
  CHECK(c.roi_x_max == 25.6);
  CHECK(c.voxels_x == 128);
  CHECK(c.voxels_y == 128);
  CHECK(c.voxels_z == 16);
  CHECK(c.token_grid_x() == 16);
  CHECK(c.patch_grid_x() == 32);
  CHECK(c.codebook_size >= 256);
  CHECK(c.codebook_size <= 512);
  CHECK(c.code_dim == 64);
  CHECK(c.feature_upsample() == 4);
  CHECK(c.occupancy_x() == 32);  // one coarse cell per decoder token
  CHECK(c.codebook_weight == 0.25);
  CHECK(c.commitment_weight == 1.0);
  CHECK(c.depth_eps == 0.4);
  CHECK_NOTHROW(c.validate());
  CHECK(c.voxel_grid().size_x() == Approx(0.4));
  CHECK(c == TokenizerConfig{});
}

TEST_CASE("config JSON round trip, presets and the example files") {
  TempDir dir;
  for (const TokenizerConfig& base : {TokenizerConfig::small(), TokenizerConfig::paper()}) {
    TokenizerConfig c = base;
    c.lr = 3.5e-4;
    c.seed = 18446744073709551615ull;  // the largest u64 survives
    c.ray_near = 0.123456789012345;
    c.save(dir / "c.json");
    const TokenizerConfig back = TokenizerConfig::load(dir / "c.json");
    CHECK(back == c);
    CHECK(TokenizerConfig::from_json(c.to_json()) == c);
    // every field is written
    CHECK(c.to_json().size() == TokenizerConfig::fields().size());
  }
  // "preset" picks the base, other keys override it
  const auto p = TokenizerConfig::parse(R"({"preset": "paper", "batch_size": 4})");
  TokenizerConfig expect = TokenizerConfig::paper();
  expect.batch_size = 4;
  CHECK(p == expect);
  CHECK(TokenizerConfig::parse("{}") == TokenizerConfig::small());
  // the shipped examples are exactly the presets
  CHECK(TokenizerConfig::load(kExamples + "small.json") == TokenizerConfig::small());
  CHECK(TokenizerConfig::load(kExamples + "paper.json") == TokenizerConfig::paper());
  // The seed's quantizer settings on the small model, with issue 16's fix.
  for (const Index K : {512, 1024}) {
    const auto c = TokenizerConfig::load(kExamples + "seed_vq_" + std::to_string(K) + ".json");
    auto expect = TokenizerConfig::small();
    expect.codebook_size = K;
    expect.ema_decay = 0.99;
    expect.dead_code_policy = "kmeans_reinit";
    expect.memory_bank_size = 20 * K;
    // K = 1024: 10 idle steps (measured, docs/tokenizer.md) rather than the
    // automatic 20.
    expect.replace_after = K == 512 ? -1 : 10;
    expect.replace_from_steps = 1;
    CHECK(c == expect);
    const auto q = c.quantizer_config();
    CHECK(q.dead.policy == DeadCodePolicy::kmeans_reinit);
    CHECK(q.dead.replace_after == expect.replace_after);
    CHECK(q.dead.replace_from_steps == 1);
    CHECK(q.ema.decay == 0.99);
  }
}

TEST_CASE("config JSON: unknown keys, wrong types and bad values are rejected by name") {
  const auto bad = [](const std::string& text) { return TokenizerConfig::parse(text); };
  CHECK_THROWS_WITH(bad(R"({"learning_rate": 0.1})"),
                    Contains("unknown key 'learning_rate'") && Contains("0.1") && Contains("lr"));
  CHECK_THROWS_WITH(bad(R"({"beta": 0.25})"), Contains("unknown key 'beta'"));
  CHECK_THROWS_WITH(bad(R"({"patch_size": 4.5})"), Contains("patch_size=4.5") && Contains("integer"));
  CHECK_THROWS_WITH(bad(R"({"voxels_x": "128"})"), Contains("voxels_x=\"128\""));
  CHECK_THROWS_WITH(bad(R"({"lr": true})"), Contains("lr=true") && Contains("number"));
  CHECK_THROWS_WITH(bad(R"({"lr": null})"), Contains("lr=null"));
  CHECK_THROWS_WITH(bad(R"({"seed": -1})"), Contains("seed=-1"));
  CHECK_THROWS_WITH(bad(R"({"preset": "huge"})"), Contains("preset") && Contains("huge"));
  CHECK_THROWS_WITH(bad(R"([1, 2])"), Contains("JSON object"));
  CHECK_THROWS_WITH(bad(R"({"lr": )"), Contains("invalid JSON"));
  // values validate() refuses, named with the key and value
  CHECK_THROWS_WITH(bad(R"({"lr": -0.001})"), Contains("lr=-0.001"));
  CHECK_THROWS_WITH(bad(R"({"beta2": 1.0})"), Contains("beta2=1"));
  CHECK_THROWS_WITH(bad(R"({"patch_size": 3})"), Contains("voxels_x=128") && Contains("patch_size"));
  CHECK_THROWS_WITH(bad(R"({"num_heads": 3})"), Contains("num_heads=3") && Contains("embed_dim=128"));
  CHECK_THROWS_WITH(bad(R"({"window_size": 3})"), Contains("window_size=3"));
  CHECK_THROWS_WITH(bad(R"({"codebook_size": 0})"), Contains("codebook_size=0"));
  CHECK_THROWS_WITH(bad(R"({"commitment_weight": -1})"), Contains("commitment_weight=-1"));
  CHECK_THROWS_WITH(bad(R"({"depth_eps": 0})"), Contains("depth_eps=0"));
  CHECK_THROWS_WITH(bad(R"({"dead_code_policy": "restart"})"),
                    Contains("dead_code_policy=\"restart\""));
  CHECK_THROWS_WITH(bad(R"({"dead_code_policy": 1})"), Contains("must be a string"));
  CHECK_THROWS_WITH(bad(R"({"vq_search_precision": "bf16"})"),
                    Contains("vq_search_precision=\"bf16\"") && Contains("bf16_rerank"));
  CHECK_THROWS_WITH(bad(R"({"ema_decay": 1.0})"), Contains("ema_decay=1"));
  CHECK_THROWS_WITH(bad(R"({"memory_bank_size": 100})"),
                    Contains("memory_bank_size=100") && Contains("codebook_size=256"));
  CHECK_THROWS_WITH(bad(R"({"augment_flip": 1.5})"), Contains("augment_flip=1.5"));
  CHECK_THROWS_WITH(bad(R"({"augment_yaw_deg": 200})"), Contains("augment_yaw_deg=200"));
  CHECK_THROWS_WITH(bad(R"({"roi_x_min": 30})"), Contains("roi_x_min=30") && Contains("roi_x_max"));
  CHECK_THROWS_WITH(bad(R"({"occupancy_pool": 3})"), Contains("occupancy_pool=3"));
  CHECK_THROWS_WITH(bad(R"({"feature_grid_xy": 100})"), Contains("feature_grid_xy=100"));
  CHECK_THROWS_WITH(bad(R"({"warmup_steps": 5000})"), Contains("warmup_steps=5000"));
  CHECK_THROWS_WITH(bad(R"({"ray_near": 40})"), Contains("ray_near=40"));
  CHECK_THROWS_WITH(bad(R"({"grad_clip": 0})"), Contains("grad_clip=0"));
  TempDir dir;
  {
    std::ofstream out(dir / "bad.json");
    out << R"({"embed_dim": 100})";
  }
  CHECK_THROWS_WITH(TokenizerConfig::load(dir / "bad.json"),
                    Contains("bad.json") && Contains("num_heads=8") && Contains("embed_dim=100"));
  CHECK_THROWS_WITH(TokenizerConfig::load(dir / "missing.json"), Contains("missing.json"));
  // save refuses an invalid config and leaves no file
  TokenizerConfig c;
  c.batch_size = 0;
  CHECK_THROWS_WITH(c.save(dir / "x.json"), Contains("batch_size=0"));
  CHECK_FALSE(fs::exists(dir / "x.json"));
}

TEST_CASE("config JSON: the \"quantizer\" object sets any quantizer field by its key, last") {
  const auto c = TokenizerConfig::parse(
      R"({"ema_decay": 0.9, "quantizer": {"gradient_estimator": "rotation", "ema.decay": 0.95,)"
      R"( "non_finite": "skip", "dead.max_dead_fraction": 0.25}})");
  const auto q = c.quantizer_config();
  CHECK(q.gradient_estimator == GradientEstimator::rotation);
  CHECK(q.ema.decay == 0.95);  // wins over ema_decay
  CHECK(q.non_finite == NonFinitePolicy::skip);
  CHECK(q.dead.max_dead_fraction == 0.25);
  CHECK(q.codebook_size == c.codebook_size);  // the flat keys still apply
  auto without = c;
  without.quantizer = nlohmann::ordered_json::object();
  CHECK(without.quantizer_config().ema.decay == 0.9);
  CHECK(without.quantizer_config().gradient_estimator == GradientEstimator::straight_through);
  CHECK_FALSE(without.to_json().contains("quantizer"));  // empty: not written
  CHECK(c.to_json().contains("quantizer"));
  // round trips
  CHECK(TokenizerConfig::from_json(c.to_json()) == c);
  TempDir dir;
  c.save(dir / "q.json");
  CHECK(TokenizerConfig::load(dir / "q.json") == c);

  const auto bad = [](const std::string& text) { return TokenizerConfig::parse(text); };
  CHECK_THROWS_WITH(bad(R"({"quantizer": 3})"), Contains("quantizer=3 must be a JSON object"));
  CHECK_THROWS_WITH(bad(R"({"quantizer": {"codebook_size": 8}})"),
                    Contains("quantizer.codebook_size is refused") && Contains("top-level codebook_size"));
  CHECK_THROWS_WITH(bad(R"({"quantizer": {"dim": 8}})"), Contains("top-level code_dim"));
  CHECK_THROWS_WITH(bad(R"({"quantizer": {"bogus": 1}})"),
                    Contains("TokenizerConfig: quantizer") && Contains("unknown key 'bogus'"));
  CHECK_THROWS_WITH(bad(R"({"quantizer": {"ema.decay": 2}})"),
                    Contains("ema.decay must lie in (0, 1), got ema.decay=2"));
  CHECK_THROWS_WITH(bad(R"({"quantizer": {"init": "random"}})"),
                    Contains(R"(init="random" must be one of kmeans, normalized)"));
}

// ----------------------------------------------------------- progress ---

TEST_CASE("progress line: bar, rate, ETA and metrics") {
  const std::string line = ProgressBar::format_line(25, 100, 10.0, {{"loss", 0.5}, {"ppl", 312.25}}, 20);
  CHECK_THAT(line, Contains("[=====>              ]"));
  CHECK_THAT(line, Contains(" 25/100"));
  CHECK_THAT(line, Contains("2.50 it/s"));
  CHECK_THAT(line, Contains("ETA 30s"));  // 75 steps at 2.5 it/s
  CHECK_THAT(line, Contains("loss 0.5"));
  CHECK_THAT(line, Contains("ppl 312.2"));
  CHECK(format_duration(3723) == "1h02m03s");
  CHECK(format_duration(245) == "4m05s");
  CHECK(format_duration(-1) == "--");
  CHECK_THAT(ProgressBar::format_line(0, 10, 0.0, {}), Contains("ETA --"));
  std::ostringstream os;  // not a terminal: full lines, always the last one
  ProgressBar bar(3, os, 10, 1000.0);
  bar.update(1, {{"loss", 1.0}});
  bar.update(2, {{"loss", 0.9}});  // within min_interval: skipped
  bar.update(3, {{"loss", 0.8}});
  const std::string out = os.str();
  CHECK(std::count(out.begin(), out.end(), '\n') == 2);
  CHECK_THAT(out, Contains("3/3"));
  CHECK_THAT(out, Contains("loss 0.8"));
  CHECK_THROWS_WITH(ProgressBar(0), Contains("total"));
}

TEST_CASE("CSV logger: header, flushed rows, rejected rows") {
  TempDir dir;
  const std::string path = dir / "log.csv";
  CsvLogger log(path, {"step", "loss", "perplexity"});
  CHECK(read_text(path) == "step,loss,perplexity\n");
  log.row({1, 0.25, 100});
  CHECK(read_text(path) == "step,loss,perplexity\n1,0.25,100\n");  // flushed at once
  log.row({2, std::numeric_limits<double>::quiet_NaN(), -std::numeric_limits<double>::infinity()});
  CHECK(read_text(path) == "step,loss,perplexity\n1,0.25,100\n2,nan,-inf\n");
  CHECK_THROWS_WITH(log.row({1, 2}), Contains("2 values for 3 columns"));
  CHECK(read_text(path) == "step,loss,perplexity\n1,0.25,100\n2,nan,-inf\n");
  CHECK_THROWS_WITH(CsvLogger(dir / "b.csv", {"a,b"}), Contains("a,b"));
  CHECK_THROWS_WITH(CsvLogger(dir / "no/such/dir.csv", {"a"}), Contains("dir.csv"));
}

TEST_CASE("gnuplot helper: script content, and a PNG when gnuplot exists or a message otherwise") {
  TempDir dir;
  {
    CsvLogger log(dir / "t.csv", {"step", "loss", "ppl"});
    for (int s = 1; s <= 5; ++s) log.row({double(s), 1.0 / s, 10.0 * s});
  }
  const std::string script =
      gnuplot_script(dir / "t.csv", dir / "t.png", "step", {"loss", "ppl"}, "training", true);
  CHECK_THAT(script, Contains("set output '" + (dir / "t.png") + "'"));
  CHECK_THAT(script, Contains("column('loss')"));
  CHECK_THAT(script, Contains("column('ppl')"));
  CHECK_THAT(script, Contains("set logscale y"));
  CHECK_THROWS_WITH(gnuplot_script(dir / "t'.csv", dir / "t.png", "step", {"loss"}, "", false),
                    Contains("quote"));
  std::ostringstream msg;
  const bool made = plot_csv(dir / "t.csv", dir / "t.png", "step", {"loss", "ppl"}, "t", false, msg);
  CHECK(fs::exists(dir / "t.png.gp"));
  if (program_available("gnuplot")) {
    CHECK(made);
    CHECK(fs::exists(dir / "t.png"));
  } else {
    CHECK_FALSE(made);
    CHECK_THAT(msg.str(), Contains("gnuplot not found"));
  }
}
