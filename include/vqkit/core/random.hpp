// vqkit/core/random.hpp - a small, portable, checkpointable random generator.
//
// std::normal_distribution and friends are implementation-defined, so a run
// would differ between standard libraries. vqkit uses xoshiro256** (Blackman
// & Vigna), seeded through splitmix64, with its own uniform, bounded-integer
// and normal draws; the whole state is four 64-bit words that a checkpoint
// saves, so a resumed run continues bit-identically.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

namespace vqkit {

class Rng {
 public:
  using State = std::array<std::uint64_t, 4>;

  explicit Rng(std::uint64_t seed = 0) { reseed(seed); }

  void reseed(std::uint64_t seed) {
    std::uint64_t z = seed;
    for (auto& w : s_) w = splitmix64(z);
  }

  const State& state() const { return s_; }
  void set_state(const State& s) { s_ = s; }

  /// Next raw 64-bit word.
  std::uint64_t next() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  /// Uniform double in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  /// Uniform integer in [0, n), unbiased (rejection); n must be > 0.
  std::uint64_t below(std::uint64_t n) {
    const std::uint64_t limit = (~std::uint64_t{0}) - (~std::uint64_t{0}) % n;
    std::uint64_t r;
    do r = next();
    while (r >= limit);
    return r % n;
  }

  /// Standard normal draw (Box-Muller; one draw per call, no cached spare, so
  /// the state is only the four words).
  double normal() {
    double u1;
    do u1 = uniform();
    while (u1 <= 0.0);
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix64(std::uint64_t& z) {
    std::uint64_t r = (z += 0x9e3779b97f4a7c15ULL);
    r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ULL;
    r = (r ^ (r >> 27)) * 0x94d049bb133111ebULL;
    return r ^ (r >> 31);
  }
  State s_{};
};

}  // namespace vqkit
