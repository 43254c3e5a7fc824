// vqkit/layers/window_attention.hpp - windowed multi-head self-attention with
// a learned relative position bias and the shifted-window mask (the attention
// of a Swin Transformer block, "W-MSA" / "SW-MSA").
//
// Shapes (B maps of H x W tokens, N = B*H*W, C = dim, nh = heads,
// d = C / nh, w = window, n = w*w tokens per window, all row-major):
//   x      (N, C)   rows in (b, y, x) order (MapShape, core/map_shape.hpp)
//   y      (N, C)   same order
//   qkv    Linear(C -> 3C), with bias; output columns [q | k | v], each C
//          wide, head h owning columns h*d .. h*d+d-1 of each
//   proj   Linear(C -> C), with bias
//   relative_position_bias_table  ((2w-1)^2, nh), no weight decay
//
// Windows. With a shift s (0 <= s < w) the map is first rolled cyclically by
// (-s, -s): the rolled map is xr[b, Y, X] = x[b, (Y+s) mod H, (X+s) mod W]
// (torch.roll(x, (-s, -s), dims=(1, 2))). The rolled map is cut into
// (H/w) x (W/w) windows per map, ordered (b, wy, wx); token t = i*w + j of a
// window sits at rolled position (wy*w + i, wx*w + j), i the row (y) and j
// the column (x) inside the window. The output is rolled back by (+s, +s),
// so y has the layout of x. qkv and proj act on each token alone, so they
// commute with the roll: the layer gathers each window's tokens straight
// from their original rows and scatters the results back, no copy of the
// rolled map is made.
//
// Relative position bias. For query token t = (i, j) and key token
// u = (k, l) of the same window
//   idx(t, u) = (i - k + w - 1) * (2w - 1) + (j - l + w - 1)   in [0, (2w-1)^2)
//   bias_h[t, u] = relative_position_bias_table[idx(t, u), h]
// (Swin's relative_position_index: the row offset is the major index).
//
// Shifted-window mask (s > 0 only). Each rolled coordinate is given a region:
//   region(Y) = 0 if Y < H - w,  1 if H - w <= Y < H - s,  2 if Y >= H - s
// and likewise region(X) with W; label = 3 * region(Y) + region(X). Tokens
// whose labels differ came from different parts of the unrolled map (they
// only became neighbours by the wrap-around) and may not attend to each
// other: their attention probability is exactly 0. (Swin adds -100 to those
// logits instead; the two agree to within exp(-100) relative.) A token
// always attends at least to itself.
//
// forward, for every window and head h, with Q, K, V (n, d) the head's
// columns of qkv(x) for the window's tokens and scale = 1 / sqrt(d):
//   S = scale * Q K^T + bias_h                 (n, n)
//   P = softmax over each row of S, masked entries 0
//   O = P V                                    (n, d)  -> columns h*d.. of o
//   y = proj(o)                                         o: (N, C)
// backward, given dy = dL/dy (N, C):
//   do = proj.backward(dy)      (accumulates proj's gradients)
//   per window and head, with dO the head's columns of do:
//     dP = dO V^T,  dV = P^T dO
//     dS = P .* (dP - rowsum(P .* dP))          (0 where masked)
//     dQ = scale * dS K,  dK = scale * dS^T Q
//     dtable[idx(t, u), h] += dS[t, u]
//   dx = qkv.backward(d[q|k|v])  (accumulates qkv's gradients)
//   Parameter gradients accumulate (+=); dx is overwritten.
//
// Threads and determinism (Backend::threads, OpenMP). Windows run in
// parallel, each window's small GEMMs single-threaded (core/gemm.hpp, whose
// AVX-512 kernel is chosen at run time, so a consumer built without -march
// gets it); every output and input-gradient row is written by exactly one
// window, and the bias-table gradient is summed over windows in window order
// from per-window partials.
// qkv and proj are Linear layers, whose GEMMs (core/gemm.hpp) give the same
// bits for any thread count. So every result is bit-identical for any
// thread count.
//
// Initialisation: qkv and proj as Linear (PyTorch's default, qkv first, from
// the caller's Rng), then the table from a normal distribution with std 0.02
// truncated at +-2 std (redrawn outside), as Swin does.
//
// Every check happens before the first write, so a call that throws
// vqkit::error leaves the layer, its gradients and the outputs untouched.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/gemm.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/linear.hpp"
#include "vqkit/core/map_shape.hpp"
#include "vqkit/core/parameter.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace vqkit {

template <class T, class Backend = cpu>
class WindowAttention {
  static_assert(std::is_floating_point_v<T>, "WindowAttention<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned).
  struct Context {
    MapShape shape;
    Index shift = 0;
    typename Linear<T, Backend>::Context qkv;   // input x (N, C)
    RowMatrix<T> qkv_out;                       // [q | k | v] (N, 3C)
    RowMatrix<T> probs;                         // (windows * nh, n * n), P row-major
    typename Linear<T, Backend>::Context proj;  // input o (N, C)
  };

  WindowAttention(Index dim, Index heads, Index window, Rng& rng, Backend backend = {})
      : backend_(backend),
        dim_(checked_dim(dim, heads, window)),
        heads_(heads),
        window_(window),
        qkv(dim, 3 * dim, rng, true, backend),
        proj(dim, dim, rng, true, backend) {
    const Index t = table_rows();
    relative_position_bias_table.resize(t, heads_);
    for (Index i = 0; i < relative_position_bias_table.size(); ++i) {
      double z = rng.normal();
      while (z < -2.0 || z > 2.0) z = rng.normal();
      relative_position_bias_table.data()[i] = static_cast<T>(0.02 * z);
    }
    relative_position_bias_table_grad = RowMatrix<T>::Zero(t, heads_);
  }

  /// x: (N, C) with N = shape.rows(); shift in [0, window). Resizes and fills
  /// y (N, C); y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape, Index shift) const {
    Context ctx;
    forward(x, y, shape, shift, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused from call to call (no
  /// large allocation once it has held a map of this shape).
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape, Index shift,
               Context& ctx) const {
    const char* where = "WindowAttention::forward";
    check_state(where);
    check_input(x.rows(), x.cols(), shape, shift, where);
    const Index C = dim_, d = head_dim(), n = window_ * window_, nh = heads_;
    const Index nwin = windows(shape);
    const int threads = backend_.num_threads();
    const bool parallel = nwin > 1 && nwin * n * n * C >= kParallelWork;
    ctx.shape = shape;
    ctx.shift = shift;
    qkv.forward(x, ctx.qkv_out, ctx.qkv);  // copies x: y may alias x
    ctx.probs.resize(nwin * nh, n * n);
    const RowMatrix<T> bias = dense_bias();  // (nh, n*n)
    const T scale = T(1) / std::sqrt(static_cast<T>(d));
    // The heads' outputs go straight into proj's context (its input copy).
    RowMatrix<T>& o = ctx.proj.input;
    o.resize(shape.rows(), C);
    const RowMatrix<T>& qkv_out = ctx.qkv_out;
    RowMatrix<T>& probs = ctx.probs;

#pragma omp parallel num_threads(threads) if (parallel)
    {
#ifdef _OPENMP
      // This task's ICV only. The window GEMMs run on one thread anyway
      // (cpu{1}); at 1 here, gemm's serial-Eigen guard (double) skips its
      // ICV save and restore on every call.
      omp_set_num_threads(1);
#endif
      std::vector<Index> rows(n);
      std::vector<int> label(n);
      RowMatrix<T> win(n, 3 * C), out(n, C), s(n, n);
      const cpu one{1};  // each window's GEMMs on this thread
#pragma omp for schedule(dynamic, 1)
      for (Index wi = 0; wi < nwin; ++wi) {
        const bool masked = window_rows(shape, shift, wi, rows.data(), label.data());
        for (Index t = 0; t < n; ++t) win.row(t) = qkv_out.row(rows[t]);
        for (Index h = 0; h < nh; ++h) {
          const auto q = win.middleCols(h * d, d);
          const auto k = win.middleCols(C + h * d, d);
          const auto v = win.middleCols(2 * C + h * d, d);
          gemm<T>(one, Op::none, q, Op::transpose, k, s, false);
          s *= scale;
          s += Eigen::Map<const RowMatrix<T>>(bias.row(h).data(), n, n);
          if (masked) {
            for (Index a = 0; a < n; ++a)
              for (Index b = 0; b < n; ++b)
                if (label[a] != label[b]) s(a, b) = -std::numeric_limits<T>::infinity();
          }
          const Vector<T> mx = s.rowwise().maxCoeff();
          s = (s.colwise() - mx).array().exp();
          if (masked) {  // exactly zero, whatever the vectorised exp returns for -inf
            for (Index a = 0; a < n; ++a)
              for (Index b = 0; b < n; ++b)
                if (label[a] != label[b]) s(a, b) = T(0);
          }
          const Vector<T> inv = s.rowwise().sum().cwiseInverse();
          s = inv.asDiagonal() * s;
          Eigen::Map<RowMatrix<T>>(probs.row(wi * nh + h).data(), n, n) = s;
          gemm<T>(one, Op::none, s, Op::none, v, out.middleCols(h * d, d), false);
        }
        for (Index t = 0; t < n; ++t) o.row(rows[t]) = out.row(t);
      }
    }
    proj.forward(o, y, ctx.proj);  // o is already the context's input: not copied
  }

  /// dy: (N, C) as y. Accumulates the gradients of qkv, proj and the table;
  /// if dx is given, overwrites it with dL/dx (N, C). dx may be dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const char* where = "WindowAttention::backward";
    check_state(where);
    check_context(ctx, where);
    VQKIT_REQUIRE(dy.rows() == ctx.shape.rows() && dy.cols() == dim_, where, "dy is ", dy.rows(),
                  "x", dy.cols(), ", expected ", ctx.shape.rows(), "x", dim_,
                  " (N from the forward input, dim=", dim_, ")");
    const MapShape& shape = ctx.shape;
    const Index shift = ctx.shift;
    const Index C = dim_, d = head_dim(), n = window_ * window_, nh = heads_;
    const Index nwin = windows(shape);
    const T scale = T(1) / std::sqrt(static_cast<T>(d));
    const int threads = backend_.num_threads();
    const bool parallel = nwin > 1 && nwin * n * n * C >= kParallelWork;

    // Scratch kept by the layer from call to call.
    RowMatrix<T>& dout = dout_;  // dL/do (N, C)
    proj.backward(ctx.proj, dy, &dout);
    RowMatrix<T>& dqkv = dqkv_;
    dqkv.resize(shape.rows(), 3 * C);
    RowMatrix<T>& dbias_win = dbias_win_;  // per-window partials of dS
    dbias_win.resize(nwin, nh * n * n);
    const RowMatrix<T>& qkv_out = ctx.qkv_out;

#pragma omp parallel num_threads(threads) if (parallel)
    {
#ifdef _OPENMP
      omp_set_num_threads(1);
#endif
      std::vector<Index> rows(n);
      std::vector<int> label(n);
      RowMatrix<T> win(n, 3 * C), dwin(n, 3 * C), dwo(n, C), dp(n, n), ds(n, n);
      const cpu one{1};
#pragma omp for schedule(dynamic, 1)
      for (Index wi = 0; wi < nwin; ++wi) {
        window_rows(shape, shift, wi, rows.data(), label.data());
        for (Index t = 0; t < n; ++t) {
          win.row(t) = qkv_out.row(rows[t]);
          dwo.row(t) = dout.row(rows[t]);
        }
        for (Index h = 0; h < nh; ++h) {
          const auto q = win.middleCols(h * d, d);
          const auto k = win.middleCols(C + h * d, d);
          const auto v = win.middleCols(2 * C + h * d, d);
          const auto dO = dwo.middleCols(h * d, d);
          const Eigen::Map<const RowMatrix<T>> p(ctx.probs.row(wi * nh + h).data(), n, n);
          gemm<T>(one, Op::none, dO, Op::transpose, v, dp, false);
          gemm<T>(one, Op::transpose, p, Op::none, dO, dwin.middleCols(2 * C + h * d, d), false);
          const Vector<T> rs = (p.array() * dp.array()).rowwise().sum();
          ds = p.array() * (dp.colwise() - rs).array();
          Eigen::Map<RowMatrix<T>>(dbias_win.row(wi).data() + h * n * n, n, n) = ds;
          gemm<T>(one, Op::none, ds, Op::none, k, dwin.middleCols(h * d, d), false);
          dwin.middleCols(h * d, d) *= scale;
          gemm<T>(one, Op::transpose, ds, Op::none, q, dwin.middleCols(C + h * d, d), false);
          dwin.middleCols(C + h * d, d) *= scale;
        }
        for (Index t = 0; t < n; ++t) dqkv.row(rows[t]) = dwin.row(t);
      }
    }
    // Bias table: sum the window partials in window order, then scatter by idx.
    RowMatrix<T> dsum = RowMatrix<T>::Zero(1, nh * n * n);
    for (Index wi = 0; wi < nwin; ++wi) dsum += dbias_win.row(wi);
    const Index w = window_, span = 2 * w - 1;
    for (Index h = 0; h < nh; ++h)
      for (Index t = 0; t < n; ++t)
        for (Index u = 0; u < n; ++u) {
          const Index idx = (t / w - u / w + w - 1) * span + (t % w - u % w + w - 1);
          relative_position_bias_table_grad(idx, h) += dsum(0, h * n * n + t * n + u);
        }
    qkv.backward(ctx.qkv, dqkv, dx);
  }

  /// "relative_position_bias_table" {(2w-1)^2, nh} (no weight decay),
  /// "qkv.weight" {3C, C}, "qkv.bias" {3C}, "proj.weight" {C, C},
  /// "proj.bias" {C}; names prefixed with `prefix` (Swin/timm order).
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    list.push_back({prefix + "relative_position_bias_table", &relative_position_bias_table,
                    &relative_position_bias_table_grad, {table_rows(), heads_}, false});
    append_parameters(list, qkv.parameters(), prefix + "qkv.");
    append_parameters(list, proj.parameters(), prefix + "proj.");
    return list;
  }

  void zero_grad() {
    qkv.zero_grad();
    proj.zero_grad();
    relative_position_bias_table_grad.setZero();
  }

  Index dim() const { return dim_; }
  Index heads() const { return heads_; }
  Index window() const { return window_; }
  Index head_dim() const { return dim_ / heads_; }
  Index table_rows() const { return (2 * window_ - 1) * (2 * window_ - 1); }
  const Backend& backend() const { return backend_; }

  /// Throws vqkit::error (naming `where`) unless an input of rows x cols with
  /// this map shape and shift is accepted by forward. Writes nothing.
  void check_input(Index rows, Index cols, const MapShape& shape, Index shift,
                   const char* where) const {
    VQKIT_REQUIRE(shape.batch >= 1 && shape.height >= 1 && shape.width >= 1, where,
                  "map shape must be positive, got batch=", shape.batch, " height=",
                  shape.height, " width=", shape.width);
    VQKIT_REQUIRE(rows == shape.rows(), where, "input has ", rows,
                  " rows, expected batch*height*width=", shape.batch, "*", shape.height, "*",
                  shape.width, "=", shape.rows());
    VQKIT_REQUIRE(cols == dim_, where, "x has ", cols, " columns, expected dim=", dim_);
    VQKIT_REQUIRE(shape.height % window_ == 0 && shape.width % window_ == 0, where, "window=",
                  window_, " does not divide the map: height=", shape.height,
                  " width=", shape.width);
    VQKIT_REQUIRE(shift >= 0 && shift < window_, where, "shift must be in [0, window=", window_,
                  "), got shift=", shift);
  }

  /// Throws vqkit::error unless ctx is a context this layer's forward made.
  void check_context(const Context& ctx, const char* where) const {
    check_input(ctx.shape.rows(), dim_, ctx.shape, ctx.shift, where);
    const Index N = ctx.shape.rows(), n = window_ * window_;
    VQKIT_REQUIRE(ctx.qkv.input.rows() == N && ctx.qkv.input.cols() == dim_, where,
                  "context qkv input is ", ctx.qkv.input.rows(), "x", ctx.qkv.input.cols(),
                  ", expected ", N, "x", dim_);
    VQKIT_REQUIRE(ctx.qkv_out.rows() == N && ctx.qkv_out.cols() == 3 * dim_, where,
                  "context qkv output is ", ctx.qkv_out.rows(), "x", ctx.qkv_out.cols(),
                  ", expected ", N, "x", 3 * dim_);
    VQKIT_REQUIRE(ctx.probs.rows() == windows(ctx.shape) * heads_ && ctx.probs.cols() == n * n,
                  where, "context probabilities are ", ctx.probs.rows(), "x", ctx.probs.cols(),
                  ", expected ", windows(ctx.shape) * heads_, "x", n * n);
    VQKIT_REQUIRE(ctx.proj.input.rows() == N && ctx.proj.input.cols() == dim_, where,
                  "context proj input is ", ctx.proj.input.rows(), "x", ctx.proj.input.cols(),
                  ", expected ", N, "x", dim_);
  }

  /// The public tensors may have been replaced (e.g. by a checkpoint load);
  /// refuse to run on inconsistent shapes rather than read out of bounds.
  void check_state(const char* where) const {
    for (const auto* l : {&qkv, &proj}) {
      const Index oc = l == &qkv ? 3 * dim_ : dim_;
      const char* name = l == &qkv ? "qkv" : "proj";
      VQKIT_REQUIRE(l->in_features() == dim_ && l->out_features() == oc && l->has_bias(), where,
                    name, " is Linear(", l->in_features(), " -> ", l->out_features(),
                    "), expected Linear(", dim_, " -> ", oc, ") with bias");
      const RowMatrix<T>* t[] = {&l->weight, &l->weight_grad, &l->bias, &l->bias_grad};
      const char* tn[] = {".weight", ".weight_grad", ".bias", ".bias_grad"};
      const Index er[] = {oc, oc, 1, 1}, ec[] = {dim_, dim_, oc, oc};
      for (int i = 0; i < 4; ++i)
        VQKIT_REQUIRE(t[i]->rows() == er[i] && t[i]->cols() == ec[i], where, name, tn[i], " is ",
                      t[i]->rows(), "x", t[i]->cols(), ", expected ", er[i], "x", ec[i]);
    }
    const Index tr = table_rows();
    VQKIT_REQUIRE(relative_position_bias_table.rows() == tr &&
                      relative_position_bias_table.cols() == heads_,
                  where, "relative_position_bias_table is ", relative_position_bias_table.rows(),
                  "x", relative_position_bias_table.cols(), ", expected ", tr, "x", heads_);
    VQKIT_REQUIRE(relative_position_bias_table_grad.rows() == tr &&
                      relative_position_bias_table_grad.cols() == heads_,
                  where, "relative_position_bias_table_grad is ",
                  relative_position_bias_table_grad.rows(), "x",
                  relative_position_bias_table_grad.cols(), ", expected ", tr, "x", heads_);
  }

 private:
  // Below this much attention work (windows * n^2 * C) the windows run on
  // the calling thread: a parallel region would cost more than it saves.
  static constexpr Index kParallelWork = Index(1) << 16;

  static Index checked_dim(Index dim, Index heads, Index window) {
    VQKIT_REQUIRE(dim >= 1, "WindowAttention", "dim must be >= 1, got dim=", dim);
    VQKIT_REQUIRE(heads >= 1, "WindowAttention", "heads must be >= 1, got heads=", heads);
    VQKIT_REQUIRE(dim % heads == 0, "WindowAttention", "dim=", dim,
                  " is not divisible by heads=", heads);
    VQKIT_REQUIRE(window >= 1, "WindowAttention", "window must be >= 1, got window=", window);
    return dim;
  }

  Index windows(const MapShape& s) const {
    return s.batch * (s.height / window_) * (s.width / window_);
  }

  /// The table expanded to (nh, n*n): row h holds bias_h[t, u] at t*n + u.
  RowMatrix<T> dense_bias() const {
    const Index w = window_, n = w * w, span = 2 * w - 1;
    RowMatrix<T> b(heads_, n * n);
    for (Index t = 0; t < n; ++t)
      for (Index u = 0; u < n; ++u) {
        const Index idx = (t / w - u / w + w - 1) * span + (t % w - u % w + w - 1);
        for (Index h = 0; h < heads_; ++h) b(h, t * n + u) = relative_position_bias_table(idx, h);
      }
    return b;
  }

  /// Original rows of window wi's tokens (rolled by -shift), and their mask
  /// labels; returns whether any two labels differ.
  bool window_rows(const MapShape& s, Index shift, Index wi, Index* rows, int* label) const {
    const Index w = window_, nwx = s.width / w, nwy = s.height / w;
    const Index b = wi / (nwy * nwx), wy = (wi / nwx) % nwy, wx = wi % nwx;
    bool mixed = false;
    for (Index i = 0; i < w; ++i)
      for (Index j = 0; j < w; ++j) {
        const Index Y = wy * w + i, X = wx * w + j, t = i * w + j;
        rows[t] = s.row(b, (Y + shift) % s.height, (X + shift) % s.width);
        label[t] = shift == 0 ? 0 : 3 * region(Y, s.height, shift) + region(X, s.width, shift);
        mixed = mixed || label[t] != label[0];
      }
    return mixed;
  }

  int region(Index c, Index size, Index shift) const {
    return c < size - window_ ? 0 : (c < size - shift ? 1 : 2);
  }

  Backend backend_;
  Index dim_;
  Index heads_;
  Index window_;
  // backward's scratch, kept so that a training loop does not map and fault
  // in fresh pages every step.
  RowMatrix<T> dout_, dqkv_, dbias_win_;

 public:
  Linear<T, Backend> qkv;                       // C -> 3C
  Linear<T, Backend> proj;                      // C -> C
  RowMatrix<T> relative_position_bias_table;       // ((2w-1)^2, nh)
  RowMatrix<T> relative_position_bias_table_grad;  // ((2w-1)^2, nh)
};

}  // namespace vqkit
