// vqkit/layers/fsq.hpp - finite scalar quantization (Mentzer et al. 2023).
//
// Each of the D dimensions has its own number of levels L_j >= 2; the
// implicit codebook is their grid, K = prod_j L_j codes, with no learned
// state and no loss. Per dimension, with eps = 1e-3 (the paper's code):
//   half_l = (L - 1)(1 + eps) / 2,  offset = 0.5 for even L else 0,
//   shift  = atanh(offset / half_l)
//   bound(z) = tanh(z + shift) * half_l - offset      (in (-L/2, L/2))
//   q = round(bound(z))   (half to even, as torch.round), an integer in
//       [-floor(L/2), ceil(L/2) - 1]
//   out = q / floor(L/2)                               (in [-1, 1])
// backward (straight-through round): dz = dout * bound'(z) / floor(L/2),
//   bound'(z) = half_l * (1 - tanh^2(z + shift)).
// Index of a row: mixed radix of the digits q_j + floor(L_j/2) with the first
// dimension least significant: index = sum_j digit_j * prod_{m<j} L_m.
//
// Metrics: batch usage/perplexity over the K implicit codes (their counts
// cost O(K) per step: K is capped at 2^24) and, in training, window usage.
// A row mask (core/row_mask.hpp) keeps padded rows out of both; they get
// index -1, a zero output and a zero gradient.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "vqkit/core/check.hpp"
#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/quantizer_surface.hpp"
#include "vqkit/quantizer/implicit_codebook.hpp"

namespace vqkit {

struct FsqConfig {
  std::vector<int> levels = {8, 5, 5, 5};  ///< L_j per dimension (the paper's 2^10 choice: 1000 codes)
  std::int64_t usage_window = 10;          ///< steps, for window usage
  double eps = 1e-3;                       ///< widens the bound so the extreme levels are reachable

  static constexpr Index max_codes = Index(1) << 24;

  Index dim() const { return Index(levels.size()); }
  Index codebook_size() const {
    Index K = 1;
    for (int L : levels) K *= L;
    return K;
  }

  /// The field list (core/config_fields.hpp): validation, checkpoint keys.
  template <class Self, class F>
  static void visit_fields(Self& c, F&& f) {
    detail::visit_field(f, {"", "levels"}, c.levels, FieldRange::unrestricted());  // checked below
    detail::visit_field(f, {"", "usage_window"}, c.usage_window, FieldRange::at_least(1));
    detail::visit_field(f, {"", "eps"}, c.eps, FieldRange::closed_open(0, 1));
  }

  void validate() const {
    constexpr const char* where = "FsqConfig";
    visit_fields(*this, detail::field_checker(where));
    VQKIT_REQUIRE(!levels.empty(), where, "levels must name at least one dimension");
    Index K = 1;
    for (std::size_t j = 0; j < levels.size(); ++j) {
      VQKIT_REQUIRE(levels[j] >= 2, where, "levels[", j, "] must be >= 2, got ", levels[j]);
      VQKIT_REQUIRE(K <= max_codes / levels[j], where, "the levels' product exceeds 2^24 codes at levels[",
                    j, "] = ", levels[j]);
      K *= levels[j];
    }
  }
};

template <class T>
class FSQ : public detail::GridQuantizer<FSQ<T>, T> {
 public:
  static constexpr const char* name = "FSQ::forward";
  static constexpr const char* state_name = "FSQ::set_state";
  static constexpr const char* set_reducer_name = "FSQ::set_reducer";
  struct Context {
    IndexVector indices;   ///< N, -1 for padded rows
    RowMatrix<T> slope;    ///< N x D: d out / d z (the straight-through surrogate)
    CodebookMetrics metrics;
    bool training = false;
  };

  explicit FSQ(FsqConfig cfg)
      : detail::GridQuantizer<FSQ<T>, T>((cfg.validate(), cfg.codebook_size()), cfg.usage_window),
        cfg_(std::move(cfg)) {
    const Index D = cfg_.dim();
    half_l_.resize(D);
    offset_.resize(D);
    shift_.resize(D);
    half_width_.resize(D);
    basis_.resize(D);
    Index b = 1;
    for (Index j = 0; j < D; ++j) {
      const int L = cfg_.levels[std::size_t(j)];
      half_l_[j] = double(L - 1) * (1.0 + cfg_.eps) / 2.0;
      offset_[j] = L % 2 == 0 ? 0.5 : 0.0;
      shift_[j] = std::atanh(offset_[j] / half_l_[j]);
      half_width_[j] = L / 2;
      basis_[j] = b;
      b *= L;
    }
  }

  const FsqConfig& config() const { return cfg_; }
  Index dim() const { return cfg_.dim(); }
  Index codebook_size() const { return cfg_.codebook_size(); }
  // train, eval, is_training, step, usage, state, set_state, set_reducer:
  // GridQuantizer (under a reducer the usage metrics and state count the
  // whole batch; out, slope and indices stay per row).

  // forward(z, out, ctx), forward(z, mask, out, ctx), forward(z, out): see
  // quantizer_surface.hpp; z (N x D) -> out (N x D) on the grid.

  /// dx = dout * slope (straight-through round); padded rows get zero.
  void backward(const Context& ctx, ConstMatrixRef<T> dout, RowMatrix<T>* dx) const {
    VQKIT_REQUIRE(dout.rows() == ctx.slope.rows() && dout.cols() == dim(), "FSQ::backward",
                  "dout is ", dout.rows(), "x", dout.cols(), ", expected ", ctx.slope.rows(), "x",
                  dim());
    if (dx) *dx = dout.cwiseProduct(ctx.slope);
  }

  /// bound(z) / floor(L/2): the output before rounding, whose derivative
  /// backward uses (exposed for tests and analysis).
  RowMatrix<T> bounded(ConstMatrixRef<T> z) const {
    detail::require_batch(z, dim(), "FSQ::bounded", "z");
    RowMatrix<T> b(z.rows(), dim());
    for (Index i = 0; i < z.rows(); ++i)
      for (Index j = 0; j < dim(); ++j)
        b(i, j) = T((std::tanh(double(z(i, j)) + shift_[j]) * half_l_[j] - offset_[j]) /
                    double(half_width_[j]));
    return b;
  }

  /// Grid indices of z's rows (no state change, no metrics).
  IndexVector encode(ConstMatrixRef<T> z) const {
    detail::require_batch(z, dim(), "FSQ::encode", "z");
    detail::require_finite(z, "FSQ::encode", "z");
    IndexVector idx(z.rows());
    for (Index i = 0; i < z.rows(); ++i) {
      std::int64_t index = 0;
      for (Index j = 0; j < dim(); ++j)
        index += (std::int64_t(level(z(i, j), j)) + half_width_[j]) * basis_[j];
      idx[i] = index;
    }
    return idx;
  }

  /// Grid vectors of indices; -1 gives a zero row, any other index outside
  /// [0, K) throws, naming it.
  RowMatrix<T> decode(const IndexVector& indices) const {
    const Index K = codebook_size();
    for (Index i = 0; i < indices.size(); ++i)
      VQKIT_REQUIRE(indices[i] >= -1 && indices[i] < K, "FSQ::decode", "index ", indices[i],
                    " at position ", i, " is outside [0, ", K, ")");
    RowMatrix<T> out = RowMatrix<T>::Zero(indices.size(), dim());
    for (Index i = 0; i < indices.size(); ++i) {
      if (indices[i] < 0) continue;
      std::int64_t rest = indices[i];
      for (Index j = 0; j < dim(); ++j) {
        const int L = cfg_.levels[std::size_t(j)];
        out(i, j) = T(double(rest % L - half_width_[j]) / double(half_width_[j]));
        rest /= L;
      }
    }
    return out;
  }

 private:
  friend class detail::QuantizerSurface<FSQ<T>, T>;
  using detail::GridQuantizer<FSQ<T>, T>::book_;

  /// The integer level of value v in dimension j.
  double level(T v, Index j) const {
    return std::nearbyint(std::tanh(double(v) + shift_[j]) * half_l_[j] - offset_[j]);
  }

  void run(ConstMatrixRef<T> z, const RowMask* mask, RowMatrix<T>& out, Context& ctx) {
    // Padded rows may hold anything; real rows must be finite.
    this->check_input(z, mask, true, "z");
    const Index N = z.rows(), D = dim();
    out.resize(N, D);
    ctx.indices.resize(N);
    ctx.slope.resize(N, D);
    ctx.training = book_.training();
    book_.begin();
    for (Index i = 0; i < N; ++i) {
      if (mask && !(*mask)[i]) {
        out.row(i).setZero();
        ctx.slope.row(i).setZero();
        ctx.indices[i] = -1;
        continue;
      }
      std::int64_t index = 0;
      for (Index j = 0; j < D; ++j) {
        const double t = std::tanh(double(z(i, j)) + shift_[j]);
        const double q = std::nearbyint(t * half_l_[j] - offset_[j]);
        out(i, j) = T(q / double(half_width_[j]));
        ctx.slope(i, j) = T(half_l_[j] * (1.0 - t * t) / double(half_width_[j]));
        index += (std::int64_t(q) + half_width_[j]) * basis_[j];
      }
      ctx.indices[i] = index;
      book_.count(index);
    }
    ctx.metrics = book_.finish(this->step_reducer());
  }

  FsqConfig cfg_;
  std::vector<double> half_l_, offset_, shift_;
  std::vector<std::int64_t> half_width_, basis_;
};

}  // namespace vqkit
