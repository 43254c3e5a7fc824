// vqkit/quantizer/nearest_code.hpp - nearest-code search (L2 and cosine).
//
//   codes: K x D, x: N x D (row-major, one vector per row)
//   L2:     a_i = argmin_k ||x_i - e_k||^2 = argmin_k (||e_k||^2 - 2 x_i.e_k)
//   cosine: a_i = argmax_k x_i.e_k / ||e_k||  (||x_i|| is the same for every k)
// Ties go to the lowest index. Distances, when asked for, are ||x_i - e_a||^2
// (clamped at 0) for L2 and 1 - cos(x_i, e_a) for cosine; a zero vector has
// cosine 0 with everything.
//
// The N x K distance matrix is never built, and x is not copied beyond one
// block of rows per thread. Two implementations, with the same guarantees:
//  - float, built with AVX-512 (e.g. -march=native on such a CPU): a fused
//    kernel (detail::nearest_code_avx512 below): each thread packs a block
//    of rows, a register-blocked micro-kernel computes 64 rows x 6 codes of
//    dot products at a time (one FMA chain per pair, over d in order) and
//    folds them straight into each row's running argmax; see "the AVX-512
//    kernel" below for the blocking. About 90% of the FMA peak on one core.
//  - otherwise (double, or no AVX-512): x is cut into blocks of row_block
//    rows, the codebook into blocks of code_block codes; each tile of dot
//    products is one Eigen GEMM into a per-thread buffer that stays in cache,
//    followed by a running argmin.
// Threads take row blocks, and each row's result is computed by one thread
// in an order that depends on neither the thread count nor (for the kernel)
// the blocking, so results are bit-identical for any number of threads.
//
// SearchMode{Precision::bf16_rerank} (float, AVX-512, AVX512-BF16 at run time): dot
// products with bf16 operands (twice the multiply-add rate), then an exact
// fp32 re-rank of every code whose approximate score lies within a proven
// error bound of the row's best: indices and distances equal the fp32
// search's bit for bit. See nearest_code_bf16.hpp for the bound; elsewhere
// the option falls back to the fp32 search (SearchStats says which ran).
//
// Range: the argmin is unchanged when x and the codes are scaled by the same
// power of two, and such a scaling is exact. When M = max(max|x|, max|e|) is
// inside the band 2^-40 <= M, 4 D M^2 <= 2^100 (about M <= 2^49 / sqrt(D))
// for float (2^-480 and 2^1000 for double), nothing is scaled: results are
// bit for bit those of the plain search. M comes from the finiteness scan
// the search does anyway (detail::max_abs), so this costs nothing. Outside
// it (a squared norm or a dot product could overflow, or squares underflow),
// detail::nearest_code_ranged searches copies scaled by powers of two, each
// put at the top of the band (4 D m^2 in (2^96, 2^100] for float: the most
// room above the underflow threshold for the smaller entries):
//  - cosine: every row and every code by its own power of two (the scores
//    x.e / ||e|| and distances do not change, bit for bit);
//  - L2: rows grouped by magnitude (classes of 2^32 in their largest entry);
//    a group drops the codes provably farther than another code from all of
//    its rows (||e_k|| > 2 max ||x_i|| + min ||e_j||) and is scaled by one
//    power of two (none if it is in range), so one outlier row or code does
//    not cost the others their precision. L2 distances are scaled back by
//    2^-2s (rounded once: inf above the type's range, 0 below its subnormals).
// A group whose entries themselves span more than ~2^100 (e.g. a code at
// 1e30 that some rows can reach among codes of 1) still loses the smaller
// ones' low bits, as any single float computation of those distances would.
// Performance: docs/performance.md.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/simd.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

enum class Metric { l2, cosine };

inline const char* to_string(Metric m) { return m == Metric::l2 ? "l2" : "cosine"; }

/// Arithmetic of the float search (a double search is always in double).
///  fp32:        the fp32 search.
///  bf16_rerank: bf16 dot products + exact fp32 re-rank of the candidates
///               within the proven bound: the same indices and distances as
///               fp32, bit for bit, faster at large D. Needs AVX-512 at build
///               time and AVX512-BF16 at run time (bf16_search_supported());
///               otherwise, and wherever the AVX-512 kernel does not apply,
///               the fp32 search runs instead, without an error.
enum class Precision { fp32, bf16_rerank };

inline const char* to_string(Precision p) { return p == Precision::fp32 ? "fp32" : "bf16_rerank"; }

/// What one search did (SearchMode::stats).
struct SearchStats {
  Precision precision = Precision::fp32;  ///< the arithmetic that ran (bf16_rerank only if it did)
  /// 0: searched as given; else the input was outside float's safe range and
  /// was searched scaled by powers of two (see "Range" above): the exponent
  /// a single scaling of the whole problem would use.
  int scale_exponent = 0;
  Index reranked = 0;      ///< bf16_rerank: (row, code) pairs re-ranked exactly in fp32
  Index max_reranked = 0;  ///< bf16_rerank on the GPU: the most re-ranked in one row (0 on the CPU)
  /// bf16_rerank on the GPU: rows with a code split searched in full after a
  /// candidate-list overflow (0 on the CPU, which has no such lists).
  Index fallback_rows = 0;
  /// The kernel that ran: "avx512" (the fp32 kernel), "avx512_bf16" (bf16 +
  /// re-rank) or "generic" (Eigen GEMM tiles: double, a CPU without
  /// AVX-512F, or inputs the kernel does not serve); on the GPU "cuda_fp32"
  /// or "cuda_bf16". With range scaling,
  /// the last of the scaled searches.
  const char* kernel = "generic";
};

struct SearchOptions {
  Metric metric = Metric::l2;
  Index row_block = 128;   ///< rows of x per tile (generic path; the AVX-512 kernel blocks itself)
  Index code_block = 512;  ///< codes per tile (generic path)

  /// The field list (core/config_fields.hpp).
  template <class Self, class F>
  static void visit_fields(Self& o, F&& f, const char* prefix = "") {
    detail::visit_field(f, {prefix, "metric"}, o.metric, FieldRange::unrestricted());
    detail::visit_field(f, {prefix, "row_block"}, o.row_block, FieldRange::at_least(1));
    detail::visit_field(f, {prefix, "code_block"}, o.code_block, FieldRange::at_least(1));
  }
};

/// Per-call choices of a search (a trailing argument of nearest_code; not
/// part of SearchOptions, which a quantizer's checkpoint stores field by
/// field).
struct SearchWorkspace;

struct SearchMode {
  Precision precision = Precision::fp32;  ///< float searches; see Precision
  SearchStats* stats = nullptr;           ///< if set, receives what the call did
  /// Scratch of the fp32 kernel, kept by the caller between calls (a
  /// quantizer holds one): with it a search of a shape seen before makes no
  /// heap allocation. nullptr: the call allocates its own. One workspace
  /// serves one call at a time.
  SearchWorkspace* workspace = nullptr;
};

/// The per-code quantity the search needs, cached per codebook version:
/// ||e_k||^2 for L2, 1/||e_k|| (0 for a zero code) for cosine.
template <class T>
Vector<T> code_norms(const cpu&, ConstMatrixRef<T> codes, Metric metric) {
  Vector<T> n = codes.rowwise().squaredNorm();
  if (metric == Metric::cosine)
    for (Index k = 0; k < n.size(); ++k) n[k] = n[k] > T(0) ? T(1) / std::sqrt(n[k]) : T(0);
  return n;
}

namespace detail {

/// Tests only: when set, bf16_search_supported() reports false (the
/// fallback path can be tested on a machine that has AVX512-BF16).
inline std::atomic<bool> bf16_disabled{false};

}  // namespace detail

#define VQKIT_BF16_KERNEL VQKIT_K512  // compiled with target attributes, used if the CPU has it

/// Whether the AVX-512 fp32 kernel serves float searches here: compiled on
/// x86-64 with GCC or clang (any flags) and the CPU has AVX-512F, checked
/// once at run time. When false, float searches take the generic path.
inline bool avx512_search_supported() { return detail::cpu_has_avx512f(); }

/// Whether Precision::bf16_rerank runs here: the fp32 kernel it reproduces
/// runs (avx512_search_supported()) and the CPU has AVX512-BF16 (checked at
/// run time).
/// When false, a bf16_rerank search runs the fp32 search.
inline bool bf16_search_supported() {
#if VQKIT_BF16_KERNEL
  static const bool cpu_has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return cpu_has && avx512_search_supported() &&
         !detail::bf16_disabled.load(std::memory_order_relaxed);
#else
  return false;
#endif
}

namespace detail {

/// The power-of-two exponent s by which a search over D dimensions whose
/// largest |entry| is m scales its inputs: 0 inside the safe band (see the
/// file comment), else the s that puts m 2^s at the top of the band, in
/// [2^(t-1), 2^t) with t = floor((hi - 2 - ceil(log2 D)) / 2): that leaves
/// the most room below it for the smaller entries of the problem.
template <class T>
int range_exponent(T m, Index D) {
  if (!(m > T(0)) || !std::isfinite(m)) return 0;
  constexpr int lo = std::is_same_v<T, float> ? -40 : -480;   // m >= 2^lo
  constexpr int hi = std::is_same_v<T, float> ? 100 : 1000;   // 4 D m^2 <= 2^hi
  int e = 0;
  (void)std::frexp(m, &e);  // m in [2^(e-1), 2^e)
  int log2d = 0;
  while ((Index(1) << log2d) < D && log2d < 62) ++log2d;  // ceil(log2 D)
  if (e - 1 >= lo && 2 + log2d + 2 * e <= hi) return 0;
  return (hi - 2 - log2d) / 2 - e;
}

}  // namespace detail

namespace detail {

/// The generic search: one Eigen GEMM per (row block x code block) tile into
/// a per-thread buffer, then a running argmin. Arguments already checked.
template <class T>
void nearest_code_gemm_tiles(const cpu& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                             Eigen::Ref<IndexVector> indices, Vector<T>* distances,
                             const SearchOptions& opt, const Vector<T>* norms) {
  const Index K = codes.rows(), N = x.rows();
  Vector<T> own_norms;
  if (norms == nullptr) {
    own_norms = code_norms<T>(be, codes, opt.metric);
    norms = &own_norms;
  }
  const T* nrm = norms->data();
  if (distances) distances->resize(N);
  const bool l2 = opt.metric == Metric::l2;
  const Index rb = std::min(opt.row_block, N), cb = std::min(opt.code_block, K);
  const Index row_blocks = (N + rb - 1) / rb;

#pragma omp parallel num_threads(be.num_threads())
  {
#ifdef _OPENMP
    omp_set_num_threads(1);  // this task's ICV only: keeps Eigen's GEMM below serial
#endif
    RowMatrix<T> tile(rb, cb);
    std::vector<T> best(rb);
    std::vector<Index> arg(rb);
#pragma omp for schedule(dynamic, 1)
    for (Index blk = 0; blk < row_blocks; ++blk) {
      const Index i0 = blk * rb, ni = std::min(rb, N - i0);
      std::fill(best.begin(), best.begin() + ni, std::numeric_limits<T>::infinity());
      std::fill(arg.begin(), arg.begin() + ni, Index(0));
      for (Index k0 = 0; k0 < K; k0 += cb) {
        const Index nk = std::min(cb, K - k0);
        auto t = tile.topLeftCorner(ni, nk);
        t.noalias() = x.middleRows(i0, ni) * codes.middleRows(k0, nk).transpose();
        for (Index i = 0; i < ni; ++i) {
          const T* row = &t(i, 0);
          T b = best[i];
          Index a = arg[i];
          if (l2) {
            for (Index j = 0; j < nk; ++j) {
              const T v = nrm[k0 + j] - T(2) * row[j];
              if (v < b) { b = v; a = k0 + j; }
            }
          } else {
            for (Index j = 0; j < nk; ++j) {
              const T v = -row[j] * nrm[k0 + j];
              if (v < b) { b = v; a = k0 + j; }
            }
          }
          best[i] = b;
          arg[i] = a;
        }
      }
      for (Index i = 0; i < ni; ++i) {
        indices[i0 + i] = arg[i];
        if (distances) {
          const T xn2 = x.row(i0 + i).squaredNorm();
          if (l2) {
            (*distances)[i0 + i] = std::max(T(0), xn2 + best[i]);
          } else {
            const T xn = std::sqrt(xn2);
            (*distances)[i0 + i] = xn > T(0) ? T(1) + best[i] / xn : T(1);
          }
        }
      }
    }
  }
}

// The fp32 kernel's scratch types: defined in every translation unit
// alike (also where the kernel is not compiled), so SearchWorkspace, a
// member of the quantizer layer, has one layout everywhere.
namespace k512 {

/// A 64-byte aligned float buffer that only grows.
struct AlignedBuffer {
  std::unique_ptr<float[], decltype(&std::free)> p{nullptr, &std::free};
  Index size = 0;
  // Scratch: a copy starts empty (it grows on first use), so a quantizer
  // that owns one can be copied.
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) {}
  AlignedBuffer& operator=(const AlignedBuffer&) {
    p.reset();
    size = 0;
    return *this;
  }
  AlignedBuffer(AlignedBuffer&&) noexcept = default;
  AlignedBuffer& operator=(AlignedBuffer&&) noexcept = default;
  float* get(Index n) {
    if (n > size) {
      const std::size_t bytes = std::size_t((n + 15) / 16 * 16) * sizeof(float);
      p.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      if (!p) throw std::bad_alloc();
      size = n;
    }
    return p.get();
  }
};

/// One thread's scratch (SearchWorkspace keeps one per thread).
struct Workspace {
  AlignedBuffer packed, part;
  std::vector<float> xn2, best;
  std::vector<std::int32_t> arg;
};

}  // namespace k512
}  // namespace detail

namespace detail::kbf16 {
struct Scratch;  // nearest_code_bf16.hpp
}  // namespace detail::kbf16

/// Scratch of the search kernels (see SearchMode::workspace): the fp32
/// kernel's code norms and parameters and one block of packed rows and
/// running results per thread; the bf16 kernel's scratch. Buffers only grow.
/// A copy starts with empty kernel scratch (scratch is never shared).
struct SearchWorkspace {
  struct Bf16Holder {
    std::shared_ptr<detail::kbf16::Scratch> p;
    Bf16Holder() = default;
    Bf16Holder(const Bf16Holder&) {}
    Bf16Holder& operator=(const Bf16Holder&) {
      p.reset();
      return *this;
    }
    Bf16Holder(Bf16Holder&&) noexcept = default;
    Bf16Holder& operator=(Bf16Holder&&) noexcept = default;
  } bf16;  ///< detail::kbf16::Scratch, made on first use
  Vector<float> norms;
  detail::k512::AlignedBuffer norm_scratch;
  std::vector<float> param;
  std::vector<std::int32_t> cidx;
  std::vector<detail::k512::Workspace> threads;
};

namespace detail {

#if VQKIT_K512
VQKIT_K512_WARNINGS_OFF
// ---- the AVX-512 kernel (float) ------------------------------------------------
//
// Scores, maximised with ties to the lowest index:
//   L2:     s_ik = x_i.e_k - ||e_k||^2 / 2   (= -(||e_k||^2 - 2 x_i.e_k) / 2, exactly)
//   cosine: s_ik = x_i.e_k * (1 / ||e_k||)
// Every dot product is one FMA chain over d = 0, 1, ..., D-1 starting from 0,
// whatever the blocking (partial sums are stored and reloaded exactly), and
// the argmax is exact, so results depend neither on the blocking nor on the
// thread count.
//
// Blocking (GotoBLAS-style, with the argmax fused into the micro-kernel):
//  - threads take blocks of MC rows of x; a block is packed, MR = 16 MV rows
//    at a time, into panels laid out [d][MR] (a cache line holds 16 rows of
//    one dimension); packing also yields each row's squared norm;
//  - the codebook is read in place, in code blocks of KB codes; D is cut into
//    chunks of at most KC dimensions, so a panel's chunk (MR x KC floats,
//    32 KiB) stays in L1 while the code block's chunks (from L2) stream past
//    it, NC codes at a time;
//  - the micro-kernel keeps an MR x NC tile of dot products in MV*NC zmm
//    registers: per dimension, MV vector loads, NC broadcasts, MV*NC FMAs.
//    After the last chunk it turns the tile into scores, reduces the NC codes
//    of each row pairwise (the lower index wins ties) and merges them into
//    the running best of the row. No N x K matrix, no scalar argmin.
namespace k512 {

inline constexpr int MV = 4;        // 16-row vectors per panel
inline constexpr int MR = 16 * MV;  // rows per panel
inline constexpr int NC = 6;        // codes per micro-tile
inline constexpr Index KC = 128;    // dimensions per chunk, at most
inline constexpr Index MC = 256;    // rows per block, at most
inline constexpr Index KB = 512;    // codes per code block, about

/// Squared norms at or above this go to the generic path: below it no dot
/// product, partial sum or score can overflow (|x.e| <= ||x|| ||e|| < 1e37).
inline constexpr float kHuge = 1e37f;

/// Packs `rows` (<= MR) rows of x (leading dimension ldx) into dst[d * MR + r],
/// zero beyond `rows`; xn2[r] = sum_d x_rd^2 (in d order, zero beyond `rows`).
/// With `shift` (D values) the rows packed are x_r - shift, each entry
/// rounded once, as a centred copy of x would hold them.
VQKIT_K512_TARGET inline void pack_panel(const float* x, Index ldx, Index rows, Index D, float* dst,
                                          float* xn2, const float* shift = nullptr) {
  for (int g = 0; g < MV; ++g) {
    __m512 nrm = _mm512_setzero_ps();
    for (Index d0 = 0; d0 < D; d0 += 16) {
      const int w = int(std::min<Index>(16, D - d0));
      const __mmask16 m = __mmask16((1u << w) - 1u);
      const __m512 s = shift ? _mm512_maskz_loadu_ps(m, shift + d0) : _mm512_setzero_ps();
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const Index row = g * 16 + i;
        r[i] = row < rows ? _mm512_maskz_loadu_ps(m, x + row * ldx + d0) : _mm512_setzero_ps();
        if (shift && row < rows) r[i] = _mm512_sub_ps(r[i], s);
      }
      transpose16(r);
      for (int j = 0; j < w; ++j) {
        _mm512_storeu_ps(dst + (d0 + j) * MR + g * 16, r[j]);
        nrm = _mm512_fmadd_ps(r[j], r[j], nrm);
      }
    }
    _mm512_storeu_ps(xn2 + g * 16, nrm);
  }
}

/// One MR x NC micro-tile over `len` dimensions: dot products of the panel
/// chunk `a` ([d][MR]) with the code row chunks c[0..NC). With Load the sums
/// start from `part` (MV*NC vectors), else from 0; without Final they are
/// stored back to `part`. With Final they become scores (per-code parameter
/// p: L2 ||e||^2 / 2, cosine 1 / ||e||) merged into best / arg (MR each).
/// idx[j] is code j's index (a ragged tail repeats the last code, which ties
/// with itself and so never wins).
template <bool Cosine, bool Load, bool Final>
VQKIT_K512_TARGET inline void micro_tile(const float* a, const float* const c[NC], Index len, float* part,
                       const float* p, const std::int32_t* idx, float* best, std::int32_t* arg) {
  __m512 acc[MV][NC];
#pragma GCC unroll 8
  for (int v = 0; v < MV; ++v)
#pragma GCC unroll 16
    for (int j = 0; j < NC; ++j)
      acc[v][j] = Load ? _mm512_loadu_ps(part + (j * MV + v) * 16) : _mm512_setzero_ps();
  const float* cj[NC];
#pragma GCC unroll 16
  for (int j = 0; j < NC; ++j) cj[j] = c[j];
  for (Index d = 0; d < len; ++d) {
    const float* ad = a + d * MR;
    __m512 av[MV];
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) av[v] = _mm512_loadu_ps(ad + 16 * v);
#pragma GCC unroll 16
    for (int j = 0; j < NC; ++j) {
      const __m512 b = _mm512_set1_ps(cj[j][d]);
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) acc[v][j] = _mm512_fmadd_ps(av[v], b, acc[v][j]);
    }
  }
  if constexpr (!Final) {
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v)
#pragma GCC unroll 16
      for (int j = 0; j < NC; ++j) _mm512_storeu_ps(part + (j * MV + v) * 16, acc[v][j]);
  } else {
    static_assert(NC == 6, "the epilogue below reduces exactly 6 codes");
    // Pairwise reduction of the 6 scores of each row, indices as offsets
    // 0..5 within the tile: the right-hand (higher-index) side wins only when
    // strictly greater. A padded tail code copies code K-1, which sits to its
    // left in the same tile, so it never wins and k0 + offset stays < K.
    const __m512i base = _mm512_set1_epi32(idx[0]);
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) {
      __m512 s0, s1, s2, s3, s4, s5;
      if constexpr (Cosine) {
        s0 = _mm512_mul_ps(acc[v][0], _mm512_set1_ps(p[0]));
        s1 = _mm512_mul_ps(acc[v][1], _mm512_set1_ps(p[1]));
        s2 = _mm512_mul_ps(acc[v][2], _mm512_set1_ps(p[2]));
        s3 = _mm512_mul_ps(acc[v][3], _mm512_set1_ps(p[3]));
        s4 = _mm512_mul_ps(acc[v][4], _mm512_set1_ps(p[4]));
        s5 = _mm512_mul_ps(acc[v][5], _mm512_set1_ps(p[5]));
      } else {
        s0 = _mm512_sub_ps(acc[v][0], _mm512_set1_ps(p[0]));
        s1 = _mm512_sub_ps(acc[v][1], _mm512_set1_ps(p[1]));
        s2 = _mm512_sub_ps(acc[v][2], _mm512_set1_ps(p[2]));
        s3 = _mm512_sub_ps(acc[v][3], _mm512_set1_ps(p[3]));
        s4 = _mm512_sub_ps(acc[v][4], _mm512_set1_ps(p[4]));
        s5 = _mm512_sub_ps(acc[v][5], _mm512_set1_ps(p[5]));
      }
      const __mmask16 m01 = _mm512_cmp_ps_mask(s1, s0, _CMP_GT_OQ);
      const __mmask16 m23 = _mm512_cmp_ps_mask(s3, s2, _CMP_GT_OQ);
      const __mmask16 m45 = _mm512_cmp_ps_mask(s5, s4, _CMP_GT_OQ);
      s0 = _mm512_mask_mov_ps(s0, m01, s1);
      s2 = _mm512_mask_mov_ps(s2, m23, s3);
      s4 = _mm512_mask_mov_ps(s4, m45, s5);
      __m512i i0 = _mm512_mask_blend_epi32(m01, _mm512_set1_epi32(0), _mm512_set1_epi32(1));
      const __m512i i2 = _mm512_mask_blend_epi32(m23, _mm512_set1_epi32(2), _mm512_set1_epi32(3));
      const __m512i i4 = _mm512_mask_blend_epi32(m45, _mm512_set1_epi32(4), _mm512_set1_epi32(5));
      const __mmask16 m02 = _mm512_cmp_ps_mask(s2, s0, _CMP_GT_OQ);
      s0 = _mm512_mask_mov_ps(s0, m02, s2);
      i0 = _mm512_mask_mov_epi32(i0, m02, i2);
      const __mmask16 m04 = _mm512_cmp_ps_mask(s4, s0, _CMP_GT_OQ);
      s0 = _mm512_mask_mov_ps(s0, m04, s4);
      i0 = _mm512_mask_mov_epi32(i0, m04, i4);
      const __m512 bv = _mm512_loadu_ps(best + 16 * v);
      const __mmask16 mb = _mm512_cmp_ps_mask(s0, bv, _CMP_GT_OQ);
      _mm512_mask_storeu_ps(best + 16 * v, mb, s0);
      _mm512_mask_storeu_epi32(arg + 16 * v, mb, _mm512_add_epi32(i0, base));
    }
  }
}

/// Blocking of one call. Any values give the same results (see above).
struct Blocking {
  Index mc = MC;  ///< rows per block, a multiple of MR
  Index kc = KC;  ///< dimensions per chunk
  Index kb = KB;  ///< codes per code block, a multiple of NC
};

/// The default blocking for N rows, D dimensions, Kp (padded) codes: chunks
/// of equal length <= KC; row blocks <= MC but no more than a fair share of
/// N per thread; code blocks of equal size about KB.
inline Blocking default_blocking(Index N, Index D, Index Kp, int threads) {
  Blocking b;
  const Index chunks = (D + KC - 1) / KC;
  b.kc = (D + chunks - 1) / chunks;
  // At least ~4 blocks per thread, so that dynamic scheduling can even out
  // a thread that is slowed down (e.g. by another process on its core).
  const Index share = (N + 4 * threads - 1) / (4 * threads);
  b.mc = std::max<Index>(MR, std::min(MC, (share + MR - 1) / MR * MR));
  const Index groups = Kp / NC, cblocks = (Kp + KB - 1) / KB;
  b.kb = (groups + cblocks - 1) / cblocks * NC;
  return b;
}



/// The kernels' own code norms (code_norms' quantity: ||e||^2 for L2,
/// 1/||e|| or 0 for cosine), each squared norm one FMA chain over d in
/// order, as pack_panel forms ||x||^2 and the micro-kernel x.e: the same
/// bits whatever the compiler flags (a caller's cached norms are computed
/// with its own flags, in Eigen's order), and a row equal to a code gets
/// distance 0 exactly.
VQKIT_K512_TARGET inline void kernel_norms(ConstMatrixRef<float> codes, bool cosine, Vector<float>& out,
                                            AlignedBuffer* scratch_buf = nullptr) {
  const Index K = codes.rows(), D = codes.cols();
  out.resize(K);
  AlignedBuffer own;
  float* scratch = (scratch_buf ? scratch_buf : &own)->get(MR * D);
  alignas(64) float n2[MR];
  for (Index k0 = 0; k0 < K; k0 += MR) {
    const Index rows = std::min<Index>(MR, K - k0);
    pack_panel(codes.data() + k0 * codes.outerStride(), codes.outerStride(), rows, D, scratch, n2);
    for (Index r = 0; r < rows; ++r)
      out[k0 + r] = !cosine ? n2[r] : n2[r] > 0.f ? 1.f / std::sqrt(n2[r]) : 0.f;
  }
}

/// The kernel's per-code score parameter (L2 ||e||^2 / 2, cosine 1/||e||)
/// and code index, padded to a multiple of NC with the last code; `norms`
/// from kernel_norms. False when a code's norm is outside the kernel's range
/// (the generic path serves it).
inline bool kernel_params(ConstMatrixRef<float> codes, const Vector<float>& norms, bool cosine,
                          std::vector<float>& param, std::vector<std::int32_t>& cidx) {
  const Index K = codes.rows(), Kp = (K + NC - 1) / NC * NC;
  param.resize(std::size_t(Kp));
  cidx.resize(std::size_t(Kp));
  for (Index k = 0; k < Kp; ++k) {
    const Index kk = std::min(k, K - 1);
    const float n = norms[kk];
    // ||e||^2 >= ~1e36: the generic path. For cosine, 1/||e|| = 0 marks a
    // zero code, or one whose squared norm overflowed (not zero: generic).
    if (cosine ? (n > 0.f && n < 1e-18f) || (n == 0.f && k < K && !codes.row(kk).isZero())
               : !(n < kHuge))
      return false;
    param[std::size_t(k)] = cosine ? n : 0.5f * n;
    cidx[std::size_t(k)] = std::int32_t(kk);
  }
  return true;
}

}  // namespace k512

/// The AVX-512 search (float). Returns false, having written nothing, when
/// it does not apply (K >= 2^31, or a code whose squared norm is >= ~1e36);
/// row blocks holding a row whose squared norm is >= 1e37 are searched by
/// the generic path. `blk_override` (tests) replaces the default blocking.
/// With `shift` (D values) it searches the rows x_i - shift (rounded once
/// per entry) without forming them: the same results, bit for bit, as the
/// search of a centred copy of x, without the copy (k-means++ seeding).
VQKIT_K512_TARGET inline bool nearest_code_avx512(const cpu& be, ConstMatrixRef<float> codes,
                                                  ConstMatrixRef<float> x,
                                Eigen::Ref<IndexVector> indices, Vector<float>* distances,
                                const SearchOptions& opt, const Vector<float>* norms,
                                const k512::Blocking* blk_override = nullptr,
                                SearchWorkspace* sws = nullptr, const float* shift = nullptr) {
  using namespace k512;
  const Index K = codes.rows(), D = codes.cols(), N = x.rows();
  if (K >= Index(std::numeric_limits<std::int32_t>::max())) return false;
  const bool cosine = opt.metric == Metric::cosine;
  SearchWorkspace own_ws;
  SearchWorkspace& ws_all = sws ? *sws : own_ws;
  // The kernel's own norms, not the caller's: see kernel_norms.
  kernel_norms(codes, cosine, ws_all.norms, &ws_all.norm_scratch);
  const Index Kp = (K + NC - 1) / NC * NC;
  std::vector<float>& param = ws_all.param;
  std::vector<std::int32_t>& cidx = ws_all.cidx;
  if (!kernel_params(codes, ws_all.norms, cosine, param, cidx)) return false;
  Blocking bk = blk_override ? *blk_override : default_blocking(N, D, Kp, be.num_threads());
  bk.mc = std::max<Index>(MR, (bk.mc + MR - 1) / MR * MR);
  bk.kc = std::clamp<Index>(bk.kc, 1, D);
  bk.kb = std::max<Index>(NC, bk.kb / NC * NC);
  const Index chunks = (D + bk.kc - 1) / bk.kc;
  const Index blocks = (N + bk.mc - 1) / bk.mc;
  const float* cbase = codes.data();
  const Index ldc = codes.outerStride(), ldx = x.outerStride();
  if (distances) distances->resize(N);

  const int nthreads = be.num_threads();
  if (ws_all.threads.size() < std::size_t(nthreads)) ws_all.threads.resize(std::size_t(nthreads));
  // One thread's buffers (they only grow: no allocation once they fit).
  const auto prepare = [&](Workspace& ws) {
    ws.packed.get(bk.mc * D);
    // Partial sums of every (panel, code group) tile of a code block.
    ws.part.get(chunks > 1 ? bk.mc * bk.kb : 16);
    ws.xn2.resize(bk.mc);
    ws.best.resize(bk.mc);
    ws.arg.resize(bk.mc);
  };
  // One block of bk.mc rows.
  const auto search_block = [&](Workspace& ws, Index blk) VQKIT_K512_TARGET {
    float* packed = ws.packed.p.get();
    float* part = ws.part.p.get();
    const Index i0 = blk * bk.mc, ni = std::min(bk.mc, N - i0), panels = (ni + MR - 1) / MR;
    for (Index p = 0; p < panels; ++p)
      pack_panel(x.data() + (i0 + p * MR) * ldx, ldx, std::min<Index>(MR, ni - p * MR), D,
                 packed + p * MR * D, ws.xn2.data() + p * MR, shift);
    bool huge = false;
    for (Index r = 0; r < ni; ++r) huge |= !(ws.xn2[r] < kHuge);
    if (huge) {  // rare: squared norms near float's range; the generic path skips NaN scores
      Vector<float> dist;
      auto seg = indices.segment(i0, ni);
      if (shift) {
        RowMatrix<float> xs = x.middleRows(i0, ni);
        xs.rowwise() -= Eigen::Map<const Eigen::Matrix<float, 1, Eigen::Dynamic>>(shift, D);
        detail::nearest_code_gemm_tiles<float>(cpu{1}, codes, xs, seg, &dist, opt, norms);
      } else {
        detail::nearest_code_gemm_tiles<float>(cpu{1}, codes, x.middleRows(i0, ni), seg, &dist,
                                               opt, norms);
      }
      if (distances) distances->segment(i0, ni) = dist;
      return;
    }
    std::fill(ws.best.begin(), ws.best.end(), -std::numeric_limits<float>::infinity());
    std::fill(ws.arg.begin(), ws.arg.end(), 0);
    const float* c[NC];
    for (Index kb0 = 0; kb0 < Kp; kb0 += bk.kb) {
      const Index groups = std::min(bk.kb, Kp - kb0) / NC;
      for (Index ch = 0; ch < chunks; ++ch) {
        const Index d0 = ch * bk.kc, len = std::min(bk.kc, D - d0);
        const bool first = ch == 0, last = ch + 1 == chunks;
        for (Index p = 0; p < panels; ++p) {
          const float* a = packed + p * MR * D + d0 * MR;
          float* bp = ws.best.data() + p * MR;
          std::int32_t* ap = ws.arg.data() + p * MR;
          for (Index g = 0; g < groups; ++g) {
            const Index k0 = kb0 + g * NC;
            for (int j = 0; j < NC; ++j) c[j] = cbase + Index(cidx[k0 + j]) * ldc + d0;
            float* pt = part + (p * (bk.kb / NC) + g) * (MR * NC);
            const float* pp = param.data() + k0;
            const std::int32_t* ip = cidx.data() + k0;
#define VQKIT_K512_CALL(L, F)                                          \
(cosine ? micro_tile<true, L, F>(a, c, len, pt, pp, ip, bp, ap)     \
        : micro_tile<false, L, F>(a, c, len, pt, pp, ip, bp, ap))
            if (first && last) VQKIT_K512_CALL(false, true);
            else if (first) VQKIT_K512_CALL(false, false);
            else if (last) VQKIT_K512_CALL(true, true);
            else VQKIT_K512_CALL(true, false);
#undef VQKIT_K512_CALL
          }
        }
      }
    }
    for (Index r = 0; r < ni; ++r) {
      indices[i0 + r] = ws.arg[r];
      if (distances) {
        if (cosine) {
          const float xn = std::sqrt(ws.xn2[r]);
          (*distances)[i0 + r] = xn > 0.f ? 1.f - ws.best[r] / xn : 1.f;
        } else {
          (*distances)[i0 + r] = std::max(0.f, ws.xn2[r] - 2.f * ws.best[r]);
        }
      }
    }
  };
  if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
    {
#ifdef _OPENMP
      Workspace& ws = ws_all.threads[std::size_t(omp_get_thread_num())];
#else
      Workspace& ws = ws_all.threads[0];
#endif
      prepare(ws);
#pragma omp for schedule(dynamic, 1)
      for (Index blk = 0; blk < blocks; ++blk) search_block(ws, blk);
    }
  } else {  // no OpenMP call at all (see parallel_for in core/backend.hpp)
    prepare(ws_all.threads[0]);
    for (Index blk = 0; blk < blocks; ++blk) search_block(ws_all.threads[0], blk);
  }
  return true;
}
VQKIT_K512_WARNINGS_ON
#endif  // VQKIT_K512


#if VQKIT_BF16_KERNEL
/// The bf16 search with exact re-rank (nearest_code_bf16.hpp). Returns false,
/// having written nothing, where it does not apply (the fp32 search runs).
inline bool nearest_code_bf16(const cpu& be, ConstMatrixRef<float> codes, ConstMatrixRef<float> x,
                              Eigen::Ref<IndexVector> indices, Vector<float>* distances,
                              const SearchOptions& opt, const Vector<float>* norms,
                              Index* reranked, SearchWorkspace* workspace);
#endif

/// The search without the argument checks and without range scaling
/// (callers that have checked both, e.g. k-means over data it validated
/// once): the AVX-512 kernel for float where it applies (bf16 with re-rank
/// if asked and available), else the generic path.
template <class T>
void nearest_code_unchecked(const cpu& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                            Eigen::Ref<IndexVector> indices, Vector<T>* distances,
                            const SearchOptions& opt, const Vector<T>* norms,
                            const SearchMode& mode = {}) {
  if (mode.stats) {
    mode.stats->precision = Precision::fp32;
    mode.stats->reranked = 0;
    mode.stats->max_reranked = 0;
    mode.stats->fallback_rows = 0;
    mode.stats->kernel = "generic";
  }
#if VQKIT_K512
  if constexpr (std::is_same_v<T, float>) {
    if (avx512_search_supported()) {
      if (mode.precision == Precision::bf16_rerank && bf16_search_supported()) {
        Index reranked = 0;
        if (nearest_code_bf16(be, codes, x, indices, distances, opt, norms, &reranked, mode.workspace)) {
          if (mode.stats) {
            mode.stats->precision = Precision::bf16_rerank;
            mode.stats->reranked = reranked;
            mode.stats->kernel = "avx512_bf16";
          }
          return;
        }
      }
      if (nearest_code_avx512(be, codes, x, indices, distances, opt, norms, nullptr, mode.workspace)) {
        if (mode.stats) mode.stats->kernel = "avx512";
        return;
      }
    }
  }
#endif
  nearest_code_gemm_tiles<T>(be, codes, x, indices, distances, opt, norms);
}

/// A backend's plain search (no checks, no range scaling): what
/// nearest_code_ranged calls on the scaled copies. One specialisation per
/// backend (the CUDA one is in cuda/search.cuh), so the range handling is
/// written once for all backends.
template <class Backend>
struct PlainSearch;

template <>
struct PlainSearch<cpu> {
  template <class T>
  static void run(const cpu& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                  Eigen::Ref<IndexVector> indices, Vector<T>* distances, const SearchOptions& opt,
                  const Vector<T>* norms, const SearchMode& mode) {
    nearest_code_unchecked<T>(be, codes, x, indices, distances, opt, norms, mode);
  }
};

/// The search with range scaling (see the file comment), arguments checked:
/// codes_max and x_max are max_abs(codes) and max_abs(x), both finite.
/// Host-side bookkeeping around the backend's PlainSearch.
template <class T, class Backend>
void nearest_code_ranged(const Backend& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                         Eigen::Ref<IndexVector> indices, Vector<T>* distances,
                         const SearchOptions& opt, const Vector<T>* norms, T codes_max, T x_max,
                         const SearchMode& mode = {}) {
  const Index K = codes.rows(), D = codes.cols(), N = x.rows();
  const int global = range_exponent<T>(std::max(codes_max, x_max), D);
  if (mode.stats) mode.stats->scale_exponent = global;
  if (global == 0) {
    PlainSearch<Backend>::template run<T>(be, codes, x, indices, distances, opt, norms, mode);
    if (mode.stats) mode.stats->scale_exponent = 0;
    return;
  }
  // Rare: entries out of T's safe range. The caller's norms are for the
  // unscaled codes: they are recomputed on the scaled copies.
  const auto row_max = [](const auto& r) {
    T m = T(0);
    for (Index j = 0; j < r.size(); ++j) m = std::max(m, T(std::abs(r[j])));
    return m;
  };
  const auto scaled = [](const auto& r, int e) { return r.unaryExpr([e](T v) { return std::ldexp(v, e); }); };
  if (distances) distances->resize(N);
  if (opt.metric == Metric::cosine) {
    // x_i.e_k / ||e_k|| is unchanged, bit for bit, when each row and each
    // code is scaled by its own power of two: every row and code goes to
    // the top of the band on its own.
    RowMatrix<T> xs(N, D), cs(K, D);
    for (Index i = 0; i < N; ++i) xs.row(i) = scaled(x.row(i), range_exponent<T>(row_max(x.row(i)), D));
    for (Index k = 0; k < K; ++k)
      cs.row(k) = scaled(codes.row(k), range_exponent<T>(row_max(codes.row(k)), D));
    PlainSearch<Backend>::template run<T>(be, cs, xs, indices, distances, opt, nullptr, mode);
    if (mode.stats) mode.stats->scale_exponent = global;
    return;
  }
  // L2: rows are grouped by magnitude (classes of 2^32 in their largest
  // entry); each group drops the codes that are provably farther than
  // another code from each of its rows (||e_k|| > 2 max_i ||x_i|| +
  // min_j ||e_j||: then ||x - e_k|| > ||x|| + ||e_j|| >= ||x - e_j||), and
  // is searched scaled by its own power of two (none if it is in range), so
  // an outlier row or code does not take the precision of the others.
  // Norms in long double (x86: 15-bit exponent), so nothing overflows.
  std::vector<long double> cn(static_cast<std::size_t>(K));
  std::vector<T> cm(static_cast<std::size_t>(K));
  long double min_cn = std::numeric_limits<long double>::infinity();
  for (Index k = 0; k < K; ++k) {
    long double s2 = 0;
    for (Index d = 0; d < D; ++d) s2 += static_cast<long double>(codes(k, d)) * codes(k, d);
    cn[std::size_t(k)] = std::sqrt(s2);
    cm[std::size_t(k)] = row_max(codes.row(k));
    min_cn = std::min(min_cn, cn[std::size_t(k)]);
  }
  std::vector<std::pair<int, Index>> order(static_cast<std::size_t>(N));  // (class, row)
  for (Index i = 0; i < N; ++i) {
    int e = std::numeric_limits<int>::min();
    const T m = row_max(x.row(i));
    if (m > T(0)) {
      (void)std::frexp(m, &e);
      e = e >= 0 ? e / 32 : -((-e + 31) / 32);
    }
    order[std::size_t(i)] = {e, i};
  }
  std::stable_sort(order.begin(), order.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  for (std::size_t g0 = 0; g0 < order.size();) {
    std::size_t g1 = g0;
    while (g1 < order.size() && order[g1].first == order[g0].first) ++g1;
    const Index n = Index(g1 - g0);
    long double rmax = 0;
    T xm = T(0);
    for (std::size_t q = g0; q < g1; ++q) {
      const auto r = x.row(order[q].second);
      long double s2 = 0;
      for (Index d = 0; d < D; ++d) s2 += static_cast<long double>(r[d]) * r[d];
      rmax = std::max(rmax, std::sqrt(s2));
      xm = std::max(xm, row_max(r));
    }
    const long double reach = (2 * rmax + min_cn) * (1 + 1e-9L);
    std::vector<Index> keep;
    T km = T(0);
    for (Index k = 0; k < K; ++k)
      if (cn[std::size_t(k)] <= reach) {
        keep.push_back(k);
        km = std::max(km, cm[std::size_t(k)]);
      }
    const int e = range_exponent<T>(std::max(xm, km), D);
    RowMatrix<T> xs(n, D), cs(Index(keep.size()), D);
    for (Index q = 0; q < n; ++q) xs.row(q) = scaled(x.row(order[g0 + std::size_t(q)].second), e);
    for (Index k = 0; k < cs.rows(); ++k) cs.row(k) = scaled(codes.row(keep[std::size_t(k)]), e);
    IndexVector idx(n);
    Vector<T> dist;
    PlainSearch<Backend>::template run<T>(be, cs, xs, idx, distances ? &dist : nullptr, opt, nullptr, mode);
    for (Index q = 0; q < n; ++q) {
      const Index i = order[g0 + std::size_t(q)].second;
      indices[i] = keep[std::size_t(idx[q])];
      if (distances) (*distances)[i] = std::ldexp(dist[q], -2 * e);
    }
    g0 = g1;
  }
  if (mode.stats) mode.stats->scale_exponent = global;
}

}  // namespace detail

/// Nearest code of every row of x. Writes indices (size N); writes distances
/// (size N) when it is non-null. `norms`, if given, must be
/// code_norms(codes, metric) for the current codes (saves one pass over the
/// codebook per call). `mode` picks the arithmetic (Precision) and where to
/// report what ran (SearchStats).
template <class T>
void nearest_code(const cpu& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                  Eigen::Ref<IndexVector> indices, Vector<T>* distances = nullptr,
                  const SearchOptions& opt = {}, const Vector<T>* norms = nullptr,
                  const SearchMode& mode = {}) {
  constexpr const char* where = "nearest_code";
  const Index K = codes.rows(), D = codes.cols(), N = x.rows();
  VQKIT_REQUIRE(K >= 1, where, "the codebook is empty (K=0)");
  VQKIT_REQUIRE(D >= 1, where, "the codebook has dimension D=0");
  detail::require_batch(x, D, where, "x");
  // One scan each: finiteness and the largest |entry| (for the range scaling).
  const T x_max = detail::max_abs(x, &be);
  if (!std::isfinite(x_max)) detail::require_finite(x, where, "x");
  const T codes_max = detail::max_abs(codes);
  if (!std::isfinite(codes_max)) detail::require_finite(codes, where, "codes");
  VQKIT_REQUIRE(indices.size() == N, where, "indices has size ", indices.size(), ", expected N=", N);
  VQKIT_REQUIRE(opt.row_block >= 1 && opt.code_block >= 1, where,
                "row_block and code_block must be >= 1, got ", opt.row_block, " and ",
                opt.code_block);
  VQKIT_REQUIRE(norms == nullptr || norms->size() == K, where, "norms has size ",
                norms ? norms->size() : 0, ", expected K=", K);

  detail::nearest_code_ranged<T>(be, codes, x, indices, distances, opt, norms, codes_max, x_max, mode);
}

template <class T>
struct SearchResult {
  IndexVector indices;
  Vector<T> distances;
};

/// Convenience form: allocates and returns indices and distances.
template <class T>
SearchResult<T> nearest_code(const cpu& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                             const SearchOptions& opt = {}, const SearchMode& mode = {}) {
  SearchResult<T> r;
  r.indices.resize(x.rows());
  nearest_code<T>(be, codes, x, r.indices, &r.distances, opt, nullptr, mode);
  return r;
}

}  // namespace vqkit

#include "vqkit/quantizer/nearest_code_bf16.hpp"  // bf16_search_supported, detail::nearest_code_bf16
