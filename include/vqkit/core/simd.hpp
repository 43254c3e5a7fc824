// vqkit/core/simd.hpp - the AVX-512 kernels' compile switch and CPU check.
//
// vqkit's AVX-512 kernels (nearest-code search, the GEMM behind Linear, the
// float GELU) are compiled on x86-64 with GCC or clang whatever the
// consumer's flags, with function target attributes (VQKIT_K512_TARGET), and
// chosen at run time when the CPU has AVX-512F (detail::cpu_has_avx512f()):
// a program built with plain -O3 runs the same kernels, with the same
// results bit for bit, as one built with -march=native. Translation units
// compiled by nvcc (the CUDA backend's host code) leave them out and take the
// generic paths.
#pragma once

#include <atomic>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__)
#define VQKIT_K512 1
#include <immintrin.h>
#define VQKIT_K512_TARGET __attribute__((target("avx512f,fma")))
#else
#define VQKIT_K512 0
#define VQKIT_K512_TARGET
#endif

// GCC 12's own avx512fintrin.h trips -W(maybe-)uninitialized on every
// _mm512_undefined_* (GCC bug 105593, fixed in 13); a consumer's -Wall would
// show it, since the kernels are compiled without -march. The kernels' code
// sits between VQKIT_K512_WARNINGS_OFF and VQKIT_K512_WARNINGS_ON.
#if defined(__GNUC__) && !defined(__clang__)
#define VQKIT_K512_WARNINGS_OFF                                 \
  _Pragma("GCC diagnostic push")                                \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")      \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define VQKIT_K512_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define VQKIT_K512_WARNINGS_OFF
#define VQKIT_K512_WARNINGS_ON
#endif

namespace vqkit {
namespace detail {

/// Tests only: when set, the AVX-512 kernels report themselves unsupported
/// (the generic paths run, as on a CPU without AVX-512).
inline std::atomic<bool> avx512_disabled{false};

/// Whether the AVX-512F kernels may run: compiled in (VQKIT_K512) and the
/// CPU has AVX-512F (checked once), unless a test disabled them.
inline bool cpu_has_avx512f() {
#if VQKIT_K512
  static const bool cpu_has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return cpu_has && !avx512_disabled.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

#if VQKIT_K512
VQKIT_K512_WARNINGS_OFF
namespace k512 {

/// Transposes 16 rows of 16 floats (r[i] = row i) into 16 vectors
/// (r[d] = element d of the 16 rows).
VQKIT_K512_TARGET inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3; r[4i+j]: dimension 4L+j in 128-bit lane L
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int j = 0; j < 4; ++j) {  // t[j]: dims j, 8+j; t[4+j]: dims 4+j, 12+j (rows 0-7), +8: rows 8-15
    t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
    r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
  }
}

/// exp of M vectors of 8 doubles, in place, relative error < 1e-14: x = n
/// ln2 + r with |r| <= ln2/2, e^r by its Taylor polynomial to degree 11, 2^n
/// applied by scalef (results underflow gracefully to 0). NaN stays NaN,
/// exp(-inf) = 0, exp(+inf) = +inf. The M vectors go through each stage
/// together (independent chains for the FMA pipes); the operation order is
/// fixed, so the bits do not depend on the calling program's flags.
template <int M>
VQKIT_K512_TARGET inline void exp_pd(__m512d (&x)[M]) {
  constexpr double c[12] = {1.0,         1.0,          1.0 / 2,       1.0 / 6,
                            1.0 / 24,    1.0 / 120,    1.0 / 720,     1.0 / 5040,
                            1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800};
  __m512d n[M], p[M];
  for (int j = 0; j < M; ++j) {
    // Clamp to where 2^n stays representable; max/min return their second
    // operand when either is NaN, so NaN passes through.
    x[j] = _mm512_min_pd(_mm512_set1_pd(710.0), _mm512_max_pd(_mm512_set1_pd(-746.0), x[j]));
    n[j] = _mm512_roundscale_pd(_mm512_mul_pd(x[j], _mm512_set1_pd(1.4426950408889634074)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n ln2, ln2 in two parts (n ln2_hi is exact for |n| < 2^11).
    x[j] = _mm512_fnmadd_pd(n[j], _mm512_set1_pd(6.93147180369123816490e-01), x[j]);
    x[j] = _mm512_fnmadd_pd(n[j], _mm512_set1_pd(1.90821492927058770002e-10), x[j]);
    p[j] = _mm512_set1_pd(c[11]);
  }
  for (int k = 10; k >= 0; --k)
    for (int j = 0; j < M; ++j) p[j] = _mm512_fmadd_pd(p[j], x[j], _mm512_set1_pd(c[k]));
  for (int j = 0; j < M; ++j) x[j] = _mm512_scalef_pd(p[j], n[j]);
}

}  // namespace k512
VQKIT_K512_WARNINGS_ON
#endif  // VQKIT_K512

}  // namespace detail
}  // namespace vqkit
