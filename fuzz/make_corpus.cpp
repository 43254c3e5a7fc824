// fuzz/make_corpus.cpp - writes the seed corpora under <dir>/safetensors,
// <dir>/checkpoint and <dir>/vecs: small valid files and a few hostile ones.
// The committed fuzz/corpus/ is its output:
//   build-fuzz/fuzz/vqkit_make_corpus fuzz/corpus
// (File names carry no .safetensors suffix: .gitignore ignores that suffix.)
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include <vqkit/io/checkpoint.hpp>
#include <vqkit/io/vecs.hpp>

#include "fuzz_common.hpp"

namespace fs = std::filesystem;
namespace st = vqkit::safetensors;
namespace io = vqkit::io;
using Bytes = std::vector<std::uint8_t>;
using vqkit::Index;
using vqkit::RowMatrix;

namespace {

fs::path out_dir;

void put(const std::string& sub, const std::string& name, const Bytes& b) {
  const fs::path dir = out_dir / sub;
  fs::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  if (!out) throw std::runtime_error("cannot write " + (dir / name).string());
}

/// 8-byte length + header text (unpadded) + buffer.
Bytes raw_file(const std::string& header, const Bytes& buffer, std::uint64_t hlen_override = 0) {
  Bytes b(8);
  const std::uint64_t h = hlen_override ? hlen_override : header.size();
  std::memcpy(b.data(), &h, 8);
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), buffer.begin(), buffer.end());
  return b;
}

void safetensors_seeds() {
  const std::string d = "safetensors";
  put(d, "valid_empty", st::serialize(st::File{}));
  {
    st::File f;
    RowMatrix<float> m(2, 3);
    m << 1, 2, 3, 4, 5, 6;
    f.tensors["weight"] = st::from_matrix(m);
    put(d, "valid_f32_matrix", st::serialize(f));
  }
  {
    st::File f;
    f.tensors["a_f64"] = st::from_vector(std::vector<double>{0.5, -1.0, 1e300});
    f.tensors["b_i64"] = st::from_scalar(std::int64_t{-9});
    f.tensors["c_i32"] = st::from_vector(std::vector<std::int32_t>{7, -7});
    f.tensors["d_u64"] = st::from_vector(std::vector<std::uint64_t>{~0ULL});
    f.tensors["e_u8"] = st::from_matrix(RowMatrix<std::uint8_t>::Constant(2, 2, 0xAB));
    f.tensors["f_empty"] = st::from_vector(std::vector<float>{});
    f.metadata["format"] = "pt";
    f.metadata["note"] = "r\xc3\xa9sum\xc3\xa9";  // UTF-8
    put(d, "valid_all_dtypes_metadata", st::serialize(f));
  }
  // As another writer would: no padding, keys out of order, a 3-D shape.
  put(d, "valid_other_writer",
      raw_file(R"({"z":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},)"
               R"("a":{"shape":[1,2,2],"dtype":"U8","data_offsets":[0,4]}})",
               Bytes{1, 2, 3, 4, 5, 6}));
  // Hostile.
  put(d, "hostile_header_length_past_end", raw_file("{}", {}, 1000));
  put(d, "hostile_header_length_huge", raw_file("{}", {}, ~std::uint64_t{0}));
  put(d, "hostile_offsets_past_end",
      raw_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4000000000]}})", Bytes(4)));
  put(d, "hostile_overlap",
      raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
               Bytes(12)));
  put(d, "hostile_wrong_dtype",
      raw_file(R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", Bytes(4)));
  put(d, "hostile_huge_shape",
      raw_file(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
               Bytes(8)));
  put(d, "hostile_non_utf8_name",
      raw_file("{\"a\xff\xfe\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", Bytes(1)));
  put(d, "hostile_duplicate_key",
      raw_file(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
               R"("a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
               Bytes(1)));
  put(d, "hostile_deep_nesting", raw_file(std::string(64, '[') + std::string(64, ']'), {}));
  // An unterminated 4 KB name: the JSON error quotes the token it read.
  put(d, "hostile_long_token", raw_file("{\"" + std::string(4000, 'a'), {}));
}

template <class T>
vqkit::VectorQuantizer<T> trained_quantizer() {
  const auto cfg = vqkit::fuzz::checkpoint_config();
  vqkit::VectorQuantizer<T> vq(cfg, vqkit::cpu{1});
  vqkit::Rng rng(1);
  RowMatrix<T> x(3, cfg.dim), q;
  for (int s = 0; s < 3; ++s) {  // 9 rows: the bank (8) is full, k-means ran
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(rng.normal());
    vq.forward(x, q);
  }
  return vq;
}

void checkpoint_seeds() {
  const std::string d = "checkpoint";
  const auto f32 = vqkit::to_safetensors(trained_quantizer<float>());
  const auto f64 = vqkit::to_safetensors(trained_quantizer<double>());
  put(d, "valid_float", st::serialize(f32));
  put(d, "valid_double", st::serialize(f64));
  {
    vqkit::VectorQuantizer<float> fresh(vqkit::fuzz::checkpoint_config(), vqkit::cpu{1});
    put(d, "valid_fresh_float", st::serialize(vqkit::to_safetensors(fresh)));
  }
  // Hostile (each a valid safetensors file, so the loader's own checks run).
  auto g = f32;
  g.metadata["codebook_size"] = "5";
  put(d, "hostile_config_mismatch", st::serialize(g));
  g = f32;
  g.metadata["codebook_size"] = "4611686018427387904";  // 2^62
  g.metadata["memory_bank_size"] = "0";
  put(d, "hostile_huge_codebook_size", st::serialize(g));
  g = f32;
  g.tensors["codebook"] = st::from_matrix(RowMatrix<double>::Zero(4, 3));
  put(d, "hostile_wrong_dtype", st::serialize(g));
  g = f32;
  {
    RowMatrix<float> c = st::to_matrix<float>(g.tensors["codebook"]);
    c(1, 2) = std::numeric_limits<float>::quiet_NaN();
    g.tensors["codebook"] = st::from_matrix(c);
  }
  put(d, "hostile_nan_codebook", st::serialize(g));
  g = f32;
  g.tensors["memory_bank.size"] = st::from_scalar(std::int64_t{9});
  put(d, "hostile_bank_size", st::serialize(g));
  g = f32;
  g.tensors["step"] = st::from_scalar(std::numeric_limits<std::int64_t>::max());
  put(d, "hostile_step_max", st::serialize(g));
  g = f32;
  g.tensors["usage.steps_since_used"] =
      st::from_vector(std::vector<std::int64_t>(4, std::numeric_limits<std::int64_t>::max()));
  put(d, "hostile_steps_since_used_max", st::serialize(g));
  g = f32;
  g.tensors.erase("rng.state");
  put(d, "hostile_missing_tensor", st::serialize(g));
}

void vecs_seeds() {
  const std::string d = "vecs";
  RowMatrix<float> f(3, 4);
  f << 1, 2, 3, 4, -1, 0.5f, 1e-40f, 3e38f, 0, 0, 0, 0;
  put(d, "valid_fvecs_3x4", io::serialize_fvecs(f));
  put(d, "valid_fvecs_1x1", io::serialize_fvecs(RowMatrix<float>::Constant(1, 1, 2.5f)));
  RowMatrix<std::uint8_t> b(2, 5);
  b << 0, 1, 2, 254, 255, 9, 8, 7, 6, 5;
  put(d, "valid_bvecs_2x5", io::serialize_bvecs(b));
  RowMatrix<std::int32_t> iv(2, 2);
  iv << 0, -1, std::numeric_limits<std::int32_t>::max(), std::numeric_limits<std::int32_t>::min();
  put(d, "valid_ivecs_2x2", io::serialize_ivecs(iv));
  auto rec = [](std::int32_t dim, std::size_t payload) {
    Bytes r(4 + payload, 0x11);
    std::memcpy(r.data(), &dim, 4);
    return r;
  };
  put(d, "hostile_d_zero", rec(0, 0));
  put(d, "hostile_d_negative", rec(-4, 16));
  put(d, "hostile_d_too_large", rec((1 << 20) + 1, 8));
  put(d, "hostile_d_max_tiny_file", rec(1 << 20, 4));
  {
    Bytes t = io::serialize_fvecs(f);
    t.pop_back();
    put(d, "hostile_truncated_row", t);
  }
  {
    Bytes t = io::serialize_fvecs(f);
    const std::int32_t other = 3;
    std::memcpy(t.data() + 20, &other, 4);  // row 1 claims d = 3
    put(d, "hostile_row_d_differs", t);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " <corpus dir>\n";
    return 2;
  }
  out_dir = argv[1];
  safetensors_seeds();
  checkpoint_seeds();
  vecs_seeds();
  std::cout << "seed corpora written under " << out_dir << "\n";
  return 0;
}
