// vqkit/core/half.hpp - exact widening of IEEE binary16 (float16) and
// bfloat16 to float.
//
// Both formats are subsets of float, so the conversion is exact: every
// finite value, signed zero, infinity and NaN (payload kept in its top bits)
// maps to the float of the same value. Used by the readers of tensors that
// PyTorch and numpy write in half precision (io/npy.hpp, io/codebook.hpp).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace vqkit {

/// The float whose value is the binary16 number with these bits.
constexpr float half_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits = 0;
  if (exp == 0x1f) {  // infinity or NaN
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: mant * 2^-24, normalised for float
    std::uint32_t e = 113;  // float exponent field of 2^-14
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

/// The float whose value is the bfloat16 number with these bits (bfloat16 is
/// the top half of a float).
constexpr float bf16_to_float(std::uint16_t b) {
  return std::bit_cast<float>(std::uint32_t(b) << 16);
}

/// Widens n little-endian 2-byte values at `bytes` (any alignment) to floats
/// at out: binary16 when bf16 is false, bfloat16 when it is true.
inline void widen_16bit(const std::uint8_t* bytes, std::size_t n, bool bf16, float* out) {
  static_assert(std::endian::native == std::endian::little, "little-endian host assumed");
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t v;
    std::memcpy(&v, bytes + 2 * i, 2);
    out[i] = bf16 ? bf16_to_float(v) : half_to_float(v);
  }
}

}  // namespace vqkit
