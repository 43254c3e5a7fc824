// libFuzzer harness for vqkit::npy::parse (include/vqkit/io/npy.hpp).
//
// Every input either throws vqkit::error with a short message or parses to
// an array whose bytes are exactly the input's data section and whose size
// matches its shape and dtype; serialize() accepts it, and its output parses
// back to the same array (the writer's header is numpy's).
#include <cstdint>
#include <cstring>
#include <string>

#include <vqkit/io/npy.hpp>

#include "fuzz_common.hpp"

namespace npy = vqkit::npy;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  npy::Array a;
  try {
    a = npy::parse(data, size);
  } catch (const vqkit::error& e) {
    VQKIT_FUZZ_CHECK(std::strlen(e.what()) <= vqkit::fuzz::max_message_bytes,
                     std::string("error message of ") + std::to_string(std::strlen(e.what())) + " bytes");
    return 0;
  }
  VQKIT_FUZZ_CHECK(a.shape.size() <= 64, "more than 64 dimensions accepted");
  const std::uint64_t want = std::uint64_t(a.numel()) * npy::dtype_size(a.dtype);
  VQKIT_FUZZ_CHECK(a.bytes.size() == want, "bytes do not match the shape");
  VQKIT_FUZZ_CHECK(a.bytes.size() <= size, "more data than input");
  VQKIT_FUZZ_CHECK(a.bytes.empty() || std::memcmp(a.bytes.data(), data + (size - a.bytes.size()), a.bytes.size()) == 0,
                   "data differs from the input's data section");
  if (a.shape.size() == 2 && a.dtype != npy::DType::I32 && a.dtype != npy::DType::I64) {
    const auto m = npy::to_float_matrix(a);
    VQKIT_FUZZ_CHECK(m.rows() == a.shape[0] && m.cols() == a.shape[1], "to_float_matrix shape");
  }
  std::vector<std::uint8_t> again;
  try {
    again = npy::serialize(a);
  } catch (const vqkit::error& e) {
    vqkit::fuzz::fail(std::string("serialize rejected what parse accepted: ") + e.what());
  }
  VQKIT_FUZZ_CHECK(again.size() % 64 == a.bytes.size() % 64, "the data does not start 64-aligned");
  const npy::Array b = npy::parse(again);
  VQKIT_FUZZ_CHECK(b.dtype == a.dtype && b.shape == a.shape && b.bytes == a.bytes, "round trip differs");
  return 0;
}
