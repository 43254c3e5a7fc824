// vqkit/layers/grouped_vq.hpp - grouped (multi-head) vector quantization.
//
// The D dimensions of a row are split into G heads of d = D / G consecutive
// dimensions, each quantized on its own:
//   separate codebooks (shared = false): G VectorQuantizers, head g's config
//     is `head` with seed + g - a product quantizer (faiss::ProductQuantizer),
//     K^G distinct outputs from G K codes;
//   one shared codebook (shared = true): one VectorQuantizer over the N G
//     head vectors, i.e. the row-major N x D batch read as (N G) x d, so its
//     statistics, bank and k-means see every head.
// Gradients are each head's, side by side. Indices are N x G (-1 for padded
// rows). Grouped residual quantization is the composition: a ResidualVQ per
// head is a GroupedVQ of ResidualVQs (not wrapped here).
#pragma once

#include <cstdint>
#include <vector>

#include "vqkit/core/row_mask.hpp"
#include "vqkit/layers/quantizer_surface.hpp"
#include "vqkit/layers/vector_quantizer.hpp"

namespace vqkit {

struct GroupedVQConfig {
  Index groups = 2;             ///< G
  bool shared = false;          ///< one codebook for every head
  VectorQuantizerConfig head;   ///< a head's quantizer (head.dim = d = D / G)

  Index dim() const { return groups * head.dim; }
  void validate() const {
    VQKIT_REQUIRE(groups >= 1, "GroupedVQConfig", "groups must be >= 1, got ", groups);
    head.validate();
  }
};

template <class T, class Backend = cpu>
class GroupedVQ : public detail::QuantizerSurface<GroupedVQ<T, Backend>, T> {
 public:
  static constexpr const char* name = "GroupedVQ::forward";
  using Head = VectorQuantizer<T, Backend>;
  struct Context {
    std::vector<typename Head::Context> head;  ///< G contexts, or 1 when shared
    IndexMatrix indices;                        ///< N x G
    double loss = 0;                            ///< sum of the heads' loss.total (shared: its one)
  };

  explicit GroupedVQ(const GroupedVQConfig& cfg, Backend backend = {}) : cfg_((cfg.validate(), cfg)) {
    const Index n = cfg.shared ? 1 : cfg.groups;
    for (Index g = 0; g < n; ++g) {
      VectorQuantizerConfig c = cfg.head;
      c.seed = cfg.head.seed + std::uint64_t(g);
      heads_.emplace_back(c, backend);
    }
  }

  const GroupedVQConfig& config() const { return cfg_; }
  Index dim() const { return cfg_.dim(); }
  Index groups() const { return cfg_.groups; }
  /// Head g's quantizer (shared: the one quantizer for every g).
  Head& head(Index g) { return heads_.at(cfg_.shared ? 0 : std::size_t(g)); }
  const Head& head(Index g) const { return heads_.at(cfg_.shared ? 0 : std::size_t(g)); }
  void train(bool on = true) {
    for (auto& h : heads_) h.train(on);
  }
  void eval() { train(false); }

  // forward(x, out, ctx), forward(x, mask, out, ctx), forward(x, out): see
  // quantizer_surface.hpp.

  void backward(const Context& ctx, ConstMatrixRef<T> dout, RowMatrix<T>* dx) {
    const Index N = ctx.indices.rows(), d = cfg_.head.dim, G = groups();
    VQKIT_REQUIRE(dout.rows() == 0 || (dout.rows() == N && dout.cols() == dim()),
                  "GroupedVQ::backward", "dout is ", dout.rows(), "x", dout.cols(), ", expected ",
                  N, "x", dim());
    if (cfg_.shared) {
      // (N x D row-major) == ((N G) x d row-major): the same memory.
      const RowMatrix<T> none(0, d);
      heads_[0].backward(ctx.head[0], dout.rows() ? ConstMatrixRef<T>(as_heads(dout)) : ConstMatrixRef<T>(none),
                         dx ? &hgrad_ : nullptr);
      if (dx) *dx = Eigen::Map<const RowMatrix<T>>(hgrad_.data(), N, dim());
      return;
    }
    if (dx) dx->resize(N, dim());
    for (Index g = 0; g < G; ++g) {
      hin_ = dout.middleCols(g * d, d);
      heads_[std::size_t(g)].backward(ctx.head[std::size_t(g)], hin_, dx ? &hgrad_ : nullptr);
      if (dx) dx->middleCols(g * d, d) = hgrad_;
    }
  }

  /// The worst health verdict of the heads.
  static Health health(const Context& ctx) { return detail::worst_health(ctx.head); }

  /// N x G indices (eval semantics, no state change).
  IndexMatrix encode(ConstMatrixRef<T> x) const {
    detail::require_batch(x, dim(), "GroupedVQ::encode", "x");
    const Index N = x.rows(), d = cfg_.head.dim, G = groups();
    IndexMatrix idx(N, G);
    if (cfg_.shared) {
      const IndexVector flat = heads_[0].encode(as_heads(x));
      return Eigen::Map<const IndexMatrix>(flat.data(), N, G);
    }
    detail::require_finite(x, "GroupedVQ::encode", "x");
    for (Index g = 0; g < G; ++g)
      idx.col(g) = heads_[std::size_t(g)].encode(RowMatrix<T>(x.middleCols(g * d, d)));
    return idx;
  }

  RowMatrix<T> decode(const IndexMatrix& indices) const {
    const Index N = indices.rows(), d = cfg_.head.dim, G = groups();
    VQKIT_REQUIRE(indices.cols() == G, "GroupedVQ::decode", "indices have ", indices.cols(),
                  " columns, expected one per head (", G, ")");
    RowMatrix<T> out(N, dim());
    if (cfg_.shared) {
      const IndexVector flat = Eigen::Map<const IndexVector>(indices.data(), N * G);
      const RowMatrix<T> q = heads_[0].decode(flat);
      return Eigen::Map<const RowMatrix<T>>(q.data(), N, dim());
    }
    std::vector<RowMatrix<T>> parts(static_cast<std::size_t>(G));
    for (Index g = 0; g < G; ++g) heads_[std::size_t(g)].decode(IndexVector(indices.col(g)), parts[std::size_t(g)]);
    for (Index g = 0; g < G; ++g) out.middleCols(g * d, d) = parts[std::size_t(g)];
    return out;
  }

  struct State {
    std::vector<typename Head::State> heads;  ///< G, or 1 when shared
  };
  State state() const {
    State s;
    for (const auto& h : heads_) s.heads.push_back(h.state());
    return s;
  }
  /// Restores every head (each checked by its own set_state); a bad head
  /// throws and no head changes.
  void set_state(State s) {
    detail::set_states_all_or_nothing(heads_, std::move(s.heads), "GroupedVQ::set_state");
  }

 private:
  friend class detail::QuantizerSurface<GroupedVQ<T, Backend>, T>;

  /// The batch's head vectors, (N G) x d, over the same memory.
  Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>> as_heads(ConstMatrixRef<T> x) const {
    VQKIT_REQUIRE(x.outerStride() == x.cols() || x.rows() <= 1, "GroupedVQ", "the batch's rows must be contiguous");
    return {x.data(), x.rows() * groups(), cfg_.head.dim, Eigen::OuterStride<>(cfg_.head.dim)};
  }

  void run(ConstMatrixRef<T> x, const RowMask* mask, RowMatrix<T>& out, Context& ctx) {
    constexpr const char* where = "GroupedVQ::forward";
    detail::require_batch(x, dim(), where, "x");
    const Index N = x.rows(), d = cfg_.head.dim, G = groups();
    ctx.indices.resize(N, G);
    ctx.loss = 0;
    if (cfg_.shared) {
      ctx.head.resize(1);
      if (mask) {
        hmask_.resize(N * G);
        for (Index i = 0; i < N; ++i) hmask_.segment(i * G, G).setConstant((*mask)[i]);
        heads_[0].forward(as_heads(x), hmask_, hout_, ctx.head[0]);
      } else {
        heads_[0].forward(as_heads(x), hout_, ctx.head[0]);
      }
      out = Eigen::Map<const RowMatrix<T>>(hout_.data(), N, dim());
      ctx.indices = Eigen::Map<const IndexMatrix>(ctx.head[0].indices.data(), N, G);
      ctx.loss = ctx.head[0].loss.total;
      return;
    }
    // Separate heads: every head's input is checked before any head learns.
    detail::require_finite_rows<T>(x, mask, where, "x");
    ctx.head.resize(std::size_t(G));
    out.resize(N, dim());
    for (Index g = 0; g < G; ++g) {
      hin_ = x.middleCols(g * d, d);
      auto& c = ctx.head[std::size_t(g)];
      if (mask)
        heads_[std::size_t(g)].forward(hin_, *mask, hout_, c);
      else
        heads_[std::size_t(g)].forward(hin_, hout_, c);
      out.middleCols(g * d, d) = hout_;
      ctx.indices.col(g) = c.indices;
      ctx.loss += c.loss.total;
    }
  }

  GroupedVQConfig cfg_;
  std::vector<Head> heads_;
  RowMatrix<T> hin_, hout_, hgrad_;  ///< a head's buffers (reused)
  RowMask hmask_;
};

}  // namespace vqkit
