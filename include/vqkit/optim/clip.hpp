// vqkit/optim/clip.hpp - global-norm gradient clipping (PyTorch's
// torch.nn.utils.clip_grad_norm_ with norm_type 2).
//
//   total = sqrt(sum over parameters p, entries k of grad_p[k]^2)
//   if max_norm / (total + 1e-6) < 1:  every grad_p *= max_norm / (total + 1e-6)
//   returns total, the norm before clipping
// (the same rule and the same 1e-6 as PyTorch, so a clipped gradient ends
// slightly below max_norm). The sum of squares is taken in double, in fixed
// blocks of entries added in order: the result is bit-identical for every
// thread count. If total is not finite (an inf or NaN gradient) the gradients
// are left unchanged and the non-finite norm is returned, so the caller can
// skip the step (PyTorch would scale them by 0 or NaN).
//
// Checked before any write (vqkit::error): max_norm finite and >= 0, no null
// gradient pointer.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

namespace detail {

/// Sum of squares of n values in double, in fixed blocks added in order.
template <class T>
double clip_sum_squares(const cpu& be, const T* x, Index n) {
  constexpr Index block = 8192;
  const Index nblocks = (n + block - 1) / block;
  std::vector<double> partial(static_cast<std::size_t>(nblocks), 0.0);
#pragma omp parallel for schedule(static) num_threads(be.num_threads()) if (nblocks > 1)
  for (Index b = 0; b < nblocks; ++b) {
    double s = 0.0;
    const Index end = std::min(n, (b + 1) * block);
    for (Index i = b * block; i < end; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
    partial[static_cast<std::size_t>(b)] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

}  // namespace detail

/// Clips the gradients of params to a global L2 norm of at most max_norm;
/// returns the norm before clipping.
template <class T>
double clip_grad_norm(const cpu& be, const ParameterList<T>& params, double max_norm) {
  const char* where = "clip_grad_norm";
  VQKIT_REQUIRE(std::isfinite(max_norm) && max_norm >= 0.0, where,
                "max_norm must be finite and >= 0, got max_norm=", max_norm);
  for (const auto& p : params)
    VQKIT_REQUIRE(p.grad != nullptr, where, "parameter '", p.name, "' has a null gradient");
  double sq = 0.0;
  for (const auto& p : params) sq += detail::clip_sum_squares(be, p.grad->data(), p.grad->size());
  const double total = std::sqrt(sq);
  if (!std::isfinite(total)) return total;
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    const T c = static_cast<T>(coef);
    for_each_parameter(be, params, [c](const ParameterRef<T>& p) { *p.grad *= c; });
  }
  return total;
}

template <class T>
double clip_grad_norm(const ParameterList<T>& params, double max_norm) {
  return clip_grad_norm(cpu{}, params, max_norm);
}

}  // namespace vqkit
