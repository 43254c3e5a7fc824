// Serving a codebook trained elsewhere: .npy read/write against files numpy
// wrote (tests/fixtures/io, gen_io.py), half-precision widening, safetensors
// state dicts with every dtype, io::load_codebook, and vqkit::Codebook's
// encode/decode against numpy's float64 argmin.
#include <unistd.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include <vqkit/core/half.hpp>
#include <vqkit/io/codebook.hpp>
#include <vqkit/io/npy.hpp>
#include <vqkit/quantizer/codebook.hpp>

#include "test_util.hpp"

using namespace vqkit;
using Bytes = std::vector<std::uint8_t>;

namespace {

std::string fixture(const std::string& name) { return std::string(VQKIT_FIXTURE_DIR) + "/io/" + name; }

Bytes file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  REQUIRE(in.is_open());
  return Bytes(std::istreambuf_iterator<char>(in), {});
}

/// A .npy of the given header text (padded to a newline as numpy does) and data.
Bytes make_npy(const std::string& dict, const Bytes& data, int major = 1) {
  std::string h = dict;
  const std::size_t prefix = major == 1 ? 10 : 12;
  while ((prefix + h.size() + 1) % 64 != 0) h += ' ';
  h += '\n';
  Bytes out = {0x93, 'N', 'U', 'M', 'P', 'Y', std::uint8_t(major), 0};
  for (std::size_t i = 0; i < prefix - 8; ++i) out.push_back(std::uint8_t(h.size() >> (8 * i)));
  out.insert(out.end(), h.begin(), h.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::string parse_error(const Bytes& b) {
  try {
    (void)npy::parse(b);
  } catch (const vqkit::error& e) {
    return e.what();
  }
  return "(accepted)";
}

std::string codebook_error(const std::string& path, const std::string& name = "") {
  try {
    (void)io::load_codebook(path, name);
  } catch (const vqkit::error& e) {
    return e.what();
  }
  return "(accepted)";
}

}  // namespace

TEST_CASE("npy: what numpy wrote parses, and serializes back to the same bytes", "[npy]") {
  for (const char* name : {"f32_3x4.npy", "f16_2x6.npy", "i32_7.npy", "i64_2x3.npy", "u8_2x3.npy",
                           "f32_scalar.npy", "f32_0x3.npy", "codebook.npy", "vectors.npy", "nearest.npy"}) {
    INFO(name);
    const Bytes raw = file_bytes(fixture(name));
    const npy::Array a = npy::load(fixture(name));
    CHECK(npy::parse(raw).bytes == a.bytes);
    CHECK(npy::serialize(a) == raw);
  }
}

TEST_CASE("npy: values of every dtype and header version", "[npy]") {
  const RowMatrix<float> f = npy::to_matrix<float>(npy::load(fixture("f32_3x4.npy")));
  REQUIRE((f.rows() == 3 && f.cols() == 4));
  for (Index i = 0; i < 3; ++i)
    for (Index j = 0; j < 4; ++j) CHECK(f(i, j) == float(i * 4 + j) * 0.5f - 2.75f);

  // float16 widening: exact values written as powers of two, not through the code under test.
  const RowMatrix<float> h = npy::to_float_matrix(npy::load(fixture("f16_2x6.npy")));
  REQUIRE((h.rows() == 2 && h.cols() == 6));
  const float want[9] = {0.0f, -0.0f, 1.0f, 65504.0f, std::ldexp(1.0f, -14), std::ldexp(1.0f, -24),
                         3 * std::ldexp(1.0f, -24), -1.5f, 1365.0f / 4096.0f};  // 1/3 in binary16: 0x3555
  for (int k = 0; k < 9; ++k) {
    INFO("element " << k);
    CHECK(h.data()[k] == want[k]);
    CHECK(std::signbit(h.data()[k]) == std::signbit(want[k]));
  }
  CHECK(h(1, 3) == std::numeric_limits<float>::infinity());
  CHECK(h(1, 4) == -std::numeric_limits<float>::infinity());
  CHECK(std::isnan(h(1, 5)));
  // bfloat16 is the top half of a float.
  CHECK(bf16_to_float(0x3fc0) == 1.5f);
  CHECK(bf16_to_float(0x8001) == -std::ldexp(1.0f, -133));

  const Vector<std::int32_t> v = npy::to_vector<std::int32_t>(npy::load(fixture("i32_7.npy")));
  REQUIRE(v.size() == 7);
  for (Index i = 0; i < 7; ++i) CHECK(v[i] == -3 * std::int32_t(i));
  const RowMatrix<std::int64_t> l = npy::to_matrix<std::int64_t>(npy::load(fixture("i64_2x3.npy")));
  for (Index k = 0; k < 6; ++k) CHECK(l.data()[k] == (std::int64_t(1) << 40) + k);
  const npy::Array u = npy::load(fixture("u8_2x3.npy"));
  CHECK(npy::to_matrix<std::uint8_t>(u)(1, 2) == 255);
  CHECK(npy::to_float_matrix(u)(1, 0) == 128.0f);

  const npy::Array s = npy::load(fixture("f32_scalar.npy"));
  CHECK(s.shape.empty());
  REQUIRE(s.bytes.size() == 4);
  float sv;
  std::memcpy(&sv, s.bytes.data(), 4);
  CHECK(sv == 1.5f);
  const npy::Array e = npy::load(fixture("f32_0x3.npy"));
  CHECK(e.shape == std::vector<std::int64_t>{0, 3});
  CHECK(npy::to_matrix<float>(e).rows() == 0);

  const npy::Array v2 = npy::load(fixture("f32_2x2_v2.npy"));
  const RowMatrix<float> m2 = npy::to_matrix<float>(v2);
  CHECK((m2(0, 0) == 1 && m2(0, 1) == 2 && m2(1, 0) == 3 && m2(1, 1) == 4));
  // Our writer picks 1.0 for this small header, as np.save does.
  CHECK(npy::serialize(v2)[6] == 1);
}

TEST_CASE("npy: from_matrix/save/load round trip; a big header gets version 2.0", "[npy]") {
  const auto dir = std::filesystem::temp_directory_path() / ("vqkit_npy_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const RowMatrix<float> m = test::gaussian<float>(5, 3, 9);
  npy::save((dir / "m.npy").string(), npy::from_matrix(m));
  CHECK(npy::to_matrix<float>(npy::load((dir / "m.npy").string())) == m);
  IndexVector idx(4);
  idx << 3, -1, 0, 1LL << 40;
  CHECK(npy::to_vector<std::int64_t>(npy::parse(npy::serialize(npy::from_vector(idx)))) == idx);
  REQUIRE_THROWS_WITH(npy::save((dir / "no_such_dir" / "m.npy").string(), npy::from_matrix(m)),
                      Catch::Contains("cannot create"));
  std::filesystem::remove_all(dir);

  npy::Array wide;  // 22000 dims of 1 do not fit a 65535-byte header
  wide.dtype = npy::DType::U8;
  wide.shape.assign(22000, 1);
  wide.bytes = {7};
  const Bytes b = npy::serialize(wide);
  CHECK(b[6] == 2);
  CHECK(parse_error(b).find("more than 64 dimensions") != std::string::npos);
}

TEST_CASE("npy: every bad file is rejected, naming why", "[npy]") {
  using Catch::Contains;
  CHECK_THAT(codebook_error(fixture("reject_f64.npy")), Contains("float64") && Contains("astype(np.float32)"));
  REQUIRE_THROWS_WITH(npy::load(fixture("reject_f64.npy")), Contains("'<f8'") && Contains("reject_f64.npy"));
  REQUIRE_THROWS_WITH(npy::load(fixture("reject_big_endian.npy")), Contains("big-endian"));
  REQUIRE_THROWS_WITH(npy::load(fixture("reject_fortran.npy")), Contains("Fortran order"));
  REQUIRE_THROWS_WITH(npy::load(fixture("reject_structured.npy")), Contains("structured"));
  REQUIRE_THROWS_WITH(npy::load(fixture("reject_bool.npy")), Contains("'|b1'"));
  REQUIRE_THROWS_WITH(npy::load(fixture("no_such.npy")), Contains("no_such.npy") && Contains("cannot open"));

  const Bytes good = file_bytes(fixture("f32_3x4.npy"));
  Bytes b = good;
  b.pop_back();
  CHECK_THAT(parse_error(b), Contains("truncated"));
  b = good;
  b.push_back(0);
  CHECK_THAT(parse_error(b), Contains("trailing"));
  b = good;
  b[0] = 'x';
  CHECK_THAT(parse_error(b), Contains("not a .npy file"));
  b = good;
  b[6] = 3;
  CHECK_THAT(parse_error(b), Contains("version 3.0"));
  CHECK_THAT(parse_error(Bytes(good.begin(), good.begin() + 9)), Contains("not a .npy file"));
  b = good;
  b[8] = 0xff;  // header length past the end
  CHECK_THAT(parse_error(b), Contains("runs past the end"));

  const Bytes data12(12 * 4, 0);
  const auto dict = [](const std::string& shape) {
    return "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }";
  };
  CHECK(parse_error(make_npy(dict("(3, 4)"), data12)) == "(accepted)");
  CHECK(parse_error(make_npy(dict("(3, 4)"), data12, 2)) == "(accepted)");
  CHECK_THAT(parse_error(make_npy(dict("(-3, 4)"), data12)), Contains("non-negative"));
  CHECK_THAT(parse_error(make_npy(dict("(12)"), data12)), Contains("without a comma"));
  CHECK_THAT(parse_error(make_npy(dict("(99999999999999999999, 1)"), data12)), Contains("overflows"));
  CHECK_THAT(parse_error(make_npy(dict("(4611686018427387904, 4)"), data12)), Contains("overflows"));
  CHECK_THAT(parse_error(make_npy(dict("[3, 4]"), data12)), Contains("expected '('"));
  CHECK_THAT(parse_error(make_npy("{'descr': '<f4', 'shape': (3, 4), }", data12)),
             Contains("lacks the key 'fortran_order'"));
  CHECK_THAT(parse_error(make_npy("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (12,)}",
                                  data12)),
             Contains("repeats the key 'descr'"));
  CHECK_THAT(parse_error(make_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (12,), 'x': 1}", data12)),
             Contains("unknown header key 'x'"));
  CHECK_THAT(parse_error(make_npy("{'descr': '<f4', 'fortran_order': 0, 'shape': (12,)}", data12)),
             Contains("not True or False"));
  CHECK_THAT(parse_error(make_npy(dict("(12,)") + " junk", data12)), Contains("after the header dict"));
  Bytes nl = make_npy(dict("(12,)"), data12);
  nl[nl.size() - data12.size() - 1] = ' ';  // the header's final newline
  CHECK_THAT(parse_error(nl), Contains("newline"));

  // Typed access checks dtype and rank.
  const npy::Array a = npy::parse(good);
  REQUIRE_THROWS_WITH(npy::to_matrix<std::int32_t>(a), Contains("float32") && Contains("int32"));
  REQUIRE_THROWS_WITH(npy::to_vector<float>(a), Contains("rank 1"));
  REQUIRE_THROWS_WITH(npy::to_float_matrix(npy::load(fixture("i32_7.npy"))), Contains("int32"));
  npy::Array bad = a;
  bad.bytes.pop_back();
  REQUIRE_THROWS_WITH(npy::serialize(bad), Contains("needs 48"));
}

TEST_CASE("load_codebook: .npy and PyTorch-style safetensors, f32/f16/bf16, exact", "[codebook][io]") {
  const RowMatrix<float> codes = npy::to_matrix<float>(npy::load(fixture("codebook.npy")));
  REQUIRE((codes.rows() == 16 && codes.cols() == 8));
  CHECK(io::load_codebook(fixture("codebook.npy")) == codes);
  CHECK(io::load_codebook(fixture("codebook_f16.npy")) ==
        npy::to_matrix<float>(npy::load(fixture("codebook_f16_as_f32.npy"))));
  const std::string st = fixture("state_dict.safetensors");
  // BF16, shape 1 x K x D, in a file that also holds BOOL, I64 and F16 tensors.
  CHECK(io::load_codebook(st, "vq._codebook.embed") ==
        npy::to_matrix<float>(npy::load(fixture("codebook_bf16_as_f32.npy"))));
  CHECK(io::load_codebook(st, "vq._codebook.embed_avg") == codes);
  CHECK(io::load_codebook(st, "proj.weight") == npy::to_matrix<float>(npy::load(fixture("proj_f16_as_f32.npy"))));
  // Every dtype of the format parses.
  const safetensors::File f = safetensors::load(st);
  CHECK(f.at("vq._codebook.initted").dtype == safetensors::DType::BOOL);
  CHECK(f.scalar<std::int64_t>("step") == 7);
}

TEST_CASE("load_codebook: wrong names, shapes, dtypes and files are named", "[codebook][io]") {
  using Catch::Contains;
  const std::string st = fixture("state_dict.safetensors");
  CHECK_THAT(codebook_error(st), Contains("holds 7 tensors") && Contains("'vq._codebook.embed' [1, 16, 8] BF16") &&
                                     !Contains("initted"));
  CHECK_THAT(codebook_error(st, "vq.embed"), Contains("no tensor named 'vq.embed'") && Contains("proj.weight"));
  CHECK_THAT(codebook_error(st, "heads.embed"), Contains("2 codebooks"));
  CHECK_THAT(codebook_error(st, "step"), Contains("tensor 'step' has shape []"));
  CHECK_THAT(codebook_error(fixture("codebook.npy"), "embed"), Contains("holds one array"));
  CHECK_THAT(codebook_error(fixture("i64_2x3.npy")), Contains("int64"));
  CHECK_THAT(codebook_error(fixture("f32_0x3.npy")), Contains("empty codebook"));
  CHECK_THAT(codebook_error(fixture("f16_2x6.npy")), Contains("non-finite"));
  CHECK_THAT(codebook_error(fixture("nearest.ivecs")), Contains("neither a .npy file") && Contains("nearest.ivecs"));
  CHECK_THAT(codebook_error(fixture("absent.safetensors")), Contains("cannot open"));
}

TEST_CASE("Codebook: encode matches numpy's float64 argmin; decode inverts it", "[codebook]") {
  const RowMatrix<float> codes = io::load_codebook(fixture("codebook.npy"));
  const RowMatrix<float> x = npy::to_matrix<float>(npy::load(fixture("vectors.npy")));
  const IndexVector want = npy::to_vector<std::int64_t>(npy::load(fixture("nearest.npy")));
  for (const int threads : {1, 2}) {
    for (const auto precision : {Precision::fp32, Precision::bf16_rerank}) {
      INFO("threads " << threads << ", " << to_string(precision));
      Codebook<float> cb(codes, Metric::l2, precision, cpu{threads});
      IndexVector idx(x.rows());
      Vector<float> dist;
      cb.encode(x, idx, &dist);
      CHECK(idx == want);
      for (Index i = 0; i < x.rows(); ++i) {
        const double d = (x.row(i).cast<double>() - codes.row(want[i]).cast<double>()).squaredNorm();
        CHECK(std::abs(dist[i] - d) <= 1e-5 * (1 + d));
      }
      CHECK(cb.decode(cb.encode(codes)) == codes);  // every code is its own nearest
      const RowMatrix<float> xq = cb.decode(idx);
      for (Index i = 0; i < x.rows(); ++i) CHECK(xq.row(i) == codes.row(want[i]));
    }
  }
  // Cosine: argmax of x.e / ||e||, against a brute force in double.
  Codebook<double> cos(codes.cast<double>(), Metric::cosine);
  const IndexVector ci = cos.encode(x.cast<double>());
  for (Index i = 0; i < x.rows(); ++i) {
    Index best = 0;
    double best_s = -2;
    for (Index k = 0; k < codes.rows(); ++k) {
      const double s = x.row(i).cast<double>().dot(codes.row(k).cast<double>()) / codes.row(k).cast<double>().norm();
      if (s > best_s) best_s = s, best = k;
    }
    CHECK(ci[i] == best);
  }
}

TEST_CASE("Codebook: bad input throws, naming it, and writes nothing", "[codebook]") {
  using Catch::Contains;
  REQUIRE_THROWS_WITH(Codebook<float>(RowMatrix<float>(0, 4)), Contains("K=0"));
  REQUIRE_THROWS_WITH(Codebook<float>(RowMatrix<float>(3, 0)), Contains("D=0"));
  RowMatrix<float> nan_codes = RowMatrix<float>::Ones(3, 2);
  nan_codes(2, 1) = std::nanf("");
  REQUIRE_THROWS_WITH(Codebook<float>(nan_codes), Contains("row 2, column 1"));

  Codebook<float> cb(test::gaussian<float>(10, 4, 3));
  REQUIRE_THROWS_WITH(cb.encode(RowMatrix<float>::Ones(5, 3)), Contains("3 columns, expected D=4"));
  IndexVector small(2);
  REQUIRE_THROWS_WITH(cb.encode(RowMatrix<float>::Ones(5, 4), small), Contains("indices has size 2"));
  RowMatrix<float> inf_x = RowMatrix<float>::Ones(5, 4);
  inf_x(3, 0) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(cb.encode(inf_x), Contains("non-finite"));
  CHECK(cb.encode(RowMatrix<float>(0, 4)).size() == 0);

  IndexVector idx(3);
  idx << 1, 10, 2;
  RowMatrix<float> out = RowMatrix<float>::Constant(3, 4, 42.0f);
  REQUIRE_THROWS_WITH(cb.decode(idx, out), Contains("indices[1] = 10") && Contains("[0, K=10)"));
  CHECK((out.array() == 42.0f).all());
  idx[1] = -1;
  REQUIRE_THROWS_WITH(cb.decode(idx, out), Contains("indices[1] = -1"));
  RowMatrix<float> wrong(2, 4);
  idx[1] = 0;
  REQUIRE_THROWS_WITH(cb.decode(idx, wrong), Contains("out is 2 x 4, expected 3 x 4"));
}
