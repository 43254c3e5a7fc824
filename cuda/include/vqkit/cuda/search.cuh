// vqkit/cuda/search.cuh - nearest-code search on the GPU (L2 and cosine).
//
//   codes: K x D, x: N x D (row-major, contiguous on the device)
//   L2:     a_i = argmax_k s_ik,  s_ik = x_i.e_k - p_k,  p_k = ||e_k||^2 / 2
//   cosine: a_i = argmax_k s_ik,  s_ik = (x_i.e_k) * p_k,  p_k = 1 / ||e_k|| (0 for a zero code)
// Ties go to the lowest index. Distances, when asked for, are
// max(0, ||x_i||^2 - 2 s_ia) for L2 and 1 - s_ia / ||x_i|| (1 for a zero row)
// for cosine - the CPU backend's definitions (quantizer/nearest_code.hpp).
//
// Two paths, one result (SearchPrecision in cuda::precision):
//  - fp32: a fused tiled kernel on the CUDA cores. Each dot product x_i.e_k is
//    ONE fmaf chain over d = 0, 1, ..., D-1 starting from 0 - exactly the
//    CPU AVX-512 kernel's order - and scores are formed as on the CPU
//    (acc - p_k, acc * p_k), so given the same p_k the scores are bit-identical
//    to the CPU kernel's and so are the indices. The argmax is kept per row in
//    registers, merged across the threads of a row with shuffles and across
//    code splits with a 64-bit atomicMax on (orderable score, ~index); the
//    N x K matrix is never written.
//  - bf16_rerank: x and the codes are rounded to BF16 (x = xh + xl, e = eh + el,
//    xl and el exact in fp32), the tensor cores (WMMA, fp32 accumulation)
//    give approximate scores A_ik, and every code whose score could still be
//    the fp32 winner is re-ranked by the exact fp32 chain above:
//      |A_ik - S_ik| <= B_ik  with (L2; cosine multiplies the dot part by p_k)
//      B_ik = m [ |xh||el| + |xl||eh| + |xl||el|          (BF16 rounding, exact identity)
//                 + D 2^-21 |xh||eh|                       (tensor-core accumulation)
//                 + D 2^-23 |x||e|                         (the fp32 chain's own error)
//                 + 2^-22 (|x||e| + p_k) ]                 (rounding of the score)
//    where S is the fp32 path's score and m = 1.02 covers the rounding of the
//    bound itself (norms are computed in double and rounded up). If w is the
//    fp32 winner, A_iw + B_iw >= S_iw >= S_ij >= A_ij - B_ij for all j, so w
//    lies in C_i = {k : A_ik + B_ik >= max_j (A_ij - B_ij)} (tested in double).
//    The codes are split over the grid's y axis when N is small (bf16_split,
//    a function of N and K only). Each (row, split) keeps a running max of
//    A - B (a lower bound of the final one, so it collects a superset of
//    C_i) and appends its candidates, with their A + B rounded up, to its
//    own list of capacity kCandidates; at the end it stores its max of A - B
//    rounded down. The re-rank takes lb = the max over the splits and
//    visits only the candidates with A + B >= lb, then picks the best exact
//    score (lowest index on ties): the fp32 path's answer. A split whose
//    list overflowed (or that met a non-finite value) is searched in full
//    over its own codes by the exact chain. The tensor-core term assumes
//    accumulation with at most one truncation per addition (what published
//    measurements of NVIDIA tensor cores show, with a 2x margin), the one
//    assumption of the proof that is not IEEE arithmetic.
//
// Inputs must be finite (the host-level overload checks; the device-level
// call does not). The host-level call also scales inputs outside float's safe
// range by powers of two, as the CPU does (detail::nearest_code_ranged); the
// device-level call does not, and a row with no finite score gets index 0 and
// distance +inf on both paths. Results do not depend on the launch
// configuration, the number of code splits or the order in which blocks run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vqkit/cuda/backend.cuh"
#include "vqkit/quantizer/nearest_code.hpp"

namespace vqkit {
namespace gpu {


namespace detail {

inline constexpr int kCandidates = 32;  // per-row candidate list capacity (bf16 path)

/// Code splits of the bf16 path: a function of (N, K) only, so the workspace
/// size does not depend on the device. The grid has row_blocks x splits
/// blocks (~512: two or more waves on any current GPU); each split covers
/// per_split consecutive codes and keeps its own candidate lists.
struct Bf16Split {
  int splits;
  std::int64_t per_split;
};

// ---- keys: (orderable score << 32) | (0xffffffff - index); max = best, lowest index
// -0 and +0 compare equal in better(), so they must map to the same key:
// otherwise the cross-split atomicMax would prefer +0 at a higher index.
__device__ __forceinline__ unsigned orderable(float f) {
  const unsigned b = f == 0.f ? 0u : __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float from_orderable(unsigned o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}
__device__ __forceinline__ unsigned long long pack_key(float s, int k) {
  return (static_cast<unsigned long long>(orderable(s)) << 32) | (0xffffffffu - unsigned(k));
}
/// Does (s, k) beat (bs, bk)? Larger score, or equal score and lower index.
__device__ __forceinline__ bool better(float s, int k, float bs, int bk) {
  return s > bs || (s == bs && k < bk);
}

/// sum_d a[d] b[d] as ONE fmaf chain over d = 0, 1, ..., D-1 from 0 (the
/// CPU kernel's order, so bit-identical to it), with the loads of 16 terms
/// issued before their 16 FMAs: one memory latency per 16 terms instead of
/// one per term (the chain itself is unchanged).
__device__ __forceinline__ float fma_chain(const float* __restrict__ a, const float* __restrict__ b, int D) {
  float acc = 0.f;
  int d = 0;
  for (; d + 16 <= D; d += 16) {
    float u[16], v[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      u[j] = a[d + j];
      v[j] = b[d + j];
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) acc = fmaf(u[j], v[j], acc);
  }
  for (; d < D; ++d) acc = fmaf(a[d], b[d], acc);
  return acc;
}

/// p_k from ||e_k||^2 (one fmaf chain over d, like the CPU kernel's chains):
/// L2 ||e||^2 / 2, cosine 1/||e||. `norms`, when given, holds code_norms
/// (L2 ||e||^2, cosine 1/||e||), as the CPU backend's norms argument.
template <int Unused = 0>
__global__ void code_param_kernel(const float* __restrict__ e, int K, int D, bool cosine,
                                  const float* __restrict__ norms, float* __restrict__ p,
                                  float* __restrict__ norms_out) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= K) return;
  float n;
  if (norms) {
    n = norms[k];
  } else {
    const float* r = e + std::size_t(k) * D;
    const float s = fma_chain(r, r, D);
    n = cosine ? (s > 0.f ? 1.0f / sqrtf(s) : 0.f) : s;
  }
  if (norms_out) norms_out[k] = n;
  p[k] = cosine ? n : 0.5f * n;
}

/// Per row: ||x||^2 in float (for distances), one warp per row.
template <int Unused = 0>
__global__ void row_sqnorm_kernel(const float* __restrict__ x, int N, int D, float* __restrict__ xn2) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const float* r = x + std::size_t(row) * D;
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s = fmaf(r[d], r[d], s);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) xn2[row] = s;
}

// ---- the exact fp32 kernel ------------------------------------------------------
inline constexpr int kEBM = 64, kEBN = 64, kEBK = 16;

template <bool Cosine>
__global__ void __launch_bounds__(256)
    search_exact_kernel(const float* __restrict__ x, const float* __restrict__ e,
                        const float* __restrict__ p, int N, int K, int D, int codes_per_split,
                        unsigned long long* __restrict__ keys) {
  __shared__ float As[kEBK][kEBM + 4];
  __shared__ float Bs[kEBK][kEBN + 4];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int i0 = blockIdx.x * kEBM;
  const int kbeg = blockIdx.y * codes_per_split, kend = min(K, kbeg + codes_per_split);
  float best[4];
  int arg[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = -INFINITY;
    arg[i] = 0x7fffffff;
  }
  for (int k0 = kbeg; k0 < kend; k0 += kEBN) {
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int d0 = 0; d0 < D; d0 += kEBK) {
      // 64 x 16 of x and of the codes, transposed into [d][row]; zero padding
      // adds fmaf(a, 0, acc) = acc, so padded dimensions change nothing.
#pragma unroll
      for (int t = threadIdx.x; t < kEBM * kEBK; t += 256) {
        const int r = t / kEBK, c = t % kEBK, gd = d0 + c;
        const int gi = i0 + r, gk = k0 + r;
        As[c][r] = (gi < N && gd < D) ? x[std::size_t(gi) * D + gd] : 0.f;
        Bs[c][r] = (gk < kend && gd < D) ? e[std::size_t(gk) * D + gd] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int c = 0; c < kEBK; ++c) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[c][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[c][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
    // Codes visited in increasing order, strict '>' : the lowest index wins ties.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = k0 + tx + 16 * j;
      if (k < kend) {
        const float pk = p[k];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float s = Cosine ? acc[i][j] * pk : acc[i][j] - pk;
          if (s > best[i]) {
            best[i] = s;
            arg[i] = k;
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best[i], o);
      const int oa = __shfl_xor_sync(0xffffffffu, arg[i], o);
      if (better(ob, oa, best[i], arg[i])) {
        best[i] = ob;
        arg[i] = oa;
      }
    }
    const int row = i0 + ty + 16 * i;
    if (tx == 0 && row < N && arg[i] != 0x7fffffff) atomicMax(keys + row, pack_key(best[i], arg[i]));
  }
}

/// keys -> indices (and distances).
template <bool Cosine>
__global__ void finalize_kernel(const unsigned long long* __restrict__ keys,
                                const float* __restrict__ xn2, int N,
                                std::int64_t* __restrict__ idx, float* __restrict__ dist) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= N) return;
  const unsigned long long key = keys[r];
  if (key == 0) {  // no finite score (see "No winner" in the file comment): index 0, distance inf
    idx[r] = 0;
    if (dist) dist[r] = INFINITY;
    return;
  }
  idx[r] = std::int64_t(0xffffffffu - unsigned(key & 0xffffffffu));
  if (dist) {
    const float s = from_orderable(unsigned(key >> 32));
    if (Cosine) {
      const float xn = sqrtf(xn2[r]);
      dist[r] = xn > 0.f ? 1.f - s / xn : 1.f;
    } else {
      dist[r] = fmaxf(0.f, xn2[r] - 2.f * s);
    }
  }
}

// ---- the BF16 tensor-core path ---------------------------------------------------
inline constexpr int kBBM = 128, kBBN = 128, kBBK = 32;
inline constexpr int kBLD = kBBK + 8;   // smem row stride of the bf16 tiles (80 bytes)
inline constexpr int kCLD = kBBN + 4;   // smem row stride of the fp32 score tile
inline constexpr std::size_t kBf16Smem =
    std::size_t(kBBM) * kCLD * sizeof(float) + 2 * std::size_t(kBBM) * sizeof(float4) +
    std::size_t(kBBN) * sizeof(float4);

/// Rounds rows to BF16 into a zero-padded [rows_pad][Dp] buffer and records
/// per row (rounded up, from double sums): {|v|, |vh|, |vl|, ||v||^2 as float}.
template <int Unused = 0>
__global__ void split_bf16_kernel(const float* __restrict__ src, int rows, int D, int rows_pad,
                                  int Dp, __nv_bfloat16* __restrict__ dst, float4* __restrict__ stats) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows_pad) return;
  double sx = 0, sh = 0, sl = 0;
  for (int d = lane; d < Dp; d += 32) {
    const float v = (row < rows && d < D) ? src[std::size_t(row) * D + d] : 0.f;
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    const float hf = __bfloat162float(h), lo = v - hf;  // exact: hf is v rounded
    dst[std::size_t(row) * Dp + d] = h;
    sx += double(v) * v;
    sh += double(hf) * hf;
    sl += double(lo) * lo;
  }
  for (int o = 16; o > 0; o >>= 1) {
    sx += __shfl_xor_sync(0xffffffffu, sx, o);
    sh += __shfl_xor_sync(0xffffffffu, sh, o);
    sl += __shfl_xor_sync(0xffffffffu, sl, o);
  }
  if (lane == 0 && row < rows)
    stats[row] = make_float4(__double2float_ru(__dsqrt_ru(sx)), __double2float_ru(__dsqrt_ru(sh)),
                             __double2float_ru(__dsqrt_ru(sl)), float(sx));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

/// The bound B_ik (file comment) for row stats r and code stats c (w = p_k).
template <bool Cosine>
__device__ __forceinline__ float score_bound(float4 r, float4 c, float gtc, float g32) {
  const float nxe = r.x * c.x;
  const float dot_err = r.y * c.z + r.z * c.y + r.z * c.z + gtc * (r.y * c.y) + g32 * nxe;
  const float u2 = 2.384185791015625e-07f;  // 2^-22
  const float b = Cosine ? c.w * (dot_err + u2 * nxe) : dot_err + u2 * (nxe + c.w);
  return 1.02f * b + 1e-30f;
}

/// One block: 128 rows x a range of codes, 128 at a time. Scores of a tile
/// come from the tensor cores (8 warps, each 32 x 64 = 2 x 4 WMMA tiles,
/// two-stage cp.async pipeline over D), go through shared memory, and every
/// candidate (see the file comment) is appended to the list of its (row,
/// split) with its upper bound A + B (rounded up); at the end the split's
/// max of A - B (rounded down; -inf after a non-finite value) goes to
/// splitlb, so the re-rank can drop the candidates that another split
/// has ruled out.
template <bool Cosine>
__global__ void __launch_bounds__(256, 2)  // <= 128 registers: two blocks per SM (130 gave one: ncu, H200)
    search_bf16_kernel(const __nv_bfloat16* __restrict__ xb, const __nv_bfloat16* __restrict__ eb,
                       const float4* __restrict__ xstat, const float4* __restrict__ estat, int N,
                       int K, int D, int Dp, int codes_per_split, int* __restrict__ cnt,
                       int2* __restrict__ cand, float* __restrict__ splitlb) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* Cs = reinterpret_cast<float*>(smem_raw);  // [128][kCLD]; the bf16 stages alias it
  __nv_bfloat16* stage = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  float4* rs = reinterpret_cast<float4*>(smem_raw + std::size_t(kBBM) * kCLD * sizeof(float));
  float4* cs = rs + kBBM;
  constexpr int kStageElems = 2 * kBBM * kBLD;  // A and B of one stage

  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // warp tile: rows wm*32.., codes wn*64..
  const int i0 = blockIdx.x * kBBM;
  const int kbeg = blockIdx.y * codes_per_split;
  const int kend = min(K, kbeg + codes_per_split);
  const float gtc = float(Dp) * 4.76837158203125e-07f;  // D 2^-21
  const float g32 = float(D) * 1.1920928955078125e-07f;  // D 2^-23

  if (tid < kBBM) rs[tid] = (i0 + tid < N) ? xstat[i0 + tid] : make_float4(0, 0, 0, 0);
  // Epilogue mapping: two threads per row, interleaved codes.
  const int er = tid >> 1, eh = tid & 1, grow = i0 + er;
  double lrow = -INFINITY;  // running max over seen codes of A - B (both threads of a row)
  bool anybad = false;
  const std::size_t list = std::size_t(grow) * gridDim.y + blockIdx.y;  // this (row, split)

  const int chunks = Dp / kBBK;
  for (int k0 = kbeg; k0 < kend; k0 += kBBN) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    auto load_stage = [&](int st, int d0) {
      __nv_bfloat16* As = stage + st * kStageElems;
      __nv_bfloat16* Bs = As + kBBM * kBLD;
#pragma unroll
      for (int c = tid; c < kBBM * (kBBK / 8); c += 256) {
        const int r = c / (kBBK / 8), c8 = (c % (kBBK / 8)) * 8;
        cp_async16(As + r * kBLD + c8, xb + std::size_t(i0 + r) * Dp + d0 + c8);
        cp_async16(Bs + r * kBLD + c8, eb + std::size_t(k0 + r) * Dp + d0 + c8);
      }
      cp_async_commit();
    };
    load_stage(0, 0);
    for (int c = 0; c < chunks; ++c) {
      if (c + 1 < chunks) {
        load_stage((c + 1) & 1, (c + 1) * kBBK);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const __nv_bfloat16* As = stage + (c & 1) * kStageElems;
      const __nv_bfloat16* Bs = As + kBBM * kBLD;
#pragma unroll
      for (int kk = 0; kk < kBBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bfr[4];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], As + (wm * 32 + i * 16) * kBLD + kk, kBLD);
#pragma unroll
        for (int j = 0; j < 4; ++j) wmma::load_matrix_sync(bfr[j], Bs + (wn * 64 + j * 16) * kBLD + kk, kBLD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], af[i], bfr[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * kCLD + wn * 64 + j * 16, acc[i][j], kCLD,
                                wmma::mem_row_major);
    if (tid < kBBN) cs[tid] = (k0 + tid < kend) ? estat[k0 + tid] : make_float4(0, 0, 0, 0);
    __syncthreads();

    // (both threads of a pair share the row, so the shuffle below is convergent)
    const bool valid = grow < N;
    const float4 r = rs[er];
    const int ncode = min(kBBN, kend - k0);
    const float* crow = Cs + er * kCLD;
    // Pass 1: the tile's max of A - B for this row.
    double m = -INFINITY;
    bool bad = false;
    if (valid) {
      for (int c = eh; c < ncode; c += 2) {
        const float4 q = cs[c];
        const float a = Cosine ? crow[c] * q.w : crow[c] - q.w;
        const float b = score_bound<Cosine>(r, q, gtc, g32);
        bad |= !(isfinite(a) && isfinite(b));
        m = fmax(m, double(a) - double(b));
      }
    }
    m = fmax(m, __shfl_xor_sync(0xffffffffu, m, 1));
    if (valid) {
      lrow = fmax(lrow, m);
      // Pass 2: candidates.
      for (int c = eh; c < ncode; c += 2) {
        const float4 q = cs[c];
        const float a = Cosine ? crow[c] * q.w : crow[c] - q.w;
        const float b = score_bound<Cosine>(r, q, gtc, g32);
        const double ub = double(a) + double(b);
        if (ub >= lrow) {
          const int slot = atomicAdd(cnt + list, 1);
          if (slot < kCandidates)
            cand[list * kCandidates + slot] = make_int2(k0 + c, __float_as_int(__double2float_ru(ub)));
        }
      }
      if (bad) atomicAdd(cnt + list, kCandidates + 1);  // force the exact search of this split
    }
    anybad |= bad;
    __syncthreads();
  }
  anybad |= __shfl_xor_sync(0xffffffffu, int(anybad), 1) != 0;
  if (grow < N && eh == 0) splitlb[list] = anybad ? -INFINITY : __double2float_rd(lrow);
}

/// Exact fp32 re-rank, one warp per row, one lane per candidate, the CPU's
/// chain. lb = max over splits of splitlb (a lower bound of the winner's
/// exact score); a candidate with A + B < lb cannot win and is skipped; a
/// split whose list overflowed (or met a non-finite value) is searched in
/// full over its own codes. rstat (when non-null): exact dot products of the
/// row, and its number of overflowed splits.
template <bool Cosine>
__global__ void rerank_kernel(const float* __restrict__ x, const float* __restrict__ e,
                              const float* __restrict__ p, const float* __restrict__ xn2,
                              const int* __restrict__ cnt, const int2* __restrict__ cand,
                              const float* __restrict__ splitlb, int splits, int per_split, int N,
                              int K, int D, std::int64_t* __restrict__ idx, float* __restrict__ dist,
                              int2* __restrict__ rstat) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= N) return;
  const std::size_t base = std::size_t(row) * splits;
  float lb = -INFINITY;
  for (int t = lane; t < splits; t += 32) lb = fmaxf(lb, splitlb[base + t]);
  for (int o = 16; o > 0; o >>= 1) lb = fmaxf(lb, __shfl_xor_sync(0xffffffffu, lb, o));
  const float* xr = x + std::size_t(row) * D;
  float bs = -INFINITY;
  int bk = 0x7fffffff, exact = 0, overflowed = 0;
  auto visit = [&](int k) {
    const float* er = e + std::size_t(k) * D;
    const float acc = fma_chain(xr, er, D);
    const float s = Cosine ? acc * p[k] : acc - p[k];
    ++exact;
    if (better(s, k, bs, bk)) {
      bs = s;
      bk = k;
    }
  };
  for (int sp = 0; sp < splits; ++sp) {
    const int c = cnt[base + sp];
    if (c > kCandidates) {
      ++overflowed;
      const int kb = sp * per_split, ke = min(K, kb + per_split);
      for (int k = kb + lane; k < ke; k += 32) visit(k);
    } else {
      const int2* list = cand + (base + sp) * kCandidates;
      for (int t = lane; t < c; t += 32) {
        const int2 q = list[t];
        if (__int_as_float(q.y) >= lb) visit(q.x);
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, bs, o);
    const int ok = __shfl_xor_sync(0xffffffffu, bk, o);
    exact += __shfl_xor_sync(0xffffffffu, exact, o);
    if (better(ob, ok, bs, bk)) {
      bs = ob;
      bk = ok;
    }
  }
  if (lane == 0) {
    if (rstat) rstat[row] = make_int2(exact, overflowed);
    if (bk == 0x7fffffff) {  // no finite score: as the fp32 path
      idx[row] = 0;
      if (dist) dist[row] = INFINITY;
      return;
    }
    idx[row] = bk;
    if (dist) {
      if (Cosine) {
        const float xn = sqrtf(xn2[row]);
        dist[row] = xn > 0.f ? 1.f - bs / xn : 1.f;
      } else {
        dist[row] = fmaxf(0.f, xn2[row] - 2.f * bs);
      }
    }
  }
}

/// The pieces of the search workspace, in carving order.
struct SearchBuffers {
  float* p = nullptr;         // K
  float* norms = nullptr;     // K (computed norms, when none are given)
  float* xn2 = nullptr;       // N (distances)
  unsigned long long* keys = nullptr;  // N (fp32 path)
  float4* xstat = nullptr;    // N (bf16 path)
  float4* estat = nullptr;    // Kp (bf16 path)
  __nv_bfloat16* xb = nullptr;  // Np x Dp
  __nv_bfloat16* eb = nullptr;  // Kp x Dp
  int* cnt = nullptr;         // N x splits
  int2* cand = nullptr;       // N x splits x kCandidates: (code, upper bound)
  float* splitlb = nullptr;   // N x splits
  int2* rstat = nullptr;      // N: (exact dot products, overflowed splits)
};

inline std::int64_t round_up(std::int64_t v, std::int64_t m) { return (v + m - 1) / m * m; }

inline Bf16Split bf16_split(std::int64_t N, std::int64_t K) {
  const std::int64_t row_blocks = (N + kBBM - 1) / kBBM, code_tiles = (K + kBBN - 1) / kBBN;
  const std::int64_t want = std::clamp<std::int64_t>((512 + row_blocks - 1) / row_blocks, 1, code_tiles);
  const std::int64_t tiles_per_split = (code_tiles + want - 1) / want;
  return {int((code_tiles + tiles_per_split - 1) / tiles_per_split), tiles_per_split * kBBN};
}

inline SearchBuffers carve_search(Carver& cv, std::int64_t N, std::int64_t K, std::int64_t D,
                                  SearchPrecision prec) {
  SearchBuffers b;
  b.p = cv.take<float>(K);
  b.norms = cv.take<float>(K);
  b.xn2 = cv.take<float>(N);
  if (prec == SearchPrecision::fp32) {
    b.keys = cv.take<unsigned long long>(N);
  } else {
    const std::int64_t Np = round_up(N, kBBM), Kp = round_up(K, kBBN), Dp = round_up(D, kBBK);
    const std::size_t lists = std::size_t(N) * std::size_t(bf16_split(N, K).splits);
    b.xstat = cv.take<float4>(N);
    b.estat = cv.take<float4>(Kp);
    b.xb = cv.take<__nv_bfloat16>(std::size_t(Np * Dp));
    b.eb = cv.take<__nv_bfloat16>(std::size_t(Kp * Dp));
    b.cnt = cv.take<int>(lists);
    b.cand = cv.take<int2>(lists * kCandidates);
    b.splitlb = cv.take<float>(lists);
    b.rstat = cv.take<int2>(N);
  }
  return b;
}

template <int Unused = 0>
__global__ void estat_param_kernel(float4* __restrict__ estat, const float* __restrict__ p, int K) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k < K) estat[k].w = p[k];
}

}  // namespace detail

/// Bytes of workspace nearest_code() needs for these sizes and this precision.
inline std::size_t nearest_code_workspace_bytes(std::int64_t N, std::int64_t K, std::int64_t D,
                                                SearchPrecision prec) {
  Carver cv;
  detail::carve_search(cv, N, K, D, prec);
  return cv.used();
}

/// The device-level search: codes (K x D) and x (N x D) contiguous on the
/// device; writes indices (N) and, when non-null, distances (N). `norms`, if
/// given, holds code_norms for the current codes (L2: ||e||^2, cosine:
/// 1/||e||) and is used as given. Runs on be.stream with be.precision;
/// allocates nothing and does not synchronise (unless stats is non-null:
/// the bf16 path's re-rank counts then come back, N pairs of ints).
/// No range scaling here (the host-level call does it, as the CPU): a row
/// none of whose scores is finite (e.g. ||e_k||^2 overflows float for every
/// code) gets index 0 and distance +inf on both paths.
inline void nearest_code(const cuda& be, const float* codes, std::int64_t K, const float* x,
                         std::int64_t N, std::int64_t D, Metric metric, std::int64_t* indices,
                         float* distances, const float* norms, void* workspace,
                         std::size_t workspace_bytes, vqkit::SearchStats* stats = nullptr) {
  constexpr const char* where = "gpu::nearest_code";
  VQKIT_REQUIRE(K >= 1 && N >= 1 && D >= 1, where, "empty problem: N=", N, ", K=", K, ", D=", D);
  require_rows(where, "N", N);
  require_rows(where, "K", K);
  VQKIT_REQUIRE(D < (std::int64_t(1) << 22), where, "D=", D, " is out of range (D < 2^22)");
  const SearchPrecision prec = be.precision;
  VQKIT_REQUIRE(workspace_bytes >= nearest_code_workspace_bytes(N, K, D, prec), where,
                "workspace of ", workspace_bytes, " bytes, needs ",
                nearest_code_workspace_bytes(N, K, D, prec));
  Carver cv(workspace);
  const detail::SearchBuffers b = detail::carve_search(cv, N, K, D, prec);
  const cudaStream_t s = be.stream;
  const bool cosine = metric == Metric::cosine;
  const int n = int(N), k = int(K), d = int(D);

  detail::code_param_kernel<<<blocks(K, 256), 256, 0, s>>>(codes, k, d, cosine, norms, b.p, b.norms);
  check_launch("code_param_kernel");
  // ||x||^2 for the distances: one definition for both paths, so they agree bit for bit.
  if (distances) {
    detail::row_sqnorm_kernel<<<blocks(N, 8), 256, 0, s>>>(x, n, d, b.xn2);
    check_launch("row_sqnorm_kernel");
  }

  if (prec == SearchPrecision::fp32) {
    using namespace detail;
    const int sms = be.sm_count();
    check(cudaMemsetAsync(b.keys, 0, std::size_t(N) * sizeof(unsigned long long), s), "cudaMemsetAsync");
    const std::int64_t row_blocks = (N + kEBM - 1) / kEBM, code_tiles = (K + kEBN - 1) / kEBN;
    const std::int64_t splits = std::clamp<std::int64_t>((2 * sms + row_blocks - 1) / row_blocks, 1, code_tiles);
    const std::int64_t per_split = (code_tiles + splits - 1) / splits * kEBN;
    const dim3 grid(unsigned(row_blocks), unsigned((K + per_split - 1) / per_split));
    if (cosine)
      search_exact_kernel<true><<<grid, 256, 0, s>>>(x, codes, b.p, n, k, d, int(per_split), b.keys);
    else
      search_exact_kernel<false><<<grid, 256, 0, s>>>(x, codes, b.p, n, k, d, int(per_split), b.keys);
    check_launch("search_exact_kernel");
    if (cosine)
      finalize_kernel<true><<<blocks(N, 256), 256, 0, s>>>(b.keys, b.xn2, n, indices, distances);
    else
      finalize_kernel<false><<<blocks(N, 256), 256, 0, s>>>(b.keys, b.xn2, n, indices, distances);
    check_launch("finalize_kernel");
    if (stats) {
      *stats = vqkit::SearchStats{};
      stats->kernel = "cuda_fp32";
    }
    return;
  }

  using namespace detail;
  const std::int64_t Np = round_up(N, kBBM), Kp = round_up(K, kBBN), Dp = round_up(D, kBBK);
  const Bf16Split sp = bf16_split(N, K);
  split_bf16_kernel<<<blocks(Np, 8), 256, 0, s>>>(x, n, d, int(Np), int(Dp), b.xb, b.xstat);
  check_launch("split_bf16_kernel(x)");
  split_bf16_kernel<<<blocks(Kp, 8), 256, 0, s>>>(codes, k, d, int(Kp), int(Dp), b.eb, b.estat);
  check_launch("split_bf16_kernel(codes)");
  estat_param_kernel<<<blocks(K, 256), 256, 0, s>>>(b.estat, b.p, k);
  check_launch("estat_param_kernel");
  check(cudaMemsetAsync(b.cnt, 0, std::size_t(N) * std::size_t(sp.splits) * sizeof(int), s), "cudaMemsetAsync");
  const dim3 grid(unsigned(Np / kBBM), unsigned(sp.splits));
  if (cosine) {
    check(cudaFuncSetAttribute(search_bf16_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(kBf16Smem)), "cudaFuncSetAttribute");
    search_bf16_kernel<true><<<grid, 256, kBf16Smem, s>>>(b.xb, b.eb, b.xstat, b.estat, n, k, d, int(Dp),
                                                          int(sp.per_split), b.cnt, b.cand, b.splitlb);
  } else {
    check(cudaFuncSetAttribute(search_bf16_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               int(kBf16Smem)), "cudaFuncSetAttribute");
    search_bf16_kernel<false><<<grid, 256, kBf16Smem, s>>>(b.xb, b.eb, b.xstat, b.estat, n, k, d, int(Dp),
                                                           int(sp.per_split), b.cnt, b.cand, b.splitlb);
  }
  check_launch("search_bf16_kernel");
  if (cosine)
    rerank_kernel<true><<<blocks(N, 8), 256, 0, s>>>(x, codes, b.p, b.xn2, b.cnt, b.cand, b.splitlb, sp.splits,
                                                     int(sp.per_split), n, k, d, indices, distances, b.rstat);
  else
    rerank_kernel<false><<<blocks(N, 8), 256, 0, s>>>(x, codes, b.p, b.xn2, b.cnt, b.cand, b.splitlb, sp.splits,
                                                      int(sp.per_split), n, k, d, indices, distances, b.rstat);
  check_launch("rerank_kernel");
  if (stats) {
    std::vector<int2> r(static_cast<std::size_t>(N));
    download(r.data(), b.rstat, r.size(), s);
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    *stats = vqkit::SearchStats{};
    stats->precision = Precision::bf16_rerank;
    stats->kernel = "cuda_bf16";
    for (const int2& v : r) {
      stats->reranked += v.x;
      stats->max_reranked = std::max<Index>(stats->max_reranked, v.x);
      stats->fallback_rows += v.y > 0;
    }
  }
}

}  // namespace gpu

// ---- host level: the CPU backend's signatures ----------------------------------

/// code_norms on the GPU: L2 ||e||^2 (one fmaf chain per code), cosine 1/||e||.
template <class T>
Vector<T> code_norms(const cuda& be, ConstMatrixRef<T> codes, Metric metric) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  be.activate();
  const std::int64_t K = codes.rows(), D = codes.cols();
  auto& a = *be.arena;
  float* dc = static_cast<float*>(a.slot(0, std::size_t(K * D) * sizeof(float)));
  float* dp = static_cast<float*>(a.slot(4, std::size_t(2 * K) * sizeof(float)));
  gpu::check(cudaMemcpy2DAsync(dc, std::size_t(D) * sizeof(float), codes.data(),
                               std::size_t(codes.outerStride()) * sizeof(float),
                               std::size_t(D) * sizeof(float), std::size_t(K),
                               cudaMemcpyHostToDevice, be.stream),
             "upload codes");
  gpu::detail::code_param_kernel<<<gpu::blocks(K, 256), 256, 0, be.stream>>>(
      dc, int(K), int(D), metric == Metric::cosine, nullptr, dp, dp + K);
  gpu::check_launch("code_param_kernel");
  Vector<T> n(K);
  gpu::download(n.data(), dp + K, std::size_t(K), be.stream);
  be.sync();
  return n;
}

namespace detail {

/// The CUDA backend's plain search for nearest_code_ranged (the range
/// handling of quantizer/nearest_code.hpp, shared with the CPU): copies in
/// (any outer stride), gpu::nearest_code, copies out. bf16_rerank runs when
/// the backend's default or the call's mode asks for it (same results).
template <>
struct PlainSearch<cuda> {
  template <class T>
  static void run(const cuda& be_in, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                  Eigen::Ref<IndexVector> indices, Vector<T>* distances, const SearchOptions& opt,
                  const Vector<T>* norms, const SearchMode& mode) {
    static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
    cuda be = be_in;
    if (mode.precision == Precision::bf16_rerank) be.precision = Precision::bf16_rerank;
    be.activate();
    const Index K = codes.rows(), D = codes.cols(), N = x.rows();
    auto& a = *be.arena;
    const std::size_t fs = sizeof(float);
    float* dc = static_cast<float*>(a.slot(0, std::size_t(K * D) * fs));
    float* dx = static_cast<float*>(a.slot(1, std::size_t(N * D) * fs));
    auto* di = static_cast<std::int64_t*>(a.slot(2, std::size_t(N) * sizeof(std::int64_t)));
    float* dd = distances ? static_cast<float*>(a.slot(3, std::size_t(N) * fs)) : nullptr;
    float* dn = norms ? static_cast<float*>(a.slot(4, std::size_t(K) * fs)) : nullptr;
    const std::size_t wb = gpu::nearest_code_workspace_bytes(N, K, D, be.precision);
    void* ws = a.slot(5, wb);
    gpu::check(cudaMemcpy2DAsync(dc, std::size_t(D) * fs, codes.data(), std::size_t(codes.outerStride()) * fs,
                                 std::size_t(D) * fs, std::size_t(K), cudaMemcpyHostToDevice, be.stream),
               "upload codes");
    gpu::check(cudaMemcpy2DAsync(dx, std::size_t(D) * fs, x.data(), std::size_t(x.outerStride()) * fs,
                                 std::size_t(D) * fs, std::size_t(N), cudaMemcpyHostToDevice, be.stream),
               "upload x");
    if (norms) gpu::upload(dn, norms->data(), std::size_t(K), be.stream);
    gpu::nearest_code(be, dc, K, dx, N, D, opt.metric, di, dd, dn, ws, wb, mode.stats);
    if (distances) distances->resize(N);
    // indices may be a strided Ref: stage through a contiguous vector when it is.
    if (indices.innerStride() == 1) {
      gpu::download(indices.data(), di, std::size_t(N), be.stream);
    } else {
      IndexVector tmp(N);
      gpu::download(tmp.data(), di, std::size_t(N), be.stream);
      be.sync();
      indices = tmp;
    }
    if (distances) gpu::download(distances->data(), dd, std::size_t(N), be.stream);
    be.sync();
  }
};

}  // namespace detail

/// nearest_code with the CPU backend's signature, checks and range scaling
/// (inputs outside float's safe band are searched as power-of-two-scaled
/// copies, exactly as on the CPU: quantizer/nearest_code.hpp, "Range").
template <class T>
void nearest_code(const cuda& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                  Eigen::Ref<IndexVector> indices, Vector<T>* distances = nullptr,
                  const SearchOptions& opt = {}, const Vector<T>* norms = nullptr,
                  const SearchMode& mode = {}) {
  static_assert(std::is_same_v<T, float>, "the CUDA backend computes in float");
  constexpr const char* where = "nearest_code";
  const Index K = codes.rows(), D = codes.cols(), N = x.rows();
  VQKIT_REQUIRE(K >= 1, where, "the codebook is empty (K=0)");
  VQKIT_REQUIRE(D >= 1, where, "the codebook has dimension D=0");
  detail::require_batch(x, D, where, "x");
  const T x_max = detail::max_abs(x);
  if (!std::isfinite(x_max)) detail::require_finite(x, where, "x");
  const T codes_max = detail::max_abs(codes);
  if (!std::isfinite(codes_max)) detail::require_finite(codes, where, "codes");
  VQKIT_REQUIRE(indices.size() == N, where, "indices has size ", indices.size(), ", expected N=", N);
  VQKIT_REQUIRE(norms == nullptr || norms->size() == K, where, "norms has size ",
                norms ? norms->size() : 0, ", expected K=", K);
  if (N == 0) {
    if (distances) distances->resize(0);
    return;
  }
  be.activate();
  detail::nearest_code_ranged<T>(be, codes, x, indices, distances, opt, norms, codes_max, x_max, mode);
}

/// Convenience form: allocates and returns indices and distances.
template <class T>
SearchResult<T> nearest_code(const cuda& be, ConstMatrixRef<T> codes, ConstMatrixRef<T> x,
                             const SearchOptions& opt = {}) {
  SearchResult<T> r;
  r.indices.resize(x.rows());
  nearest_code<T>(be, codes, x, r.indices, &r.distances, opt);
  return r;
}

}  // namespace vqkit
