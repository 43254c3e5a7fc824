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
// rows).
//
// Grouped residual quantization is the same class with ResidualVQ heads:
// GroupedResidualVQ<T> = GroupedVQ<T, cpu, ResidualVQ<T>>, configured by a
// GroupedResidualVQConfig whose `head` is a ResidualVQConfig (head.level.dim
// = D / G). Each head is then a Q-level residual stack (shared: one stack
// over the N G head vectors); indices are N x (G Q), head g's levels in
// columns g Q .. g Q + Q - 1. Head g's quantizers are seeded apart: level
// seeds + g Q, dropout seed + g.
//
// Data parallel (set_reducer, docs/distributed.md): every head is attached
// to the reducer; a training step checks every rank's slice together, and
// each head then trains as one process given the whole batch would.
#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/layers/quantizer_surface.hpp"
#include "vqkit/layers/residual_vq.hpp"
#include "vqkit/layers/vector_quantizer.hpp"

namespace vqkit {

namespace detail {
// What GroupedVQ needs to know of its heads' config, for each kind of head.
inline Index head_dim(const VectorQuantizerConfig& c) { return c.dim; }
inline Index head_dim(const ResidualVQConfig& c) { return c.level.dim; }
/// Index columns per head.
inline Index head_codes(const VectorQuantizerConfig&) { return 1; }
inline Index head_codes(const ResidualVQConfig& c) { return c.levels; }
/// Head g's config: its own seeds.
inline VectorQuantizerConfig head_config(VectorQuantizerConfig c, Index g) {
  c.seed += std::uint64_t(g);
  return c;
}
inline ResidualVQConfig head_config(ResidualVQConfig c, Index g) {
  c.level.seed += std::uint64_t(g) * std::uint64_t(c.levels);
  c.seed += std::uint64_t(g);
  return c;
}
inline double total_loss(const VqLoss& l) { return l.total; }
inline double total_loss(double l) { return l; }
}  // namespace detail

template <class HeadConfig>
struct GroupedConfig {
  Index groups = 2;       ///< G
  bool shared = false;    ///< one quantizer for every head
  HeadConfig head;        ///< a head's quantizer (its dim = d = D / G)

  Index dim() const { return groups * detail::head_dim(head); }
  /// The field list of the grouping's own fields (core/config_fields.hpp):
  /// validation, checkpoint keys. `head` has its own, stored with each
  /// head's checkpoint.
  template <class Self, class F>
  static void visit_fields(Self& c, F&& f) {
    detail::visit_field(f, {"", "groups"}, c.groups, FieldRange::at_least(1));
    detail::visit_field(f, {"", "shared"}, c.shared, FieldRange::unrestricted());
  }

  /// Its nested config, by name (the JSON object "head").
  template <class Self, class F>
  static void visit_parts(Self& c, F&& f) {
    f("head", c.head);
  }

  void validate() const {
    visit_fields(*this, detail::field_checker("GroupedVQConfig"));
    head.validate();
  }
};
using GroupedVQConfig = GroupedConfig<VectorQuantizerConfig>;
using GroupedResidualVQConfig = GroupedConfig<ResidualVQConfig>;

template <class T, class Backend = cpu, class HeadQuantizer = VectorQuantizer<T, Backend>>
class GroupedVQ
    : public detail::CompositeQuantizer<GroupedVQ<T, Backend, HeadQuantizer>, T> {
 public:
  static constexpr const char* name = "GroupedVQ::forward";
  static constexpr const char* set_reducer_name = "GroupedVQ::set_reducer";
  using Head = HeadQuantizer;
  using HeadConfig = std::remove_cvref_t<decltype(std::declval<const Head&>().config())>;
  using Config = GroupedConfig<HeadConfig>;
  struct Context {
    std::vector<typename Head::Context> head;  ///< G contexts, or 1 when shared
    IndexMatrix indices;                        ///< N x (G codes per head)
    double loss = 0;                            ///< sum of the heads' losses (shared: its one)
  };

  explicit GroupedVQ(const Config& cfg, Backend backend = {}) : cfg_((cfg.validate(), cfg)) {
    const Index n = cfg.shared ? 1 : cfg.groups;
    heads_.reserve(std::size_t(n));
    for (Index g = 0; g < n; ++g) heads_.emplace_back(detail::head_config(cfg.head, g), backend);
  }

  const Config& config() const { return cfg_; }
  Index dim() const { return cfg_.dim(); }
  Index groups() const { return cfg_.groups; }
  /// Index columns per head (1, or a residual head's levels).
  Index codes_per_head() const { return detail::head_codes(cfg_.head); }
  /// Head g's quantizer (shared: the one quantizer for every g).
  Head& head(Index g) { return heads_.at(cfg_.shared ? 0 : std::size_t(g)); }
  const Head& head(Index g) const { return heads_.at(cfg_.shared ? 0 : std::size_t(g)); }
  void train(bool on = true) {
    for (auto& h : heads_) h.train(on);
  }
  void eval() { train(false); }
  bool is_training() const { return heads_.front().is_training(); }

  // forward(x, out, ctx), forward(x, mask, out, ctx), forward(x, out), and
  // data-parallel training (set_reducer, sync_memory_bank): see
  // quantizer_surface.hpp. Under a reducer each head's slices, in rank
  // order, are the head's whole batch (shared: rank r's N_r G head vectors).

  /// What set_reducer compares across ranks: the config and every head's
  /// fingerprint.
  std::uint64_t fingerprint() const { return this->fingerprint_with(); }

  void backward(const Context& ctx, ConstMatrixRef<T> dout, RowMatrix<T>* dx) {
    const Index N = ctx.indices.rows(), d = head_dim(), G = groups();
    VQKIT_REQUIRE(dout.rows() == 0 || (dout.rows() == N && dout.cols() == dim()),
                  "GroupedVQ::backward", "dout is ", dout.rows(), "x", dout.cols(), ", expected ",
                  N, "x", dim());
    if (cfg_.shared) {
      // (N x D row-major) == ((N G) x d row-major): the same memory.
      const RowMatrix<T> none(0, d);
      heads_[0].backward(ctx.head[0], dout.rows() ? ConstMatrixRef<T>(as_heads(dout, hin_)) : ConstMatrixRef<T>(none),
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
  static Health health(const Context& ctx) {
    if constexpr (std::is_same_v<Head, VectorQuantizer<T, Backend>>) {
      return detail::worst_health(ctx.head);
    } else {
      Health h = Health::healthy;
      for (const auto& c : ctx.head) h = std::max(h, Head::health(c));
      return h;
    }
  }

  /// N x (G codes per head) indices (eval semantics, no state change).
  IndexMatrix encode(ConstMatrixRef<T> x) const {
    detail::require_batch(x, dim(), "GroupedVQ::encode", "x");
    const Index N = x.rows(), d = head_dim(), G = groups(), w = codes_per_head();
    if (cfg_.shared) {
      RowMatrix<T> copy;
      const auto flat = heads_[0].encode(as_heads(x, copy));  // (N G) x w, row-major
      return Eigen::Map<const IndexMatrix>(flat.data(), N, G * w);
    }
    detail::require_finite(x, "GroupedVQ::encode", "x");
    IndexMatrix idx(N, G * w);
    for (Index g = 0; g < G; ++g)
      idx.middleCols(g * w, w) = heads_[std::size_t(g)].encode(RowMatrix<T>(x.middleCols(g * d, d)));
    return idx;
  }

  RowMatrix<T> decode(const IndexMatrix& indices) const {
    const Index N = indices.rows(), d = head_dim(), G = groups(), w = codes_per_head();
    VQKIT_REQUIRE(indices.cols() == G * w, "GroupedVQ::decode", "indices have ", indices.cols(),
                  " columns, expected ", w, " per head (", G * w, ")");
    using HeadIndices = std::remove_cvref_t<decltype(std::declval<const Context&>().head[0].indices)>;
    if (cfg_.shared) {
      const HeadIndices flat = Eigen::Map<const IndexMatrix>(indices.data(), N * G, w);
      const RowMatrix<T> q = heads_[0].decode(flat);
      return Eigen::Map<const RowMatrix<T>>(q.data(), N, dim());
    }
    std::vector<RowMatrix<T>> parts(static_cast<std::size_t>(G));  // every head checks first
    for (Index g = 0; g < G; ++g)
      parts[std::size_t(g)] = heads_[std::size_t(g)].decode(HeadIndices(indices.middleCols(g * w, w)));
    RowMatrix<T> out(N, dim());
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
  friend class detail::QuantizerSurface<GroupedVQ<T, Backend, HeadQuantizer>, T>;
  friend class detail::CompositeQuantizer<GroupedVQ<T, Backend, HeadQuantizer>, T>;
  std::vector<Head>& parts() { return heads_; }
  const std::vector<Head>& parts() const { return heads_; }

  Index head_dim() const { return detail::head_dim(cfg_.head); }

  /// The batch's head vectors, (N G) x d: over x's memory when its rows are
  /// contiguous, else over a copy of x in `copy` (a view of wider rows).
  Eigen::Map<const RowMatrix<T>> as_heads(ConstMatrixRef<T> x, RowMatrix<T>& copy) const {
    const T* data = x.data();
    if (x.outerStride() != x.cols() && x.rows() > 1) {
      copy = x;
      data = copy.data();
    }
    return {data, x.rows() * groups(), head_dim()};
  }

  void run(ConstMatrixRef<T> x, const RowMask* mask, RowMatrix<T>& out, Context& ctx) {
    // Separate heads: every head's input is checked before any head learns
    // (shared: the one head checks the head vectors itself).
    this->check_input(x, mask, !cfg_.shared);
    const Index N = x.rows(), d = head_dim(), G = groups(), w = codes_per_head();
    ctx.indices.resize(N, G * w);
    ctx.loss = 0;
    if (cfg_.shared) {
      ctx.head.resize(1);
      if (mask) {
        hmask_.resize(N * G);
        for (Index i = 0; i < N; ++i) hmask_.segment(i * G, G).setConstant((*mask)[i]);
        heads_[0].forward(as_heads(x, hin_), hmask_, hout_, ctx.head[0]);
      } else {
        heads_[0].forward(as_heads(x, hin_), hout_, ctx.head[0]);
      }
      out = Eigen::Map<const RowMatrix<T>>(hout_.data(), N, dim());
      ctx.indices = Eigen::Map<const IndexMatrix>(ctx.head[0].indices.data(), N, G * w);
      ctx.loss = detail::total_loss(ctx.head[0].loss);
      return;
    }
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
      ctx.indices.middleCols(g * w, w) = c.indices;
      ctx.loss += detail::total_loss(c.loss);
    }
  }

  Config cfg_;
  std::vector<Head> heads_;
  RowMatrix<T> hin_, hout_, hgrad_;  ///< a head's buffers (reused; shared: hin_ holds a strided batch's copy)
  RowMask hmask_;
};

/// Grouped residual quantization: G heads, each a ResidualVQ (see above).
template <class T, class Backend = cpu>
using GroupedResidualVQ = GroupedVQ<T, Backend, ResidualVQ<T, Backend>>;

}  // namespace vqkit
