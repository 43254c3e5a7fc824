// vqkit/core/blocked_sum.hpp - a sum whose bits do not depend on the thread
// count.
//
//   detail::blocked_sum(be, n, f) = sum over i in [0, n) of f(i), in double
//
// The indices are cut into fixed blocks of 4096; the blocks are summed in
// parallel on the backend's threads, each in index order, and the block sums
// are then added in block order. The blocking never depends on the thread
// count, so neither does the result. Up to 64 blocks (262144 terms) the
// partial sums live on the stack; beyond that one vector is allocated.
// (The reconstruction losses use it; any layer reducing over rows can.)
#pragma once

#include <algorithm>
#include <array>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit::detail {

template <class F>
double blocked_sum(const cpu& be, Index n, F&& f) {
  constexpr Index block = 4096;
  constexpr Index on_stack = 64;
  const Index nblocks = (n + block - 1) / block;
  std::array<double, on_stack> small{};
  std::vector<double> large(nblocks > on_stack ? static_cast<std::size_t>(nblocks) : 0);
  double* partial = nblocks > on_stack ? large.data() : small.data();
#pragma omp parallel for schedule(static) num_threads(be.num_threads()) if (nblocks > 1)
  for (Index b = 0; b < nblocks; ++b) {
    double s = 0.0;
    const Index end = std::min(n, (b + 1) * block);
    for (Index i = b * block; i < end; ++i) s += f(i);
    partial[b] = s;
  }
  double total = 0.0;
  for (Index b = 0; b < nblocks; ++b) total += partial[b];
  return total;
}

}  // namespace vqkit::detail
