// vqkit/layers/swin_block.hpp - the Swin Transformer block (pre-norm window
// attention + MLP, each with a residual) and a stage of such blocks that
// alternate regular and shifted windows.
//
// Shapes (B maps of H x W tokens, N = B*H*W, C = dim, hidden = mlp_ratio*C):
//   x, y   (N, C)   rows in (b, y, x) order (MapShape, core/map_shape.hpp)
//
// SwinBlock(dim, heads, window, shift, rng, mlp_ratio = 4), shift 0 or
// window/2 (integer division):
//   forward:   h  = norm1(x)                         LayerNorm(C), eps 1e-5
//              x1 = x + attn(h, shape, s)            WindowAttention(C, heads, window)
//              y  = x1 + fc2(gelu(fc1(norm2(x1))))   fc1: C -> hidden, exact GELU,
//                                                    fc2: hidden -> C
//   s is the block's shift, applied as a cyclic roll of the map by (-s, -s)
//   before the windows are cut and rolled back after (with the shifted-window
//   mask; see window_attention.hpp), EXCEPT when min(H, W) <= window: then
//   the map is a single window along one axis and, as Swin does, the block
//   does not shift (s = 0). The shift used is kept in the Context.
//   backward, given dy = dL/dy:
//              dx1 = dy + norm2'(fc1'(gelu'(fc2'(dy))))
//              dx  = dx1 + norm1'(attn'(dx1))
//   (each ' the sub-layer's backward, which accumulates its parameter
//   gradients); dx is overwritten and may be dy.
//
// SwinStage(dim, depth, heads, window, rng, mlp_ratio = 4): depth blocks in
// sequence, block i shifted by 0 for even i and window/2 for odd i; backward
// runs them in reverse.
//
// Parameters, named as timm's Swin ("blocks.0." prefixes them in a stage):
//   norm1.weight {C}, norm1.bias {C}, attn.relative_position_bias_table
//   {(2w-1)^2, heads}, attn.qkv.weight {3C, C}, attn.qkv.bias {3C},
//   attn.proj.weight {C, C}, attn.proj.bias {C}, norm2.weight {C},
//   norm2.bias {C}, mlp.fc1.weight {hidden, C}, mlp.fc1.bias {hidden},
//   mlp.fc2.weight {C, hidden}, mlp.fc2.bias {C}. Weight decay only on the
//   four Linear weights (not on biases, norms or the bias table).
//
// Threads: the Linear layers and the attention run as in window_attention.hpp
// (fixed row chunks, windows in parallel): results are bit-identical for any
// thread count.
//
// Initialisation: LayerNorms ones/zeros; from the caller's Rng, in order,
// attn (see window_attention.hpp), fc1, fc2 (Linear's PyTorch default).
//
// Every check happens before the first write, so a call that throws
// vqkit::error leaves the block, its gradients and the outputs untouched.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/gelu.hpp"
#include "vqkit/layers/layer_norm.hpp"
#include "vqkit/layers/linear.hpp"
#include "vqkit/core/map_shape.hpp"
#include "vqkit/core/parameter.hpp"
#include "vqkit/layers/window_attention.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class SwinBlock {
  static_assert(std::is_floating_point_v<T>, "SwinBlock<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned).
  struct Context {
    MapShape shape;
    Index shift = 0;  // the shift actually used (0 for maps no larger than a window)
    typename LayerNorm<T, Backend>::Context norm1;
    typename WindowAttention<T, Backend>::Context attn;
    typename LayerNorm<T, Backend>::Context norm2;
    typename Linear<T, Backend>::Context fc1;
    typename Gelu<T, Backend>::Context act;
    typename Linear<T, Backend>::Context fc2;
    RowMatrix<T> out;  // forward's scratch, kept for the next call
  };

  SwinBlock(Index dim, Index heads, Index window, Index shift, Rng& rng, Index mlp_ratio = 4,
            Backend backend = {})
      : backend_(backend),
        shift_(checked_shift(dim, window, shift, mlp_ratio)),
        hidden_(mlp_ratio * dim),
        norm1(dim, T(1e-5), backend),
        attn(dim, heads, window, rng, backend),
        norm2(dim, T(1e-5), backend),
        fc1(dim, mlp_ratio * dim, rng, true, backend),
        act(backend),
        fc2(mlp_ratio * dim, dim, rng, true, backend) {}

  /// The shift this block uses on a map of this shape (0 or window/2).
  Index shift_for(const MapShape& shape) const {
    return std::min(shape.height, shape.width) <= attn.window() ? Index(0) : shift_;
  }

  /// x: (N, C), N = shape.rows(). Resizes and fills y (N, C); y may be x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape) const {
    Context ctx;
    forward(x, y, shape, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused from call to call (no
  /// large allocation once it has held a map of this shape).
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape, Context& ctx) const {
    const char* where = "SwinBlock::forward";
    check_state(where);
    attn.check_input(x.rows(), x.cols(), shape, 0, where);
    ctx.shape = shape;
    ctx.shift = shift_for(shape);
    // Each layer writes straight into the next one's context (its input
    // copy), which then copies nothing.
    norm1.forward(x, ctx.attn.qkv.input, ctx.norm1);  // keeps a copy of x: y may alias x
    RowMatrix<T>& x1 = ctx.norm2.input;  // x + attention
    attn.forward(ctx.attn.qkv.input, x1, shape, ctx.shift, ctx.attn);
    x1 += ctx.norm1.input;
    norm2.forward(x1, ctx.fc1.input, ctx.norm2);
    fc1.forward(ctx.fc1.input, ctx.act.input, ctx.fc1);
    act.forward(ctx.act.input, ctx.fc2.input, ctx.act);
    fc2.forward(ctx.fc2.input, ctx.out, ctx.fc2);
    ctx.out += x1;
    y.swap(ctx.out);  // y's old buffer becomes the next call's scratch
  }

  /// dy: (N, C) as y. Accumulates every parameter gradient; if dx is given,
  /// overwrites it with dL/dx (N, C). dx may be dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const char* where = "SwinBlock::backward";
    check_state(where);
    check_context(ctx, where);
    VQKIT_REQUIRE(dy.rows() == ctx.shape.rows() && dy.cols() == dim(), where, "dy is ", dy.rows(),
                  "x", dy.cols(), ", expected ", ctx.shape.rows(), "x", dim(),
                  " (N from the forward input, dim=", dim(), ")");
    RowMatrix<T>& g = g_;  // dL/dx1 so far (copied: dx may alias dy)
    g = dy;
    RowMatrix<T>& t = t_;
    fc2.backward(ctx.fc2, g, &t);
    act.backward(ctx.act, t, &t);
    fc1.backward(ctx.fc1, t, &t);
    norm2.backward(ctx.norm2, t, &t);
    g += t;  // dL/dx1
    attn.backward(ctx.attn, g, &t);
    norm1.backward(ctx.norm1, t, dx != nullptr ? &t : nullptr);
    if (dx != nullptr) {
      g += t;
      dx->swap(g);  // dx's old buffer becomes the next call's scratch
    }
  }

  /// The names and flags listed in the header comment, prefixed by `prefix`.
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    append_parameters(list, norm1.parameters(), prefix + "norm1.");
    append_parameters(list, attn.parameters(), prefix + "attn.");
    append_parameters(list, norm2.parameters(), prefix + "norm2.");
    append_parameters(list, fc1.parameters(), prefix + "mlp.fc1.");
    append_parameters(list, fc2.parameters(), prefix + "mlp.fc2.");
    return list;
  }

  void zero_grad() {
    norm1.zero_grad();
    attn.zero_grad();
    norm2.zero_grad();
    fc1.zero_grad();
    fc2.zero_grad();
  }

  Index dim() const { return attn.dim(); }
  Index heads() const { return attn.heads(); }
  Index window() const { return attn.window(); }
  Index shift() const { return shift_; }
  Index hidden() const { return hidden_; }
  const Backend& backend() const { return backend_; }

  /// Throws vqkit::error (naming `where`) unless every tensor has the shape
  /// this block was built with. Writes nothing.
  void check_state(const char* where) const {
    attn.check_state(where);
    const Index C = dim();
    check_norm(norm1, "norm1", C, where);
    check_norm(norm2, "norm2", C, where);
    check_linear(fc1, "mlp.fc1", C, hidden_, where);
    check_linear(fc2, "mlp.fc2", hidden_, C, where);
  }

  /// Throws vqkit::error unless ctx is a context this block's forward made.
  void check_context(const Context& ctx, const char* where) const {
    attn.check_input(ctx.shape.rows(), dim(), ctx.shape, 0, where);
    VQKIT_REQUIRE(ctx.shift == shift_for(ctx.shape), where, "context shift=", ctx.shift,
                  ", expected ", shift_for(ctx.shape));
    attn.check_context(ctx.attn, where);
    VQKIT_REQUIRE(ctx.attn.shape == ctx.shape && ctx.attn.shift == ctx.shift, where,
                  "context of attn does not match the block's map shape and shift");
    const Index N = ctx.shape.rows(), C = dim();
    const RowMatrix<T>* ins[] = {&ctx.norm1.input, &ctx.norm2.input, &ctx.fc1.input,
                                 &ctx.act.input, &ctx.fc2.input};
    const char* names[] = {"norm1", "norm2", "mlp.fc1", "mlp.act", "mlp.fc2"};
    const Index cols[] = {C, C, C, hidden_, hidden_};
    for (int i = 0; i < 5; ++i)
      VQKIT_REQUIRE(ins[i]->rows() == N && ins[i]->cols() == cols[i], where, "context input of ",
                    names[i], " is ", ins[i]->rows(), "x", ins[i]->cols(), ", expected ", N, "x",
                    cols[i]);
    for (const auto* nc : {&ctx.norm1, &ctx.norm2})
      VQKIT_REQUIRE(nc->mean.size() == N && nc->rstd.size() == N, where,
                    "context norm statistics have ", nc->mean.size(), "/", nc->rstd.size(),
                    " entries, expected N=", N);
  }

 private:
  static Index checked_shift(Index dim, Index window, Index shift, Index mlp_ratio) {
    VQKIT_REQUIRE(mlp_ratio >= 1, "SwinBlock", "mlp_ratio must be >= 1, got mlp_ratio=",
                  mlp_ratio);
    VQKIT_REQUIRE(dim >= 1 && window >= 1, "SwinBlock", "dim and window must be >= 1, got dim=",
                  dim, " window=", window);
    VQKIT_REQUIRE(shift == 0 || shift == window / 2, "SwinBlock",
                  "shift must be 0 or window/2=", window / 2, ", got shift=", shift);
    return shift;
  }

  static void check_norm(const LayerNorm<T, Backend>& l, const char* name, Index C,
                         const char* where) {
    VQKIT_REQUIRE(l.dim() == C, where, name, " has dim=", l.dim(), ", expected ", C);
    const RowMatrix<T>* t[] = {&l.weight, &l.bias, &l.weight_grad, &l.bias_grad};
    const char* tn[] = {".weight", ".bias", ".weight_grad", ".bias_grad"};
    for (int i = 0; i < 4; ++i)
      VQKIT_REQUIRE(t[i]->rows() == 1 && t[i]->cols() == C, where, name, tn[i], " is ",
                    t[i]->rows(), "x", t[i]->cols(), ", expected 1x", C);
  }

  static void check_linear(const Linear<T, Backend>& l, const char* name, Index in, Index out,
                           const char* where) {
    VQKIT_REQUIRE(l.in_features() == in && l.out_features() == out && l.has_bias(), where, name,
                  " is Linear(", l.in_features(), " -> ", l.out_features(), "), expected Linear(",
                  in, " -> ", out, ") with bias");
    const RowMatrix<T>* t[] = {&l.weight, &l.weight_grad, &l.bias, &l.bias_grad};
    const char* tn[] = {".weight", ".weight_grad", ".bias", ".bias_grad"};
    const Index er[] = {out, out, 1, 1}, ec[] = {in, in, out, out};
    for (int i = 0; i < 4; ++i)
      VQKIT_REQUIRE(t[i]->rows() == er[i] && t[i]->cols() == ec[i], where, name, tn[i], " is ",
                    t[i]->rows(), "x", t[i]->cols(), ", expected ", er[i], "x", ec[i]);
  }

  Backend backend_;
  Index shift_;
  Index hidden_;
  RowMatrix<T> g_, t_;  // backward's scratch, kept for the next call

 public:
  LayerNorm<T, Backend> norm1;
  WindowAttention<T, Backend> attn;
  LayerNorm<T, Backend> norm2;
  Linear<T, Backend> fc1;  // "mlp.fc1"
  Gelu<T, Backend> act;    // no parameters
  Linear<T, Backend> fc2;  // "mlp.fc2"
};

template <class T, class Backend = cpu>
class SwinStage {
 public:
  using Block = SwinBlock<T, Backend>;

  /// What backward needs from forward: one context per block.
  struct Context {
    std::vector<typename Block::Context> blocks;
    RowMatrix<T> out;  // forward's scratch, kept for the next call
  };

  SwinStage(Index dim, Index depth, Index heads, Index window, Rng& rng, Index mlp_ratio = 4,
            Backend backend = {}) {
    VQKIT_REQUIRE(depth >= 1, "SwinStage", "depth must be >= 1, got depth=", depth);
    blocks.reserve(static_cast<std::size_t>(depth));
    for (Index i = 0; i < depth; ++i)
      blocks.emplace_back(dim, heads, window, i % 2 == 0 ? Index(0) : window / 2, rng, mlp_ratio,
                          backend);
  }

  /// x: (N, C), N = shape.rows(). Resizes and fills y (N, C); y may be x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape) const {
    Context ctx;
    forward(x, y, shape, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused from call to call (no
  /// large allocation once it has held a map of this shape).
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape, Context& ctx) const {
    const char* where = "SwinStage::forward";
    for (const auto& b : blocks) b.check_state(where);
    blocks.front().attn.check_input(x.rows(), x.cols(), shape, 0, where);
    ctx.blocks.resize(blocks.size());
    RowMatrix<T>& cur = ctx.out;
    blocks.front().forward(x, cur, shape, ctx.blocks.front());
    for (std::size_t i = 1; i < blocks.size(); ++i) blocks[i].forward(cur, cur, shape, ctx.blocks[i]);
    y.swap(cur);  // y's old buffer becomes the next call's scratch
  }

  /// dy: (N, C) as y. Accumulates every block's gradients; if dx is given,
  /// overwrites it with dL/dx (N, C). dx may be dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const char* where = "SwinStage::backward";
    VQKIT_REQUIRE(ctx.blocks.size() == blocks.size(), where, "context has ", ctx.blocks.size(),
                  " blocks, expected depth=", blocks.size());
    for (std::size_t i = 0; i < blocks.size(); ++i) {
      blocks[i].check_state(where);
      blocks[i].check_context(ctx.blocks[i], where);
      VQKIT_REQUIRE(ctx.blocks[i].shape == ctx.blocks.front().shape, where, "context of block ", i,
                    " has another map shape than block 0");
    }
    const Index N = ctx.blocks.front().shape.rows(), C = blocks.front().dim();
    VQKIT_REQUIRE(dy.rows() == N && dy.cols() == C, where, "dy is ", dy.rows(), "x", dy.cols(),
                  ", expected ", N, "x", C, " (N from the forward input, dim=", C, ")");
    RowMatrix<T>& g = g_;  // a copy: dx may alias dy
    g = dy;
    for (std::size_t i = blocks.size(); i-- > 1;) blocks[i].backward(ctx.blocks[i], g, &g);
    blocks.front().backward(ctx.blocks.front(), g, dx != nullptr ? &g : nullptr);
    if (dx != nullptr) dx->swap(g);  // dx's old buffer becomes the next call's scratch
  }

  /// Every block's parameters, prefixed "blocks.<i>." (then `prefix`).
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    for (std::size_t i = 0; i < blocks.size(); ++i)
      append_parameters(list, blocks[i].parameters(),
                        prefix + "blocks." + std::to_string(i) + ".");
    return list;
  }

  void zero_grad() {
    for (auto& b : blocks) b.zero_grad();
  }

  Index depth() const { return static_cast<Index>(blocks.size()); }

  std::vector<Block> blocks;

 private:
  RowMatrix<T> g_;  // backward's scratch, kept for the next call
};

}  // namespace vqkit
