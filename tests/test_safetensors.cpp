#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>
#include <vqkit/core/random.hpp>
#include <vqkit/io/safetensors.hpp>

#include "skip.hpp"

namespace st = vqkit::safetensors;
namespace fs = std::filesystem;
using Bytes = std::vector<std::uint8_t>;

namespace {

/// A fresh directory under the system temp folder, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() / ("vqkit_test_safetensors_" + std::to_string(::getpid()) +
                                        "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
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

/// Files in dir whose name contains ".tmp.".
int count_temp_files(const fs::path& dir) {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().find(".tmp.") != std::string::npos) ++n;
  return n;
}

/// 8-byte little-endian length + header text + data.
Bytes make_file(const std::string& header, const Bytes& data) {
  Bytes b(8 + header.size() + data.size());
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[i] = static_cast<std::uint8_t>(n >> (8 * i));
  std::copy(header.begin(), header.end(), b.begin() + 8);
  std::copy(data.begin(), data.end(), b.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return b;
}

bool same_tensor(const st::Tensor& a, const st::Tensor& b) {
  return a.dtype == b.dtype && a.shape == b.shape && a.bytes == b.bytes;
}

bool same_file(const st::File& a, const st::File& b) {
  if (a.metadata != b.metadata || a.tensors.size() != b.tensors.size()) return false;
  for (const auto& [name, t] : a.tensors)
    if (!b.contains(name) || !same_tensor(t, b.at(name))) return false;
  return true;
}

/// Extreme values for each element type.
template <class T>
std::vector<T> interesting_values() {
  using L = std::numeric_limits<T>;
  if constexpr (std::is_floating_point_v<T>) {
    return {T(0),     T(-0.0),         T(1),          T(-2.5),        L::max(),       L::lowest(),
            L::min(), L::denorm_min(), L::infinity(), -L::infinity(), L::quiet_NaN(), T(3.14159)};
  } else {
    return {T(0),     T(1),
            L::max(), L::min(),
            T(42),    T(L::max() / 3),
            T(7),     T(L::max() - 1),
            T(100),   T(L::min() + 1),
            T(9),     T(11)};
  }
}

/// Adds a 3x4 matrix, a vector, a scalar and empty tensors of type T to f.
template <class T>
void add_all(st::File& f, const std::string& prefix) {
  const auto v = interesting_values<T>();
  vqkit::RowMatrix<T> m(3, 4);
  for (int i = 0; i < 12; ++i) m(i / 4, i % 4) = v[i];
  f.tensors[prefix + ".matrix"] = st::from_matrix(m);
  f.tensors[prefix + ".vector"] = st::from_vector(v);
  f.tensors[prefix + ".scalar"] = st::from_scalar(v[2]);
  f.tensors[prefix + ".empty_rows"] = st::from_matrix(vqkit::RowMatrix<T>(0, 5));
  f.tensors[prefix + ".empty_vector"] = st::from_vector(std::vector<T>{});
}

/// Checks the typed copies of what add_all<T> stored (bitwise, so NaN and
/// -0.0 count).
template <class T>
void check_all(const st::File& f, const std::string& prefix) {
  const auto v = interesting_values<T>();
  REQUIRE(f.at(prefix + ".matrix").dtype == st::dtype_of<T>());
  const auto m = f.matrix<T>(prefix + ".matrix");
  REQUIRE(m.rows() == 3);
  REQUIRE(m.cols() == 4);
  REQUIRE(std::memcmp(m.data(), v.data(), 12 * sizeof(T)) == 0);
  const auto vec = f.vector<T>(prefix + ".vector");
  REQUIRE(vec.size() == 12);
  REQUIRE(std::memcmp(vec.data(), v.data(), 12 * sizeof(T)) == 0);
  const T s = f.scalar<T>(prefix + ".scalar");
  REQUIRE(std::memcmp(&s, &v[2], sizeof(T)) == 0);
  REQUIRE(f.at(prefix + ".scalar").shape.empty());
  const auto e = f.matrix<T>(prefix + ".empty_rows");
  REQUIRE(e.rows() == 0);
  REQUIRE(e.cols() == 5);
  REQUIRE(f.vector<T>(prefix + ".empty_vector").size() == 0);
}

st::File every_dtype_file() {
  st::File f;
  add_all<float>(f, "f32");
  add_all<double>(f, "f64");
  add_all<std::int64_t>(f, "i64");
  add_all<std::int32_t>(f, "i32");
  add_all<std::uint64_t>(f, "u64");
  add_all<std::uint8_t>(f, "u8");
  f.metadata["format"] = "pt";
  f.metadata["note"] = "unicode \xc3\xa9\xe2\x82\xac and \"quotes\"";
  f.metadata[""] = "";
  return f;
}

void check_every_dtype(const st::File& f) {
  check_all<float>(f, "f32");
  check_all<double>(f, "f64");
  check_all<std::int64_t>(f, "i64");
  check_all<std::int32_t>(f, "i32");
  check_all<std::uint64_t>(f, "u64");
  check_all<std::uint8_t>(f, "u8");
}

}  // namespace

TEST_CASE("safetensors: every dtype round-trips through memory and disk") {
  const st::File f = every_dtype_file();
  const Bytes bytes = st::serialize(f);

  // The data starts 8-byte aligned and the header is padded with spaces.
  std::uint64_t hlen;
  std::memcpy(&hlen, bytes.data(), 8);
  REQUIRE((8 + hlen) % 8 == 0);
  REQUIRE(bytes[8] == '{');

  const st::File g = st::parse(bytes);
  REQUIRE(same_file(f, g));
  check_every_dtype(g);
  REQUIRE(g.metadata.at("note") == f.metadata.at("note"));
  REQUIRE(st::serialize(g) == bytes);  // deterministic and stable

  TempDir dir;
  const std::string path = dir / "model.safetensors";
  st::save(path, f);
  REQUIRE(read_all(path) == bytes);
  const st::File h = st::load(path);
  REQUIRE(same_file(f, h));
  check_every_dtype(h);
  REQUIRE(count_temp_files(dir.path) == 0);
}

TEST_CASE("safetensors: a tiny file matches hand-computed bytes") {
  st::File f;
  f.tensors["a"] = st::from_vector(std::vector<float>{1.0f, -2.0f});
  f.tensors["b"] = st::from_vector(std::vector<std::uint8_t>{1, 2, 3});
  f.metadata["format"] = "pt";

  // Keys sorted ("__metadata__" < "a" < "b" in byte order), compact JSON,
  // tensors back to back in key order: a = [0, 8), b = [8, 11). The header
  // is 138 bytes, padded with 6 spaces to 144 = 0x90 so data starts at 152.
  const std::string json =
      "{\"__metadata__\":{\"format\":\"pt\"},"
      "\"a\":{\"data_offsets\":[0,8],\"dtype\":\"F32\",\"shape\":[2]},"
      "\"b\":{\"data_offsets\":[8,11],\"dtype\":\"U8\",\"shape\":[3]}}"
      "      ";
  REQUIRE(json.size() == 144);
  // 1.0f = 0x3F800000, -2.0f = 0xC0000000, little-endian; then 1, 2, 3.
  const Bytes data = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0, 1, 2, 3};
  Bytes expected(163, 0);
  expected[0] = 0x90;
  std::copy(json.begin(), json.end(), expected.begin() + 8);
  std::copy(data.begin(), data.end(), expected.begin() + 152);

  REQUIRE(st::serialize(f) == expected);
  const st::File g = st::parse(expected);
  REQUIRE(g.vector<float>("a") == vqkit::Vector<float>{{1.0f, -2.0f}});
  REQUIRE(g.vector<std::uint8_t>("b") == vqkit::Vector<std::uint8_t>{{1, 2, 3}});
  REQUIRE(g.metadata == f.metadata);
}

TEST_CASE("safetensors: files from other writers parse (any key order, no padding)") {
  // Metadata first, fields in another order, whitespace, data order unlike
  // name order, a scalar and a zero-size tensor.
  const std::string json =
      "{ \"__metadata__\" : {\"k\": \"v\"},\n"
      "  \"z\": {\"shape\": [], \"dtype\": \"I32\", \"data_offsets\": [0, 4]},\n"
      "  \"a\": {\"dtype\": \"U8\", \"data_offsets\": [4, 6], \"shape\": [2]},\n"
      "  \"e\": {\"dtype\": \"F64\", \"data_offsets\": [6, 6], \"shape\": [0, 3]} }";
  const Bytes file = make_file(json, {0xFB, 0xFF, 0xFF, 0xFF, 7, 9});
  const st::File f = st::parse(file);
  REQUIRE(f.metadata.at("k") == "v");
  REQUIRE(f.scalar<std::int32_t>("z") == -5);
  REQUIRE(f.vector<std::uint8_t>("a") == vqkit::Vector<std::uint8_t>{{7, 9}});
  REQUIRE(f.matrix<double>("e").rows() == 0);
  REQUIRE(f.matrix<double>("e").cols() == 3);

  // An empty file is "{}" and nothing else.
  REQUIRE(st::parse(make_file("{}", {})).tensors.empty());
  REQUIRE(st::parse(make_file("{}      ", {})).tensors.empty());
  // Zero-size tensors may share an offset.
  const st::File z = st::parse(make_file(R"({"p":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},)"
                                         R"("q":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}})",
                                         {}));
  REQUIRE(z.tensors.size() == 2);
}

TEST_CASE("safetensors: typed access checks dtype and rank exactly") {
  STATIC_REQUIRE(st::dtype_of<long long>() == st::DType::I64);
  STATIC_REQUIRE(st::dtype_of<unsigned char>() == st::DType::U8);
  STATIC_REQUIRE(st::dtype_size(st::DType::I32) == 4);

  st::File f;
  vqkit::RowMatrix<float> m(2, 3);
  m << 1, 2, 3, 4, 5, 6;
  f.tensors["w"] = st::from_matrix(m);
  REQUIRE(f.at("w").shape == std::vector<std::int64_t>{2, 3});

  REQUIRE_THROWS_AS(f.matrix<double>("w"), vqkit::error);
  REQUIRE_THROWS_WITH(f.matrix<double>("w"), Catch::Contains("tensor 'w'") &&
                                                 Catch::Contains("F32") && Catch::Contains("F64"));
  REQUIRE_THROWS_WITH(f.matrix<std::int32_t>("w"), Catch::Contains("I32"));
  REQUIRE_THROWS_WITH(f.vector<float>("w"), Catch::Contains("rank 2"));
  REQUIRE_THROWS_AS(f.scalar<float>("w"), vqkit::error);
  REQUIRE_THROWS_WITH(f.at("missing"), Catch::Contains("missing"));
  REQUIRE(f.matrix<float>("w") == m);

  // A tensor whose bytes do not match its shape is refused on access.
  st::Tensor bad = f.tensors["w"];
  bad.bytes.pop_back();
  REQUIRE_THROWS_WITH(st::to_matrix<float>(bad, "bad"), Catch::Contains("tensor 'bad'"));

  // Column-major input and blocks are stored row-major.
  Eigen::MatrixXd cm(2, 2);
  cm << 1, 2, 3, 4;
  REQUIRE(st::to_matrix<double>(st::from_matrix(cm)) == vqkit::RowMatrix<double>(cm));
  const vqkit::RowMatrix<float> blk = m.block(0, 1, 2, 2);
  REQUIRE(st::to_matrix<float>(st::from_matrix(m.block(0, 1, 2, 2))) == blk);
  const vqkit::Vector<float> row0 = m.row(0).transpose();
  REQUIRE(st::to_vector<float>(st::from_vector(m.row(0))) == row0);
  REQUIRE_THROWS_AS(st::from_vector(m), vqkit::error);
}

TEST_CASE("safetensors: serialize refuses invalid tensors") {
  st::File f;
  f.tensors["ok"] = st::from_scalar(1.0);

  st::File g = f;
  g.tensors["short"] = st::from_vector(std::vector<float>{1, 2});
  g.tensors["short"].bytes.pop_back();
  REQUIRE_THROWS_WITH(st::serialize(g), Catch::Contains("tensor 'short'"));

  g = f;
  g.tensors["neg"] = st::Tensor{st::DType::F32, {2, -1}, {}};
  REQUIRE_THROWS_WITH(st::serialize(g),
                      Catch::Contains("tensor 'neg'") && Catch::Contains("negative"));

  g = f;
  g.tensors["huge"] = st::Tensor{st::DType::F64, {1LL << 40, 1LL << 40}, {}};
  REQUIRE_THROWS_WITH(st::serialize(g), Catch::Contains("overflows"));

  g = f;
  g.tensors["__metadata__"] = st::from_scalar(1.0f);
  REQUIRE_THROWS_WITH(st::serialize(g), Catch::Contains("reserved"));

  g = f;
  g.tensors["bad\xff"] = st::from_scalar(1.0f);
  REQUIRE_THROWS_WITH(st::serialize(g), Catch::Contains("UTF-8"));

  g = f;
  g.metadata["k"] = "\xc3";
  REQUIRE_THROWS_WITH(st::serialize(g), Catch::Contains("UTF-8"));
}

TEST_CASE("safetensors: save into a read-only directory throws and keeps the previous file") {
  // Its own test case, so that it can report Skipped (exit 77) as root, whom
  // a read-only directory does not stop.
  if (::geteuid() == 0) VQKIT_SKIP("running as root: a read-only directory does not stop root");
  TempDir dir;
  const std::string path = dir / "ckpt.safetensors";
  st::File a;
  a.tensors["x"] = st::from_vector(std::vector<double>(1000, 1.5));
  st::save(path, a);
  const Bytes good = read_all(path);
  fs::permissions(dir.path, fs::perms::owner_read | fs::perms::owner_exec, fs::perm_options::replace);
  REQUIRE_THROWS_WITH(st::save(path, a), Catch::Contains("temporary file"));
  fs::permissions(dir.path, fs::perms::owner_all, fs::perm_options::add);
  REQUIRE(read_all(path) == good);
  REQUIRE(count_temp_files(dir.path) == 0);
}

TEST_CASE("safetensors: save is atomic and leaves no temporary file") {
  TempDir dir;
  const std::string path = dir / "ckpt.safetensors";

  st::File a;
  a.tensors["x"] = st::from_vector(std::vector<double>(1000, 1.5));
  st::File b;
  b.tensors["y"] = st::from_scalar(std::int64_t{7});
  st::save(path, a);
  st::save(path, b);  // replaces the larger file completely
  REQUIRE(same_file(st::load(path), b));
  const Bytes good = read_all(path);
  REQUIRE(count_temp_files(dir.path) == 0);

  SECTION("an invalid entry throws before touching the file") {
    st::File bad = a;
    bad.tensors["x"].bytes.resize(3);
    REQUIRE_THROWS_WITH(st::save(path, bad),
                        Catch::Contains("ckpt.safetensors") && Catch::Contains("tensor 'x'"));
    REQUIRE(read_all(path) == good);
    REQUIRE(count_temp_files(dir.path) == 0);
  }

  SECTION("a missing directory throws") {
    REQUIRE_THROWS_AS(st::save(dir / "no_such_dir/f.safetensors", a), vqkit::error);
    REQUIRE_FALSE(fs::exists(dir / "no_such_dir"));
  }

  SECTION("a failed rename removes the temporary file and keeps the target") {
    // rename() of a file over a non-empty directory fails, even for root.
    const std::string target = dir / "occupied";
    fs::create_directories(target);
    write_all(target + "/inside", {1, 2, 3});
    REQUIRE_THROWS_WITH(st::save(target, a), Catch::Contains("renaming"));
    REQUIRE(fs::is_directory(target));
    REQUIRE(read_all(target + "/inside") == Bytes{1, 2, 3});
    REQUIRE(count_temp_files(dir.path) == 0);
    REQUIRE(read_all(path) == good);
  }

  SECTION("a write that fails midway removes the temporary file") {
    // A file-size limit makes write() fail with EFBIG after 4 KiB (also for
    // root); a is 8 KB.
    rlimit old{};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit small = old;
    small.rlim_cur = 4096;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    bool threw = false;
    std::string message;
    try {
      st::save(path, a);
    } catch (const vqkit::error& e) {
      threw = true;
      message = e.what();
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
    REQUIRE(threw);
    REQUIRE_THAT(message, Catch::Contains("writing") && Catch::Contains("is unchanged"));
    REQUIRE(read_all(path) == good);
    REQUIRE(count_temp_files(dir.path) == 0);
  }

  SECTION("a stale temporary file from this pid is overwritten") {
    write_all(path + ".tmp." + std::to_string(::getpid()), Bytes(100000, 0xAB));
    st::save(path, a);
    REQUIRE(same_file(st::load(path), a));
    REQUIRE(count_temp_files(dir.path) == 0);
  }
}

TEST_CASE("safetensors: load names the file when it is missing or truncated") {
  TempDir dir;
  REQUIRE_THROWS_WITH(st::load(dir / "absent.safetensors"), Catch::Contains("absent.safetensors"));
  st::File f;
  f.tensors["t"] = st::from_vector(std::vector<float>{1, 2, 3});
  Bytes bytes = st::serialize(f);
  for (std::size_t cut : {std::size_t{0}, std::size_t{5}, std::size_t{20}, bytes.size() - 1}) {
    const std::string path = dir / ("cut" + std::to_string(cut));
    write_all(path, Bytes(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(cut)));
    REQUIRE_THROWS_WITH(st::load(path), Catch::Contains(path));
  }
}

TEST_CASE("safetensors: hostile headers are rejected with vqkit::error") {
  struct Case {
    const char* header;
    std::size_t buffer;
    const char* expect;  // a substring of the message
  };
  const Case cases[] = {
      {R"([])", 0, "must be a JSON object"},
      {R"("x")", 0, "must be a JSON object"},
      {R"({"a":5})", 0, "tensor 'a' must be an object"},
      {R"({"a":[1]})", 0, "tensor 'a' must be an object"},
      {R"({"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8, "unsupported dtype"},
      {R"({"a":{"dtype":"f16","shape":[1],"data_offsets":[0,2]}})", 2, "unsupported dtype"},
      {R"({"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}})", 4, "unsupported dtype"},
      {R"({"a":{"dtype":3,"shape":[1],"data_offsets":[0,4]}})", 4, "dtype must be a string"},
      {R"({"a":{"dtype":"F32","shape":[1]}})", 4, "needs the fields"},
      {R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", 4, "needs the fields"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":0}})", 4, "unknown field"},
      {R"({"a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", 4, "shape must be an array"},
      {R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, "negative"},
      {R"({"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", 4, "non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}})", 4, "non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[null],"data_offsets":[0,4]}})", 4, "non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}})", 4, "nested deeper"},
      {R"({"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}})", 4,
       "too large"},
      {R"({"a":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,4]}})", 4,
       "non-negative integer"},  // parses as a double
      {R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,4]}})", 4,
       "element count of the shape overflows"},
      {R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,4]}})", 4,
       "byte size of the shape overflows"},
      {R"({"a":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4]}})", 4, "need"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4, "[begin, end]"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}})", 4, "[begin, end]"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":{"0":4}}})", 4, "[begin, end]"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4, "begin <= end"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,8]}})", 4, "begin <= end <= 4"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4, "negative"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,"4"]}})", 4, "non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4, "need 8"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, "tensor 'b' overlaps tensor 'a'"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       8, "overlaps"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
       R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
       12, "gap of 4 bytes before tensor 'b'"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, "gap"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 8, "4 bytes after"},
      {R"({})", 1, "1 bytes after"},
      {R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
       R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
       4, "key \"a\" twice"},
      {R"({"a":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 4,
       "key \"dtype\" twice"},
      {R"({"__metadata__":{"k":"v","k":"w"}})", 0, "key \"k\" twice"},
      {R"({"__metadata__":{},"__metadata__":{}})", 0, "twice"},
      {R"({"__metadata__":{"k":1}})", 0, "__metadata__[\"k\"] must be a string"},
      {R"({"__metadata__":{"k":null}})", 0, "must be a string"},
      {R"({"__metadata__":"x"})", 0, "__metadata__ must be an object"},
      {R"({"a":)", 0, "not valid JSON"},
      {"", 0, "not valid JSON"},
      {R"({} x)", 0, "not valid JSON"},
      {R"({}{})", 0, "not valid JSON"},
      {R"({/*c*/})", 0, "not valid JSON"},
      {"{\"a\xff\":1}", 0, "not valid JSON"},      // invalid UTF-8
      {"{\"a\xc0\x80\":1}", 0, "not valid JSON"},  // overlong UTF-8
      {"{\"\\ud800\":1}", 0, "not valid JSON"},    // lone surrogate
      {R"({"a":{"b":{"c":{}}}})", 0, "nested deeper"},
      {R"([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]])", 0,
       "nested deeper"},
  };
  TempDir dir;
  int i = 0;
  for (const auto& c : cases) {
    CAPTURE(c.header);
    const Bytes file = make_file(c.header, Bytes(c.buffer, 0));
    REQUIRE_THROWS_AS(st::parse(file), vqkit::error);
    REQUIRE_THROWS_WITH(st::parse(file), Catch::Contains(c.expect));
    // load() applies the same checks and names the file.
    const std::string path = dir / ("case" + std::to_string(i++) + ".safetensors");
    write_all(path, file);
    REQUIRE_THROWS_WITH(st::load(path), Catch::Contains(c.expect) && Catch::Contains(path));
  }

  // A shape longer than any real tensor's.
  std::string shape = "[1";
  for (int k = 0; k < 100; ++k) shape += ",1";
  shape += "]";
  REQUIRE_THROWS_WITH(
      st::parse(
          make_file(R"({"a":{"dtype":"U8","shape":)" + shape + R"(,"data_offsets":[0,1]}})", {0})),
      Catch::Contains("more than 64"));
  // The message stays short however long the offending name is.
  const std::string long_name(100000, 'n');
  try {
    st::parse(make_file("{\"" + long_name + "\":5}", {}));
    FAIL("accepted");
  } catch (const vqkit::error& e) {
    REQUIRE(std::string(e.what()).size() < 400);
  }
}

TEST_CASE("safetensors: a bad header length is rejected") {
  for (std::size_t n = 0; n < 8; ++n)
    REQUIRE_THROWS_WITH(st::parse(Bytes(n, 0)), Catch::Contains("too short"));
  auto with_length = [](std::uint64_t h, std::size_t total) {
    Bytes b(total, ' ');
    for (int i = 0; i < 8; ++i) b[i] = static_cast<std::uint8_t>(h >> (8 * i));
    return b;
  };
  REQUIRE_THROWS_WITH(st::parse(with_length(200'000'000, 64)), Catch::Contains("exceeds"));
  REQUIRE_THROWS_WITH(st::parse(with_length(~std::uint64_t{0}, 64)), Catch::Contains("exceeds"));
  REQUIRE_THROWS_WITH(st::parse(with_length(100'000'001, 64)), Catch::Contains("exceeds"));
  REQUIRE_THROWS_WITH(st::parse(with_length(57, 64)), Catch::Contains("runs past the end"));
  REQUIRE_THROWS_WITH(st::parse(with_length(56, 64)), Catch::Contains("not valid JSON"));
  REQUIRE_THROWS_AS(st::parse(nullptr, 16), vqkit::error);
}

TEST_CASE("safetensors: random corruption only ever raises vqkit::error") {
  st::File f;
  f.tensors["a"] = st::from_vector(std::vector<float>{1, 2, 3});
  f.tensors["b"] = st::from_scalar(std::int64_t{-9});
  f.tensors["c"] = st::from_matrix(vqkit::RowMatrix<std::uint8_t>::Constant(2, 3, 5));
  f.metadata["m"] = "v";
  const Bytes base = st::serialize(f);
  std::uint64_t hlen;
  std::memcpy(&hlen, base.data(), 8);

  // Every strict prefix is invalid.
  for (std::size_t n = 0; n < base.size(); ++n)
    REQUIRE_THROWS_AS(st::parse(base.data(), n), vqkit::error);

  vqkit::Rng rng(2024);
  int accepted = 0, rejected = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    Bytes b = base;
    const int edits = 1 + static_cast<int>(rng.below(3));
    for (int e = 0; e < edits; ++e) {
      // Mostly inside the JSON header, where the parser has the most to do.
      const std::size_t pos = rng.below(4) != 0 ? 8 + rng.below(hlen) : rng.below(b.size());
      const char* alphabet = "{}[]\",:0123456789-.e \\u";
      switch (rng.below(4)) {
        case 0:
          b[pos] = static_cast<std::uint8_t>(rng.below(256));
          break;
        case 1:
          b[pos] = static_cast<std::uint8_t>(alphabet[rng.below(std::strlen(alphabet))]);
          break;
        case 2:
          b.erase(b.begin() + static_cast<std::ptrdiff_t>(pos));
          break;
        default:
          b.insert(b.begin() + static_cast<std::ptrdiff_t>(pos),
                   static_cast<std::uint8_t>(alphabet[rng.below(std::strlen(alphabet))]));
      }
      if (pos < b.size() && b.size() > 8 && rng.below(8) == 0) {
        const std::uint64_t h = b.size() - 8 - rng.below(16);  // fix up the length
        std::memcpy(b.data(), &h, 8);
      }
    }
    try {
      const st::File g = st::parse(b);
      ++accepted;
      // Whatever is accepted re-serializes and parses to the same content.
      REQUIRE(same_file(st::parse(st::serialize(g)), g));
    } catch (const vqkit::error&) {
      ++rejected;
    }
    // Any other exception type escapes and fails the test.
  }
  CHECK(rejected > 0);
  CHECK(accepted > 0);
}

TEST_CASE("safetensors: every dtype of the format round-trips; the integer ones have typed access",
          "[safetensors]") {
  st::File f;
  for (const st::DType d : st::all_dtypes) {
    st::DType back{};
    REQUIRE(st::dtype_from_name(st::dtype_name(d), back));
    CHECK(back == d);
    st::Tensor t;
    t.dtype = d;
    t.shape = {3};
    for (std::size_t i = 0; i < 3 * st::dtype_size(d); ++i) t.bytes.push_back(std::uint8_t(i * 37 + 1));
    f.tensors[st::dtype_name(d)] = t;
  }
  CHECK(f.tensors.size() == 15);
  const st::File g = st::parse(st::serialize(f));
  for (const auto& [name, t] : f.tensors) {
    INFO(name);
    CHECK(g.at(name).dtype == t.dtype);
    CHECK(g.at(name).bytes == t.bytes);
  }
  const std::vector<std::int16_t> v = {-32768, 7, 32767};
  CHECK(st::to_vector<std::int16_t>(st::from_vector(v)) == Eigen::Map<const Eigen::Matrix<std::int16_t, -1, 1>>(v.data(), 3));
  STATIC_REQUIRE(st::dtype_of<std::uint32_t>() == st::DType::U32);
  STATIC_REQUIRE(st::dtype_of<signed char>() == st::DType::I8);
  REQUIRE_THROWS_WITH(st::to_vector<std::uint16_t>(g.at("BF16"), "BF16"), Catch::Contains("has dtype BF16"));
}
