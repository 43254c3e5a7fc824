// tests/cuda/test_cuda_edges.cu - the CUDA backend at its edges: the shapes
// and values that broke it before it ever ran (issue 14, items 2-7).
//
// Exits 77 (ctest: skipped) when there is no CUDA device; 1 on any failure.
//  - sizes: K = 1, D = 1, N = 1; K >= 65536 (EMA, sums, codebook gradient,
//    code resets: K was a grid's y dimension, at most 65535); N >= 65536 in
//    gather_residual and a bank of capacity >= 65536 (same); N = kMaxRows
//    (2^31 - 1024) in the search and the counts when the device has the
//    memory (int launch arithmetic); N > kMaxRows rejected.
//  - values: a row with no finite score (a code's squared norm overflows)
//    gets index 0 and distance inf on both device paths, and the host-level
//    call (range scaling, as the CPU) gives the CPU's answer; extreme ranges
//    (1e-30 and 1e25 entries) equal the CPU's range-scaled search; -0 and +0
//    scores in different code splits tie to the lower index.
//  - paths: fp32 and bf16_rerank give bit-identical distances; at
//    (1024, 65536, 32) the bf16 candidate lists rarely overflow (each code
//    split used to start its own bound at -inf: every row overflowed).
//  - calling conventions: a non-default (non-blocking) stream, strided
//    (outer stride > D) host inputs: the same results as the defaults.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "cuda_ref.hpp"
#include "vqkit/cuda/vector_quantizer.cuh"

using namespace vqkit_test;
using vqkit::Metric;
using vqkit::SearchPrecision;
namespace gpu = vqkit::gpu;

namespace {

constexpr SearchPrecision kPaths[] = {SearchPrecision::fp32, SearchPrecision::bf16_rerank};

/// Host-level search on the GPU with precision p.
void gpu_search(const Mat& codes, const Mat& x, Metric m, SearchPrecision p, IndexVector& idx, Vec& dist,
                cudaStream_t stream = nullptr) {
  vqkit::cuda be;
  be.precision = p;
  be.stream = stream;
  vqkit::SearchOptions o;
  o.metric = m;
  idx.resize(x.rows());
  vqkit::nearest_code<float>(be, codes, x, idx, &dist, o);
}

/// Indices equal to the CPU's except near-ties (relative score gap <= 1e-5,
/// in long double); distances within 1e-5 (L2 relative, cosine absolute).
void expect_cpu(const char* name, const Mat& codes, const Mat& x, Metric m, SearchPrecision p) {
  IndexVector ci, gi;
  Vec cd, gd;
  cpu_search(codes, x, m, nullptr, ci, cd);
  gpu_search(codes, x, m, p, gi, gd);
  Index bad = 0, differ = 0;
  double worst = 0;
  for (Index i = 0; i < x.rows(); ++i) {
    if (gi[i] != ci[i]) {
      ++differ;
      if (gi[i] < 0 || gi[i] >= codes.rows()) {
        ++bad;
        continue;
      }
      // a near-tie: the two codes' exact (double) scores for this row
      auto score = [&](Index k) {
        long double dot = 0, ee = 0;
        for (Index d = 0; d < x.cols(); ++d) {
          dot += static_cast<long double>(x(i, d)) * codes(k, d);
          ee += static_cast<long double>(codes(k, d)) * codes(k, d);
        }
        return m == Metric::l2 ? ee - 2 * dot : -dot / std::sqrt(ee + 1e-300L);
      };
      const long double a = score(gi[i]), b = score(ci[i]);
      if (std::abs(a - b) > 1e-5L * std::max(std::abs(a), std::abs(b))) ++bad;
    }
    const double ref = double(cd[i]), got = double(gd[i]);
    // L2 relative; cosine distances lie in [0, 2]: absolute
    const double scale = m == Metric::l2 ? std::abs(ref) + 1e-30 : 1.0;
    const double err = std::isinf(ref) ? (std::isinf(got) ? 0.0 : 1.0) : std::abs(got - ref) / scale;
    if (!(err <= worst)) worst = err;
  }
  std::printf("  %-28s %-6s %-11s N=%ld K=%ld D=%ld: %ld differ from the CPU (%ld not near-ties), dist rel err %.2e\n",
              name, vqkit::to_string(m), vqkit::to_string(p), long(x.rows()), long(codes.rows()), long(codes.cols()),
              long(differ), long(bad), worst);
  VQ_CHECK(bad == 0, "%s: %ld rows differ from the CPU and are not near-ties", name, long(bad));
  VQ_CHECK(worst <= 1e-5, "%s: distance rel err %.3e", name, worst);
}

void test_tiny_shapes() {
  std::printf("search: K = 1, D = 1, N = 1\n");
  vqkit::Rng rng(31);
  const Index shapes[][3] = {{1, 1, 1}, {1, 5, 1}, {7, 1, 3}, {1, 1, 300}, {300, 2, 1}};
  for (const auto& s : shapes) {
    const Mat x = gaussian(s[0], s[2], rng), codes = gaussian(s[1], s[2], rng);
    for (Metric m : {Metric::l2, Metric::cosine})
      for (SearchPrecision p : kPaths) expect_cpu("tiny", codes, x, m, p);
  }
}

void test_ranges() {
  std::printf("search: extreme ranges and rows with no finite score\n");
  vqkit::Rng rng(32);
  // Codes whose squared norms overflow float (1e20 * 1e20 * 4 > 3.4e38):
  // the device-level call (no range scaling) finds no finite score.
  const Index N = 200, K = 50, D = 4;
  const Mat x = gaussian(N, D, rng);
  const Mat codes = gaussian(K, D, rng, 1e20);
  gpu::DeviceBuffer<float> dx(std::size_t(N * D)), dc(std::size_t(K * D)), dd{std::size_t(N)};
  gpu::DeviceBuffer<std::int64_t> di{std::size_t(N)};
  vqkit::cuda be;
  gpu::upload(dx.data(), x.data(), dx.size(), be.stream);
  gpu::upload(dc.data(), codes.data(), dc.size(), be.stream);
  Vec dist[2];
  for (int pi = 0; pi < 2; ++pi) {
    be.precision = kPaths[pi];
    const std::size_t wb = gpu::nearest_code_workspace_bytes(N, K, D, be.precision);
    gpu::DeviceBuffer<unsigned char> ws(wb);
    gpu::check(cudaMemset(di.data(), 0x7f, N * sizeof(std::int64_t)), "cudaMemset");  // poison
    gpu::nearest_code(be, dc.data(), K, dx.data(), N, D, Metric::l2, di.data(), dd.data(), nullptr, ws.data(), wb);
    IndexVector gi(N);
    dist[pi].resize(N);
    gpu::download(gi.data(), di.data(), std::size_t(N), be.stream);
    gpu::download(dist[pi].data(), dd.data(), std::size_t(N), be.stream);
    be.sync();
    Index wrong = 0;
    for (Index i = 0; i < N; ++i) wrong += gi[i] != 0 || !std::isinf(dist[pi][i]);
    std::printf("  no finite score, device level, %-11s: %ld of %ld rows not (index 0, distance inf)\n",
                vqkit::to_string(kPaths[pi]), long(wrong), long(N));
    VQ_CHECK(wrong == 0, "%s: %ld no-winner rows got an index other than 0 or a finite distance",
             vqkit::to_string(kPaths[pi]), long(wrong));
  }
  // The host level scales such inputs by powers of two, as the CPU does.
  for (Metric m : {Metric::l2, Metric::cosine})
    for (SearchPrecision p : kPaths) expect_cpu("huge codes (1e20)", codes, x, m, p);
  // Tiny rows (squares underflow) next to ordinary ones, and huge codes next to ordinary ones.
  Mat xm = gaussian(300, 16, rng), cm = gaussian(120, 16, rng);
  for (Index i = 0; i < 100; ++i) xm.row(i) *= 1e-30f;
  for (Index i = 100; i < 150; ++i) xm.row(i) *= 1e25f;
  for (Index k = 0; k < 20; ++k) cm.row(k) *= 1e-30f;
  for (Index k = 20; k < 30; ++k) cm.row(k) *= 1e25f;
  for (Metric m : {Metric::l2, Metric::cosine})
    for (SearchPrecision p : kPaths) expect_cpu("mixed 1e-30 / 1 / 1e25", cm, xm, m, p);
}

void test_signed_zero_ties() {
  std::printf("search: -0 and +0 scores in different code splits\n");
  // Cosine, D = 1, x = [1]; norms given: p_k = 1e-30 for codes 0 and 64,
  // 1 for the rest. Code 0 = [-1e-20] scores -1e-50 -> -0, code 64 =
  // [+1e-20] scores +0, every other code -1: the best score is 0, tied
  // between code 0 and code 64, which N = 1 puts in different splits of
  // the fp32 kernel (64 codes per tile). Ties go to the lower index: 0.
  const Index K = 128, D = 1, N = 1;
  Mat codes = Mat::Constant(K, D, -1.f);
  codes(0, 0) = -1e-20f;
  codes(64, 0) = 1e-20f;
  Vec norms = Vec::Ones(K);
  norms[0] = norms[64] = 1e-30f;
  const Mat x = Mat::Ones(N, D);
  vqkit::cuda be;
  gpu::DeviceBuffer<float> dx{1}, dc{std::size_t(K)}, dn{std::size_t(K)};
  gpu::DeviceBuffer<std::int64_t> di{1};
  gpu::upload(dx.data(), x.data(), 1, be.stream);
  gpu::upload(dc.data(), codes.data(), std::size_t(K), be.stream);
  gpu::upload(dn.data(), norms.data(), std::size_t(K), be.stream);
  for (SearchPrecision p : kPaths) {
    be.precision = p;
    const std::size_t wb = gpu::nearest_code_workspace_bytes(N, K, D, p);
    gpu::DeviceBuffer<unsigned char> ws(wb);
    std::int64_t got = -1;
    for (int rep = 0; rep < 20; ++rep) {  // block order varies between launches
      gpu::nearest_code(be, dc.data(), K, dx.data(), N, D, Metric::cosine, di.data(), nullptr, dn.data(), ws.data(),
                        wb);
      gpu::download(&got, di.data(), 1, be.stream);
      be.sync();
      if (got != 0) break;
    }
    std::printf("  %-11s: index %lld (expected 0)\n", vqkit::to_string(p), static_cast<long long>(got));
    VQ_CHECK(got == 0, "%s: -0 vs +0 tie went to index %lld", vqkit::to_string(p), static_cast<long long>(got));
  }
}

void test_path_distances_equal() {
  std::printf("search: fp32 and bf16_rerank distances bit-identical\n");
  vqkit::Rng rng(33);
  const Index shapes[][3] = {{777, 300, 64}, {1000, 1030, 37}, {513, 70, 300}};
  for (const auto& s : shapes) {
    const Mat x = gaussian(s[0], s[2], rng), codes = gaussian(s[1], s[2], rng);
    for (Metric m : {Metric::l2, Metric::cosine}) {
      IndexVector i32, i16;
      Vec d32, d16;
      gpu_search(codes, x, m, SearchPrecision::fp32, i32, d32);
      gpu_search(codes, x, m, SearchPrecision::bf16_rerank, i16, d16);
      Index di = 0, dd = 0;
      for (Index i = 0; i < x.rows(); ++i) {
        di += i32[i] != i16[i];
        dd += std::memcmp(&d32[i], &d16[i], sizeof(float)) != 0;
      }
      std::printf("  N=%ld K=%ld D=%ld %-6s: %ld indices, %ld distances differ between the paths\n", long(s[0]),
                  long(s[1]), long(s[2]), vqkit::to_string(m), long(di), long(dd));
      VQ_CHECK(di == 0 && dd == 0, "fp32 vs bf16: %ld indices, %ld distances differ", long(di), long(dd));
    }
  }
}

void test_bf16_many_codes() {
  std::printf("search: bf16 candidate lists at K = 65536\n");
  vqkit::Rng rng(34);
  const Index N = 1024, K = 65536, D = 32;
  const Mat x = gaussian(N, D, rng), codes = gaussian(K, D, rng);
  vqkit::cuda be;
  be.precision = SearchPrecision::bf16_rerank;
  gpu::DeviceBuffer<float> dx(std::size_t(N * D)), dc(std::size_t(K * D));
  gpu::DeviceBuffer<std::int64_t> di{std::size_t(N)};
  gpu::upload(dx.data(), x.data(), dx.size(), be.stream);
  gpu::upload(dc.data(), codes.data(), dc.size(), be.stream);
  const std::size_t wb = gpu::nearest_code_workspace_bytes(N, K, D, be.precision);
  gpu::DeviceBuffer<unsigned char> ws(wb);
  vqkit::SearchStats st;
  gpu::nearest_code(be, dc.data(), K, dx.data(), N, D, Metric::l2, di.data(), nullptr, nullptr, ws.data(), wb, &st);
  IndexVector gi(N);
  gpu::download(gi.data(), di.data(), std::size_t(N), be.stream);
  be.sync();
  IndexVector ci;
  Vec cd;
  gpu_search(codes, x, Metric::l2, SearchPrecision::fp32, ci, cd);
  Index diff = 0;
  for (Index i = 0; i < N; ++i) diff += gi[i] != ci[i];
  const double mean = double(st.reranked) / double(N);
  std::printf("  N=%ld K=%ld D=%ld, %d splits: exact dot products per row %.2f (max %ld), rows with a full split "
              "search %ld, differ from fp32 %ld (kernel %s)\n",
              long(N), long(K), long(D), gpu::detail::bf16_split(N, K).splits, mean, long(st.max_reranked),
              long(st.fallback_rows), long(diff), st.kernel);
  VQ_CHECK(diff == 0, "bf16 vs fp32 at K=65536: %ld rows differ", long(diff));
  VQ_CHECK(st.fallback_rows <= N / 100, "%ld of %ld rows overflowed a candidate list", long(st.fallback_rows),
           long(N));
  VQ_CHECK(mean >= 1.0 && mean <= 16.0, "mean exact dot products per row %.2f", mean);
  VQ_CHECK(st.precision == vqkit::Precision::bf16_rerank && std::string(st.kernel) == "cuda_bf16",
           "the stats name the path that ran");
}

void test_large_k_and_n() {
  std::printf("K and N >= 65536 (grid y limit)\n");
  vqkit::Rng rng(35);
  vqkit::cuda be;
  const Index K = 70001, N = 100003, D = 3;
  const Mat x = gaussian(N, D, rng);
  IndexVector idx(N);
  for (Index i = 0; i < N; ++i) idx[i] = Index(rng.below(std::uint64_t(K)));
  // counts and sums
  const auto c = cpu_cluster_stats(x, idx, K);
  const auto g = vqkit::cluster_stats<float>(be, x, idx, K);
  VQ_CHECK(g.counts == c.counts && g.sums == c.sums, "cluster_stats at K=%ld differ", long(K));
  // EMA
  Mat codes_c = gaussian(K, D, rng), codes_g = codes_c;
  vqkit::EmaState<float> sc, sg;
  vqkit::ema_reset<float>(sc, codes_c, Vec::Constant(K, 2.f));
  sg = sc;
  cpu_ema_update(sc, c, vqkit::EmaOptions{}, codes_c);
  vqkit::ema_update<float>(be, sg, g, vqkit::EmaOptions{}, codes_g);
  const double e = max_rel(codes_g, codes_c, 1e-3);
  std::printf("  EMA at K=%ld: codes rel err %.2e\n", long(K), e);
  VQ_CHECK(e <= 1e-5, "EMA at K=%ld: rel err %.3e", long(K), e);
  // codebook gradient
  vqkit::LossOptions lo;
  Mat gc = gaussian(K, D, rng), gg = gc;
  cpu_codebook_grad(x, idx, lo, gc);
  vqkit::vq_codebook_grad<float>(be, x, idx, lo, gg);
  VQ_CHECK(max_rel(gg, gc, 1e-3) <= 1e-6, "codebook grad at K=%ld: rel err %.3e", long(K), max_rel(gg, gc, 1e-3));
  // gather + residual with N > 65535 rows
  gpu::DeviceBuffer<float> dx(std::size_t(N * D)), dcodes(std::size_t(K * D)), dr(std::size_t(N * D));
  gpu::DeviceBuffer<std::int64_t> di{std::size_t(N)};
  gpu::upload(dx.data(), x.data(), dx.size(), be.stream);
  gpu::upload(dcodes.data(), codes_c.data(), dcodes.size(), be.stream);
  gpu::upload(di.data(), idx.data(), di.size(), be.stream);
  gpu::gather_residual(be, dx.data(), dcodes.data(), di.data(), N, D, nullptr, dr.data());
  Mat res(N, D);
  gpu::download(res.data(), dr.data(), dr.size(), be.stream);
  be.sync();
  Index wrong = 0;
  for (Index i = 0; i < N; ++i) wrong += !(res.row(i) == x.row(i) - codes_c.row(idx[i]));
  VQ_CHECK(wrong == 0, "gather_residual at N=%ld: %ld rows wrong", long(N), long(wrong));
  // code resets of more than 65535 codes
  {
    const Index n = K - 1;
    std::vector<int> ks(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) ks[std::size_t(j)] = int(j + 1);
    const Mat vals = gaussian(n, D, rng);
    Mat hc = codes_c;
    vqkit::EmaState<float> hs = sc;
    for (Index j = 0; j < n; ++j) vqkit::ema_reset_code<float>(hs, hc, j + 1, vals.row(j), 1.5f);
    gpu::DeviceBuffer<float> dn{std::size_t(K)}, dm(std::size_t(K * D)), dv(std::size_t(n * D));
    gpu::DeviceBuffer<int> dk{std::size_t(n)};
    gpu::upload(dcodes.data(), codes_c.data(), dcodes.size(), be.stream);
    gpu::upload(dn.data(), sc.cluster_size.data(), dn.size(), be.stream);
    gpu::upload(dm.data(), sc.embed_sum.data(), dm.size(), be.stream);
    gpu::upload(dv.data(), vals.data(), dv.size(), be.stream);
    gpu::upload(dk.data(), ks.data(), ks.size(), be.stream);
    gpu::ema_reset_codes(be, dk.data(), dv.data(), n, D, 1.5f, dcodes.data(), dn.data(), dm.data());
    Mat gcodes(K, D);
    vqkit::EmaState<float> gs = sc;
    gpu::download(gcodes.data(), dcodes.data(), dcodes.size(), be.stream);
    gpu::download(gs.cluster_size.data(), dn.data(), dn.size(), be.stream);
    gpu::download(gs.embed_sum.data(), dm.data(), dm.size(), be.stream);
    be.sync();
    VQ_CHECK(gcodes == hc && gs.cluster_size == hs.cluster_size && gs.embed_sum == hs.embed_sum,
             "resets of %ld codes differ", long(n));
  }
  // a device bank of capacity > 65535, filled by one push larger than it (the gather path)
  {
    const Index cap = 70000, BD = 2;
    vqkit::MemoryBank<float> hb(cap, BD);
    gpu::DeviceMemoryBank db(cap, BD);
    vqkit::Rng rh(3), rd(3);
    const Mat rows = gaussian(90000, BD, rng);
    hb.push(rows, rh);
    gpu::DeviceBuffer<float> drows(std::size_t(rows.size()));
    gpu::upload(drows.data(), rows.data(), drows.size(), be.stream);
    db.push(be, drows.data(), rows.rows(), rd);
    Mat got(cap, BD);
    gpu::download(got.data(), db.data(), std::size_t(cap * BD), be.stream);
    be.sync();
    VQ_CHECK(got == hb.storage() && rd.state() == rh.state(), "bank of capacity %ld differs", long(cap));
  }
  // the search with K > 65535, both paths, against the CPU
  {
    const Mat xs = gaussian(700, 16, rng), cs = gaussian(70001, 16, rng);
    for (SearchPrecision p : kPaths) expect_cpu("K = 70001", cs, xs, Metric::l2, p);
  }
}

template <int Unused = 0>
__global__ void fill_pattern_kernel(float* x, std::int64_t n) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = float(i % 3) - 1.f;  // -1, 0, 1
}

template <int Unused = 0>
__global__ void count_wrong_kernel(const std::int64_t* idx, std::int64_t n, unsigned long long* wrong) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    // codes: 0 = [-1], 1 = [1]; x = 0 ties -> index 0
    const std::int64_t want = (i % 3 == 2) ? 1 : 0;
    if (idx[i] != want) atomicAdd(wrong, 1ull);
  }
}

void test_max_rows() {
  std::printf("N = kMaxRows (2^31 - 1024)\n");
  const std::int64_t N = gpu::kMaxRows, K = 2, D = 1;
  vqkit::cuda be;
  be.precision = SearchPrecision::fp32;
  const std::size_t ws = gpu::nearest_code_workspace_bytes(N, K, D, be.precision);
  const std::size_t sw = gpu::cluster_stats_workspace_bytes(N, K, false);
  const std::size_t need = std::size_t(N) * (sizeof(float) + sizeof(std::int64_t)) + std::max(ws, sw) + (1u << 30);
  std::size_t free_b = 0, total_b = 0;
  gpu::check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  // the limit is enforced (nothing allocated for this)
  bool threw = false;
  try {
    gpu::nearest_code(be, nullptr, K, nullptr, N + 1, D, Metric::l2, nullptr, nullptr, nullptr, nullptr, 0);
  } catch (const vqkit::error& e) {
    threw = std::string(e.what()).find("N=2147482625") != std::string::npos;
  }
  VQ_CHECK(threw, "N = kMaxRows + 1 is rejected, naming N");
  if (free_b < need) {
    std::printf("  needs %.1f GB of device memory, %.1f GB free: this case not run\n", double(need) / 1e9,
                double(free_b) / 1e9);
    return;
  }
  gpu::DeviceBuffer<float> dx{std::size_t(N)}, dc{2}, dcounts{2};
  gpu::DeviceBuffer<std::int64_t> di{std::size_t(N)};
  gpu::DeviceBuffer<unsigned char> w(std::max(ws, sw));
  gpu::DeviceBuffer<unsigned long long> wrong{1};
  const float codes[2] = {-1.f, 1.f};
  gpu::upload(dc.data(), codes, 2, be.stream);
  fill_pattern_kernel<<<4096, 256, 0, be.stream>>>(dx.data(), N);
  gpu::check_launch("fill_pattern_kernel");
  gpu::nearest_code(be, dc.data(), K, dx.data(), N, D, Metric::l2, di.data(), nullptr, nullptr, w.data(), ws);
  gpu::check(cudaMemsetAsync(wrong.data(), 0, sizeof(unsigned long long), be.stream), "cudaMemsetAsync");
  count_wrong_kernel<<<4096, 256, 0, be.stream>>>(di.data(), N, wrong.data());
  gpu::check_launch("count_wrong_kernel");
  gpu::cluster_counts(be, di.data(), N, K, dcounts.data(), w.data(), sw);
  unsigned long long nwrong = 0;
  float counts[2] = {0, 0};
  gpu::download(&nwrong, wrong.data(), 1, be.stream);
  gpu::download(counts, dcounts.data(), 2, be.stream);
  be.sync();
  const std::int64_t ones = (N - 3) / 3 + 1;  // i % 3 == 2 for i in [0, N)
  std::printf("  N=%lld: %llu wrong indices; counts %.0f / %.0f (expected %lld / %lld, as float)\n",
              static_cast<long long>(N), nwrong, double(counts[0]), double(counts[1]),
              static_cast<long long>(N - ones), static_cast<long long>(ones));
  VQ_CHECK(nwrong == 0, "%llu wrong indices at N = kMaxRows", nwrong);
  VQ_CHECK(counts[0] == float(N - ones) && counts[1] == float(ones), "counts at N = kMaxRows");
}

void test_streams_and_strides() {
  std::printf("a non-default stream; strided host inputs\n");
  vqkit::Rng rng(36);
  const Index N = 900, K = 260, D = 40;
  const Mat x = gaussian(N, D, rng), codes = gaussian(K, D, rng);
  cudaStream_t st = nullptr;
  gpu::check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
  for (SearchPrecision p : kPaths) {
    IndexVector a, b;
    Vec da, db;
    gpu_search(codes, x, Metric::l2, p, a, da);
    gpu_search(codes, x, Metric::l2, p, b, db, st);
    VQ_CHECK(a == b && da == db, "%s: the search on a non-blocking stream differs", vqkit::to_string(p));
    // strided: the rows live in wider matrices (outer stride D + 7)
    Mat xw = gaussian(N, D + 7, rng), cw = gaussian(K, D + 7, rng);
    xw.leftCols(D) = x;
    cw.leftCols(D) = codes;
    vqkit::cuda be;
    be.precision = p;
    be.stream = st;
    IndexVector c(N);
    Vec dc;
    vqkit::nearest_code<float>(be, cw.leftCols(D), xw.leftCols(D), c, &dc);
    VQ_CHECK(c == a && dc == da, "%s: strided inputs give another result", vqkit::to_string(p));
  }
  // statistics and the EMA step on the stream equal the default stream's
  IndexVector idx(N);
  for (Index i = 0; i < N; ++i) idx[i] = Index(rng.below(std::uint64_t(K)));
  vqkit::cuda be0, be1;
  be1.stream = st;
  const auto s0 = vqkit::cluster_stats<float>(be0, x, idx, K), s1 = vqkit::cluster_stats<float>(be1, x, idx, K);
  VQ_CHECK(s0.counts == s1.counts && s0.sums == s1.sums, "cluster_stats on a stream differ");
  Mat c0 = codes, c1 = codes;
  vqkit::EmaState<float> e0, e1;
  vqkit::ema_reset<float>(e0, c0, Vec::Ones(K));
  e1 = e0;
  vqkit::ema_update<float>(be0, e0, s0, vqkit::EmaOptions{}, c0);
  vqkit::ema_update<float>(be1, e1, s1, vqkit::EmaOptions{}, c1);
  VQ_CHECK(c0 == c1 && e0.cluster_size == e1.cluster_size && e0.embed_sum == e1.embed_sum,
           "ema_update on a stream differs");
  gpu::check(cudaStreamDestroy(st), "cudaStreamDestroy");
}

}  // namespace

int main() {
  if (gpu::device_count() == 0) {
    std::printf("SKIPPED: no CUDA device found (cudaGetDeviceCount); the CUDA tests need a GPU\n");
    return 77;
  }
  cudaDeviceProp prop{};
  gpu::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  const struct {
    const char* name;
    void (*fn)();
  } cases[] = {{"tiny shapes", test_tiny_shapes},
               {"ranges", test_ranges},
               {"signed zero ties", test_signed_zero_ties},
               {"path distances", test_path_distances_equal},
               {"bf16 many codes", test_bf16_many_codes},
               {"large K and N", test_large_k_and_n},
               {"streams and strides", test_streams_and_strides},
               {"max rows", test_max_rows}};
  for (const auto& c : cases) {
    try {
      c.fn();
    } catch (const std::exception& e) {  // one broken case does not hide the others
      ++failures();
      std::printf("  FAIL %s: exception: %s\n", c.name, e.what());
    }
  }
  std::printf("%d checks, %d failed\n", checks(), failures());
  return failures() == 0 ? 0 : 1;
}
