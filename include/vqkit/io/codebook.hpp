// vqkit/io/codebook.hpp - load a codebook trained elsewhere (PyTorch, numpy)
// to serve it with vqkit::Codebook.
//
//   RowMatrix<float> codes = io::load_codebook("model.safetensors", "vq._codebook.embed");
//   RowMatrix<float> codes = io::load_codebook("codebook.npy");
//
// The file kind is read from its first bytes (a .npy starts with
// "\x93NUMPY"; anything else is read as safetensors), not from its name.
//  - safetensors: the tensor called tensor_name; with an empty name, the
//    file's only tensor. Every dtype of the format parses, so a whole
//    state dict (bool flags, step counters, EMA buffers) is fine; the chosen
//    tensor must be F32, F16 or BF16.
//  - .npy: the file's array (tensor_name must be empty); float32 or float16.
// The shape must be K x D or 1 x K x D (a single codebook as
// vector-quantize-pytorch stores it), K >= 1, D >= 1, and every value finite.
// Half-precision values are widened exactly to float. Anything else throws
// vqkit::error naming the file, the tensor and the bad value; when the name
// is missing or wrong, the message lists the tensors that could be meant.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "vqkit/core/check.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/half.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/io/npy.hpp"
#include "vqkit/io/safetensors.hpp"

namespace vqkit::io {

namespace detail {

using safetensors::detail::shape_string;

/// (K, D) of a K x D or 1 x K x D shape, or throws.
inline void codebook_shape(const std::vector<std::int64_t>& shape, const char* where, const std::string& what,
                           Index& K, Index& D) {
  if (shape.size() == 3 && shape[0] != 1)
    ::vqkit::detail::throw_error(where, what, " has shape ", shape_string(shape), ": ", shape[0],
                                 " codebooks (heads); vqkit serves one K x D codebook per Codebook, "
                                 "save one head (e.g. embed[h]) to its own tensor");
  VQKIT_REQUIRE(shape.size() == 2 || shape.size() == 3, where, what, " has shape ", shape_string(shape),
                ", expected K x D or 1 x K x D");
  K = Index(shape[shape.size() - 2]);
  D = Index(shape[shape.size() - 1]);
  VQKIT_REQUIRE(K >= 1 && D >= 1, where, what, " has shape ", shape_string(shape),
                ": an empty codebook (K and D must be >= 1)");
}

/// The tensors of f that look like a codebook (float, rank 2 or 3), for
/// messages.
inline std::string codebook_candidates(const safetensors::File& f) {
  std::string s;
  int n = 0;
  for (const auto& [name, t] : f.tensors) {
    const bool is_float = t.dtype == safetensors::DType::F32 || t.dtype == safetensors::DType::F16 ||
                          t.dtype == safetensors::DType::BF16;
    if (!is_float || (t.shape.size() != 2 && t.shape.size() != 3)) continue;
    if (n++ == 10) {
      s += ", ...";
      break;
    }
    s += (s.empty() ? "" : ", ") + std::string("'") + safetensors::detail::clip(name, 80) + "' " +
         shape_string(t.shape) + " " + safetensors::dtype_name(t.dtype);
  }
  return s.empty() ? std::string("none (no F32/F16/BF16 tensor of rank 2 or 3)") : s;
}

}  // namespace detail

/// Reads the K x D codebook at path; see the top of this header.
inline RowMatrix<float> load_codebook(const std::string& path, const std::string& tensor_name = "") {
  const std::string where_s = "load_codebook('" + path + "')";
  const char* where = where_s.c_str();
  char magic[6] = {};
  {
    std::ifstream in(path, std::ios::binary);
    VQKIT_REQUIRE(in.is_open(), where, "cannot open the file: ", std::strerror(errno));
    in.read(magic, 6);
  }
  RowMatrix<float> codes;
  Index K = 0, D = 0;
  if (std::memcmp(magic, "\x93NUMPY", 6) == 0) {
    VQKIT_REQUIRE(tensor_name.empty(), where, "a .npy file holds one array, but tensor '", tensor_name,
                  "' was asked for (pass an empty name)");
    npy::Array a = npy::load(path);
    detail::codebook_shape(a.shape, where, "the array", K, D);
    VQKIT_REQUIRE(a.dtype == npy::DType::F32 || a.dtype == npy::DType::F16, where, "the array has dtype ",
                  npy::dtype_name(a.dtype), "; a codebook is float32 or float16");
    a.shape = {K, D};  // 1 x K x D as K x D
    codes = npy::to_float_matrix(a);
  } else {
    safetensors::File f;
    try {
      f = safetensors::load(path);
    } catch (const error& e) {
      ::vqkit::detail::throw_error(where, "neither a .npy file (no \\x93NUMPY magic) nor a valid safetensors file: ",
                                   e.what());
    }
    std::string name = tensor_name;
    if (name.empty()) {
      VQKIT_REQUIRE(f.tensors.size() == 1, where, "the file holds ", f.tensors.size(),
                    " tensors; name the codebook (candidates: ", detail::codebook_candidates(f), ")");
      name = f.tensors.begin()->first;
    }
    VQKIT_REQUIRE(f.contains(name), where, "no tensor named '", safetensors::detail::clip(name),
                  "' (candidates: ", detail::codebook_candidates(f), ")");
    const safetensors::Tensor& t = f.at(name);
    const std::string what = "tensor '" + safetensors::detail::clip(name) + "'";
    detail::codebook_shape(t.shape, where, what, K, D);
    using safetensors::DType;
    VQKIT_REQUIRE(t.dtype == DType::F32 || t.dtype == DType::F16 || t.dtype == DType::BF16, where, what,
                  " has dtype ", safetensors::dtype_name(t.dtype), "; a codebook is F32, F16 or BF16");
    codes.resize(K, D);
    if (t.dtype == DType::F32)
      std::memcpy(codes.data(), t.bytes.data(), t.bytes.size());
    else
      widen_16bit(t.bytes.data(), std::size_t(K * D), t.dtype == DType::BF16, codes.data());
  }
  ::vqkit::detail::require_finite(codes, where, "the codebook");
  return codes;
}

}  // namespace vqkit::io
