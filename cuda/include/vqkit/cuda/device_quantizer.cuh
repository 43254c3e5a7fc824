// vqkit/cuda/device_quantizer.cuh - the quantizer layer with its state on the
// GPU: gpu::DeviceVectorQuantizer.
//
// VectorQuantizer<float, vqkit::cuda> (layers/vector_quantizer.hpp) keeps its
// state in host memory and moves every operand over PCIe. This class keeps
// the codebook, its gradient, the EMA state, the memory bank and the usage
// counters in device memory and takes the caller's device arrays (x, the
// quantized output, dq, dx: N x D contiguous, row-major, on the backend's
// stream), so a caller's own CUDA tensors (e.g. libtorch's data_ptr()) pass
// without copies. The semantics, the config and the checkpoint State are the
// host layer's, step for step and draw for draw: the same config and seed
// give the same indices and policy decisions (tests/cuda/test_cuda_device_layer.cu
// runs both side by side).
//
// What crosses the bus in a training step: a few scalars (the loss, the
// finiteness check, two usage counts), the K per-code counts for the batch
// metrics, and under the replace policy the K cluster sizes and the chosen
// rows' indices; never a K x D or N x D array (gpu::transfer_bytes() counts
// what the layer copies; the test checks it). The exceptions are the rare
// k-means steps (the first init, its refinement when the bank fills, and
// kmeans_reinit): the k-means++ seeding is the CPU's function (so that the
// draws match the CPU layer's), so the bank comes to the host for it.
// state() / set_state() copy everything, as a checkpoint must.
//
// Not supported here: a data-parallel Reducer (use the host layer).
#pragma once

#include <cstdint>
#include <vector>

#include "vqkit/cuda/backend.cuh"
#include "vqkit/cuda/kmeans.cuh"
#include "vqkit/cuda/search.cuh"
#include "vqkit/cuda/stats.cuh"
#include "vqkit/cuda/train.cuh"
#include "vqkit/layers/vector_quantizer.hpp"
#include "vqkit/quantizer/init.hpp"

namespace vqkit {
namespace gpu {

namespace detail {

/// *first = the smallest flat index of a non-finite entry of x (n of them),
/// or n when there is none.
template <int Unused = 0>
__global__ void first_non_finite_kernel(const float* __restrict__ x, std::size_t n,
                                        unsigned long long* __restrict__ first) {
  for (std::size_t t = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; t < n;
       t += std::size_t(gridDim.x) * blockDim.x)
    if (!isfinite(x[t])) atomicMin(first, static_cast<unsigned long long>(t));
}

/// since[k] = used[k] = 0 for the listed codes (UsageTracker::reset).
template <int Unused = 0>
__global__ void usage_reset_kernel(const int* __restrict__ ks, int n, std::int64_t* __restrict__ since,
                                   std::int64_t* __restrict__ used) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < n) since[ks[j]] = used[ks[j]] = 0;
}

/// Grows a device buffer to at least n elements (contents lost when it grows).
template <class T>
T* ensure(DeviceBuffer<T>& b, std::size_t n) {
  if (b.size() < n) b.resize(n);
  return b.data();
}

}  // namespace detail

/// One step's results and device buffers (reused between steps: once a batch
/// size has been seen, a step of that size allocates nothing on the device).
struct DeviceContext {
  DeviceBuffer<std::int64_t> indices;  ///< rows: the chosen code per row
  DeviceBuffer<float> residual;        ///< rows x D: x - q
  std::int64_t rows = 0;
  VqLoss loss;
  CodebookMetrics metrics;
  bool training = false;
  bool data_initialized = false;  ///< a k-means init (first or refining) ran in this step
  bool reinitialized = false;     ///< the kmeans_reinit policy fired in this step
  Index replaced = 0;             ///< codes replaced by the replace policy in this step
  bool skipped = false;           ///< non-finite batch skipped (NonFinitePolicy::skip)

  /// The indices, copied to the host (on request).
  IndexVector host_indices(cudaStream_t s = nullptr) const {
    IndexVector h(rows);
    download(h.data(), indices.data(), std::size_t(rows), s);
    check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    return h;
  }
};

class DeviceVectorQuantizer {
 public:
  using State = VectorQuantizer<float, cpu>::State;

  explicit DeviceVectorQuantizer(const VectorQuantizerConfig& cfg, cuda be = {})
      : cfg_((cfg.validate(), cfg)), be_(std::move(be)), rng_(cfg.seed),
        bank_(cfg.bank_rows(), cfg.dim) {
    VQKIT_REQUIRE(cfg_.gradient_estimator == GradientEstimator::straight_through,
                  "gpu::DeviceVectorQuantizer", "gradient_estimator must be straight_through (the "
                  "rotation trick runs on the host layers only), got ", to_string(cfg_.gradient_estimator));
    be_.activate();
    if (cfg_.search_precision == Precision::bf16_rerank) be_.precision = Precision::bf16_rerank;
    const Index K = cfg_.codebook_size, D = cfg_.dim;
    codes_.resize(std::size_t(K * D));
    grad_.resize(std::size_t(K * D));
    cluster_size_.resize(std::size_t(K));
    embed_sum_.resize(std::size_t(K * D));
    since_.resize(std::size_t(K));
    used_.resize(std::size_t(K));
    counts_.resize(std::size_t(K));
    sums_.resize(std::size_t(K * D));
    scalars_.resize(4);
    // The host layer's construction, then one upload.
    const RowMatrix<float> codes = normalized_init<float>(K, D, rng_);
    EmaState<float> ema;
    ema_reset<float>(ema, codes, Vector<float>::Ones(K));
    upload_host_state(codes, ema);
    check(cudaMemsetAsync(grad_.data(), 0, grad_.size() * sizeof(float), be_.stream), "cudaMemsetAsync");
    reset_usage_all();
    data_initialized_ = cfg_.init == InitMethod::normalized;
    init_refined_ = cfg_.init == InitMethod::normalized || !cfg_.refine_init;
    be_.sync();
  }

  const VectorQuantizerConfig& config() const { return cfg_; }
  const cuda& backend() const { return be_; }
  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  /// x: N x D on the device; writes quantized (N x D, device). See the file comment.
  void forward(const float* x, std::int64_t N, float* quantized, DeviceContext& ctx) {
    constexpr const char* where = "DeviceVectorQuantizer::forward";
    const Index K = cfg_.codebook_size, D = cfg_.dim;
    require_rows(where, "N", N);
    VQKIT_REQUIRE(N == 0 || (x != nullptr && quantized != nullptr), where, "null device pointer for N=", N);
    be_.activate();
    const bool finite = N == 0 || all_finite(x, N, where);  // throws under NonFinitePolicy::reject
    ctx.loss = VqLoss{};
    ctx.metrics = CodebookMetrics{};
    ctx.training = training_;
    ctx.data_initialized = ctx.reinitialized = ctx.skipped = false;
    ctx.replaced = 0;
    if (!finite) {  // NonFinitePolicy::skip
      if (training_) ++skipped_;
      ctx.skipped = true;
      ctx.rows = 0;
      return;
    }
    ctx.rows = N;
    if (N == 0) return;
    if (training_) {
      bank_.push(be_, x, N, rng_);
      const bool first = !data_initialized_ && bank_.size() >= cfg_.init_rows();
      const bool refine = data_initialized_ && !init_refined_ && bank_.full();
      if (first || refine) {
        reinit_from_bank(N);
        data_initialized_ = true;
        init_refined_ = bank_.full() || !cfg_.refine_init;
        ctx.data_initialized = true;
      }
    }
    std::int64_t* idx = detail::ensure(ctx.indices, std::size_t(N));
    float* res = detail::ensure(ctx.residual, std::size_t(N * D));
    const std::size_t wb = nearest_code_workspace_bytes(N, K, D, be_.precision);
    gpu::nearest_code(be_, codes_.data(), K, x, N, D, cfg_.metric, idx, nullptr, nullptr,
                      detail::ensure(search_ws_, wb), wb);
    gather_residual(be_, x, codes_.data(), idx, N, D, quantized, res);
    ctx.loss = gpu::vq_loss(be_, res, N, D, cfg_.loss, detail::ensure(loss_ws_, vq_loss_workspace_bytes()),
                            vq_loss_workspace_bytes());
    if (training_ && cfg_.update == CodebookUpdate::ema) {
      const std::size_t sb = cluster_stats_workspace_bytes(N, K, true);
      cluster_stats(be_, x, idx, N, K, D, counts_.data(), sums_.data(), detail::ensure(stats_ws_, sb), sb);
      EmaOptions ema = cfg_.ema;
      ema.decay = cfg_.ema.decay_at(step_);
      ema_update(be_, cluster_size_.data(), embed_sum_.data(), counts_.data(), sums_.data(), K, D, ema,
                 codes_.data(), detail::ensure(ema_ws_, ema_update_workspace_bytes()),
                 ema_update_workspace_bytes());
    } else {
      const std::size_t sb = cluster_stats_workspace_bytes(N, K, false);
      cluster_counts(be_, idx, N, K, counts_.data(), detail::ensure(stats_ws_, sb), sb);
      if (training_)  // gradient mode still tracks EMA cluster sizes (replace policy)
        ema_sizes(be_, cluster_size_.data(), counts_.data(), K, cfg_.ema.decay_at(step_));
    }
    if (training_) {
      usage_record(be_, counts_.data(), K, since_.data(), used_.data());
      ++step_;
    }
    host_counts_.resize(K);
    download(host_counts_.data(), counts_.data(), std::size_t(K), be_.stream);
    const auto dead_window = usage_counts(be_, since_.data(), used_.data(), K, cfg_.dead.dead_after,
                                          cfg_.usage_window, scalars_.data());  // synchronises
    ctx.metrics = batch_metrics(host_counts_);
    ctx.metrics.window = cfg_.usage_window;
    ctx.metrics.window_usage = dead_window.second;
    ctx.metrics.dead = dead_window.first;
    ctx.metrics.overflow_rows = bank_.overflow_rows();
    ctx.metrics.ema_decay = cfg_.ema.decay_at(training_ ? step_ - 1 : step_);
    ctx.metrics.steps_since_init = step_ - last_init_step_;  // (lag_fraction: host layer only)
    if (training_) apply_dead_code_policy(ctx, N);
  }

  /// dq: N x D on the device (nullptr: no upstream gradient); writes dx (N x D,
  /// device) when non-null; in gradient mode accumulates the codebook gradient.
  void backward(const DeviceContext& ctx, const float* dq, float* dx) {
    if (ctx.skipped || ctx.rows == 0) {
      if (dx && ctx.rows > 0)
        check(cudaMemsetAsync(dx, 0, std::size_t(ctx.rows * cfg_.dim) * sizeof(float), be_.stream), "memset");
      return;
    }
    be_.activate();
    const Index N = ctx.rows, K = cfg_.codebook_size, D = cfg_.dim;
    if (cfg_.update == CodebookUpdate::gradient) {
      const std::size_t sb = cluster_stats_workspace_bytes(N, K, true);
      vq_codebook_grad(be_, ctx.residual.data(), ctx.indices.data(), N, K, D, cfg_.loss, grad_.data(),
                       detail::ensure(stats_ws_, sb), sb);
    }
    if (dx) vq_input_grad(be_, ctx.residual.data(), dq, N, D, cfg_.loss, dx);
  }

  void zero_grad() {
    check(cudaMemsetAsync(grad_.data(), 0, grad_.size() * sizeof(float), be_.stream), "cudaMemsetAsync");
  }

  // Device views (K x D / K, row-major, on be.stream): for the caller's own kernels or optimiser.
  float* device_codebook() { return codes_.data(); }
  float* device_codebook_grad() { return grad_.data(); }
  const float* device_cluster_size() const { return cluster_size_.data(); }

  // Host copies, on request.
  RowMatrix<float> codebook() const { return download_matrix(codes_, cfg_.codebook_size, cfg_.dim); }
  RowMatrix<float> codebook_grad() const { return download_matrix(grad_, cfg_.codebook_size, cfg_.dim); }
  EmaState<float> ema_state() const {
    EmaState<float> e;
    e.cluster_size = download_matrix(cluster_size_, cfg_.codebook_size, 1).col(0);
    e.embed_sum = download_matrix(embed_sum_, cfg_.codebook_size, cfg_.dim);
    return e;
  }
  std::int64_t step() const { return step_; }
  std::int64_t reinit_count() const { return reinits_; }
  std::int64_t replaced_count() const { return replaced_; }
  std::int64_t skipped_batches() const { return skipped_; }
  bool data_initialized() const { return data_initialized_; }
  std::int64_t last_init_step() const { return last_init_step_; }
  const Rng& rng() const { return rng_; }

  /// The complete state, in the host layer's checkpoint format (copies all).
  State state() const {
    const Index K = cfg_.codebook_size, D = cfg_.dim;
    State s;
    s.codes = codebook();
    s.grad = codebook_grad();
    s.ema = ema_state();
    s.steps_since_used.resize(K);
    s.used_since_reset.resize(K);
    download(s.steps_since_used.data(), since_.data(), std::size_t(K), be_.stream);
    download(s.used_since_reset.data(), used_.data(), std::size_t(K), be_.stream);
    s.bank.resize(bank_.capacity(), D);
    download(s.bank.data(), bank_.data(), std::size_t(bank_.capacity() * D), be_.stream);
    be_.sync();
    s.bank_size = bank_.size();
    s.bank_head = bank_.head();
    s.bank_overflow = bank_.overflow_rows();
    s.rng = rng_.state();
    s.step = step_;
    s.reinits = reinits_;
    s.replaced = replaced_;
    s.skipped = skipped_;
    s.data_initialized = data_initialized_;
    s.init_refined = init_refined_;
    s.training = training_;
    s.last_init_step = last_init_step_;
    return s;
  }

  /// Restores a state (this layer's or a host layer's with the same config).
  /// Validated by the host layer's own checks first: a bad state throws
  /// their message and leaves this quantizer untouched.
  void set_state(State s) {
    VectorQuantizer<float, cpu> probe(cfg_);
    probe.set_state(std::move(s));  // throws on any inconsistency
    State v = probe.state();
    be_.activate();
    upload_host_state(v.codes, v.ema);
    upload(grad_.data(), v.grad.data(), grad_.size(), be_.stream);
    upload(since_.data(), v.steps_since_used.data(), since_.size(), be_.stream);
    upload(used_.data(), v.used_since_reset.data(), used_.size(), be_.stream);
    bank_.restore(be_, v.bank.data(), v.bank_size, v.bank_head, v.bank_overflow);
    be_.sync();
    rng_.set_state(v.rng);
    step_ = v.step;
    reinits_ = v.reinits;
    replaced_ = v.replaced;
    skipped_ = v.skipped;
    data_initialized_ = v.data_initialized;
    init_refined_ = v.init_refined;
    training_ = v.training;
    last_init_step_ = v.last_init_step;
  }

 private:
  /// Finiteness of x (one device scan, 8 bytes back). reject: throws naming
  /// the row and column; skip: returns false.
  bool all_finite(const float* x, std::int64_t N, const char* where) {
    const std::size_t n = std::size_t(N) * std::size_t(cfg_.dim);
    auto* first = reinterpret_cast<unsigned long long*>(scalars_.data());
    const unsigned long long none = n;
    upload(first, &none, 1, be_.stream);
    detail::first_non_finite_kernel<<<std::min(grid_1d(n), 4096u), 256, 0, be_.stream>>>(x, n, first);
    check_launch("first_non_finite_kernel");
    unsigned long long f = 0;
    download(&f, first, 1, be_.stream);
    be_.sync();
    if (f == n) return true;
    if (cfg_.non_finite == NonFinitePolicy::skip) return false;
    float v = 0;
    download(&v, x + f, 1, be_.stream);
    be_.sync();
    VQKIT_REQUIRE(false, where, "x holds a non-finite value (", v, ") at row ", Index(f / cfg_.dim), ", column ",
                  Index(f % cfg_.dim));
    return false;
  }

  void upload_host_state(const RowMatrix<float>& codes, const EmaState<float>& ema) {
    upload(codes_.data(), codes.data(), codes_.size(), be_.stream);
    upload(cluster_size_.data(), ema.cluster_size.data(), cluster_size_.size(), be_.stream);
    upload(embed_sum_.data(), ema.embed_sum.data(), embed_sum_.size(), be_.stream);
  }

  void reset_usage_all() {
    check(cudaMemsetAsync(since_.data(), 0, since_.size() * sizeof(std::int64_t), be_.stream), "cudaMemsetAsync");
    check(cudaMemsetAsync(used_.data(), 0, used_.size() * sizeof(std::int64_t), be_.stream), "cudaMemsetAsync");
  }

  RowMatrix<float> download_matrix(const DeviceBuffer<float>& b, Index rows, Index cols) const {
    RowMatrix<float> m(rows, cols);
    download(m.data(), b.data(), std::size_t(rows * cols), be_.stream);
    be_.sync();
    return m;
  }

  /// k-means over the bank (the host layer's reinit_from_bank): the bank
  /// comes to the host for the CPU's seeding, Lloyd runs on the GPU.
  void reinit_from_bank(Index rows_per_step) {
    const Index K = cfg_.codebook_size, D = cfg_.dim, n = bank_.size();
    RowMatrix<float> rows(n, D);
    download(rows.data(), bank_.data(), std::size_t(n * D), be_.stream);
    be_.sync();
    KMeansOptions ko;
    ko.k = K;
    ko.iterations = cfg_.kmeans_iterations;
    ko.min_cluster_fraction = cfg_.kmeans_min_cluster_fraction;
    auto km = kmeans<float>(be_, rows, ko, rng_);
    const float scale = float(double(rows_per_step) / double(n));
    EmaState<float> ema;
    ema_reset<float>(ema, km.centroids, km.counts * scale);
    upload_host_state(km.centroids, ema);
    last_init_step_ = step_;
    reset_usage_all();
    be_.sync();  // the host matrices are temporaries
  }

  /// The host layer's replacement_rows: the newest bank rows replacements draw from.
  std::int64_t replacement_rows(Index rows_per_step) const {
    const std::int64_t size = bank_.size();
    if (cfg_.dead.replace_from_steps == 0) return size;
    const double rows = double(rows_per_step) * double(cfg_.dead.replace_from_steps);
    return rows >= double(size) ? size : std::max<std::int64_t>(1, std::int64_t(rows));
  }

  void apply_dead_code_policy(DeviceContext& ctx, Index rows_per_step) {
    const Index K = cfg_.codebook_size, D = cfg_.dim;
    // The host layer's apply_dead_code_policy, decision for decision.
    if (cfg_.dead.policy == DeadCodePolicy::kmeans_reinit) {
      const bool due = kmeans_reinit_due(cfg_.dead, step_, ctx.metrics.dead, K) ||
                       kmeans_health_reinit_due(cfg_.dead, ctx.metrics.window_usage, cfg_.usage_window,
                                                double(rows_per_step) * double(cfg_.usage_window),
                                                step_ - last_init_step_, K);
      if (data_initialized_ && bank_.size() >= K && due) {
        reinit_from_bank(rows_per_step);
        ++reinits_;
        ctx.reinitialized = true;
      }
    }
    const bool by_size = cfg_.dead.policy == DeadCodePolicy::replace;
    const std::int64_t idle_steps = cfg_.dead.replace_after_steps(K, rows_per_step, cfg_.usage_window);
    const bool by_idle = idle_steps > 0 && cfg_.dead.policy != DeadCodePolicy::none;
    if ((by_size || by_idle) && data_initialized_ && !ctx.reinitialized) {
      Vector<float> cs(K);
      download(cs.data(), cluster_size_.data(), std::size_t(K), be_.stream);
      IndexVector since;
      if (by_idle) {
        since.resize(K);
        download(since.data(), since_.data(), std::size_t(K), be_.stream);
      }
      be_.sync();
      const float mean = cs.sum() / float(K);
      const float threshold = by_size ? float(cfg_.dead.replace_threshold) * mean : -1.0f;
      const std::int64_t from = replacement_rows(rows_per_step);
      std::vector<int> ks, rows;
      for (Index k = 0; k < K; ++k) {
        const bool idle = by_idle && since[k] >= idle_steps;
        if (cs[k] >= threshold && !idle) continue;
        ks.push_back(int(k));
        // the host layer's draw, in its order
        rows.push_back(int(from == bank_.size() ? bank_.random_row_index(rng_)
                                                : bank_.random_recent_row_index(rng_, from)));
      }
      const Index n = Index(ks.size());
      if (n > 0) {
        int* dks = detail::ensure(replace_ks_, std::size_t(2 * n));
        int* drows = dks + n;
        upload(dks, ks.data(), ks.size(), be_.stream);
        upload(drows, rows.data(), rows.size(), be_.stream);
        float* vals = detail::ensure(replace_rows_, std::size_t(n * D));
        gpu::detail::gather_rows_kernel<<<grid_1d(std::size_t(n) * std::size_t(D)), 256, 0, be_.stream>>>(
            bank_.data(), drows, int(n), int(D), vals);
        check_launch("gather_rows_kernel");
        ema_reset_codes(be_, dks, vals, n, D, mean, codes_.data(), cluster_size_.data(), embed_sum_.data());
        detail::usage_reset_kernel<<<blocks(n, 256), 256, 0, be_.stream>>>(dks, int(n), since_.data(),
                                                                                     used_.data());
        check_launch("usage_reset_kernel");
        be_.sync();  // ks and rows are host temporaries
      }
      ctx.replaced = n;
      replaced_ += n;
    }
  }

  VectorQuantizerConfig cfg_;
  cuda be_;
  Rng rng_;
  DeviceMemoryBank bank_;
  DeviceBuffer<float> codes_, grad_, cluster_size_, embed_sum_, counts_, sums_, replace_rows_;
  DeviceBuffer<std::int64_t> since_, used_, scalars_;
  DeviceBuffer<int> replace_ks_;
  DeviceBuffer<unsigned char> search_ws_, stats_ws_, loss_ws_, ema_ws_;
  Vector<float> host_counts_;
  std::int64_t step_ = 0, reinits_ = 0, replaced_ = 0, skipped_ = 0;
  std::int64_t last_init_step_ = 0;
  bool data_initialized_ = false, init_refined_ = false, training_ = true;
};

}  // namespace gpu
}  // namespace vqkit
