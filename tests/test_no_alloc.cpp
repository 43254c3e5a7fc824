// A steady training or eval step of VectorQuantizer<float> makes no heap
// allocation (issue 12): this program replaces the C allocator's entry
// points (glibc: malloc, calloc, realloc, memalign, posix_memalign,
// aligned_alloc; operator new and Eigen both end in them) with counting
// wrappers, and counts what a step does after warm-up steps. Not built in
// sanitizer builds (ASan owns the allocator there).
#include <catch2/catch.hpp>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdlib>
#include <vqkit/layers/quantizer_block.hpp>
#include <vqkit/layers/vector_quantizer.hpp>
#include <vqkit/quantizer/codebook.hpp>

#include "test_util.hpp"

extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
}

namespace {
std::atomic<long> g_allocs{0};
std::atomic<bool> g_counting{false};
/// A counted allocation (break here in a debugger to find its caller).
__attribute__((noinline)) void counted_allocation() { g_allocs.fetch_add(1, std::memory_order_relaxed); }
inline void count() {
  if (g_counting.load(std::memory_order_relaxed)) counted_allocation();
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  count();
  return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  count();
  return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  count();
  return __libc_realloc(p, n);
}
void* memalign(std::size_t a, std::size_t n) {
  count();
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  count();
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) {
  count();
  void* p = __libc_memalign(a, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
}

using namespace vqkit;

namespace {

/// Heap allocations made by f.
template <class F>
long allocations(F&& f) {
  g_allocs = 0;
  g_counting = true;
  f();
  g_counting = false;
  return g_allocs.load();
}

}  // namespace

TEST_CASE("the counter sees allocations (the test can fail)", "[alloc]") {
  CHECK(allocations([] { RowMatrix<float> m(100, 100); m.setZero(); }) >= 1);
  CHECK(allocations([] { std::vector<int> v(1000, 1); }) >= 1);
}

TEST_CASE("a steady VectorQuantizer<float> step makes no heap allocation", "[alloc][vq]") {
  if (!avx512_search_supported())
    VQKIT_SKIP("no AVX-512F: the generic search path allocates its tiles per call");
  for (const int threads : {1, 2}) {
    for (const auto update : {CodebookUpdate::ema, CodebookUpdate::gradient}) {
      INFO("threads " << threads << ", update " << to_string(update));
      VectorQuantizerConfig cfg;
      cfg.codebook_size = 256;
      cfg.dim = 64;
      cfg.update = update;
      cfg.memory_bank_size = 2048;  // init at step 1, refine when full (step 4)
      VectorQuantizer<float> vq(cfg, cpu{threads});
      const Index N = 512;
      std::vector<RowMatrix<float>> batches;
      for (int s = 0; s < 10; ++s) batches.push_back(test::gaussian<float>(N, 64, std::uint64_t(100 + s)));
      const RowMatrix<float> dq = test::gaussian<float>(N, 64, 7);
      RowMatrix<float> q, dx;
      VectorQuantizer<float>::Context ctx;
      for (int s = 0; s < 5; ++s) {  // warm-up: k-means init and refine happen here
        vq.forward(batches[std::size_t(s)], q, ctx);
        vq.backward(ctx, dq, &dx);
      }
      REQUIRE(vq.init_refined());
      for (int s = 5; s < 10; ++s) {
        const long n = allocations([&] {
          vq.forward(batches[std::size_t(s)], q, ctx);
          vq.backward(ctx, dq, &dx);
        });
        CHECK(n == 0);
        CHECK_FALSE(ctx.data_initialized);
        CHECK(ctx.metrics.usage > 0);
      }
      vq.eval();
      CHECK(allocations([&] { vq.forward(batches[0], q, ctx); }) == 0);
      // The allocating form, for contrast: it builds a new context.
      CHECK(allocations([&] { auto c = vq.forward(batches[1], q); }) > 0);
    }
  }
}

TEST_CASE("a steady step with the bf16 + re-rank search makes no heap allocation", "[alloc][vq][bf16]") {
  // The bf16 kernel's scratch lives in the quantizer's SearchWorkspace (it
  // was thread_local); a steady step reuses it.
  if (!bf16_search_supported()) VQKIT_SKIP("no AVX512-BF16 here: the bf16 search does not run");
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    VectorQuantizerConfig cfg;
    cfg.codebook_size = 256;
    cfg.dim = 128;
    cfg.search_precision = Precision::bf16_rerank;
    cfg.memory_bank_size = 2048;
    VectorQuantizer<float> vq(cfg, cpu{threads});
    const Index N = 512;
    std::vector<RowMatrix<float>> batches;
    for (int s = 0; s < 8; ++s) batches.push_back(test::gaussian<float>(N, 128, std::uint64_t(300 + s)));
    const RowMatrix<float> dq = test::gaussian<float>(N, 128, 9);
    RowMatrix<float> q, dx;
    VectorQuantizer<float>::Context ctx;
    for (int s = 0; s < 5; ++s) {
      vq.forward(batches[std::size_t(s)], q, ctx);
      vq.backward(ctx, dq, &dx);
    }
    REQUIRE(vq.init_refined());
    for (int s = 5; s < 8; ++s) {
      const long n = allocations([&] {
        vq.forward(batches[std::size_t(s)], q, ctx);
        vq.backward(ctx, dq, &dx);
      });
      CHECK(n == 0);
    }
    // The search that ran was the bf16 one, and it equals the fp32 search.
    SearchStats st;
    SearchMode mode;
    mode.precision = Precision::bf16_rerank;
    mode.stats = &st;
    IndexVector a(N), b(N);
    nearest_code<float>(cpu{threads}, vq.codebook(), batches[7], a, nullptr, {}, nullptr, mode);
    CHECK(st.precision == Precision::bf16_rerank);
    nearest_code<float>(cpu{threads}, vq.codebook(), batches[7], b);
    CHECK(a == b);
  }
}

TEST_CASE("Codebook::encode/decode of a steady batch shape make no heap allocation", "[alloc][codebook]") {
  if (!avx512_search_supported())
    VQKIT_SKIP("no AVX-512F: the generic search path allocates its tiles per call");
  for (const int threads : {1, 2}) {
    INFO("threads " << threads);
    Codebook<float> cb(test::gaussian<float>(300, 48, 1), Metric::l2, Precision::fp32, cpu{threads});
    const RowMatrix<float> x = test::gaussian<float>(700, 48, 2);
    IndexVector idx(x.rows());
    Vector<float> dist;
    RowMatrix<float> back(x.rows(), 48);
    cb.encode(x, idx, &dist);  // warm-up: the workspace grows here
    CHECK(allocations([&] {
            cb.encode(x, idx, &dist);
            cb.decode(idx, back);
          }) == 0);
    CHECK(allocations([&] { auto i = cb.encode(x); }) > 0);  // the allocating form, for contrast
  }
}

TEST_CASE("a steady QuantizerBlock step makes no heap allocation", "[alloc][block]") {
  // The Linear layers' GEMMs pack on the stack (core/gemm.hpp); everything
  // else reuses the context and the block's buffers. 1 and 2 threads.
  if (!avx512_search_supported())
    VQKIT_SKIP("no AVX-512F: the generic search path allocates its tiles per call");
  QuantizerBlockConfig cfg;
  cfg.dim = 32;
  cfg.quantizer.codebook_size = 128;
  cfg.quantizer.dim = 64;
  cfg.quantizer.memory_bank_size = 1024;
  for (const int threads : {1, 2}) {
  INFO("threads " << threads);
  QuantizerBlock<float> block(cfg, cpu{threads});
  const Index N = 256;
  const RowMatrix<float> dy = test::gaussian<float>(N, 32, 9);
  RowMatrix<float> y, dx;
  QuantizerBlock<float>::Context ctx;
  for (int s = 0; s < 6; ++s) {
    const RowMatrix<float> x = test::gaussian<float>(N, 32, std::uint64_t(200 + s));
    block.forward(x, y, ctx);
    block.backward(ctx, dy, &dx);
  }
  REQUIRE(block.quantizer.init_refined());
  const RowMatrix<float> x = test::gaussian<float>(N, 32, 300);
  const long reused = allocations([&] {
    block.forward(x, y, ctx);
    block.backward(ctx, dy, &dx);
  });
  const long fresh = allocations([&] {
    auto c = block.forward(x, y);
    block.backward(c, dy, &dx);
  });
  INFO("allocations: reused context " << reused << ", fresh context " << fresh);
  CHECK(reused == 0);
  CHECK(fresh >= 6);  // the fresh contexts (inputs, statistics, indices, residual)
  }
}
