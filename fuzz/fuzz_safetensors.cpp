// libFuzzer harness for vqkit::safetensors::parse (include/vqkit/io/safetensors.hpp).
//
// For every input: parse() either throws vqkit::error with a short message or
// returns a File whose tensors are consistent (bytes == product(shape) *
// dtype size, total bytes <= input size), whose typed accessors work, and
// which serializes and parses back to the same content.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <vqkit/io/safetensors.hpp>

#include "fuzz_common.hpp"

namespace st = vqkit::safetensors;

namespace {

bool same_file(const st::File& a, const st::File& b) {
  if (a.metadata != b.metadata || a.tensors.size() != b.tensors.size()) return false;
  for (const auto& [name, t] : a.tensors) {
    const auto it = b.tensors.find(name);
    if (it == b.tensors.end()) return false;
    if (t.dtype != it->second.dtype || t.shape != it->second.shape || t.bytes != it->second.bytes)
      return false;
  }
  return true;
}

/// Reads a tensor through the typed accessor its dtype and rank call for.
template <class T>
void read_typed(const st::Tensor& t, const std::string& name) {
  if (t.shape.size() == 0) {
    (void)st::to_scalar<T>(t, name);
  } else if (t.shape.size() == 1) {
    VQKIT_FUZZ_CHECK(st::to_vector<T>(t, name).size() == t.shape[0], "to_vector size");
  } else if (t.shape.size() == 2) {
    const auto m = st::to_matrix<T>(t, name);
    VQKIT_FUZZ_CHECK(m.rows() == t.shape[0] && m.cols() == t.shape[1], "to_matrix shape");
  }
}

void read_any(const st::Tensor& t, const std::string& name) {
  switch (t.dtype) {
    case st::DType::F32: return read_typed<float>(t, name);
    case st::DType::F64: return read_typed<double>(t, name);
    case st::DType::I64: return read_typed<std::int64_t>(t, name);
    case st::DType::I32: return read_typed<std::int32_t>(t, name);
    case st::DType::U64: return read_typed<std::uint64_t>(t, name);
    case st::DType::U8: return read_typed<std::uint8_t>(t, name);
    case st::DType::U32: return read_typed<std::uint32_t>(t, name);
    case st::DType::U16: return read_typed<std::uint16_t>(t, name);
    case st::DType::I16: return read_typed<std::int16_t>(t, name);
    case st::DType::I8: return read_typed<std::int8_t>(t, name);
    case st::DType::F16:
    case st::DType::BF16:
    case st::DType::BOOL:
    case st::DType::F8_E5M2:
    case st::DType::F8_E4M3:
      return;  // bytes only (no C++ element type)
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  st::File f;
  try {
    f = st::parse(data, size);
  } catch (const vqkit::error& e) {
    VQKIT_FUZZ_CHECK(std::strlen(e.what()) <= vqkit::fuzz::max_message_bytes,
                     std::string("error message of ") + std::to_string(std::strlen(e.what())) +
                         " bytes");
    return 0;
  }
  // Accepted: the content is consistent and bounded by the input.
  std::uint64_t total = 0;
  for (const auto& [name, t] : f.tensors) {
    VQKIT_FUZZ_CHECK(name != "__metadata__", "a tensor is named __metadata__");
    const std::uint64_t n = static_cast<std::uint64_t>(t.numel());
    VQKIT_FUZZ_CHECK(t.bytes.size() == n * st::dtype_size(t.dtype), "bytes do not match the shape");
    total += t.bytes.size();
    read_any(t, name);
  }
  VQKIT_FUZZ_CHECK(total + 8 <= size, "tensors hold more bytes than the input");
  // Round trip: serialize() accepts whatever parse() accepted, and the bytes
  // it writes parse back to the same content.
  std::vector<std::uint8_t> again;
  try {
    again = st::serialize(f);
  } catch (const vqkit::error& e) {
    vqkit::fuzz::fail(std::string("serialize refused a parsed file: ") + e.what());
  }
  try {
    VQKIT_FUZZ_CHECK(same_file(st::parse(again), f), "round trip changed the content");
  } catch (const vqkit::error& e) {
    vqkit::fuzz::fail(std::string("parse refused serialize's output: ") + e.what());
  }
  return 0;
}
