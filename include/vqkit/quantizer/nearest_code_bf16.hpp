// vqkit/quantizer/nearest_code_bf16.hpp - the float search with bf16 dot
// products and an exact fp32 re-rank (SearchMode::precision =
// Precision::bf16_rerank; included by nearest_code.hpp).
//
//   codes: K x D, x: N x D, float. Result: the indices and distances of the
//   fp32 search (detail::nearest_code_avx512), bit for bit, ties to the
//   lowest index.
//
// Scores, maximised as in the fp32 kernel: L2 f_k = x.e_k - p_k with
// p_k = ||e_k||^2 / 2, cosine f_k = (x.e_k) p_k with p_k = 1/||e_k||.
//
// 1. Approximate pass: the fp32 kernel's blocking with bf16 operands. x is
//    packed 64 rows at a time into panels of dimension pairs (one 32-bit
//    lane = the bf16 values of dimensions 2m and 2m+1 of one row), the codes
//    are converted once per call to bf16 pairs (K x ceil(D/2) words, next to
//    the per-code parameters p_k); the micro-kernel keeps 64 rows x 6 codes
//    in 24 zmm accumulators and does per dimension pair 4 loads, 6
//    broadcasts and 24 vdpbf16ps (32 multiply-adds each, against 16 for an
//    fp32 FMA). Its epilogue forms the approximate scores a_k (in fp32, from
//    the same p_k), keeps each row's running maximum m and appends every
//    code with a_k >= m - T (T: the row's bound, below) to the row's
//    candidate list.
// 2. Exact pass: every candidate with a_k >= m_final - T is scored again in
//    fp32 with the fp32 kernel's own arithmetic: one FMA chain
//    acc = fma(x_d, e_d, acc) over d = 0..D-1 from 0 (16 candidates per
//    vector, codes and rows transposed 16 x 16), then acc - p_k or acc * p_k.
//    The winner is the largest exact score, ties to the lowest index, and
//    the distance is formed as the fp32 kernel forms it (from the same
//    fp32 ||x||^2, an FMA chain over d in order, computed while packing).
//
// The bound. Write u = 2^-24 (fp32), u_b = 2^-8 (bf16, round to nearest
// even: |bf16(v) - v| <= u_b |v|), g_D = D u / (1 - D u), S_k = sum_d
// |x_d e_kd| <= ||x|| ||e_k||. The bf16 dot product is the exact fp32
// product of the two rounded operands (8-bit significands), accumulated in
// fp32 along one chain of at most D additions:
//   |dot_bf16 - x.e| <= ((1 + u_b)^2 - 1) S + g_D (1 + u_b)^2 S,
// and the fp32 kernel's FMA chain has |dot_fp32 - x.e| <= g_D S, so
//   |dot_bf16 - dot_fp32| <= eps S,  eps = 2 u_b + u_b^2 + g_D ((1 + u_b)^2 + 1).
// The score adds one rounding in each (|dot - p| <= (1 + eps) S + p), and
// the threshold m - T one more, so with
//   E = (eps + 4u (1 + eps)) ||x|| C + 4u P + A
//     (L2: C = max_k ||e_k||, P = max_k p_k; cosine: C = max_k ||e_k|| p_k, P = 0)
// every code has |a_k - f_k| <= E, and the fp32 winner w (f_w >= f_j for all j)
// satisfies a_w >= f_w - E >= f_j - E >= a_j - 2E: with T = 2E the candidate
// set always holds w. A = D 2^-124 (||x|| + C_e + 1) (C_e = max ||e_k||)
// covers the flushes to zero of the bf16 instructions (denormal operands,
// products and sums) and the underflow of the fp32 chain; the search's range
// scaling (nearest_code.hpp) keeps the entries of a searched problem near 1,
// where A is negligible. ||x|| comes from the fp32 ||x||^2 (inflated by
// 1 + 2 g_D, plus D 2^-126 for underflowed squares), C and P from a double
// pass over the codes; T is 1.01 x 2E, rounded up. For D = 1024: eps ~ 0.0080,
// T ~ 0.016 ||x|| max||e||, i.e. a few candidates per row on Gaussian data.
// The bound is used only where eps is small: D <= 65536 (else fp32 runs).
//
// Where it runs: float, built with AVX-512 (this header compiles the kernel
// with a target attribute, so -mavx512f suffices) and run on a CPU with
// AVX512-BF16 (bf16_search_supported(), a run-time check). Where the fp32
// kernel would not serve the call (K >= 2^31, a code norm near float's
// range) the fp32 search runs; a row block holding a row whose squared norm
// is >= 1e37 is searched by the generic path, as the fp32 kernel does.
// SearchMode::stats reports which arithmetic ran and how many (row, code)
// pairs were re-ranked. Results do not depend on the thread count.
#pragma once

#include "vqkit/quantizer/nearest_code.hpp"

#if VQKIT_BF16_KERNEL

#include <immintrin.h>

#define VQKIT_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// GCC bug 105593 (core/simd.hpp): not a consumer's warning to see.
VQKIT_K512_WARNINGS_OFF

namespace vqkit::detail {
namespace kbf16 {

using k512::MR;
using k512::MV;
using k512::NC;
inline constexpr Index KC2 = 128;  // dimension pairs per chunk, at most (a 32 KiB panel chunk)

/// A code whose approximate score was within T of the row's running best.
struct Cand {
  float score;
  std::int32_t code;
};

/// A 64-byte aligned buffer of U that only grows.
template <class U>
struct Buf {
  std::unique_ptr<U[], decltype(&std::free)> p{nullptr, &std::free};
  Index size = 0;
  U* get(Index n) {
    if (n > size) {
      const std::size_t bytes = (std::size_t(n) * sizeof(U) + 63) / 64 * 64;
      p.reset(static_cast<U*>(std::aligned_alloc(64, bytes)));
      if (!p) throw std::bad_alloc();
      size = n;
    }
    return p.get();
  }
};

/// One thread's scratch (Scratch holds one per thread).
struct Workspace {
  Buf<std::uint32_t> packed;
  Buf<float> part;
  std::vector<float> xn2, runmax, tol, exact;
  std::vector<std::vector<Cand>> cand;
  std::vector<std::int32_t> pair_row, pair_code;
};

/// All the scratch of one search, kept by the caller between calls in its
/// SearchWorkspace (no thread_local state): the codes as bf16 pairs, the
/// kernel's norms and parameters, and one Workspace per thread.
struct Scratch {
  Buf<std::uint32_t> cbuf;
  Vector<float> knorms;
  k512::AlignedBuffer norm_scratch;
  std::vector<float> param;
  std::vector<std::int32_t> cidx;
  std::vector<double> n2;
  std::vector<Workspace> threads;
};

/// Everything a block search reads.
struct Problem {
  ConstMatrixRef<float>* codes;
  ConstMatrixRef<float>* x;
  const SearchOptions* opt;
  const Vector<float>* norms;
  std::int64_t* indices;
  float* distances;  // nullptr: not asked for
  const std::uint32_t* cb;  // bf16 pairs of the codes, K rows of ld2 words
  Index ld2;
  const float* param;
  const std::int32_t* cidx;
  Index N, K, Kp, D, D2;
  Index mc, kb, kc2, chunks;
  bool cosine;
  double c1, cnorm, pterm, aterm, gD;  // tol = 2.02 (c1 ||x|| cnorm + pterm + aterm (||x|| + ...))
};

/// 16 bf16 pairs (lo[l], hi[l]) as 32-bit lanes: lo in the low half.
VQKIT_BF16_TARGET inline __m512i bf16_pairs(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

/// Packs `rows` (<= MR) rows of x into dst[m * MR + r] = bf16 pair (x_r,2m,
/// x_r,2m+1), zero beyond `rows` and beyond D; xn2[r] = sum_d x_rd^2 exactly
/// as the fp32 kernel's pack_panel computes it (one FMA chain in d order).
VQKIT_BF16_TARGET inline void pack_panel(const float* x, Index ldx, Index rows, Index D,
                                         std::uint32_t* dst, float* xn2) {
  for (int g = 0; g < MV; ++g) {
    __m512 nrm = _mm512_setzero_ps();
    for (Index d0 = 0; d0 < D; d0 += 16) {
      const int w = int(std::min<Index>(16, D - d0));
      const __mmask16 m = __mmask16((1u << w) - 1u);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const Index row = g * 16 + i;
        r[i] = row < rows ? _mm512_maskz_loadu_ps(m, x + row * ldx + d0) : _mm512_setzero_ps();
      }
      k512::transpose16(r);
      for (int j = 0; j < w; ++j) nrm = _mm512_fmadd_ps(r[j], r[j], nrm);
      for (int p = 0; p < (w + 1) / 2; ++p)  // r[j] = 0 for j >= w
        _mm512_storeu_si512(dst + (d0 / 2 + p) * MR + g * 16, bf16_pairs(r[2 * p], r[2 * p + 1]));
    }
    _mm512_storeu_ps(xn2 + g * 16, nrm);
  }
}

/// One code row to bf16 pairs (zero-padded to ceil(D/2) words); returns
/// its squared norm in double.
VQKIT_BF16_TARGET inline double convert_code(const float* e, Index D, std::uint32_t* out) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  for (Index d0 = 0; d0 < D; d0 += 32) {
    const int w = int(std::min<Index>(32, D - d0));
    const int wl = std::min(w, 16), wh = w - wl;
    const __m512 lo = _mm512_maskz_loadu_ps(__mmask16((1u << wl) - 1u), e + d0);
    const __m512 hi =
        wh > 0 ? _mm512_maskz_loadu_ps(__mmask16((1u << wh) - 1u), e + d0 + 16) : _mm512_setzero_ps();
    const __m512i v = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // 32 bf16 in dimension order
    _mm512_mask_storeu_epi32(out + d0 / 2, __mmask16((1u << ((w + 1) / 2)) - 1u), v);
    for (__m512 h : {lo, hi}) {
      const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(h));
      const __m512d b = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(h), 1)));
      s0 = _mm512_fmadd_pd(a, a, s0);
      s1 = _mm512_fmadd_pd(b, b, s1);
    }
  }
  return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}

/// One 64-row x 6-code micro-tile over `len2` dimension pairs (see
/// k512::micro_tile for Load / Final and `part`). With Final: approximate
/// scores, running maxima `runmax` and candidates (a >= runmax - tol) of
/// the panel's rows below `valid`; codes k0..k0+5 (those >= K are padding).
template <bool Cosine, bool Load, bool Final>
VQKIT_BF16_TARGET inline void micro_tile(const std::uint32_t* a, const std::uint32_t* const c[NC],
                                         Index len2, float* part, const float* p, Index k0, Index K,
                                         float* runmax, const float* tol, std::vector<Cand>* cand,
                                         Index valid) {
  __m512 acc[MV][NC];
#pragma GCC unroll 8
  for (int v = 0; v < MV; ++v)
#pragma GCC unroll 16
    for (int j = 0; j < NC; ++j)
      acc[v][j] = Load ? _mm512_loadu_ps(part + (j * MV + v) * 16) : _mm512_setzero_ps();
  const std::uint32_t* cj[NC];
#pragma GCC unroll 16
  for (int j = 0; j < NC; ++j) cj[j] = c[j];
  for (Index dd = 0; dd < len2; ++dd) {
    const std::uint32_t* ad = a + dd * MR;
    __m512bh av[MV];
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) av[v] = (__m512bh)_mm512_loadu_si512(ad + 16 * v);
#pragma GCC unroll 16
    for (int j = 0; j < NC; ++j) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(int(cj[j][dd]));
#pragma GCC unroll 8
      for (int v = 0; v < MV; ++v) acc[v][j] = _mm512_dpbf16_ps(acc[v][j], av[v], b);
    }
  }
  if constexpr (!Final) {
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v)
#pragma GCC unroll 16
      for (int j = 0; j < NC; ++j) _mm512_storeu_ps(part + (j * MV + v) * 16, acc[v][j]);
  } else {
#pragma GCC unroll 8
    for (int v = 0; v < MV; ++v) {
      __m512 s[NC];
#pragma GCC unroll 16
      for (int j = 0; j < NC; ++j)
        s[j] = Cosine ? _mm512_mul_ps(acc[v][j], _mm512_set1_ps(p[j]))
                      : _mm512_sub_ps(acc[v][j], _mm512_set1_ps(p[j]));
      // (maskz_max: GCC 12's _mm512_max_ps trips -Wuninitialized, its bug 105593)
      const __mmask16 all = 0xFFFF;
      const __m512 mx = _mm512_maskz_max_ps(
          all, _mm512_maskz_max_ps(all, _mm512_maskz_max_ps(all, s[0], s[1]), _mm512_maskz_max_ps(all, s[2], s[3])),
          _mm512_maskz_max_ps(all, s[4], s[5]));
      const __m512 m = _mm512_maskz_max_ps(all, _mm512_loadu_ps(runmax + 16 * v), mx);
      _mm512_storeu_ps(runmax + 16 * v, m);
      const __m512 thr = _mm512_sub_ps(m, _mm512_loadu_ps(tol + 16 * v));
      __mmask16 mk[NC];
      __mmask16 any = 0;
#pragma GCC unroll 16
      for (int j = 0; j < NC; ++j) {
        mk[j] = _mm512_cmp_ps_mask(s[j], thr, _CMP_GE_OQ);
        any = __mmask16(any | mk[j]);
      }
      if (any) [[unlikely]] {
        alignas(64) float sc[16];
        for (int j = 0; j < NC && k0 + j < K; ++j) {
          if (!mk[j]) continue;
          _mm512_store_ps(sc, s[j]);
          for (unsigned bits = mk[j]; bits; bits &= bits - 1) {
            const int l = std::countr_zero(bits);
            const Index r = 16 * v + l;
            if (r >= valid) break;
            std::vector<Cand>& cr = cand[r];
            cr.push_back({sc[l], std::int32_t(k0 + j)});
            const std::size_t n = cr.size();
            if (n >= 64 && (n & (n - 1)) == 0) {  // prune at powers of two: amortised O(1)
              const float t = runmax[r] - tol[r];
              cr.erase(std::remove_if(cr.begin(), cr.end(), [t](const Cand& q) { return !(q.score >= t); }),
                       cr.end());
            }
          }
        }
      }
    }
  }
}

/// Exact fp32 dot products of n <= 16 (row, code) pairs, each one FMA chain
/// fma(x_d, e_d, acc) over d = 0..D-1 from 0: the fp32 kernel's arithmetic.
VQKIT_BF16_TARGET inline void exact_dots(const float* x, Index ldx, const float* codes, Index ldc,
                                         Index D, const std::int32_t* rows, const std::int32_t* cds,
                                         int n, float* out) {
  const float* xp[16];
  const float* ep[16];
  for (int l = 0; l < 16; ++l) {
    const int q = l < n ? l : 0;
    xp[l] = x + Index(rows[q]) * ldx;
    ep[l] = codes + Index(cds[q]) * ldc;
  }
  __m512 acc = _mm512_setzero_ps();
  for (Index d0 = 0; d0 < D; d0 += 16) {
    const int w = int(std::min<Index>(16, D - d0));
    const __mmask16 m = __mmask16((1u << w) - 1u);
    __m512 xr[16], er[16];
    for (int l = 0; l < 16; ++l) {
      xr[l] = _mm512_maskz_loadu_ps(m, xp[l] + d0);
      er[l] = _mm512_maskz_loadu_ps(m, ep[l] + d0);
    }
    k512::transpose16(xr);
    k512::transpose16(er);
    for (int j = 0; j < w; ++j) acc = _mm512_fmadd_ps(xr[j], er[j], acc);
  }
  alignas(64) float o[16];
  _mm512_store_ps(o, acc);
  for (int l = 0; l < n; ++l) out[l] = o[l];
}

/// Searches row block `blk`; returns the number of (row, code) pairs re-ranked.
template <bool Cosine>
VQKIT_BF16_TARGET Index search_block(const Problem& P, Workspace& ws, Index blk) {
  const Index i0 = blk * P.mc, ni = std::min(P.mc, P.N - i0), panels = (ni + MR - 1) / MR;
  const ConstMatrixRef<float>& x = *P.x;
  const Index ldx = x.outerStride();
  std::uint32_t* packed = ws.packed.get(P.mc * P.D2);
  float* part = ws.part.get(P.chunks > 1 ? P.mc * P.kb : 16);
  for (Index p = 0; p < panels; ++p)
    pack_panel(x.data() + (i0 + p * MR) * ldx, ldx, std::min<Index>(MR, ni - p * MR), P.D,
               packed + p * MR * P.D2, ws.xn2.data() + p * MR);
  bool huge = false;
  for (Index r = 0; r < ni; ++r) huge |= !(ws.xn2[std::size_t(r)] < k512::kHuge);
  if (huge) {  // as the fp32 kernel: the generic path for this block
    Vector<float> dist;
    IndexVector seg(ni);
    detail::nearest_code_gemm_tiles<float>(cpu{1}, *P.codes, x.middleRows(i0, ni), seg, &dist, *P.opt,
                                           P.norms);
    for (Index r = 0; r < ni; ++r) {
      P.indices[i0 + r] = seg[r];
      if (P.distances) P.distances[i0 + r] = dist[r];
    }
    return 0;
  }
  // The row bounds T (see the file comment), rounded up to float.
  for (Index r = 0; r < panels * MR; ++r) {
    float t = 0.f;
    if (r < ni) {
      const double xn = std::sqrt(double(ws.xn2[std::size_t(r)]) * (1.0 + 2.0 * P.gD) +
                                  double(P.D) * 0x1p-126);
      const double E = P.c1 * xn * P.cnorm + P.pterm + P.aterm * (xn + 1.0);
      t = std::nextafter(float(2.02 * E), std::numeric_limits<float>::infinity());
    }
    ws.tol[std::size_t(r)] = t;
    ws.runmax[std::size_t(r)] = -std::numeric_limits<float>::infinity();
    ws.cand[std::size_t(r)].clear();
  }
  const std::uint32_t* c[NC];
  for (Index kb0 = 0; kb0 < P.Kp; kb0 += P.kb) {
    const Index groups = std::min(P.kb, P.Kp - kb0) / NC;
    for (Index ch = 0; ch < P.chunks; ++ch) {
      const Index m0 = ch * P.kc2, len2 = std::min(P.kc2, P.D2 - m0);
      const bool first = ch == 0, last = ch + 1 == P.chunks;
      for (Index p = 0; p < panels; ++p) {
        const std::uint32_t* a = packed + p * MR * P.D2 + m0 * MR;
        float* rm = ws.runmax.data() + p * MR;
        const float* tl = ws.tol.data() + p * MR;
        std::vector<Cand>* cd = ws.cand.data() + p * MR;
        const Index valid = ni - p * MR;
        for (Index g = 0; g < groups; ++g) {
          const Index k0 = kb0 + g * NC;
          for (int j = 0; j < NC; ++j) c[j] = P.cb + Index(P.cidx[k0 + j]) * P.ld2 + m0;
          float* pt = part + (p * (P.kb / NC) + g) * (MR * NC);
          const float* pp = P.param + k0;
#define VQKIT_BF16_CALL(L, F) micro_tile<Cosine, L, F>(a, c, len2, pt, pp, k0, P.K, rm, tl, cd, valid)
          if (first && last) VQKIT_BF16_CALL(false, true);
          else if (first) VQKIT_BF16_CALL(false, false);
          else if (last) VQKIT_BF16_CALL(true, true);
          else VQKIT_BF16_CALL(true, false);
#undef VQKIT_BF16_CALL
        }
      }
    }
  }
  // The exact re-rank of the candidates within the final bound.
  ws.pair_row.clear();
  ws.pair_code.clear();
  for (Index r = 0; r < ni; ++r) {
    const float t = ws.runmax[std::size_t(r)] - ws.tol[std::size_t(r)];
    for (const Cand& q : ws.cand[std::size_t(r)])
      if (q.score >= t) {
        ws.pair_row.push_back(std::int32_t(r));
        ws.pair_code.push_back(q.code);
      }
  }
  const Index pairs = Index(ws.pair_row.size());
  ws.exact.resize(std::size_t(pairs));
  const ConstMatrixRef<float>& codes = *P.codes;
  for (Index q0 = 0; q0 < pairs; q0 += 16)
    exact_dots(x.data() + i0 * ldx, ldx, codes.data(), codes.outerStride(), P.D, ws.pair_row.data() + q0,
               ws.pair_code.data() + q0, int(std::min<Index>(16, pairs - q0)), ws.exact.data() + q0);
  Index q = 0;
  for (Index r = 0; r < ni; ++r) {
    float best = -std::numeric_limits<float>::infinity();
    std::int32_t arg = 0;
    for (; q < pairs && ws.pair_row[std::size_t(q)] == r; ++q) {
      const std::int32_t k = ws.pair_code[std::size_t(q)];
      const float dot = ws.exact[std::size_t(q)];
      const float f = Cosine ? dot * P.param[k] : dot - P.param[k];
      if (f > best || (f == best && k < arg)) {
        best = f;
        arg = k;
      }
    }
    P.indices[i0 + r] = arg;
    if (P.distances) {
      const float xn2 = ws.xn2[std::size_t(r)];
      if (Cosine) {
        const float xn = std::sqrt(xn2);
        P.distances[i0 + r] = xn > 0.f ? 1.f - best / xn : 1.f;
      } else {
        P.distances[i0 + r] = std::max(0.f, xn2 - 2.f * best);
      }
    }
  }
  return pairs;
}

}  // namespace kbf16

inline bool nearest_code_bf16(const cpu& be, ConstMatrixRef<float> codes, ConstMatrixRef<float> x,
                              Eigen::Ref<IndexVector> indices, Vector<float>* distances,
                              const SearchOptions& opt, const Vector<float>* norms,
                              Index* reranked, SearchWorkspace* sw) {
  using namespace kbf16;
  const Index K = codes.rows(), D = codes.cols(), N = x.rows();
  if (K >= Index(std::numeric_limits<std::int32_t>::max()) || D > 65536) return false;
  const bool cosine = opt.metric == Metric::cosine;
  // The caller's scratch (a quantizer keeps one), else this call's own.
  std::shared_ptr<Scratch> local;
  if (sw && !sw->bf16.p) sw->bf16.p = std::make_shared<Scratch>();
  if (!sw) local = std::make_shared<Scratch>();
  Scratch& sc = sw ? *sw->bf16.p : *local;
  // The kernel's own norms, not the caller's: see kernel_norms.
  Vector<float>& knorms = sc.knorms;
  k512::kernel_norms(codes, cosine, knorms, &sc.norm_scratch);
  std::vector<float>& param = sc.param;
  std::vector<std::int32_t>& cidx = sc.cidx;
  if (!k512::kernel_params(codes, knorms, cosine, param, cidx)) return false;
  const Index Kp = Index(param.size()), D2 = (D + 1) / 2;

  // The codes as bf16 pairs, and their squared norms in double (for the bound).
  std::uint32_t* cb = sc.cbuf.get(K * D2);
  std::vector<double>& n2 = sc.n2;
  n2.resize(static_cast<std::size_t>(K));
  {
    const float* cbase = codes.data();
    const Index ldc = codes.outerStride();
    // (No parallel region when it would run on one thread: libgomp
    // allocates a team for each serial region, test_no_alloc sees it.)
    if (be.num_threads() > 1 && K * D >= (Index(1) << 16)) {
#pragma omp parallel for schedule(static) num_threads(be.num_threads())
      for (Index k = 0; k < K; ++k) n2[std::size_t(k)] = convert_code(cbase + k * ldc, D, cb + k * D2);
    } else {
      for (Index k = 0; k < K; ++k) n2[std::size_t(k)] = convert_code(cbase + k * ldc, D, cb + k * D2);
    }
  }
  double cmax2 = 0, pmax = 0, qmax = 0;
  for (Index k = 0; k < K; ++k) {
    cmax2 = std::max(cmax2, n2[std::size_t(k)]);
    pmax = std::max(pmax, double(param[std::size_t(k)]));
    qmax = std::max(qmax, std::sqrt(n2[std::size_t(k)]) * double(param[std::size_t(k)]));
  }
  constexpr double u = 0x1p-24, ub = 0x1p-8;
  const double gD = double(D) * u / (1.0 - double(D) * u);
  const double eps = 2 * ub + ub * ub + gD * ((1 + ub) * (1 + ub) + 1);
  const double cmax = std::sqrt(cmax2) * (1 + 1e-12);

  Problem P{};
  P.codes = &codes;
  P.x = &x;
  P.opt = &opt;
  P.norms = norms;
  P.indices = indices.data();
  if (distances) distances->resize(N);
  P.distances = distances ? distances->data() : nullptr;
  P.cb = cb;
  P.ld2 = D2;
  P.param = param.data();
  P.cidx = cidx.data();
  P.N = N;
  P.K = K;
  P.Kp = Kp;
  P.D = D;
  P.D2 = D2;
  const k512::Blocking bk = k512::default_blocking(N, D, Kp, be.num_threads());
  P.mc = std::max<Index>(MR, (bk.mc + MR - 1) / MR * MR);
  P.kb = std::max<Index>(NC, bk.kb / NC * NC);
  P.chunks = (D2 + KC2 - 1) / KC2;
  P.kc2 = (D2 + P.chunks - 1) / P.chunks;
  P.cosine = cosine;
  P.gD = gD;
  P.c1 = eps + 4 * u * (1 + eps);
  P.cnorm = cosine ? qmax * (1 + 1e-12) : cmax;
  P.pterm = cosine ? 0.0 : 4 * u * pmax;
  P.aterm = double(D) * 0x1p-124;  // A = D 2^-124 (||x|| + max||e|| + 1)
  P.pterm += P.aterm * cmax;
  const Index blocks = (N + P.mc - 1) / P.mc;

  Index total = 0;
  const int nt = be.num_threads();
  if (sc.threads.size() < std::size_t(nt)) sc.threads.resize(std::size_t(nt));
  const std::size_t mc = std::size_t(P.mc);
  auto prepare = [&](Workspace& ws) {
    ws.xn2.resize(mc);
    ws.runmax.resize(mc);
    ws.tol.resize(mc);
    if (ws.cand.size() < mc) {
      // Room for the usual candidate counts up front, so that a steady
      // stream of batches stops allocating after its first call (a row
      // with more candidates than this still grows its list).
      const std::size_t had = ws.cand.size();
      ws.cand.resize(mc);
      for (std::size_t r = had; r < mc; ++r) ws.cand[r].reserve(64);
      ws.pair_row.reserve(16 * mc);
      ws.pair_code.reserve(16 * mc);
      ws.exact.reserve(16 * mc);
    }
  };
  if (nt == 1) {  // no parallel region (see the conversion above)
    Workspace& ws = sc.threads[0];
    prepare(ws);
    for (Index blk = 0; blk < blocks; ++blk)
      total += cosine ? search_block<true>(P, ws, blk) : search_block<false>(P, ws, blk);
  } else {
#pragma omp parallel num_threads(nt) reduction(+ : total)
    {
#ifdef _OPENMP
      Workspace& ws = sc.threads[std::size_t(omp_get_thread_num())];
#else
      Workspace& ws = sc.threads[0];
#endif
      prepare(ws);
#pragma omp for schedule(dynamic, 1)
      for (Index blk = 0; blk < blocks; ++blk)
        total += cosine ? search_block<true>(P, ws, blk) : search_block<false>(P, ws, blk);
    }
  }
  if (reranked) *reranked = total;
  return true;
}

}  // namespace vqkit::detail

VQKIT_K512_WARNINGS_ON
#undef VQKIT_BF16_TARGET

#endif  // VQKIT_BF16_KERNEL
