// vqkit/layers/gelu.hpp - GELU activation, the EXACT (erf) variant:
// PyTorch's nn.GELU() with its default approximate='none', not the tanh
// approximation used by GPT-2 / llm.c.
//
// Shapes: x (N, C) -> y (N, C), elementwise, any N and C; no parameters.
//
// forward:   y = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
//            computed as 0.5 * x * erfc(-x / sqrt(2)), the same function,
//            which keeps full relative precision for large negative x
//            (1 + erf(...) would cancel there).
// backward:  dy = dL/dy (N, C), the forward input x kept in Context:
//            dx = dy * (Phi(x) + x * phi(x)),  phi(x) = exp(-x^2/2) / sqrt(2*pi)
//            dx is overwritten; there are no parameter gradients.
//
// float evaluates erfc in double, in blocks of 256 values:
// erfc(z) = t exp(-z^2 - 1.26551223 + t P(t)), t = 1 / (1 + z/2), P the
// degree-8 Chebyshev fit of Numerical Recipes' erfcc (relative error < 1.2e-7
// for every z >= 0), erfc(-z) = 2 - erfc(z). So float results stay within ~2
// ulp of the exact values, tail included, without a scalar libm call per
// value (which took ~10% of a QuantizerBlock step). Where the CPU has
// AVX-512F the formula runs as AVX-512 code (exp from core/simd.hpp), chosen
// at run time whatever the program's compiler flags (in a build without
// -march, Eigen's SSE2 version took ~20% of a tokenizer step); elsewhere
// Eigen vectorises it. Blocks run on the backend's threads; each value is
// computed alone, so the bits do not depend on the thread count. double
// keeps std::erfc.
//
// Every check happens before the first write, so a call that throws
// vqkit::error leaves the outputs untouched.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"
#include "vqkit/core/simd.hpp"

namespace vqkit {

namespace detail {

// (Eigen's AVX-512 exp, in a -march=native build, trips the same GCC 12
// warnings as the intrinsics below.)
VQKIT_K512_WARNINGS_OFF

/// GELU on n <= 256 floats: out = gelu(x), or, with Derivative, out =
/// dy * gelu'(x). The arithmetic is double (see the header comment).
template <bool Derivative>
void gelu_block(const float* x, const float* dy, float* out, Index n) {
  using A = Eigen::Array<double, Eigen::Dynamic, 1, Eigen::ColMajor, 256, 1>;  // on the stack
  const A v = Eigen::Map<const Eigen::ArrayXf>(x, n).cast<double>();
  const A z = v.abs() * 0.70710678118654752440;
  const A t = 1.0 / (1.0 + 0.5 * z);
  const A p =
      -1.26551223 +
      t * (1.00002368 +
           t * (0.37409196 +
                t * (0.09678418 +
                     t * (-0.18628806 +
                          t * (0.27886807 +
                               t * (-1.13520398 +
                                    t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
  const A e = t * (p - z * z).exp();                 // erfc(|x| / sqrt 2)
  const A c = (v >= 0.0).select(2.0 - e, e);         // erfc(-x / sqrt 2) = 2 Phi(x)
  Eigen::Map<Eigen::ArrayXf> o(out, n);
  if constexpr (Derivative) {
    const A d = 0.5 * c + v * 0.39894228040143267794 * (-0.5 * v * v).exp();
    o = (Eigen::Map<const Eigen::ArrayXf>(dy, n).cast<double>() * d).cast<float>();
  } else {
    o = (0.5 * v * c).cast<float>();
  }
}

#if VQKIT_K512
namespace k512 {

/// gelu_block's formula on M vectors of 8 doubles, in place: v <- gelu(v),
/// or, with Derivative, v <- dy * gelu'(v). Stage by stage over the M
/// vectors; exp_pd for Eigen's exp (the same ~1-2 ulp of float).
template <bool Derivative, int M>
VQKIT_K512_TARGET inline void gelu_pd(__m512d (&v)[M], const __m512d (&dy)[M]) {
  constexpr double P[10] = {-1.26551223, 1.00002368,  0.37409196, 0.09678418,  -0.18628806,
                            0.27886807,  -1.13520398, 1.48851587, -0.82215223, 0.17087277};
  const __m512d half = _mm512_set1_pd(0.5), one = _mm512_set1_pd(1.0);
  __m512d z[M], t[M], e[M], g[M];
  for (int j = 0; j < M; ++j) {
    z[j] = _mm512_mul_pd(_mm512_abs_pd(v[j]), _mm512_set1_pd(0.70710678118654752440));
    t[j] = _mm512_div_pd(one, _mm512_fmadd_pd(half, z[j], one));
    e[j] = _mm512_set1_pd(P[9]);
  }
  for (int k = 8; k >= 0; --k)
    for (int j = 0; j < M; ++j) e[j] = _mm512_fmadd_pd(t[j], e[j], _mm512_set1_pd(P[k]));
  for (int j = 0; j < M; ++j) e[j] = _mm512_fnmadd_pd(z[j], z[j], e[j]);
  exp_pd(e);
  for (int j = 0; j < M; ++j) {
    e[j] = _mm512_mul_pd(t[j], e[j]);  // erfc(|x| / sqrt 2)
    const __mmask8 nonneg = _mm512_cmp_pd_mask(v[j], _mm512_setzero_pd(), _CMP_GE_OQ);
    e[j] = _mm512_mask_sub_pd(e[j], nonneg, _mm512_set1_pd(2.0), e[j]);  // 2 Phi(x)
  }
  if constexpr (Derivative) {
    for (int j = 0; j < M; ++j)
      g[j] = _mm512_mul_pd(_mm512_mul_pd(_mm512_set1_pd(-0.5), v[j]), v[j]);
    exp_pd(g);
    for (int j = 0; j < M; ++j) {
      const __m512d phi =
          _mm512_mul_pd(_mm512_mul_pd(v[j], _mm512_set1_pd(0.39894228040143267794)), g[j]);
      v[j] = _mm512_mul_pd(dy[j], _mm512_fmadd_pd(half, e[j], phi));
    }
  } else {
    (void)dy;
    (void)g;
    for (int j = 0; j < M; ++j) v[j] = _mm512_mul_pd(_mm512_mul_pd(half, v[j]), e[j]);
  }
}

/// The low / high 8 of 16 floats, as doubles.
VQKIT_K512_TARGET inline __m512d lo8(__m512 a) { return _mm512_cvtps_pd(_mm512_castps512_ps256(a)); }
VQKIT_K512_TARGET inline __m512d hi8(__m512 a) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

/// Two vectors of 8 doubles rounded to 16 floats (lo, hi).
VQKIT_K512_TARGET inline __m512 pack16(__m512d lo, __m512d hi) {
  const __m256d l = _mm256_castps_pd(_mm512_cvtpd_ps(lo)), h = _mm256_castps_pd(_mm512_cvtpd_ps(hi));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(l), h, 1));
}

/// 16 floats at p, or those of mask m (the rest 0) unless full.
VQKIT_K512_TARGET inline __m512 load16(bool full, __mmask16 m, const float* p) {
  return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}

/// gelu_pd on 32 floats (x, dy) -> out, the first `left` of them (all 32
/// from 32 on) loaded and stored; masked accesses only when left < 32 (a
/// masked store is slow on some CPUs).
template <bool Derivative>
VQKIT_K512_TARGET inline void gelu32(const float* x, const float* dy, float* out, Index left) {
  const auto mask = [](Index k) {  // the first min(k, 16) of 16 lanes
    return k >= 16 ? __mmask16(0xffff) : k <= 0 ? __mmask16(0) : __mmask16((1u << k) - 1u);
  };
  const bool full = left >= 32;
  const __mmask16 m0 = mask(left), m1 = mask(left - 16);
  const __m512 a = load16(full, m0, x), b = load16(full, m1, x + 16);
  __m512d v[4] = {lo8(a), hi8(a), lo8(b), hi8(b)};
  __m512d g[4] = {};
  if constexpr (Derivative) {
    const __m512 c = load16(full, m0, dy), d = load16(full, m1, dy + 16);
    g[0] = lo8(c), g[1] = hi8(c), g[2] = lo8(d), g[3] = hi8(d);
  }
  gelu_pd<Derivative>(v, g);
  if (full) {
    _mm512_storeu_ps(out, pack16(v[0], v[1]));
    _mm512_storeu_ps(out + 16, pack16(v[2], v[3]));
  } else {
    _mm512_mask_storeu_ps(out, m0, pack16(v[0], v[1]));
    _mm512_mask_storeu_ps(out + 16, m1, pack16(v[2], v[3]));
  }
}

/// gelu_block with AVX-512F, any n.
template <bool Derivative>
VQKIT_K512_TARGET void gelu_block(const float* x, const float* dy, float* out, Index n) {
  for (Index i = 0; i < n; i += 32)
    gelu32<Derivative>(x + i, Derivative ? dy + i : nullptr, out + i, n - i);
}

}  // namespace k512
#endif
VQKIT_K512_WARNINGS_ON

/// gelu_block over n values in blocks of 256, on be's threads from 64K
/// values; the AVX-512 kernel when the CPU has it (whatever the program's
/// compiler flags), Eigen's vector code otherwise.
template <bool Derivative>
void gelu_float(const cpu& be, const float* x, const float* dy, float* out, Index n) {
  constexpr Index B = 256;
  const Index blocks = (n + B - 1) / B;
  [[maybe_unused]] const bool use_k512 = cpu_has_avx512f();
  const auto run = [&](Index b) {
    const Index o = b * B;
#if VQKIT_K512
    if (use_k512) {
      k512::gelu_block<Derivative>(x + o, Derivative ? dy + o : nullptr, out + o, std::min(B, n - o));
      return;
    }
#endif
    gelu_block<Derivative>(x + o, Derivative ? dy + o : nullptr, out + o, std::min(B, n - o));
  };
  if (n >= (Index(1) << 16)) parallel_for(be, blocks, run);
  else
    for (Index b = 0; b < blocks; ++b) run(b);
}

}  // namespace detail

template <class T, class Backend = cpu>
class Gelu {
  static_assert(std::is_floating_point_v<T>, "Gelu<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned copy of the input).
  struct Context {
    RowMatrix<T> input;  // x (N, C)
  };

  explicit Gelu(Backend backend = {}) : backend_(std::move(backend)) {}

  /// Phi(x) * x, elementwise on a scalar.
  static T value(T x) { return T(0.5) * x * std::erfc(-x * kInvSqrt2); }
  /// d/dx [x * Phi(x)] = Phi(x) + x * phi(x).
  static T derivative(T x) {
    return T(0.5) * std::erfc(-x * kInvSqrt2) + x * kInvSqrt2Pi * std::exp(T(-0.5) * x * x);
  }

  /// x: (N, C). Resizes and fills y (N, C); y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y) const {
    Context ctx;
    forward(x, y, ctx);
    return ctx;
  }

  /// The same into a context whose buffer is reused.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Context& ctx) const {
    detail::copy_rows(backend_, x, ctx.input);  // copied first, so y may alias x
    y.resize(ctx.input.rows(), ctx.input.cols());
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Backend, cpu>)
      detail::gelu_float<false>(backend_, ctx.input.data(), nullptr, y.data(), y.size());
    else
      y = ctx.input.unaryExpr([](T v) { return value(v); });
  }

  /// dy: (N, C), the shape of the forward input. If dx is given, overwrites
  /// it with dL/dx (N, C); dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.input.rows() && dy.cols() == ctx.input.cols(),
                  "Gelu::backward", "dy is ", dy.rows(), "x", dy.cols(), ", expected ",
                  ctx.input.rows(), "x", ctx.input.cols(), " (the forward input's shape)");
    if (dx == nullptr) return;
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Backend, cpu>) {
      if (dy.outerStride() == dy.cols()) {  // contiguous: dx may alias dy, element by element
        dx->resize(dy.rows(), dy.cols());
        detail::gelu_float<true>(backend_, ctx.input.data(), dy.data(), dx->data(), dx->size());
        return;
      }
    }
    dx->resize(dy.rows(), dy.cols());
    dx->array() = dy.array() * ctx.input.unaryExpr([](T v) { return derivative(v); }).array();
  }

  /// No parameters: always empty.
  ParameterList<T> parameters(const std::string& /*prefix*/ = "") { return {}; }
  void zero_grad() {}

  const Backend& backend() const { return backend_; }

 private:
  static constexpr T kInvSqrt2 = T(0.70710678118654752440084436210484903928);
  static constexpr T kInvSqrt2Pi = T(0.39894228040143267793994605993438186848);
  Backend backend_;
};

}  // namespace vqkit
