// vqkit/layers/patch.hpp - changing the resolution of a (B*H*W, C) map:
// PatchEmbed (space-to-depth p x p -> Linear -> LayerNorm), PatchMerging
// (Swin's 2x2 merge -> LayerNorm -> Linear), PatchUpsample (Linear ->
// depth-to-space 2x -> LayerNorm), and PositionEmbedding (a learned absolute
// table added to every map of the batch).
//
// Maps are (B*H*W, C) matrices with rows in (b, y, x) order (MapShape,
// map_shape.hpp); the MapShape comes as an extra forward argument after y and
// is kept in the Context. Map sizes that the patch does not divide throw.
//
// ---- Space-to-depth and its channel order --------------------------------
// space_to_depth(x, s, p, order) maps a fine map (B*H*W, C) to a coarse map
// (B*(H/p)*(W/p), p*p*C): coarse cell (b, Y, X) holds the p x p fine cells
// (b, Y*p + dy, X*p + dx), 0 <= dy, dx < p, one after the other, each with
// its C channels contiguous. The sub-pixel slot of (dy, dx) is
//   SubpixelOrder::row_major   slot = dy*p + dx       (dy outer, dx inner)
//       = torch: x.reshape(B, H/p, p, W/p, p, C).permute(0, 1, 3, 2, 4, 5)
//                 .reshape(B, H/p, W/p, p*p*C)           for x (B, H, W, C)
//   SubpixelOrder::swin        slot = dx*p + dy       (dx outer, dy inner)
//       = Swin's PatchMerging (p = 2): torch.cat([x[:, 0::2, 0::2],
//         x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
// and channel c of that cell lands at column slot*C + c. depth_to_space is
// the exact inverse (the same slot formula read the other way).
//
// Note: a PyTorch Conv2d(C, E, p, stride p) patch embedding flattens its
// weight (E, C, p, p) as (c, dy, dx); to load one into PatchEmbed's proj,
// permute it to (E, p, p, C) (= (dy, dx, c), row_major) and reshape to (E, p*p*C).
//
// ---- PatchEmbed(C, E, p) --------------------------------------------------
//   x (B*H*W, C), MapShape {B, H, W}  ->  y (B*(H/p)*(W/p), E)
//   forward:  z = space_to_depth(x, p, row_major)         (B*H/p*W/p, p*p*C)
//             y = LayerNorm_E(z proj.weight^T + proj.bias)
//   backward: dz = Linear^T(LayerNorm^T(dy)); dx = depth_to_space(dz)
//   parameters "proj.weight" {E, p*p*C}, "proj.bias" {E}, "norm.weight" {E},
//   "norm.bias" {E}.
//
// ---- PatchMerging(C) (Swin) -----------------------------------------------
//   x (B*H*W, C), {B, H, W}, H and W even  ->  y (B*(H/2)*(W/2), 2C)
//   forward:  z = space_to_depth(x, 2, swin)              (B*H/2*W/2, 4C)
//             y = LayerNorm_4C(z) reduction.weight^T      (no bias)
//   backward: dx = depth_to_space(LayerNorm^T(Linear^T(dy)), swin)
//   parameters "norm.weight" {4C}, "norm.bias" {4C}, "reduction.weight" {2C, 4C}.
//
// ---- PatchUpsample(C, C') (depth-to-space 2x) ------------------------------
//   x (B*H*W, C), {B, H, W}  ->  y (B*(2H)*(2W), C')
//   forward:  z = x proj.weight^T + proj.bias             (B*H*W, 4C')
//             u = depth_to_space(z, {B, 2H, 2W}, 2, row_major)  (B*2H*2W, C')
//                 i.e. torch z.reshape(B, H, W, 2, 2, C').permute(0, 1, 3, 2, 4, 5)
//                      .reshape(B, 2H, 2W, C')
//             y = LayerNorm_C'(u)
//   backward: du = LayerNorm^T(dy); dz = space_to_depth(du); dx = Linear^T(dz)
//   parameters "proj.weight" {4C', C}, "proj.bias" {4C'}, "norm.weight" {C'},
//   "norm.bias" {C'}.
//
// ---- PositionEmbedding(H, W, C) ---------------------------------------------
//   x (B*H*W, C), {B, H, W}  ->  y (B*H*W, C)
//   forward:  y[(b*H + y)*W + x, :] = x[...] + weight[y*W + x, :]
//   backward: dx = dy; dweight[cell, :] += sum over b (in increasing b) of dy
//   parameters "weight" {H*W, C}, no weight decay (a position table).
//   Initialisation: N(0, 0.02^2) truncated at +-2 standard deviations (a
//   draw outside is redrawn), row-major, from the caller's Rng.
//
// Linear layers initialise as PyTorch's nn.Linear, LayerNorms to ones/zeros.
// All backward passes accumulate (+=) parameter gradients and overwrite dx.
// Every check (shapes, divisibility, the Context against the layer,
// parameter shapes) happens before the first write, so a call that throws
// vqkit::error leaves the layer, its gradients and the outputs unchanged.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/layer_norm.hpp"
#include "vqkit/layers/linear.hpp"
#include "vqkit/core/map_shape.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

/// Where sub-pixel (dy, dx) of a p x p patch goes in the merged channel vector.
enum class SubpixelOrder {
  row_major,  // slot = dy*p + dx (torch reshape/permute(0,1,3,2,4,5))
  swin,       // slot = dx*p + dy (Swin PatchMerging's cat order)
};

/// The coarse shape {B, H/p, W/p}; throws vqkit::error naming `where` unless
/// p >= 1 and p divides H and W.
inline MapShape coarse_shape(const MapShape& fine, Index p, const char* where) {
  VQKIT_REQUIRE(p >= 1, where, "patch size must be >= 1, got patch_size=", p);
  VQKIT_REQUIRE(fine.batch >= 1 && fine.height >= 1 && fine.width >= 1, where,
                "map shape must be positive, got batch=", fine.batch, " height=", fine.height,
                " width=", fine.width);
  VQKIT_REQUIRE(fine.height % p == 0 && fine.width % p == 0, where, "map height=", fine.height,
                " width=", fine.width, " is not divisible by patch_size=", p);
  return {fine.batch, fine.height / p, fine.width / p};
}

namespace detail {

// Copies between a fine map (B*H*W, C) and its coarse form (B*(H/p)*(W/p),
// p*p*C); ToCoarse picks the direction. Shapes already checked.
template <bool ToCoarse, class Fine, class Coarse>
void move_patches(Fine& fine, Coarse& coarse, const MapShape& fs, Index p, SubpixelOrder order,
                  const cpu& be) {
  const Index C = fine.cols();
  const MapShape cs{fs.batch, fs.height / p, fs.width / p};
  // One coarse row at a time (its p*p fine rows are its own: any split over
  // threads moves the same values).
  parallel_rows(be, cs.rows(), p * p * C, [&](Index r) {
    const Index X = r % cs.width, Y = (r / cs.width) % cs.height, b = r / (cs.width * cs.height);
    for (Index dy = 0; dy < p; ++dy)
      for (Index dx = 0; dx < p; ++dx) {
        const Index slot = order == SubpixelOrder::row_major ? dy * p + dx : dx * p + dy;
        const Index fr = fs.row(b, Y * p + dy, X * p + dx);
        if constexpr (ToCoarse)
          coarse.row(r).segment(slot * C, C) = fine.row(fr);
        else
          fine.row(fr) = coarse.row(r).segment(slot * C, C);
      }
  });
}

}  // namespace detail

/// (B*H*W, C) -> (B*(H/p)*(W/p), p*p*C); see the header comment for the order.
/// Into `out` (resized; its buffer is reused when the size matches), which
/// must not be x; the rows are moved on be's threads.
template <class T>
void space_to_depth(ConstMatrixRef<T> x, const MapShape& fine, Index p, SubpixelOrder order,
                    RowMatrix<T>& out, const cpu& be = cpu{1}) {
  const MapShape cs = coarse_shape(fine, p, "space_to_depth");
  require_map(x, fine, "space_to_depth");
  VQKIT_REQUIRE(x.size() == 0 || out.data() != x.data(), "space_to_depth",
                "out must not be the input");
  out.resize(cs.rows(), p * p * x.cols());
  detail::move_patches<true>(x, out, fine, p, order, be);
}

template <class T>
RowMatrix<T> space_to_depth(ConstMatrixRef<T> x, const MapShape& fine, Index p,
                            SubpixelOrder order = SubpixelOrder::row_major) {
  RowMatrix<T> out;
  space_to_depth<T>(x, fine, p, order, out);
  return out;
}

/// (B*(H/p)*(W/p), p*p*C) -> (B*H*W, C) for the fine shape {B, H, W}; the
/// inverse of space_to_depth with the same p and order. Into `out` as above.
template <class T>
void depth_to_space(ConstMatrixRef<T> z, const MapShape& fine, Index p, SubpixelOrder order,
                    RowMatrix<T>& out, const cpu& be = cpu{1}) {
  const MapShape cs = coarse_shape(fine, p, "depth_to_space");
  require_map(z, cs, "depth_to_space");
  VQKIT_REQUIRE(z.cols() % (p * p) == 0, "depth_to_space", "input has ", z.cols(),
                " columns, not a multiple of patch_size^2=", p * p);
  VQKIT_REQUIRE(z.size() == 0 || out.data() != z.data(), "depth_to_space",
                "out must not be the input");
  out.resize(fine.rows(), z.cols() / (p * p));
  detail::move_patches<false>(out, z, fine, p, order, be);
}

template <class T>
RowMatrix<T> depth_to_space(ConstMatrixRef<T> z, const MapShape& fine, Index p,
                            SubpixelOrder order = SubpixelOrder::row_major) {
  RowMatrix<T> out;
  depth_to_space<T>(z, fine, p, order, out);
  return out;
}

namespace detail {
// Every listed parameter value and gradient has its listed shape (the public
// tensors may have been replaced, e.g. by a checkpoint load).
template <class T>
void require_patch_parameter_shapes(const ParameterList<T>& list, const char* where) {
  for (const auto& p : list) {
    const Index r = p.shape.size() == 2 ? p.shape[0] : 1;
    const Index c = p.shape.back();
    VQKIT_REQUIRE(p.value->rows() == r && p.value->cols() == c && p.grad->rows() == r &&
                      p.grad->cols() == c,
                  where, p.name, " is ", p.value->rows(), "x", p.value->cols(), " (gradient ",
                  p.grad->rows(), "x", p.grad->cols(), "), expected ", r, "x", c);
  }
}

// A LayerNorm context that belongs to an input of n rows and dim columns.
template <class Ctx>
void require_norm_context(const Ctx& c, Index n, Index dim, const char* where) {
  VQKIT_REQUIRE(c.input.rows() == n && c.input.cols() == dim && c.mean.size() == n &&
                    c.rstd.size() == n,
                where, "context does not match: norm input is ", c.input.rows(), "x",
                c.input.cols(), ", expected ", n, "x", dim);
}

template <class Ctx>
void require_linear_context(const Ctx& c, Index n, Index in, const char* where) {
  VQKIT_REQUIRE(c.input.rows() == n && c.input.cols() == in, where,
                "context does not match: linear input is ", c.input.rows(), "x",
                c.input.cols(), ", expected ", n, "x", in);
}
}  // namespace detail

// ------------------------------------------------------------- PatchEmbed ---

template <class T, class Backend = cpu>
class PatchEmbed {
  static_assert(std::is_floating_point_v<T>, "PatchEmbed<T>: T must be float or double");

 public:
  struct Context {
    MapShape in_shape;
    typename Linear<T, Backend>::Context proj;
    typename LayerNorm<T, Backend>::Context norm;
  };

  /// proj is drawn from rng (nn.Linear init); LayerNorm eps 1e-5.
  PatchEmbed(Index in_channels, Index embed_dim, Index patch_size, Rng& rng, Backend backend = {})
      : proj(checked(in_channels, embed_dim, patch_size) * patch_size * patch_size * in_channels,
             embed_dim, rng, true, backend),
        norm(embed_dim, T(1e-5), backend),
        c_(in_channels),
        p_(patch_size),
        backend_(std::move(backend)) {}

  MapShape output_shape(const MapShape& in) const { return coarse_shape(in, p_, "PatchEmbed"); }

  /// x (B*H*W, C) with shape {B, H, W} -> y (B*(H/p)*(W/p), E); y may alias x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape) const {
    coarse_shape(shape, p_, "PatchEmbed::forward");
    require_map(x, shape, "PatchEmbed::forward");
    VQKIT_REQUIRE(x.cols() == c_, "PatchEmbed::forward", "x has ", x.cols(),
                  " columns, expected in_channels=", c_);
    Context ctx;
    forward(x, y, shape, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused from call to call.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape, Context& ctx) const {
    coarse_shape(shape, p_, "PatchEmbed::forward");
    require_map(x, shape, "PatchEmbed::forward");
    VQKIT_REQUIRE(x.cols() == c_, "PatchEmbed::forward", "x has ", x.cols(),
                  " columns, expected in_channels=", c_);
    ctx.in_shape = shape;
    // Each step writes straight into the next layer's context (its input
    // copy), so nothing is copied twice.
    space_to_depth<T>(x, shape, p_, SubpixelOrder::row_major, ctx.proj.input, backend_);
    proj.forward(ctx.proj.input, ctx.norm.input, ctx.proj);
    norm.forward(ctx.norm.input, y, ctx.norm);
  }

  /// dy (B*(H/p)*(W/p), E). Accumulates the gradients; dx (B*H*W, C) overwritten.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const char* where = "PatchEmbed::backward";
    const MapShape cs = coarse_shape(ctx.in_shape, p_, where);
    const Index e = norm.dim();
    VQKIT_REQUIRE(dy.rows() == cs.rows() && dy.cols() == e, where, "dy is ", dy.rows(), "x",
                  dy.cols(), ", expected ", cs.rows(), "x", e);
    detail::require_norm_context(ctx.norm, cs.rows(), e, where);
    detail::require_linear_context(ctx.proj, cs.rows(), proj.in_features(), where);
    detail::require_patch_parameter_shapes(parameters(), where);
    RowMatrix<T>& d = d_;
    norm.backward(ctx.norm, dy, &d);
    proj.backward(ctx.proj, d, dx != nullptr ? &d : nullptr);
    if (dx != nullptr) depth_to_space<T>(d, ctx.in_shape, p_, SubpixelOrder::row_major, *dx, backend_);
  }

  /// "proj.weight", "proj.bias", "norm.weight", "norm.bias".
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    append_parameters(list, proj.parameters(), prefix + "proj.");
    append_parameters(list, norm.parameters(), prefix + "norm.");
    return list;
  }
  void zero_grad() {
    proj.zero_grad();
    norm.zero_grad();
  }

  Index in_channels() const { return c_; }
  Index embed_dim() const { return norm.dim(); }
  Index patch_size() const { return p_; }
  const Backend& backend() const { return backend_; }

  Linear<T, Backend> proj;    // (p*p*C -> E)
  LayerNorm<T, Backend> norm;  // (E)

 private:
  Index c_;
  Index p_;
  Backend backend_;
  RowMatrix<T> d_;  // backward's scratch, kept for the next call

  static Index checked(Index c, Index e, Index p) {
    VQKIT_REQUIRE(c >= 1 && e >= 1 && p >= 1, "PatchEmbed",
                  "sizes must be >= 1, got in_channels=", c, " embed_dim=", e,
                  " patch_size=", p);
    return 1;
  }
};

// ----------------------------------------------------------- PatchMerging ---

template <class T, class Backend = cpu>
class PatchMerging {
  static_assert(std::is_floating_point_v<T>, "PatchMerging<T>: T must be float or double");

 public:
  struct Context {
    MapShape in_shape;
    typename LayerNorm<T, Backend>::Context norm;
    typename Linear<T, Backend>::Context reduction;
  };

  /// reduction is drawn from rng (nn.Linear init, no bias); LayerNorm eps 1e-5.
  PatchMerging(Index channels, Rng& rng, Backend backend = {})
      : norm(4 * checked(channels), T(1e-5), backend),
        reduction(4 * channels, 2 * channels, rng, false, backend),
        c_(channels),
        backend_(std::move(backend)) {}

  MapShape output_shape(const MapShape& in) const { return coarse_shape(in, 2, "PatchMerging"); }

  /// x (B*H*W, C) with shape {B, H, W}, H and W even -> y (B*(H/2)*(W/2), 2C).
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape) const {
    coarse_shape(shape, 2, "PatchMerging::forward");
    require_map(x, shape, "PatchMerging::forward");
    VQKIT_REQUIRE(x.cols() == c_, "PatchMerging::forward", "x has ", x.cols(),
                  " columns, expected channels=", c_);
    Context ctx;
    forward(x, y, shape, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused from call to call.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape, Context& ctx) const {
    coarse_shape(shape, 2, "PatchMerging::forward");
    require_map(x, shape, "PatchMerging::forward");
    VQKIT_REQUIRE(x.cols() == c_, "PatchMerging::forward", "x has ", x.cols(),
                  " columns, expected channels=", c_);
    ctx.in_shape = shape;
    space_to_depth<T>(x, shape, 2, SubpixelOrder::swin, ctx.norm.input, backend_);
    norm.forward(ctx.norm.input, ctx.reduction.input, ctx.norm);
    reduction.forward(ctx.reduction.input, y, ctx.reduction);
  }

  /// dy (B*(H/2)*(W/2), 2C). Accumulates the gradients; dx (B*H*W, C) overwritten.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const char* where = "PatchMerging::backward";
    const MapShape cs = coarse_shape(ctx.in_shape, 2, where);
    VQKIT_REQUIRE(dy.rows() == cs.rows() && dy.cols() == 2 * c_, where, "dy is ", dy.rows(),
                  "x", dy.cols(), ", expected ", cs.rows(), "x", 2 * c_);
    detail::require_norm_context(ctx.norm, cs.rows(), 4 * c_, where);
    detail::require_linear_context(ctx.reduction, cs.rows(), 4 * c_, where);
    detail::require_patch_parameter_shapes(parameters(), where);
    RowMatrix<T>& d = d_;
    reduction.backward(ctx.reduction, dy, &d);
    norm.backward(ctx.norm, d, dx != nullptr ? &d : nullptr);
    if (dx != nullptr) depth_to_space<T>(d, ctx.in_shape, 2, SubpixelOrder::swin, *dx, backend_);
  }

  /// "norm.weight", "norm.bias", "reduction.weight" (Swin's names).
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    append_parameters(list, norm.parameters(), prefix + "norm.");
    append_parameters(list, reduction.parameters(), prefix + "reduction.");
    return list;
  }
  void zero_grad() {
    norm.zero_grad();
    reduction.zero_grad();
  }

  Index channels() const { return c_; }
  const Backend& backend() const { return backend_; }

  LayerNorm<T, Backend> norm;      // (4C)
  Linear<T, Backend> reduction;    // (4C -> 2C), no bias

 private:
  Index c_;
  Backend backend_;
  RowMatrix<T> d_;  // backward's scratch, kept for the next call

  static Index checked(Index c) {
    VQKIT_REQUIRE(c >= 1, "PatchMerging", "channels must be >= 1, got channels=", c);
    return c;
  }
};

// ---------------------------------------------------------- PatchUpsample ---

template <class T, class Backend = cpu>
class PatchUpsample {
  static_assert(std::is_floating_point_v<T>, "PatchUpsample<T>: T must be float or double");

 public:
  struct Context {
    MapShape in_shape;
    typename Linear<T, Backend>::Context proj;
    typename LayerNorm<T, Backend>::Context norm;
    RowMatrix<T> z;  // forward's scratch (proj's output), kept for the next call
  };

  /// proj (C -> 4C') is drawn from rng (nn.Linear init); LayerNorm(C') eps 1e-5.
  PatchUpsample(Index in_channels, Index out_channels, Rng& rng, Backend backend = {})
      : proj(checked(in_channels, out_channels), 4 * out_channels, rng, true, backend),
        norm(out_channels, T(1e-5), backend),
        backend_(std::move(backend)) {}

  MapShape output_shape(const MapShape& in) const {
    return {in.batch, 2 * in.height, 2 * in.width};
  }

  /// x (B*H*W, C) with shape {B, H, W} -> y (B*(2H)*(2W), C'); y may alias x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape) const {
    require_map(x, shape, "PatchUpsample::forward");
    VQKIT_REQUIRE(x.cols() == proj.in_features(), "PatchUpsample::forward", "x has ", x.cols(),
                  " columns, expected in_channels=", proj.in_features());
    Context ctx;
    forward(x, y, shape, ctx);
    return ctx;
  }

  /// The same into a context whose buffers are reused from call to call.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape, Context& ctx) const {
    require_map(x, shape, "PatchUpsample::forward");
    VQKIT_REQUIRE(x.cols() == proj.in_features(), "PatchUpsample::forward", "x has ", x.cols(),
                  " columns, expected in_channels=", proj.in_features());
    ctx.in_shape = shape;
    proj.forward(x, ctx.z, ctx.proj);
    depth_to_space<T>(ctx.z, output_shape(shape), 2, SubpixelOrder::row_major, ctx.norm.input,
                      backend_);
    norm.forward(ctx.norm.input, y, ctx.norm);
  }

  /// dy (B*(2H)*(2W), C'). Accumulates the gradients; dx (B*H*W, C) overwritten.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const char* where = "PatchUpsample::backward";
    const MapShape& s = ctx.in_shape;
    VQKIT_REQUIRE(s.batch >= 1 && s.height >= 1 && s.width >= 1, where,
                  "context map shape is not positive");
    const MapShape fs = output_shape(s);
    const Index co = norm.dim();
    VQKIT_REQUIRE(dy.rows() == fs.rows() && dy.cols() == co, where, "dy is ", dy.rows(), "x",
                  dy.cols(), ", expected ", fs.rows(), "x", co);
    detail::require_norm_context(ctx.norm, fs.rows(), co, where);
    detail::require_linear_context(ctx.proj, s.rows(), proj.in_features(), where);
    detail::require_patch_parameter_shapes(parameters(), where);
    RowMatrix<T>& d = d_;
    norm.backward(ctx.norm, dy, &d);
    space_to_depth<T>(d, fs, 2, SubpixelOrder::row_major, dz_, backend_);
    proj.backward(ctx.proj, dz_, dx);
  }

  /// "proj.weight", "proj.bias", "norm.weight", "norm.bias".
  ParameterList<T> parameters(const std::string& prefix = "") {
    ParameterList<T> list;
    append_parameters(list, proj.parameters(), prefix + "proj.");
    append_parameters(list, norm.parameters(), prefix + "norm.");
    return list;
  }
  void zero_grad() {
    proj.zero_grad();
    norm.zero_grad();
  }

  Index in_channels() const { return proj.in_features(); }
  Index out_channels() const { return norm.dim(); }
  const Backend& backend() const { return backend_; }

  Linear<T, Backend> proj;     // (C -> 4C')
  LayerNorm<T, Backend> norm;  // (C')

 private:
  Backend backend_;
  RowMatrix<T> d_, dz_;  // backward's scratch, kept for the next call

  static Index checked(Index c, Index co) {
    VQKIT_REQUIRE(c >= 1 && co >= 1, "PatchUpsample", "sizes must be >= 1, got in_channels=", c,
                  " out_channels=", co);
    return c;
  }
};

// ------------------------------------------------------ PositionEmbedding ---

template <class T, class Backend = cpu>
class PositionEmbedding {
  static_assert(std::is_floating_point_v<T>, "PositionEmbedding<T>: T must be float or double");

 public:
  struct Context {
    MapShape shape;
    Index cols = 0;
  };

  PositionEmbedding(Index height, Index width, Index channels, Rng& rng, Backend backend = {})
      : backend_(std::move(backend)), h_(height), w_(width), c_(channels) {
    VQKIT_REQUIRE(height >= 1 && width >= 1 && channels >= 1, "PositionEmbedding",
                  "sizes must be >= 1, got height=", height, " width=", width,
                  " channels=", channels);
    weight.resize(h_ * w_, c_);
    for (Index i = 0; i < weight.size(); ++i) {
      double z = rng.normal();
      while (std::abs(z) > 2.0) z = rng.normal();
      weight.data()[i] = static_cast<T>(0.02 * z);
    }
    weight_grad = RowMatrix<T>::Zero(h_ * w_, c_);
  }

  /// x (B*H*W, C) with shape {B, H, W} (H, W those of the table) -> y (same
  /// shape); y may alias x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, const MapShape& shape) const {
    const char* where = "PositionEmbedding::forward";
    check_state(where);
    require_map(x, shape, where);
    VQKIT_REQUIRE(shape.height == h_ && shape.width == w_ && x.cols() == c_, where,
                  "input map is height=", shape.height, " width=", shape.width, " with ",
                  x.cols(), " channels, expected height=", h_, " width=", w_,
                  " channels=", c_);
    if (y.data() != x.data()) {  // y's buffer is reused when it has x's size
      if (detail::storage_overlaps(y, x)) {
        RowMatrix<T> copy = x;
        y.swap(copy);
      } else {
        y = x;
      }
    }
    for (Index b = 0; b < shape.batch; ++b) y.middleRows(b * h_ * w_, h_ * w_) += weight;
    return {shape, c_};
  }

  /// dy (B*H*W, C). weight_grad += sum over the batch; dx = dy (overwritten,
  /// may be the same matrix as dy).
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    const char* where = "PositionEmbedding::backward";
    check_state(where);
    VQKIT_REQUIRE(ctx.shape.height == h_ && ctx.shape.width == w_ && ctx.shape.batch >= 1 &&
                      ctx.cols == c_,
                  where, "context map is height=", ctx.shape.height, " width=", ctx.shape.width,
                  ", expected height=", h_, " width=", w_);
    VQKIT_REQUIRE(dy.rows() == ctx.shape.rows() && dy.cols() == c_, where, "dy is ", dy.rows(),
                  "x", dy.cols(), ", expected ", ctx.shape.rows(), "x", c_);
    for (Index b = 0; b < ctx.shape.batch; ++b) weight_grad += dy.middleRows(b * h_ * w_, h_ * w_);
    if (dx != nullptr && dx->data() != dy.data()) *dx = dy;
  }

  /// "weight" {H*W, C}, no weight decay.
  ParameterList<T> parameters(const std::string& prefix = "") {
    return {{prefix + "weight", &weight, &weight_grad, {h_ * w_, c_}, false}};
  }
  void zero_grad() { weight_grad.setZero(); }

  Index height() const { return h_; }
  Index width() const { return w_; }
  Index channels() const { return c_; }
  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
  Index h_, w_, c_;

 public:
  RowMatrix<T> weight;       // (H*W, C), row y*W + x
  RowMatrix<T> weight_grad;  // (H*W, C)

 private:
  void check_state(const char* where) const {
    VQKIT_REQUIRE(weight.rows() == h_ * w_ && weight.cols() == c_ &&
                      weight_grad.rows() == h_ * w_ && weight_grad.cols() == c_,
                  where, "weight/weight_grad are ", weight.rows(), "x", weight.cols(), "/",
                  weight_grad.rows(), "x", weight_grad.cols(), ", expected ", h_ * w_, "x", c_);
  }
};

}  // namespace vqkit
