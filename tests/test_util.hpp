// Shared helpers for vqkit's tests.
#pragma once

#include <filesystem>
#include <string>

#include "skip.hpp"

#include <vqkit/core/random.hpp>
#include <vqkit/core/types.hpp>

namespace vqkit::test {

template <class T>
RowMatrix<T> gaussian(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  Rng r(seed);
  RowMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(scale * r.normal());
  return m;
}

/// Small integers in [-range, range]: dot products and norms are exact in
/// float, so ties are real ties.
template <class T>
RowMatrix<T> small_integers(Index rows, Index cols, std::uint64_t seed, int range = 3) {
  Rng r(seed);
  RowMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i)
    m.data()[i] = T(std::int64_t(r.below(std::uint64_t(2 * range + 1))) - range);
  return m;
}

/// Path of a file under the shared data folder, or "" when it is absent.
inline std::string data_file(const std::string& rel) {
#ifdef VQKIT_TEST_DATA_DIR
  const std::filesystem::path p = std::filesystem::path(VQKIT_TEST_DATA_DIR) / rel;
  if (std::filesystem::exists(p)) return p.string();
#endif
  return {};
}

}  // namespace vqkit::test
