// vqkit/layers/volume_render.hpp - alpha compositing of samples along rays
// into rendering weights and an expected depth (NeRF-style volume rendering,
// as in CoPilot4D's neural feature grid head).
//
// Shapes (R rays, S samples per ray, samples ordered near to far; row-major):
//   alpha   (R, S)   opacity of each sample, in [0, 1]
//   h       (R, S)   depth of each sample along its ray
//   weights (R, S)   w
//   depth   (R)      D
//
// forward, per ray (index i over the samples of the ray):
//   T_i = prod_{j<i} (1 - alpha_j)          transmittance, T_0 = 1
//   w_i = alpha_i * T_i
//   D   = sum_i w_i * h_i
// (sum_i w_i = 1 - prod_i (1 - alpha_i) <= 1: no background term.)
//
// backward, given dw = dL/dw (R, S) and dD = dL/dD (R) (either may be empty,
// meaning zero), per ray with g_i = dw_i + dD * h_i:
//   dh_i     = dD * w_i
//   dalpha_k = T_k * (g_k - Q_k),  Q_k = sum_{i>k} g_i * alpha_i * prod_{k<j<i} (1 - alpha_j)
//   computed by one reverse scan: Q_{S-1} = 0, Q_{k-1} = g_k * alpha_k + (1 - alpha_k) * Q_k.
//   O(S) per ray and no division by (1 - alpha), so alpha = 1 is fine.
//   dalpha and dh are overwritten.
//
// Rays are independent: the loops are parallel over rays and the results do
// not depend on the thread count. Every check happens before the first write:
// shape mismatches, alpha outside [0, 1] or non-finite values throw
// vqkit::error and leave the outputs untouched.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class VolumeRenderer {
  static_assert(std::is_floating_point_v<T>, "VolumeRenderer<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned).
  struct Context {
    RowMatrix<T> alpha;          // (R, S)
    RowMatrix<T> depths;         // h (R, S)
    RowMatrix<T> weights;        // w (R, S)
    RowMatrix<T> transmittance;  // T (R, S)
  };

  explicit VolumeRenderer(Backend backend = {}) : backend_(std::move(backend)) {}

  /// alpha (R, S) in [0, 1], h (R, S). Resizes and fills weights (R, S) and
  /// depth (R).
  Context forward(ConstMatrixRef<T> alpha, ConstMatrixRef<T> h, RowMatrix<T>& weights,
                  Vector<T>& depth) const {
    const char* where = "VolumeRenderer::forward";
    VQKIT_REQUIRE(h.rows() == alpha.rows() && h.cols() == alpha.cols(), where, "h is ", h.rows(),
                  "x", h.cols(), ", expected the shape of alpha ", alpha.rows(), "x",
                  alpha.cols());
    VQKIT_REQUIRE(alpha.cols() >= 1, where, "need at least one sample per ray, got S=",
                  alpha.cols());
    for (Index r = 0; r < alpha.rows(); ++r)
      for (Index i = 0; i < alpha.cols(); ++i) {
        const T a = alpha(r, i);
        VQKIT_REQUIRE(a >= T(0) && a <= T(1), where, "alpha(", r, ", ", i, ") = ", a,
                      " is outside [0, 1]");
        VQKIT_REQUIRE(std::isfinite(h(r, i)), where, "h(", r, ", ", i, ") is not finite (",
                      h(r, i), ")");
      }
    Context ctx;
    ctx.alpha = alpha;
    ctx.depths = h;
    const Index R = alpha.rows(), S = alpha.cols();
    ctx.weights.resize(R, S);
    ctx.transmittance.resize(R, S);
    Vector<T> d(R);
#pragma omp parallel for schedule(static) num_threads(backend_.num_threads()) if (R * S >= 4096)
    for (Index r = 0; r < R; ++r) {
      T trans = T(1), acc = T(0);
      for (Index i = 0; i < S; ++i) {
        const T a = ctx.alpha(r, i);
        const T w = a * trans;
        ctx.transmittance(r, i) = trans;
        ctx.weights(r, i) = w;
        acc += w * ctx.depths(r, i);
        trans *= T(1) - a;
      }
      d[r] = acc;
    }
    weights = ctx.weights;
    depth = std::move(d);
    return ctx;
  }

  /// dw (R, S) or empty, dD (R) or empty. Overwrites dalpha (R, S) and dh
  /// (R, S); either may be null.
  void backward(const Context& ctx, ConstMatrixRef<T> dw, ConstVectorRef<T> dD,
                RowMatrix<T>* dalpha, RowMatrix<T>* dh) const {
    const char* where = "VolumeRenderer::backward";
    const Index R = ctx.alpha.rows(), S = ctx.alpha.cols();
    const RowMatrix<T>* parts[] = {&ctx.depths, &ctx.weights, &ctx.transmittance};
    for (const RowMatrix<T>* m : parts)
      VQKIT_REQUIRE(m->rows() == R && m->cols() == S, where, "inconsistent context: a tensor is ",
                    m->rows(), "x", m->cols(), ", alpha is ", R, "x", S);
    const bool has_dw = dw.size() != 0, has_dD = dD.size() != 0;
    VQKIT_REQUIRE(!has_dw || (dw.rows() == R && dw.cols() == S), where, "dw is ", dw.rows(), "x",
                  dw.cols(), ", expected ", R, "x", S, " (or empty)");
    VQKIT_REQUIRE(!has_dD || dD.size() == R, where, "dD has ", dD.size(), " entries, expected R=",
                  R, " (or empty)");
    RowMatrix<T> da, dhh;
    if (dalpha != nullptr) da.resize(R, S);
    if (dh != nullptr) dhh.resize(R, S);
#pragma omp parallel for schedule(static) num_threads(backend_.num_threads()) if (R * S >= 4096)
    for (Index r = 0; r < R; ++r) {
      const T gD = has_dD ? dD[r] : T(0);
      if (dh != nullptr) dhh.row(r) = gD * ctx.weights.row(r);
      if (dalpha == nullptr) continue;
      T q = T(0);  // Q_k
      for (Index k = S - 1; k >= 0; --k) {
        const T g = (has_dw ? dw(r, k) : T(0)) + gD * ctx.depths(r, k);
        const T a = ctx.alpha(r, k);
        da(r, k) = ctx.transmittance(r, k) * (g - q);
        q = g * a + (T(1) - a) * q;  // becomes Q_{k-1}
      }
    }
    if (dalpha != nullptr) *dalpha = std::move(da);
    if (dh != nullptr) *dh = std::move(dhh);
  }

  /// No trainable parameters.
  ParameterList<T> parameters(const std::string& = "") { return {}; }
  void zero_grad() {}

  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
};

}  // namespace vqkit
