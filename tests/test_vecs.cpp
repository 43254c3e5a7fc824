#include <unistd.h>

#include <catch2/catch.hpp>

#include "skip.hpp"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <vector>
#include <vqkit/core/random.hpp>
#include <vqkit/io/vecs.hpp>

namespace io = vqkit::io;
namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("vqkit_test_vecs_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void write_all(const std::string& path, const Bytes& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

Bytes read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void put_i32(Bytes& b, std::int32_t v) {
  for (int i = 0; i < 4; ++i)
    b.push_back(static_cast<std::uint8_t>(static_cast<std::uint32_t>(v) >> (8 * i)));
}

/// A .bvecs record: d, then d values.
void put_brow(Bytes& b, std::int32_t d, std::uint8_t fill) {
  put_i32(b, d);
  for (std::int32_t i = 0; i < d; ++i) b.push_back(fill);
}

/// The shared real data, or "" when it is absent (the caller skips).
std::string data_file(const std::string& rel) {
  const std::string path = std::string(VQKIT_TEST_DATA_DIR) + "/" + rel;
  return fs::exists(path) ? path : "";
}

}  // namespace

TEST_CASE("vecs: the byte layout matches the format") {
  vqkit::RowMatrix<float> f(1, 2);
  f << 1.0f, 2.0f;  // 0x3F800000, 0x40000000
  REQUIRE(io::serialize_fvecs(f) == Bytes{2, 0, 0, 0, 0, 0, 0x80, 0x3F, 0, 0, 0, 0x40});
  vqkit::RowMatrix<std::int32_t> iv(2, 1);
  iv << -1, 258;
  REQUIRE(io::serialize_ivecs(iv) == Bytes{1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,  //
                                           1, 0, 0, 0, 2, 1, 0, 0});
  vqkit::RowMatrix<std::uint8_t> bv(1, 3);
  bv << 7, 200, 0;
  REQUIRE(io::serialize_bvecs(bv) == Bytes{3, 0, 0, 0, 7, 200, 0});

  const Bytes b = {3, 0, 0, 0, 7, 200, 0, 3, 0, 0, 0, 1, 2, 255};
  const auto m = io::parse_bvecs(b.data(), b.size());
  REQUIRE(m.rows() == 2);
  REQUIRE(m.cols() == 3);
  REQUIRE(m(0, 1) == 200.0f);
  REQUIRE(m(1, 2) == 255.0f);
  const auto m8 = io::parse_bvecs_u8(b.data(), b.size());
  REQUIRE(m8.cast<float>() == m);
}

TEST_CASE("vecs: files round-trip, and max_rows reads a prefix") {
  TempDir dir;
  vqkit::Rng rng(5);
  vqkit::RowMatrix<float> f(7, 5);
  for (vqkit::Index i = 0; i < f.size(); ++i) f.data()[i] = static_cast<float>(rng.normal());
  f(0, 0) = -0.0f;
  f(1, 1) = std::numeric_limits<float>::infinity();
  f(2, 2) = std::numeric_limits<float>::denorm_min();
  vqkit::RowMatrix<std::int32_t> iv(4, 3);
  iv << 0, 1, 2, std::numeric_limits<std::int32_t>::min(), std::numeric_limits<std::int32_t>::max(),
      -7, 9999, 10, 11, 12, 13, 14;
  vqkit::RowMatrix<std::uint8_t> bv(5, 6);
  for (vqkit::Index i = 0; i < bv.size(); ++i) bv.data()[i] = static_cast<std::uint8_t>(i * 37);

  io::write_fvecs(dir / "a.fvecs", f);
  io::write_ivecs(dir / "a.ivecs", iv);
  io::write_bvecs(dir / "a.bvecs", bv);
  REQUIRE(fs::file_size(dir / "a.fvecs") == 7 * (4 + 5 * 4));
  REQUIRE(fs::file_size(dir / "a.bvecs") == 5 * (4 + 6));

  const auto f2 = io::read_fvecs(dir / "a.fvecs");
  REQUIRE(f2.rows() == 7);
  REQUIRE(f2.cols() == 5);
  REQUIRE(std::memcmp(f2.data(), f.data(), sizeof(float) * 35) == 0);
  REQUIRE(io::read_ivecs(dir / "a.ivecs") == iv);
  REQUIRE(io::read_bvecs_u8(dir / "a.bvecs") == bv);
  REQUIRE(io::read_bvecs(dir / "a.bvecs") == bv.cast<float>());

  // The file and memory readers agree.
  const Bytes raw = read_all(dir / "a.ivecs");
  REQUIRE(io::parse_ivecs(raw.data(), raw.size()) == iv);

  REQUIRE(io::read_fvecs(dir / "a.fvecs", 3) == f2.topRows(3));
  REQUIRE(io::read_fvecs(dir / "a.fvecs", 100) == f2);
  const auto none = io::read_fvecs(dir / "a.fvecs", 0);
  REQUIRE(none.rows() == 0);
  REQUIRE(none.cols() == 5);
  REQUIRE(io::read_bvecs(dir / "a.bvecs", 2) == bv.topRows(2).cast<float>());

  // Writers refuse what readers would refuse.
  REQUIRE_THROWS_AS(io::write_fvecs(dir / "empty.fvecs", vqkit::RowMatrix<float>(0, 3)),
                    vqkit::error);
  REQUIRE_THROWS_AS(io::write_fvecs(dir / "empty.fvecs", vqkit::RowMatrix<float>(3, 0)),
                    vqkit::error);
  REQUIRE_THROWS_WITH(io::write_fvecs(dir / "no_dir/x.fvecs", f), Catch::Contains("no_dir"));
}

TEST_CASE("vecs: malformed input is rejected with vqkit::error naming the problem") {
  struct Case {
    Bytes bytes;
    const char* expect;
  };
  std::vector<Case> cases;
  cases.push_back({{}, "is empty"});
  cases.push_back({{1, 0, 0}, "row 0 is truncated"});
  {
    Bytes b;
    put_brow(b, 0, 0);
    cases.push_back({b, "row 0 has d = 0"});
  }
  {
    Bytes b;
    put_i32(b, -3);
    cases.push_back({b, "row 0 has d = -3"});
  }
  {
    Bytes b;
    put_i32(b, (1 << 20) + 1);
    cases.push_back({b, "row 0 has d = 1048577"});
  }
  {
    Bytes b;
    put_brow(b, 3, 1);
    put_brow(b, 4, 1);
    put_brow(b, 3, 1);  // 7 + 8 + 7 bytes
    cases.push_back({b, "row 1 has d = 4, but row 0 has d = 3"});
  }
  {
    Bytes b;
    put_brow(b, 3, 1);
    put_brow(b, 2, 1);
    put_brow(b, 4, 1);  // sizes coincide with 3 records of d = 3
    cases.push_back({b, "row 1 has d = 2"});
  }
  {
    Bytes b;
    put_brow(b, 3, 1);
    put_brow(b, 3, 1);
    put_brow(b, 3, 1);
    b.pop_back();
    cases.push_back({b, "row 2 is truncated"});
  }
  {
    Bytes b;
    put_brow(b, 3, 1);
    b.push_back(0);
    cases.push_back({b, "row 1 is truncated (1 trailing bytes)"});
  }

  TempDir dir;
  int i = 0;
  for (const auto& c : cases) {
    CAPTURE(i);
    REQUIRE_THROWS_AS(io::parse_bvecs(c.bytes.data(), c.bytes.size()), vqkit::error);
    REQUIRE_THROWS_WITH(io::parse_bvecs(c.bytes.data(), c.bytes.size()),
                        Catch::Contains(c.expect) && Catch::Contains("<memory>"));
    const std::string path = dir / ("case" + std::to_string(i++) + ".bvecs");
    write_all(path, c.bytes);
    REQUIRE_THROWS_WITH(io::read_bvecs(path), Catch::Contains(c.expect) && Catch::Contains(path));
    REQUIRE_THROWS_WITH(io::read_bvecs_u8(path), Catch::Contains(c.expect));
  }

  // The size check covers the whole file even when only a prefix is read.
  Bytes f;
  for (int r = 0; r < 3; ++r) {
    put_i32(f, 2);
    put_i32(f, 0);
    put_i32(f, 0);
  }
  REQUIRE(io::parse_fvecs(f.data(), f.size(), 1).rows() == 1);
  f.pop_back();
  REQUIRE_THROWS_WITH(io::parse_fvecs(f.data(), f.size(), 1), Catch::Contains("truncated"));
  // The record size depends on the value type: an 8-byte .bvecs record of
  // d = 4 is a truncated .ivecs record.
  Bytes iv;
  put_i32(iv, 4);
  for (int k = 0; k < 4; ++k) iv.push_back(0);
  REQUIRE_THROWS_WITH(io::parse_ivecs(iv.data(), iv.size()), Catch::Contains("row 0 is truncated"));
  REQUIRE(io::parse_bvecs(iv.data(), iv.size()).cols() == 4);

  REQUIRE_THROWS_WITH(io::read_fvecs(dir / "absent.fvecs"), Catch::Contains("absent.fvecs"));
  REQUIRE_THROWS_AS(io::parse_fvecs(nullptr, 8), vqkit::error);
}

TEST_CASE("vecs: random corruption only ever raises vqkit::error") {
  vqkit::RowMatrix<float> m = vqkit::RowMatrix<float>::Constant(4, 3, 0.5f);
  const Bytes base = io::serialize_fvecs(m);
  vqkit::Rng rng(11);
  int accepted = 0, rejected = 0;
  for (int iter = 0; iter < 5000; ++iter) {
    Bytes b = base;
    const std::size_t pos = rng.below(b.size());
    switch (rng.below(3)) {
      case 0:
        b[pos] = static_cast<std::uint8_t>(rng.below(256));
        break;
      case 1:
        b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos));
        break;
      default:
        b.resize(pos);
        break;
    }
    try {
      const auto r = io::parse_fvecs(b.data(), b.size());
      REQUIRE(static_cast<std::size_t>(r.rows()) * (4 + 4 * static_cast<std::size_t>(r.cols())) ==
              b.size());
      ++accepted;
    } catch (const vqkit::error&) {
      ++rejected;
    }
  }
  CHECK(accepted > 0);
  CHECK(rejected > 0);
}

TEST_CASE("vecs: glove100 base (real data) is 10000 x 100 finite floats") {
  const std::string path = data_file("vectors/glove100/glove100_base_10k.fvecs");
  if (path.empty()) VQKIT_SKIP("shared data absent under " << VQKIT_TEST_DATA_DIR);
  const auto x = io::read_fvecs(path);
  REQUIRE(x.rows() == 10000);
  REQUIRE(x.cols() == 100);
  REQUIRE(x.allFinite());
  REQUIRE(x.cwiseAbs().maxCoeff() < 100.0f);
  REQUIRE(x.rowwise().norm().minCoeff() > 0.0f);
  REQUIRE(io::read_fvecs(path, 10) == x.topRows(10));
}

TEST_CASE("vecs: mnist10k (real data) is 10000 x 784 bytes") {
  const std::string path = data_file("vectors/mnist10k/mnist10k_784d.bvecs");
  if (path.empty()) VQKIT_SKIP("shared data absent under " << VQKIT_TEST_DATA_DIR);
  const auto x = io::read_bvecs(path);
  REQUIRE(x.rows() == 10000);
  REQUIRE(x.cols() == 784);
  REQUIRE(x.minCoeff() == 0.0f);
  REQUIRE(x.maxCoeff() == 255.0f);
  REQUIRE(io::read_bvecs_u8(path).cast<float>() == x);
}

TEST_CASE("vecs: glove100 ground truth (real data) is 1000 x 100 ids, nearest first") {
  const std::string path = data_file("vectors/glove100/glove100_query_1k_gt100_l2_base10k.ivecs");
  if (path.empty()) VQKIT_SKIP("shared data absent under " << VQKIT_TEST_DATA_DIR);
  const auto gt = io::read_ivecs(path);
  REQUIRE(gt.rows() == 1000);
  REQUIRE(gt.cols() == 100);
  REQUIRE(gt.minCoeff() >= 0);
  REQUIRE(gt.maxCoeff() < 10000);
  for (vqkit::Index q = 0; q < gt.rows(); ++q) {
    const std::set<std::int32_t> ids(gt.row(q).data(), gt.row(q).data() + gt.cols());
    REQUIRE(ids.size() == 100);
  }

  // Cross-check the three files: the ground truth lists each query's
  // neighbours in the base by increasing L2 distance.
  const std::string base_path = data_file("vectors/glove100/glove100_base_10k.fvecs");
  const std::string query_path = data_file("vectors/glove100/glove100_query_1k.fvecs");
  if (base_path.empty() || query_path.empty())
    VQKIT_SKIP("shared data absent under " << VQKIT_TEST_DATA_DIR);
  const auto base = io::read_fvecs(base_path);
  const auto queries = io::read_fvecs(query_path, 5);
  REQUIRE(queries.cols() == 100);
  for (vqkit::Index q = 0; q < queries.rows(); ++q) {
    const Eigen::VectorXf d2 = (base.rowwise() - queries.row(q)).rowwise().squaredNorm();
    REQUIRE(d2(gt(q, 0)) == Approx(d2.minCoeff()).epsilon(1e-4));
    for (vqkit::Index k = 0; k + 1 < gt.cols(); ++k)
      REQUIRE(d2(gt(q, k)) <= d2(gt(q, k + 1)) * (1 + 1e-4f) + 1e-6f);
  }
}

TEST_CASE("vecs: digits (real data) is 1797 x 64 integers in [0, 16]") {
  const std::string path = data_file("vectors/digits/digits_1797x64.fvecs");
  if (path.empty()) VQKIT_SKIP("shared data absent under " << VQKIT_TEST_DATA_DIR);
  const auto x = io::read_fvecs(path);
  REQUIRE(x.rows() == 1797);
  REQUIRE(x.cols() == 64);
  REQUIRE(x.minCoeff() == 0.0f);
  REQUIRE(x.maxCoeff() == 16.0f);
  REQUIRE((x.array() == x.array().round()).all());
}
