// vqkit/core/gemm.hpp - the matrix product behind Linear (and the layers
// built on it): deterministic, threaded on the backend, no heap allocation.
//
//   gemm(be, opa, a, opb, b, c, accumulate, bias)
//     c (M x N) = op(a) (M x K) * op(b) (K x N)  + c      (accumulate)
//                                                + bias   (!accumulate, bias given: one
//                                                          value per column, every row)
//   op(m) = m or m^T (Op::none, Op::transpose); all matrices row-major views.
//
// Guarantees:
//  - Bits never depend on the thread count: every element of c is computed
//    by one thread, and (float, AVX-512) as one FMA chain over k = 0 .. K-1
//    in order, starting from c (accumulate), the bias, or 0; partial sums
//    are stored and reloaded exactly between blocks of k, so the blocking
//    does not change them either. Elsewhere (double, or a CPU without
//    AVX-512) c is cut into fixed blocks of rows, each an Eigen GEMM run
//    serially, so the same holds.
//  - No heap allocation: the float kernel packs blocks of b into a 64 KB
//    buffer on each thread's stack.
//  - The float kernel is chosen at run time (core/simd.hpp), so a consumer
//    built without -march gets it.
// Why our own kernel rather than Eigen's or a BLAS: docs/performance.md,
// "Linear's GEMM" (Eigen's product allocates its packing buffers on every
// call, splits k differently for different thread counts, and runs SSE2 code
// in a consumer built without -march; OpenBLAS 0.3.21 is slower here).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/simd.hpp"
#include "vqkit/core/types.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace vqkit {

/// How gemm reads an operand: as stored, or transposed.
enum class Op { none, transpose };

namespace detail {

/// Keeps Eigen's own GEMM threading off for the lifetime of the guard (the
/// calling task's OpenMP ICV), so results do not depend on how Eigen would
/// split a product between threads. Restores the previous setting.
class SerialEigen {
 public:
#ifdef _OPENMP
  SerialEigen() : saved_(omp_get_max_threads()) {
    if (saved_ != 1) omp_set_num_threads(1);
  }
  ~SerialEigen() {
    if (saved_ != 1) omp_set_num_threads(saved_);
  }
#else
  SerialEigen() = default;
#endif
  SerialEigen(const SerialEigen&) = delete;
  SerialEigen& operator=(const SerialEigen&) = delete;

 private:
#ifdef _OPENMP
  int saved_ = 1;
#endif
};

/// A matrix read with strides: element (i, j) at p[i * rs + j * cs].
template <class T>
struct Strided {
  const T* p;
  Index rs, cs;
};

template <class T>
Strided<T> strided(const ConstMatrixRef<T>& m, Op op) {
  return op == Op::none ? Strided<T>{m.data(), m.outerStride(), 1}
                        : Strided<T>{m.data(), 1, m.outerStride()};
}

/// Products below this many multiply-adds run on one thread.
inline constexpr double kGemmParallelWork = double(1 << 20);

#if VQKIT_K512
VQKIT_K512_WARNINGS_OFF
namespace gemm512 {

// Blocking: a task is an MC x NC block of c; for each KC-deep slice of k it
// packs b's KC x NC block into panels of NR columns ([panel][k][NR], zero
// beyond N) on its stack (KC * NC floats = 64 KB, L2), then walks c's block
// in tiles of MR rows x NR columns: MR broadcasts of a (read in place) and
// two vector loads of the panel per k, 2 MR FMAs into 2 MR accumulators.
inline constexpr int MR = 12;
inline constexpr int NR = 32;
inline constexpr Index KC = 128;
inline constexpr Index NC = 128;
inline constexpr Index MC = 40 * MR;

/// Packs b(k0 .. k0+kc, j0 .. j0+nc) into dst[p][k][NR] (zero beyond nc).
VQKIT_K512_TARGET inline void pack_b(const Strided<float>& b, Index k0, Index kc, Index j0,
                                     Index nc, float* dst) {
  const Index panels = (nc + NR - 1) / NR;
  if (b.cs == 1) {  // rows of b are contiguous along n
    for (Index p = 0; p < panels; ++p) {
      const Index w = std::min<Index>(NR, nc - p * NR);
      const __mmask16 m0 = __mmask16(w >= 16 ? 0xffffu : (1u << w) - 1u);
      const __mmask16 m1 = __mmask16(w >= 32 ? 0xffffu : w > 16 ? (1u << (w - 16)) - 1u : 0u);
      const float* src = b.p + k0 * b.rs + j0 + p * NR;
      float* out = dst + p * kc * NR;
      for (Index k = 0; k < kc; ++k) {
        _mm512_store_ps(out + k * NR, _mm512_maskz_loadu_ps(m0, src + k * b.rs));
        _mm512_store_ps(out + k * NR + 16, _mm512_maskz_loadu_ps(m1, src + k * b.rs + 16));
      }
    }
  } else if (b.rs == 1) {  // columns of b are contiguous along k: transpose 16 x 16 tiles
    for (Index p = 0; p < panels; ++p) {
      float* out = dst + p * kc * NR;
      for (int g = 0; g < NR / 16; ++g) {
        const Index n0 = p * NR + g * 16;
        for (Index kb = 0; kb < kc; kb += 16) {
          const int kw = int(std::min<Index>(16, kc - kb));
          const __mmask16 km = __mmask16((1u << kw) - 1u);
          __m512 r[16];
          for (int i = 0; i < 16; ++i)
            r[i] = n0 + i < nc ? _mm512_maskz_loadu_ps(km, b.p + (j0 + n0 + i) * b.cs + k0 + kb)
                               : _mm512_setzero_ps();
          k512::transpose16(r);
          for (int j = 0; j < kw; ++j) _mm512_store_ps(out + (kb + j) * NR + g * 16, r[j]);
        }
      }
    }
  } else {
    for (Index p = 0; p < panels; ++p)
      for (Index k = 0; k < kc; ++k)
        for (Index j = 0; j < NR; ++j) {
          const Index n = p * NR + j;
          dst[(p * kc + k) * NR + j] = n < nc ? b.p[(k0 + k) * b.rs + (j0 + n) * b.cs] : 0.0f;
        }
  }
}

enum class Start { zero, load, bias };

/// One R x NR tile of c over kc values of k: acc = start; acc += a(r, k) *
/// panel(k, :) for k in order; stored with the column masks m0, m1.
template <int R>
VQKIT_K512_TARGET inline void tile(const float* a, Index ars, Index acs, const float* panel,
                                   Index kc, float* c, Index ldc, __mmask16 m0, __mmask16 m1,
                                   Start start, const float* bias) {
  __m512 acc[R][2];
  if (start == Start::load) {
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_maskz_loadu_ps(m0, c + r * ldc);
      acc[r][1] = _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
    }
  } else {
    const __m512 b0 = start == Start::bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 b1 =
        start == Start::bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) {
      acc[r][0] = b0;
      acc[r][1] = b1;
    }
  }
  if (acs == 1) {  // a row-major: row r's k-th value at a[r * ars + k]
    for (Index k = 0; k < kc; ++k) {
      const __m512 p0 = _mm512_load_ps(panel + k * NR), p1 = _mm512_load_ps(panel + k * NR + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(a[r * ars + k]);
        acc[r][0] = _mm512_fmadd_ps(av, p0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, p1, acc[r][1]);
      }
    }
  } else {  // a read transposed: the R values of one k are a[k * acs + r * ars]
    for (Index k = 0; k < kc; ++k) {
      const __m512 p0 = _mm512_load_ps(panel + k * NR), p1 = _mm512_load_ps(panel + k * NR + 16);
      const float* ak = a + k * acs;
      for (int r = 0; r < R; ++r) {
        const __m512 av = _mm512_set1_ps(ak[r * ars]);
        acc[r][0] = _mm512_fmadd_ps(av, p0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(av, p1, acc[r][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc[r][0]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc[r][1]);
  }
}

template <int R>
VQKIT_K512_TARGET inline void tile_rows(int rows, const float* a, Index ars, Index acs,
                                        const float* panel, Index kc, float* c, Index ldc,
                                        __mmask16 m0, __mmask16 m1, Start start,
                                        const float* bias) {
  if constexpr (R > 1) {
    if (rows < R) {
      tile_rows<R - 1>(rows, a, ars, acs, panel, kc, c, ldc, m0, m1, start, bias);
      return;
    }
  }
  tile<R>(a, ars, acs, panel, kc, c, ldc, m0, m1, start, bias);
}

/// c block (i0 .. i0+mc, j0 .. j0+nc) over all of k.
VQKIT_K512_TARGET inline void block(const Strided<float>& a, const Strided<float>& b, Index K,
                                    float* c, Index ldc, Index i0, Index mc, Index j0, Index nc,
                                    bool accumulate, const float* bias) {
  alignas(64) float packed[KC * NC];
  const Index panels = (nc + NR - 1) / NR;
  for (Index k0 = 0; k0 < K; k0 += KC) {
    const Index kc = std::min(KC, K - k0);
    pack_b(b, k0, kc, j0, nc, packed);
    const Start start = k0 > 0 || accumulate ? Start::load
                        : bias != nullptr    ? Start::bias
                                             : Start::zero;
    for (Index i = i0; i < i0 + mc; i += MR) {
      const int rows = int(std::min<Index>(MR, i0 + mc - i));
      const float* ai = a.p + i * a.rs + k0 * a.cs;
      for (Index p = 0; p < panels; ++p) {
        const Index w = std::min<Index>(NR, nc - p * NR);
        const __mmask16 m0 = __mmask16(w >= 16 ? 0xffffu : (1u << w) - 1u);
        const __mmask16 m1 = __mmask16(w >= 32 ? 0xffffu : w > 16 ? (1u << (w - 16)) - 1u : 0u);
        const Index j = j0 + p * NR;
        tile_rows<MR>(rows, ai, a.rs, a.cs, packed + p * kc * NR, kc, c + i * ldc + j, ldc, m0,
                      m1, start, bias != nullptr ? bias + j : nullptr);
      }
    }
  }
}

}  // namespace gemm512
VQKIT_K512_WARNINGS_ON
#endif  // VQKIT_K512

/// Rows of c per block of the generic path (a function of nothing but the
/// shape, so the bits do not depend on the thread count).
inline constexpr Index kGemmGenericRows = 256;

template <class T>
void gemm_generic(const cpu& be, Op opa, const ConstMatrixRef<T>& a, Op opb,
                  const ConstMatrixRef<T>& b, MatrixRef<T>& c, bool accumulate, const T* bias) {
  const Index M = c.rows(), N = c.cols(), K = opa == Op::none ? a.cols() : a.rows();
  const Index blocks = (M + kGemmGenericRows - 1) / kGemmGenericRows;
  const bool threaded = be.num_threads() > 1 && blocks > 1 && double(M) * N * K >= kGemmParallelWork;
  const auto run = [&](Index blk) {
    const Index r0 = blk * kGemmGenericRows, len = std::min(kGemmGenericRows, M - r0);
    auto out = c.middleRows(r0, len);
    const auto rhs = [&](auto&& lhs) {
      if (opb == Op::none) {
        if (accumulate) out.noalias() += lhs * b;
        else out.noalias() = lhs * b;
      } else {
        if (accumulate) out.noalias() += lhs * b.transpose();
        else out.noalias() = lhs * b.transpose();
      }
    };
    if (opa == Op::none) rhs(a.middleRows(r0, len));
    else rhs(a.middleCols(r0, len).transpose());
    if (!accumulate && bias != nullptr)
      out.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias, N);
  };
  if (threaded) {
    parallel_for_dynamic(be, blocks, 1, run);  // inside a team: Eigen runs serially
  } else {
    SerialEigen serial;
    for (Index blk = 0; blk < blocks; ++blk) run(blk);
  }
}

}  // namespace detail

/// c = op(a) * op(b) + (accumulate ? c : bias on every row, or 0). c must
/// already have the product's shape; bias, when given, holds c.cols()
/// values and is only used when !accumulate. a, b and c must not overlap.
/// Throws vqkit::error (naming the shapes) before any write when the shapes
/// do not match.
template <class T>
void gemm(const cpu& be, Op opa, ConstMatrixRef<T> a, Op opb, ConstMatrixRef<T> b,
          MatrixRef<T> c, bool accumulate, const T* bias = nullptr) {
  static_assert(std::is_floating_point_v<T>, "gemm<T>: T must be float or double");
  const Index M = opa == Op::none ? a.rows() : a.cols();
  const Index K = opa == Op::none ? a.cols() : a.rows();
  const Index Kb = opb == Op::none ? b.rows() : b.cols();
  const Index N = opb == Op::none ? b.cols() : b.rows();
  VQKIT_REQUIRE(K == Kb, "gemm", "op(a) is ", M, "x", K, " but op(b) is ", Kb, "x", N,
                ": inner dimensions differ");
  VQKIT_REQUIRE(c.rows() == M && c.cols() == N, "gemm", "c is ", c.rows(), "x", c.cols(),
                ", expected ", M, "x", N);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      if (bias != nullptr) c.rowwise() = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias, N);
      else c.setZero();
    }
    return;
  }
#if VQKIT_K512
  if constexpr (std::is_same_v<T, float>) {
    if (detail::cpu_has_avx512f()) {
      using namespace detail::gemm512;
      const detail::Strided<float> sa = detail::strided<float>(a, opa);
      const detail::Strided<float> sb = detail::strided<float>(b, opb);
      const Index tn = (N + NC - 1) / NC;
      Index mc = MC, tm = (M + MC - 1) / MC;
      const int threads = be.num_threads();
      const bool threaded = threads > 1 && double(M) * N * K >= detail::kGemmParallelWork;
      if (threaded && tm * tn < 4 * threads) {
        // Few tasks: smaller row blocks of about equal height (a multiple of
        // MR), so that the threads' shares even out (bits do not change).
        const Index want = std::min((M + MR - 1) / MR, (4 * threads + tn - 1) / tn);
        mc = ((M + want - 1) / want + MR - 1) / MR * MR;
        tm = (M + mc - 1) / mc;
      }
      float* cp = c.data();
      const Index ldc = c.outerStride();
      const auto run = [&](Index t) {
        const Index i0 = (t / tn) * mc, j0 = (t % tn) * NC;
        block(sa, sb, K, cp, ldc, i0, std::min(mc, M - i0), j0, std::min(NC, N - j0), accumulate,
              bias);
      };
      if (threaded && tm * tn > 1)
        parallel_for_dynamic(be, tm * tn, 1, run);
      else
        for (Index t = 0; t < tm * tn; ++t) run(t);
      return;
    }
  }
#endif
  detail::gemm_generic<T>(be, opa, a, opb, b, c, accumulate, bias);
}

}  // namespace vqkit
