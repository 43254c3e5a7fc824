// tests/cuda/test_cuda_primitives.cu - every CUDA primitive against the CPU
// backend on the same inputs (cuda/include/vqkit/cuda/*.cuh).
//
// Exits 77 (ctest: skipped) when there is no CUDA device; 1 on any failure.
//  - search, fp32 and bf16_rerank, L2 and cosine, odd shapes, random,
//    clustered (many near-equal codes: long candidate lists, the full-search
//    fallback), duplicated codes (ties to the lowest index) and real data
//    (GloVe, digits via read_fvecs): indices identical to the CPU backend's.
//    Given the CPU's code norms the scores are bit-identical to the CPU
//    AVX-512 kernel's, so no mismatch at all is allowed; with norms computed
//    on the GPU (another summation order) a mismatch is allowed only for a
//    near-tie, checked in double. Distances within 1e-5 of ||x||^2 + ||e||^2.
//  - determinism: the same call twice gives identical results.
//  - cluster counts / sums: identical (the CPU's order of additions);
//    EMA state within 1e-5 relative, and identical over two GPU runs;
//    batch metrics from a CUB histogram equal the CPU's.
//  - loss, input and codebook gradients, memory bank (same Rng draws),
//    usage counters, consistent code resets, k-means (same seeding draws).
//  - bad input throws vqkit::error and writes nothing.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>

#include "cuda_ref.hpp"
#include "vqkit/cuda/vector_quantizer.cuh"
#include "vqkit/io/vecs.hpp"

using namespace vqkit_test;
using vqkit::Metric;
using vqkit::SearchPrecision;

namespace {

/// Double-precision score gap between codes a and b for row x (L2: squared
/// distances; cosine: cosines), relative to the row's scale.
double rel_gap(const Mat& codes, const Mat& x, Index i, Index a, Index b, Metric m) {
  auto score = [&](Index k) {
    double dot = 0, ee = 0, xx = 0;
    for (Index d = 0; d < x.cols(); ++d) {
      dot += double(x(i, d)) * codes(k, d);
      ee += double(codes(k, d)) * codes(k, d);
      xx += double(x(i, d)) * x(i, d);
    }
    if (m == Metric::l2) return std::make_pair(xx - 2 * dot + ee, xx + ee);
    const double c = ee > 0 ? dot / std::sqrt(ee) : 0.0;
    return std::make_pair(-c, std::sqrt(xx) + 1e-30);
  };
  const auto sa = score(a), sb = score(b);
  return std::abs(sa.first - sb.first) / std::max(sa.second, sb.second);
}

void compare_search(const char* name, const Mat& codes, const Mat& x, Metric m, SearchPrecision p,
                    bool give_norms) {
  const Vec norms = cpu_code_norms(codes, m);
  IndexVector ci;
  Vec cd;
  cpu_search(codes, x, m, give_norms ? &norms : nullptr, ci, cd);
  vqkit::cuda be;
  be.precision = p;
  vqkit::SearchOptions o;
  o.metric = m;
  IndexVector gi(x.rows());
  gi.setConstant(-7);
  Vec gd;
  vqkit::nearest_code<float>(be, codes, x, gi, &gd, o, give_norms ? &norms : nullptr);
  Index mismatch = 0, non_tie = 0;
  double worst_dist = 0;
  for (Index i = 0; i < x.rows(); ++i) {
    if (gi[i] != ci[i]) {
      ++mismatch;
      if (gi[i] < 0 || gi[i] >= codes.rows() || rel_gap(codes, x, i, gi[i], ci[i], m) > 1e-5) ++non_tie;
    }
    const double xx = x.row(i).cast<double>().squaredNorm(), ee = codes.row(ci[i]).cast<double>().squaredNorm();
    const double scale = m == Metric::l2 ? xx + ee + 1e-30 : 1.0;
    worst_dist = std::max(worst_dist, std::abs(double(gd[i]) - double(cd[i])) / scale);
  }
  const bool exact_expected = give_norms && cpu_search_is_avx512();
  std::printf("  %-34s %-6s %-11s norms=%-3s N=%-6ld K=%-6ld D=%-5ld mismatches %ld (non-ties %ld), max dist err %.2e\n",
              name, vqkit::to_string(m), vqkit::to_string(p), give_norms ? "cpu" : "gpu", long(x.rows()),
              long(codes.rows()), long(codes.cols()), long(mismatch), long(non_tie), worst_dist);
  VQ_CHECK(non_tie == 0, "%s: %ld rows differ from the CPU and are not near-ties", name, long(non_tie));
  if (exact_expected) VQ_CHECK(mismatch == 0, "%s: %ld indices differ from the CPU kernel", name, long(mismatch));
  VQ_CHECK(worst_dist <= 1e-5, "%s: distance error %.3e", name, worst_dist);
  // Determinism: the same call again.
  IndexVector gi2(x.rows());
  Vec gd2;
  vqkit::nearest_code<float>(be, codes, x, gi2, &gd2, o, give_norms ? &norms : nullptr);
  VQ_CHECK(gi2 == gi && gd2 == gd, "%s: a second run differs", name);
}

void test_search_random() {
  std::printf("search, random data\n");
  vqkit::Rng rng(11);
  const Index shapes[][3] = {{1000, 300, 37}, {513, 1030, 128}, {2048, 64, 8}, {257, 4099, 3}, {130, 200, 1000}};
  for (const auto& s : shapes) {
    const Mat x = gaussian(s[0], s[2], rng), codes = gaussian(s[1], s[2], rng);
    for (Metric m : {Metric::l2, Metric::cosine})
      for (SearchPrecision p : {SearchPrecision::fp32, SearchPrecision::bf16_rerank})
        for (bool gn : {true, false}) compare_search("gaussian", codes, x, m, p, gn);
  }
}

void test_search_hard() {
  std::printf("search, clustered codes, duplicates, offsets\n");
  vqkit::Rng rng(12);
  // Codes in 8 tight groups: dozens of codes within the bf16 bound of each
  // other, so candidate lists overflow and rows take the full exact search.
  {
    const Mat centres = gaussian(8, 64, rng, 2.0);
    Mat codes(512, 64);
    for (Index k = 0; k < 512; ++k) codes.row(k) = centres.row(k % 8) + 1e-3f * gaussian(1, 64, rng).row(0);
    const Mat x = mixture(700, 64, 8, rng, 0.5);
    for (Metric m : {Metric::l2, Metric::cosine})
      for (SearchPrecision p : {SearchPrecision::fp32, SearchPrecision::bf16_rerank})
        compare_search("tight code groups", codes, x, m, p, true);
  }
  // Exact duplicates: every code appears twice; ties must go to the lower index.
  {
    Mat base = gaussian(100, 24, rng);
    Mat codes(200, 24);
    for (Index k = 0; k < 200; ++k) codes.row(k) = base.row((k * 37) % 100);
    const Mat x = gaussian(600, 24, rng);
    for (Metric m : {Metric::l2, Metric::cosine})
      for (SearchPrecision p : {SearchPrecision::fp32, SearchPrecision::bf16_rerank}) {
        compare_search("duplicated codes", codes, x, m, p, true);
        vqkit::cuda be;
        be.precision = p;
        vqkit::SearchOptions o;
        o.metric = m;
        const auto r = vqkit::nearest_code<float>(be, codes, x, o);
        Index wrong = 0;
        for (Index i = 0; i < x.rows(); ++i)
          for (Index k = 0; k < r.indices[i]; ++k) wrong += codes.row(k) == codes.row(r.indices[i]);
        VQ_CHECK(wrong == 0, "duplicates: %ld rows picked the higher of two equal codes", long(wrong));
      }
  }
  // A large common offset: |x||e| >> the gaps (wide bf16 bound).
  {
    Mat x = gaussian(400, 48, rng), codes = gaussian(300, 48, rng);
    x.array() += 20.f;
    codes.array() += 20.f;
    for (SearchPrecision p : {SearchPrecision::fp32, SearchPrecision::bf16_rerank})
      compare_search("offset 20", codes, x, Metric::l2, p, true);
  }
  // Zero code and zero row under cosine.
  {
    Mat codes = gaussian(50, 16, rng), x = gaussian(60, 16, rng);
    codes.row(3).setZero();
    x.row(5).setZero();
    for (SearchPrecision p : {SearchPrecision::fp32, SearchPrecision::bf16_rerank})
      compare_search("zero code / zero row", codes, x, Metric::cosine, p, true);
  }
}

void test_search_real() {
  std::printf("search, real data\n");
  const std::string dir = VQKIT_TEST_DATA_DIR;
  const std::string glove_b = dir + "/vectors/glove100/glove100_base_10k.fvecs",
                    glove_q = dir + "/vectors/glove100/glove100_query_1k.fvecs",
                    digits = dir + "/vectors/digits/digits_1797x64.fvecs";
  if (!std::filesystem::exists(glove_b) || !std::filesystem::exists(digits)) {
    std::printf("  real data not found under %s: skipped these cases\n", dir.c_str());
    return;
  }
  const Mat base = vqkit::io::read_fvecs(glove_b, 4096), query = vqkit::io::read_fvecs(glove_q, 1000);
  const Mat dg = vqkit::io::read_fvecs(digits);
  const Mat dg_codes = dg.topRows(256), dg_x = dg.bottomRows(dg.rows() - 256);
  for (Metric m : {Metric::l2, Metric::cosine})
    for (SearchPrecision p : {SearchPrecision::fp32, SearchPrecision::bf16_rerank}) {
      compare_search("GloVe 4096 vs query 1000", query, base, m, p, true);
      compare_search("GloVe 4096 vs query 1000", query, base, m, p, false);
      compare_search("digits", dg_codes, dg_x, m, p, true);
    }
}

void test_search_stats_and_device_api() {
  std::printf("search, device API and bf16 statistics\n");
  vqkit::Rng rng(13);
  const Index N = 3000, K = 1024, D = 256;
  const Mat x = gaussian(N, D, rng), codes = gaussian(K, D, rng);
  vqkit::cuda be;
  be.precision = SearchPrecision::bf16_rerank;
  vqkit::gpu::DeviceBuffer<float> dx(std::size_t(N * D)), dc(std::size_t(K * D));
  vqkit::gpu::DeviceBuffer<std::int64_t> di{std::size_t(N)};
  vqkit::gpu::upload(dx.data(), x.data(), dx.size(), be.stream);
  vqkit::gpu::upload(dc.data(), codes.data(), dc.size(), be.stream);
  const std::size_t wb = vqkit::gpu::nearest_code_workspace_bytes(N, K, D, be.precision);
  vqkit::gpu::DeviceBuffer<unsigned char> ws(wb);
  vqkit::SearchStats st;
  vqkit::gpu::nearest_code(be, dc.data(), K, dx.data(), N, D, Metric::l2, di.data(), nullptr, nullptr, ws.data(),
                           wb, &st);
  IndexVector gi(N);
  vqkit::gpu::download(gi.data(), di.data(), std::size_t(N), be.stream);
  be.sync();
  IndexVector ci;
  Vec cd;
  cpu_search(codes, x, Metric::l2, nullptr, ci, cd);
  Index diff = 0;
  for (Index i = 0; i < N; ++i) diff += gi[i] != ci[i];
  std::printf("  bf16 N=%ld K=%ld D=%ld: mean candidates %.2f, max %ld, full-search rows %ld, mismatches %ld\n",
              long(N), long(K), long(D), double(st.reranked) / double(N), long(st.max_reranked), long(st.fallback_rows),
              long(diff));
  VQ_CHECK(st.reranked >= N, "every row re-ranks at least its winner");
  VQ_CHECK(diff <= 1, "device API: %ld mismatches", long(diff));
  bool threw = false;
  try {
    vqkit::gpu::nearest_code(be, dc.data(), K, dx.data(), N, D, Metric::l2, di.data(), nullptr, nullptr, ws.data(),
                             wb - 1);
  } catch (const vqkit::error&) {
    threw = true;
  }
  VQ_CHECK(threw, "a too-small workspace is rejected");
}

void test_bad_input() {
  std::printf("bad input\n");
  vqkit::Rng rng(14);
  Mat x = gaussian(20, 8, rng), codes = gaussian(10, 8, rng);
  x(7, 3) = std::nanf("");
  IndexVector idx = IndexVector::Constant(20, -5);
  vqkit::cuda be;
  bool threw = false;
  try {
    vqkit::nearest_code<float>(be, codes, x, idx);
  } catch (const vqkit::error& e) {
    threw = std::string(e.what()).find("row 7") != std::string::npos;
  }
  VQ_CHECK(threw, "NaN in x is rejected, naming the row");
  VQ_CHECK((idx.array() == -5).all(), "nothing written on rejection");
  IndexVector wrong(5);
  threw = false;
  try {
    vqkit::nearest_code<float>(be, codes, gaussian(20, 8, rng), wrong);
  } catch (const vqkit::error&) {
    threw = true;
  }
  VQ_CHECK(threw, "wrong indices size is rejected");
  IndexVector bad = IndexVector::Zero(20);
  bad[4] = 10;
  threw = false;
  try {
    (void)vqkit::cluster_stats<float>(be, gaussian(20, 8, rng), bad, 10);
  } catch (const vqkit::error&) {
    threw = true;
  }
  VQ_CHECK(threw, "out-of-range index is rejected by cluster_stats");
}

void test_stats_ema_metrics() {
  std::printf("cluster stats, EMA, metrics\n");
  vqkit::Rng rng(15);
  vqkit::cuda be;
  const Index shapes[][3] = {{5000, 300, 33}, {777, 4096, 16}, {20000, 64, 130}};
  for (const auto& s : shapes) {
    const Index N = s[0], K = s[1], D = s[2];
    const Mat x = gaussian(N, D, rng);
    IndexVector idx(N);
    for (Index i = 0; i < N; ++i) idx[i] = Index(rng.below(std::uint64_t(K / 2 + 1))) * 2 % K;  // empty codes too
    const auto c = cpu_cluster_stats(x, idx, K);
    const auto g = vqkit::cluster_stats<float>(be, x, idx, K);
    VQ_CHECK(g.counts == c.counts, "counts differ (N=%ld K=%ld)", long(N), long(K));
    VQ_CHECK(g.sums == c.sums, "sums not bit-identical (N=%ld K=%ld), max rel %.3e", long(N), long(K),
             max_rel(g.sums, c.sums));
    VQ_CHECK(vqkit::cluster_counts<float>(be, idx, K) == cpu_cluster_counts(idx, K), "cluster_counts differ");

    // EMA over three steps, from a consistent state.
    Mat codes_c = gaussian(K, D, rng), codes_g = codes_c;
    vqkit::EmaState<float> sc, sg;
    vqkit::ema_reset<float>(sc, codes_c, Vec::Constant(K, 2.f));
    sg = sc;
    vqkit::EmaOptions eo;
    eo.decay = 0.95;
    for (int step = 0; step < 3; ++step) {
      cpu_ema_update(sc, c, eo, codes_c);
      vqkit::ema_update<float>(be, sg, g, eo, codes_g);
    }
    const double e1 = max_rel(sg.cluster_size, sc.cluster_size), e2 = max_rel(sg.embed_sum, sc.embed_sum, 1e-3),
                 e3 = max_rel(codes_g, codes_c, 1e-3);
    std::printf("  N=%ld K=%ld D=%ld: EMA rel err N %.2e M %.2e e %.2e\n", long(N), long(K), long(D), e1, e2, e3);
    VQ_CHECK(e1 <= 1e-5 && e2 <= 1e-5 && e3 <= 1e-5, "EMA state off: %.3e %.3e %.3e", e1, e2, e3);
    // Metrics from device indices.
    vqkit::gpu::DeviceBuffer<std::int64_t> di{std::size_t(N)};
    vqkit::gpu::upload(di.data(), idx.data(), std::size_t(N), be.stream);
    Vec counts;
    const auto mg = vqkit::batch_metrics(be, di.data(), N, K, &counts);
    const auto mc = vqkit::batch_metrics(cpu_cluster_counts(idx, K));
    VQ_CHECK(mg.perplexity == mc.perplexity && mg.usage == mc.usage && mg.entropy == mc.entropy,
             "metrics differ: %g vs %g", mg.perplexity, mc.perplexity);
  }
  // Determinism of the whole EMA path: two identical runs, identical codebooks.
  {
    const Index N = 8192, K = 512, D = 64;
    const Mat x = gaussian(N, D, rng), start = gaussian(K, D, rng);
    Mat out[2];
    for (int run = 0; run < 2; ++run) {
      Mat codes = start;
      vqkit::EmaState<float> st;
      vqkit::ema_reset<float>(st, codes, Vec::Ones(K));
      for (int step = 0; step < 3; ++step) {
        const auto r = vqkit::nearest_code<float>(be, codes, x);
        const auto b = vqkit::cluster_stats<float>(be, x, r.indices, K);
        vqkit::ema_update<float>(be, st, b, vqkit::EmaOptions{}, codes);
      }
      out[run] = codes;
    }
    VQ_CHECK(out[0] == out[1], "two identical EMA runs give different codebooks");
  }
}

void test_loss_grads() {
  std::printf("loss and gradients\n");
  vqkit::Rng rng(16);
  vqkit::cuda be;
  const Index N = 3001, K = 97, D = 45;
  const Mat r = gaussian(N, D, rng), dq = gaussian(N, D, rng);
  IndexVector idx(N);
  for (Index i = 0; i < N; ++i) idx[i] = Index(rng.below(K));
  for (auto red : {vqkit::Reduction::mean, vqkit::Reduction::sum_over_dim}) {
    vqkit::LossOptions o;
    o.reduction = red;
    const auto lc = cpu_vq_loss(r, o), lg = vqkit::vq_loss<float>(be, r, o);
    VQ_CHECK(std::abs(lg.total - lc.total) <= 1e-12 * std::abs(lc.total), "loss %.17g vs %.17g", lg.total, lc.total);
    Mat dxc, dxg;
    cpu_input_grad(r, dq, o, dxc);
    vqkit::vq_input_grad<float>(be, r, dq, o, dxg);
    VQ_CHECK(max_rel(dxg, dxc, 1e-3) <= 1e-6, "input grad rel err %.3e", max_rel(dxg, dxc, 1e-3));
    Mat none(0, D);
    cpu_input_grad(r, none, o, dxc);
    vqkit::vq_input_grad<float>(be, r, none, o, dxg);
    VQ_CHECK(max_rel(dxg, dxc, 1e-6) <= 1e-6, "input grad (no dq) rel err %.3e", max_rel(dxg, dxc, 1e-6));
    Mat gc = gaussian(K, D, rng), gg = gc;
    cpu_codebook_grad(r, idx, o, gc);
    vqkit::vq_codebook_grad<float>(be, r, idx, o, gg);
    VQ_CHECK(max_rel(gg, gc, 1e-3) <= 1e-6, "codebook grad rel err %.3e", max_rel(gg, gc, 1e-3));
  }
  // gather + residual on the device.
  const Mat x = gaussian(N, D, rng), codes = gaussian(K, D, rng);
  vqkit::gpu::DeviceBuffer<float> dx(std::size_t(N * D)), dc(std::size_t(K * D)), dqq(std::size_t(N * D)),
      drr(std::size_t(N * D));
  vqkit::gpu::DeviceBuffer<std::int64_t> di{std::size_t(N)};
  vqkit::gpu::upload(dx.data(), x.data(), dx.size(), be.stream);
  vqkit::gpu::upload(dc.data(), codes.data(), dc.size(), be.stream);
  vqkit::gpu::upload(di.data(), idx.data(), di.size(), be.stream);
  vqkit::gpu::gather_residual(be, dx.data(), dc.data(), di.data(), N, D, dqq.data(), drr.data());
  Mat q(N, D), res(N, D);
  vqkit::gpu::download(q.data(), dqq.data(), dqq.size(), be.stream);
  vqkit::gpu::download(res.data(), drr.data(), drr.size(), be.stream);
  be.sync();
  bool ok = true;
  for (Index i = 0; i < N; ++i) ok &= q.row(i) == codes.row(idx[i]) && res.row(i) == x.row(i) - codes.row(idx[i]);
  VQ_CHECK(ok, "gather / residual differ");
}

void test_bank_usage_reset() {
  std::printf("memory bank, usage counters, code resets\n");
  vqkit::Rng data_rng(17);
  vqkit::cuda be;
  const Index cap = 1000, D = 12;
  vqkit::MemoryBank<float> hb(cap, D);
  vqkit::gpu::DeviceMemoryBank db(cap, D);
  vqkit::Rng rh(5), rd(5);
  for (Index n : {300, 450, 400, 2500, 10, 999}) {
    const Mat x = gaussian(n, D, data_rng);
    hb.push(x, rh);
    vqkit::gpu::DeviceBuffer<float> dx(std::size_t(n * D));
    vqkit::gpu::upload(dx.data(), x.data(), dx.size(), be.stream);
    db.push(be, dx.data(), n, rd);
    Mat got(cap, D);
    vqkit::gpu::download(got.data(), db.data(), std::size_t(cap * D), be.stream);
    be.sync();
    VQ_CHECK(got == hb.storage() && db.size() == hb.size() && db.head() == hb.head() &&
                 db.overflow_rows() == hb.overflow_rows(),
             "bank differs after a push of %ld rows", long(n));
  }
  VQ_CHECK(rd.state() == rh.state(), "the device bank drew differently from the host bank");
  {
    vqkit::Rng a(9), b(9);
    VQ_CHECK(db.random_row_index(a) == Index(b.below(std::uint64_t(hb.size()))), "random_row draw differs");
  }
  // Usage counters.
  const Index K = 300;
  vqkit::UsageTracker ut(K);
  vqkit::gpu::DeviceBuffer<std::int64_t> since{std::size_t(K)}, used{std::size_t(K)};
  vqkit::gpu::DeviceBuffer<float> dcounts{std::size_t(K)};
  vqkit::gpu::DeviceBuffer<unsigned long long> tmp(2);
  vqkit::gpu::check(cudaMemset(since.data(), 0, K * 8), "memset");
  vqkit::gpu::check(cudaMemset(used.data(), 0, K * 8), "memset");
  for (int step = 0; step < 40; ++step) {
    Vec counts = Vec::Zero(K);
    for (int j = 0; j < 50; ++j) counts[Index(data_rng.below(std::uint64_t(K / (1 + step % 3))))] += 1;
    ut.record(counts);
    vqkit::gpu::upload(dcounts.data(), counts.data(), std::size_t(K), be.stream);
    vqkit::gpu::usage_record(be, dcounts.data(), K, since.data(), used.data());
  }
  IndexVector s(K), u(K);
  vqkit::gpu::download(s.data(), since.data(), std::size_t(K), be.stream);
  vqkit::gpu::download(u.data(), used.data(), std::size_t(K), be.stream);
  be.sync();
  VQ_CHECK(s == ut.steps_since_used() && u == ut.used_since_reset(), "usage counters differ");
  const auto du = vqkit::gpu::usage_counts(be, since.data(), used.data(), K, 20, 10, tmp.data());
  VQ_CHECK(du.first == ut.dead(20) && du.second == ut.used_within(10), "dead %ld vs %ld, window %ld vs %ld",
           long(du.first), long(ut.dead(20)), long(du.second), long(ut.used_within(10)));
  // Consistent resets of a few codes.
  const Index Kc = 40;
  Mat codes = gaussian(Kc, D, data_rng), codes_g = codes;
  vqkit::EmaState<float> st;
  vqkit::ema_reset<float>(st, codes, Vec::Constant(Kc, 3.f));
  vqkit::EmaState<float> sg = st;
  const Mat vals = gaussian(3, D, data_rng);
  const int ks[3] = {4, 17, 39};
  for (int j = 0; j < 3; ++j) vqkit::ema_reset_code<float>(st, codes, ks[j], vals.row(j), 2.5f);
  vqkit::gpu::DeviceBuffer<float> dc(std::size_t(Kc * D)), dn{std::size_t(Kc)}, dm(std::size_t(Kc * D)),
      dv(std::size_t(3 * D));
  vqkit::gpu::DeviceBuffer<int> dk(3);
  vqkit::gpu::upload(dc.data(), codes_g.data(), dc.size(), be.stream);
  vqkit::gpu::upload(dn.data(), sg.cluster_size.data(), dn.size(), be.stream);
  vqkit::gpu::upload(dm.data(), sg.embed_sum.data(), dm.size(), be.stream);
  vqkit::gpu::upload(dv.data(), vals.data(), dv.size(), be.stream);
  vqkit::gpu::upload(dk.data(), ks, 3, be.stream);
  vqkit::gpu::ema_reset_codes(be, dk.data(), dv.data(), 3, D, 2.5f, dc.data(), dn.data(), dm.data());
  vqkit::gpu::download(codes_g.data(), dc.data(), dc.size(), be.stream);
  vqkit::gpu::download(sg.cluster_size.data(), dn.data(), dn.size(), be.stream);
  vqkit::gpu::download(sg.embed_sum.data(), dm.data(), dm.size(), be.stream);
  be.sync();
  VQ_CHECK(codes_g == codes && sg.cluster_size == st.cluster_size && sg.embed_sum == st.embed_sum,
           "code resets differ");
}

void test_kmeans() {
  std::printf("k-means\n");
  vqkit::Rng rng(18);
  const Mat data = mixture(3000, 16, 40, rng, 0.5);
  for (bool pp : {true, false})
    for (SearchPrecision p : {SearchPrecision::fp32, SearchPrecision::bf16_rerank}) {
      vqkit::KMeansOptions o;
      o.k = 32;
      o.iterations = 8;
      o.plus_plus = pp;
      o.min_cluster_fraction = 0.5;
      vqkit::Rng rc(77), rg(77);
      const auto c = cpu_kmeans(data, o, rc);
      vqkit::cuda be;
      be.precision = p;
      const auto g = vqkit::kmeans<float>(be, data, o, rg);
      const double ce = max_rel(g.centroids, c.centroids, 1e-2);
      std::printf("  plus_plus=%d %-11s inertia cpu %.6g gpu %.6g, centroid rel err %.2e, splits %ld/%ld\n", int(pp),
                  vqkit::to_string(p), c.inertia, g.inertia, ce, long(c.empty_splits), long(g.empty_splits));
      VQ_CHECK(rg.state() == rc.state(), "the Rng saw different draws");
      VQ_CHECK(g.counts == c.counts, "k-means counts differ");
      VQ_CHECK(ce <= 1e-5, "centroids differ: %.3e", ce);
      VQ_CHECK(std::abs(g.inertia - c.inertia) <= 1e-5 * c.inertia, "inertia %.9g vs %.9g", g.inertia, c.inertia);
    }
}

}  // namespace

int main() {
  const int devices = vqkit::gpu::device_count();
  if (devices == 0) {
    std::printf("SKIPPED: no CUDA device found (cudaGetDeviceCount); the CUDA tests need a GPU\n");
    return 77;
  }
  cudaDeviceProp prop{};
  vqkit::gpu::check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("device: %s (sm_%d%d); CPU reference search: %s\n", prop.name, prop.major, prop.minor,
              cpu_search_is_avx512() ? "AVX-512 kernel" : "generic path");
  try {
    test_search_random();
    test_search_hard();
    test_search_real();
    test_search_stats_and_device_api();
    test_bad_input();
    test_stats_ema_metrics();
    test_loss_grads();
    test_bank_usage_reset();
    test_kmeans();
  } catch (const std::exception& e) {
    std::printf("FAIL: exception: %s\n", e.what());
    return 1;
  }
  std::printf("%d checks, %d failed\n", checks(), failures());
  return failures() == 0 ? 0 : 1;
}
