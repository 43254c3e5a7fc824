// examples/quantizer_family.hpp - vq_train's runs of every quantizer kind
// (--quantizer vq | rvq | grouped | fsq | lfq), on the raw vectors or as a
// small autoencoder (--autoencoder): Linear(D -> d) -> quantizer ->
// Linear(d -> D), trained with AdamW on the mean squared reconstruction
// error plus the quantizer's own loss. FSQ and LFQ quantize onto a fixed
// grid, so they need the autoencoder to map the data onto it.
//
// Every kind sits behind one small interface (Quantizer below), adapted from
// the library's layers; the loop, the metrics and the report are shared.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <vqkit/layers/linear.hpp>
#include <vqkit/optim/adamw.hpp>
#include <vqkit/quantizer.hpp>

namespace vqkit::family {

using Matrix = RowMatrix<float>;

/// What a step reports: the quantizer's loss and its worst level's / head's usage.
struct StepStats {
  double loss = 0;          ///< the quantizer's own loss (VQ terms, LFQ entropy + commitment)
  double perplexity = 0;    ///< batch perplexity (the lowest over levels / heads)
  Index window_usage = 0;   ///< codes used in the window (the lowest over levels / heads)
  Index codes = 0;          ///< codes of that level / head (FSQ, LFQ: the implicit codebook)
};

class Quantizer {
 public:
  virtual ~Quantizer() = default;
  virtual Index dim() const = 0;
  virtual std::string describe() const = 0;
  virtual void train(bool on) = 0;
  virtual StepStats forward(const Matrix& z, Matrix& q) = 0;
  /// dq -> dz (straight through plus the quantizer's loss gradient).
  virtual void backward(const Matrix& dq, Matrix& dz) = 0;
};

inline void fill(StepStats& s, const CodebookMetrics& m, Index K, bool first) {
  if (first || m.window_usage < s.window_usage) {
    s.window_usage = m.window_usage;
    s.codes = K;
  }
  s.perplexity = first ? m.perplexity : std::min(s.perplexity, m.perplexity);
}

// What differs between the kinds: a description and the step's stats.
inline std::string describe(const VectorQuantizer<float>& q) {
  return "vq: K=" + std::to_string(q.codebook_size()) + ", dim " + std::to_string(q.dim());
}
inline std::string describe(const ResidualVQ<float>& q) {
  return "rvq: " + std::to_string(q.num_levels()) + " levels x K=" +
         std::to_string(q.config().level.codebook_size) + ", dim " + std::to_string(q.dim());
}
inline std::string describe(const GroupedVQ<float>& q) {
  return "grouped: " + std::to_string(q.groups()) + (q.config().shared ? " heads sharing" : " heads x") +
         " K=" + std::to_string(q.config().head.codebook_size) + ", dim " + std::to_string(q.dim());
}
inline std::string describe(const FSQ<float>& q) {
  std::string l;
  for (int v : q.config().levels) {
    if (!l.empty()) l += ',';
    l += std::to_string(v);
  }
  return "fsq: levels " + l + " (" + std::to_string(q.codebook_size()) + " codes)";
}
inline std::string describe(const LFQ<float>& q) {
  return "lfq: " + std::to_string(q.dim()) + " bits (" + std::to_string(q.codebook_size()) + " codes)";
}

inline StepStats stats(const VectorQuantizer<float>& q, const VectorQuantizer<float>::Context& c) {
  StepStats s;
  s.loss = c.loss.total;
  fill(s, c.metrics, q.codebook_size(), true);
  return s;
}
inline StepStats stats(const ResidualVQ<float>& q, const ResidualVQ<float>::Context& c) {
  StepStats s;
  s.loss = c.loss;
  for (std::size_t l = 0; l < c.level.size(); ++l) fill(s, c.level[l].metrics, q.config().level.codebook_size, l == 0);
  return s;
}
inline StepStats stats(const GroupedVQ<float>& q, const GroupedVQ<float>::Context& c) {
  StepStats s;
  s.loss = c.loss;
  for (std::size_t g = 0; g < c.head.size(); ++g) fill(s, c.head[g].metrics, q.config().head.codebook_size, g == 0);
  return s;
}
inline StepStats stats(const FSQ<float>& q, const FSQ<float>::Context& c) {
  StepStats s;
  fill(s, c.metrics, q.codebook_size(), true);
  return s;
}
inline StepStats stats(const LFQ<float>& q, const LFQ<float>::Context& c) {
  StepStats s;
  s.loss = c.loss.total;
  fill(s, c.metrics, q.codebook_size(), true);
  return s;
}

/// Any of the library's quantizers behind the Quantizer interface.
template <class Q>
class Adapter final : public Quantizer {
 public:
  template <class... Args>
  explicit Adapter(Args&&... args) : q_(std::forward<Args>(args)...) {}
  Index dim() const override { return q_.dim(); }
  std::string describe() const override { return family::describe(q_); }
  void train(bool on) override { q_.train(on); }
  StepStats forward(const Matrix& z, Matrix& q) override {
    q_.forward(z, q, ctx_);
    return stats(q_, ctx_);
  }
  void backward(const Matrix& dq, Matrix& dz) override { q_.backward(ctx_, dq, &dz); }

 private:
  Q q_;
  typename Q::Context ctx_;
};

struct RunOptions {
  Index batch = 4096;
  std::int64_t steps = 300, log_every = 10;
  bool autoencoder = false;
  double lr = 1e-3;  ///< AdamW, autoencoder only
  std::uint64_t seed = 0, batch_seed = 0;
  int threads = 0;
  std::string csv;
};

/// Trains q on X (through the autoencoder if asked), prints a line every
/// log_every steps and a summary; returns 0.
inline int run(Quantizer& q, const Matrix& X, const RunOptions& o) {
  const Index n = X.rows(), D = X.cols(), d = q.dim(), N = o.batch;
  if (!o.autoencoder && d != D)
    throw std::runtime_error("the quantizer's dimension " + std::to_string(d) + " is not the data's " +
                             std::to_string(D) + ": add --autoencoder or change its size");
  const cpu be{o.threads};
  Rng init(o.seed ^ 0x9e3779b97f4a7c15ULL);
  Linear<float> enc(D, d, init, true, be), dec(d, D, init, true, be);
  ParameterList<float> params = enc.parameters("enc.");
  for (auto& p : dec.parameters("dec.")) params.push_back(p);
  AdamWOptions ao;
  ao.lr = o.lr;
  ao.weight_decay = 0;
  AdamW<float> opt(params, ao, be);

  std::printf("  %s%s\n", q.describe().c_str(),
              o.autoencoder ? (", autoencoder " + std::to_string(D) + " -> " + std::to_string(d) +
                               " -> " + std::to_string(D) + ", AdamW lr " + std::to_string(o.lr))
                                  .c_str()
                            : ", on the raw vectors");
  std::ofstream csv;
  if (!o.csv.empty()) {
    csv.open(o.csv, std::ios::trunc);
    if (!csv.is_open()) throw std::runtime_error("--csv: cannot create '" + o.csv + "'");
    csv << "step,recon_mse,quantizer_loss,perplexity,window_usage,codes\n";
  }
  std::printf("%6s %12s %12s %10s %12s\n", "step", "recon MSE", "q loss", "perplexity", "window");
  Rng draw(o.batch_seed);
  Matrix x(N, D), z, qz, y, dy, dq, dz;
  Linear<float>::Context ce, cd;
  const auto t0 = std::chrono::steady_clock::now();
  Index last_window = 0, last_codes = 0;
  q.train(true);
  for (std::int64_t step = 1; step <= o.steps; ++step) {
    for (Index i = 0; i < N; ++i) x.row(i) = X.row(Index(draw.below(std::uint64_t(n))));
    const Matrix* zin = &x;
    if (o.autoencoder) {
      enc.forward(x, z, ce);
      zin = &z;
    }
    const StepStats s = q.forward(*zin, qz);
    if (o.autoencoder) dec.forward(qz, y, cd);
    const Matrix& recon = o.autoencoder ? y : qz;
    const double mse = (recon - x).cast<double>().squaredNorm() / double(N * D);
    if (o.autoencoder) {
      dy = (recon - x) * float(2.0 / double(N * D));
      dec.backward(cd, dy, &dq);
      q.backward(dq, dz);
      enc.backward(ce, dz, nullptr);
      opt.step();
      opt.zero_grad();
    }
    last_window = s.window_usage;
    last_codes = s.codes;
    if (csv.is_open())
      csv << step << ',' << mse << ',' << s.loss << ',' << s.perplexity << ',' << s.window_usage << ','
          << s.codes << '\n';
    if (step == 1 || step % o.log_every == 0 || step == o.steps)
      std::printf("%6lld %12.6g %12.6g %10.1f %6lld/%-6lld\n", static_cast<long long>(step), mse, s.loss,
                  s.perplexity, static_cast<long long>(s.window_usage), static_cast<long long>(s.codes));
  }
  const double train_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  // The whole set in eval mode: mean squared error per vector (summed over dims).
  q.train(false);
  Matrix all_z, all_q, all_y;
  if (o.autoencoder) enc.forward(X, all_z);
  q.forward(o.autoencoder ? all_z : X, all_q);
  if (o.autoencoder) dec.forward(all_q, all_y);
  const double per_vector = ((o.autoencoder ? all_y : all_q) - X).cast<double>().squaredNorm() / double(n);
  std::printf("\nsummary: %lld steps in %.2f s; window usage at the last step %lld/%lld (%.1f%%); "
              "reconstruction error over all %lld rows (eval): %.5g per vector (%.5g of the data's "
              "mean squared norm)\n",
              static_cast<long long>(o.steps), train_s, static_cast<long long>(last_window),
              static_cast<long long>(last_codes), 100.0 * double(last_window) / double(std::max<Index>(1, last_codes)),
              static_cast<long long>(n), per_vector, per_vector / (X.cast<double>().squaredNorm() / double(n)));
  return 0;
}

}  // namespace vqkit::family
