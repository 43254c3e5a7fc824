// vqkit/layers/segment_sum.hpp - summing rows into segments (points ->
// voxels, voxels -> BEV pillars) and scattering sparse rows into a dense map;
// their backward passes are gathers.
//
// Segment sum (PyTorch: y = zeros(S, C).index_add_(0, ids, x)):
//   x    (N, C)   one row per element (point, voxel)
//   ids  (N)      int64 segment of each row, 0 <= ids[n] < S
//   y    (S, C)   y[s,:] = sum over n with ids[n] == s of x[n,:]; 0 if empty
//   backward (a gather): dx[n,:] = dy[ids[n],:]                      (N, C)
//
// Scatter to a map (sparse rows -> dense BEV map, MapShape {B, H, W}):
//   x       (N, C)   one row per occupied cell
//   coords  (N, 3)   int64 (b, y, x) of each row: 0 <= b < B, 0 <= y < H,
//                    0 <= x < W (x the column / width index, y the row)
//   y       (B*H*W, C), rows in (b, y, x) order: row = (b*H + y)*W + x;
//                    cells no row maps to are zero, rows with the same
//                    coordinates are summed (a segment sum over cell rows)
//   backward (a gather): dx[n,:] = dy[row(coords[n]),:]              (N, C)
//
// Determinism: the sums are computed per output row, adding the input rows
// in increasing n (a stable counting sort groups them first), so the result
// is bit-identical for any number of OpenMP threads and equal to the serial
// loop "for n: y[ids[n]] += x[n]" on a zeroed y.
//
// Primitives take the backend first (cpu{threads}); the layers SegmentSum
// and ScatterToMap wrap them in the layer contract, with the ids / coords
// and sizes as extra forward arguments after y, kept in the Context. No
// parameters. Every id and coordinate is range-checked before anything is
// written, and the error names the bad value and its position.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/map_shape.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

/// (N, 3) int64 (b, y, x) cell coordinates.
using ConstCoordsRef = Eigen::Ref<const RowMatrix<std::int64_t>>;
using ConstIndexVectorRef = Eigen::Ref<const IndexVector>;

/// Throws vqkit::error naming `where`, the position and the value of the
/// first id outside [0, bound); `what` names the ids ("ids", "idx").
inline void require_ids_in_range(ConstIndexVectorRef ids, Index bound, const char* where,
                                 const char* what = "ids", const char* bound_name = "num_segments") {
  for (Index n = 0; n < ids.size(); ++n)
    VQKIT_REQUIRE(ids[n] >= 0 && ids[n] < bound, where, what, "[", n, "]=", ids[n],
                  " is out of range [0, ", bound, ") (", bound_name, "=", bound, ")");
}

/// Map rows (b*H + y)*W + x of (N, 3) (b, y, x) coordinates; throws
/// vqkit::error naming the first row outside the map and its coordinates.
inline IndexVector map_rows_of(ConstCoordsRef coords, const MapShape& s, const char* where) {
  VQKIT_REQUIRE(s.batch >= 1 && s.height >= 1 && s.width >= 1, where,
                "map shape must be positive, got batch=", s.batch, " height=", s.height,
                " width=", s.width);
  VQKIT_REQUIRE(coords.cols() == 3, where, "coords has ", coords.cols(),
                " columns, expected 3 (b, y, x)");
  IndexVector rows(coords.rows());
  for (Index n = 0; n < coords.rows(); ++n) {
    const std::int64_t b = coords(n, 0), y = coords(n, 1), x = coords(n, 2);
    VQKIT_REQUIRE(b >= 0 && b < s.batch && y >= 0 && y < s.height && x >= 0 && x < s.width,
                  where, "coords[", n, "]=(b=", b, ", y=", y, ", x=", x,
                  ") is outside the map batch=", s.batch, " height=", s.height,
                  " width=", s.width);
    rows[n] = s.row(b, y, x);
  }
  return rows;
}

namespace detail {

// Rows grouped by segment: the rows of segment s are
// order[offsets[s] .. offsets[s+1]) in increasing n (stable counting sort).
struct SegmentGroups {
  std::vector<Index> offsets;
  std::vector<Index> order;
};

inline SegmentGroups group_by_segment(ConstIndexVectorRef ids, Index num_segments) {
  SegmentGroups g;
  g.offsets.assign(static_cast<std::size_t>(num_segments) + 1, 0);
  for (Index n = 0; n < ids.size(); ++n) ++g.offsets[static_cast<std::size_t>(ids[n]) + 1];
  for (Index s = 0; s < num_segments; ++s)
    g.offsets[static_cast<std::size_t>(s) + 1] += g.offsets[static_cast<std::size_t>(s)];
  g.order.resize(static_cast<std::size_t>(ids.size()));
  std::vector<Index> next(g.offsets.begin(), g.offsets.end() - 1);
  for (Index n = 0; n < ids.size(); ++n)
    g.order[static_cast<std::size_t>(next[static_cast<std::size_t>(ids[n])]++)] = n;
  return g;
}

// Below this many touched values a loop runs on one thread.
inline constexpr Index kParallelWork = Index(1) << 14;

inline int threads_for(const cpu& be, Index work) {
  return work >= kParallelWork ? be.num_threads() : 1;
}

// out (S, C) += segment sums of x; ids already checked. out must not alias x.
template <class T>
void segment_sum_add_unchecked(const cpu& be, ConstMatrixRef<T> x, ConstIndexVectorRef ids,
                               MatrixRef<T> out) {
  const Index S = out.rows();
  const SegmentGroups g = group_by_segment(ids, S);
  const int nt = threads_for(be, (x.rows() + S) * x.cols());
  (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (Index s = 0; s < S; ++s) {
    const auto begin = g.offsets[static_cast<std::size_t>(s)];
    const auto end = g.offsets[static_cast<std::size_t>(s) + 1];
    for (Index k = begin; k < end; ++k) out.row(s) += x.row(g.order[static_cast<std::size_t>(k)]);
  }
}

// out (N, C) = src rows ids, into out's buffer (reused when it has the
// size); ids already checked. out may be (or overlap) src: then the rows go
// to a fresh matrix first.
template <class T>
void gather_rows_into(const cpu& be, ConstMatrixRef<T> src, ConstIndexVectorRef ids,
                      RowMatrix<T>& out) {
  RowMatrix<T> fresh;
  RowMatrix<T>& dst = storage_overlaps(out, src) ? fresh : out;
  dst.resize(ids.size(), src.cols());
  const int nt = threads_for(be, ids.size() * src.cols());
  (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (Index n = 0; n < ids.size(); ++n) dst.row(n) = src.row(ids[n]);
  if (&dst == &fresh) out.swap(fresh);
}

// The same into a fresh matrix.
template <class T>
RowMatrix<T> gather_rows_unchecked(const cpu& be, ConstMatrixRef<T> src, ConstIndexVectorRef ids) {
  RowMatrix<T> out;
  gather_rows_into<T>(be, src, ids, out);
  return out;
}

}  // namespace detail

/// y (S, C) = segment sums of x (N, C) by ids (N); y is resized and
/// overwritten and may be the same matrix as x.
template <class T>
void segment_sum(const cpu& be, ConstMatrixRef<T> x, ConstIndexVectorRef ids, Index num_segments,
                 RowMatrix<T>& y) {
  VQKIT_REQUIRE(num_segments >= 0, "segment_sum", "num_segments must be >= 0, got num_segments=",
                num_segments);
  VQKIT_REQUIRE(ids.size() == x.rows(), "segment_sum", "ids has ", ids.size(),
                " entries, expected one per row of x (", x.rows(), ")");
  require_ids_in_range(ids, num_segments, "segment_sum");
  if (detail::storage_overlaps(y, x)) {
    RowMatrix<T> out = RowMatrix<T>::Zero(num_segments, x.cols());
    detail::segment_sum_add_unchecked<T>(be, x, ids, out);
    y = std::move(out);
  } else {
    y.setZero(num_segments, x.cols());  // y's buffer reused when it has the size
    detail::segment_sum_add_unchecked<T>(be, x, ids, y);
  }
}

/// out (S, C) += segment sums of x (N, C) by ids (N), S = out.rows(); out
/// must not overlap x. Checks everything before the first write.
template <class T>
void segment_sum_add(const cpu& be, ConstMatrixRef<T> x, ConstIndexVectorRef ids,
                     MatrixRef<T> out) {
  VQKIT_REQUIRE(ids.size() == x.rows(), "segment_sum_add", "ids has ", ids.size(),
                " entries, expected one per row of x (", x.rows(), ")");
  VQKIT_REQUIRE(out.cols() == x.cols(), "segment_sum_add", "out has ", out.cols(),
                " columns, expected x's ", x.cols());
  require_ids_in_range(ids, out.rows(), "segment_sum_add");
  detail::segment_sum_add_unchecked<T>(be, x, ids, out);
}

/// out (N, C) = src[ids[n], :] (the backward of segment_sum); out is resized
/// and overwritten and may be the same matrix as src.
template <class T>
void gather_rows(const cpu& be, ConstMatrixRef<T> src, ConstIndexVectorRef ids, RowMatrix<T>& out) {
  require_ids_in_range(ids, src.rows(), "gather_rows", "ids", "source rows");
  detail::gather_rows_into<T>(be, src, ids, out);  // out's buffer reused
}

/// Dense map y (B*H*W, C) from sparse rows x (N, C) at coords (N, 3) (b, y, x);
/// empty cells zero, duplicate coordinates summed. y may be the same matrix as x.
template <class T>
void scatter_to_map(const cpu& be, ConstMatrixRef<T> x, ConstCoordsRef coords,
                    const MapShape& shape, RowMatrix<T>& y) {
  const IndexVector rows = map_rows_of(coords, shape, "scatter_to_map");
  VQKIT_REQUIRE(coords.rows() == x.rows(), "scatter_to_map", "coords has ", coords.rows(),
                " rows, expected one per row of x (", x.rows(), ")");
  RowMatrix<T> out = RowMatrix<T>::Zero(shape.rows(), x.cols());
  detail::segment_sum_add_unchecked<T>(be, x, rows, out);
  y = std::move(out);
}

/// Layer form of segment_sum:
///   forward(x (N,C), y, ids (N), num_segments) -> y (S, C)
///   backward(ctx, dy (S,C), dx) -> dx (N, C) = dy[ids]   (overwritten)
template <class T, class Backend = cpu>
class SegmentSum {
  static_assert(std::is_floating_point_v<T>, "SegmentSum<T>: T must be float or double");

 public:
  struct Context {
    IndexVector ids;           // (N)
    Index num_segments = 0;    // S
    Index cols = 0;            // C
  };

  explicit SegmentSum(Backend backend = {}) : backend_(std::move(backend)) {}

  /// y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, ConstIndexVectorRef ids,
                  Index num_segments) const {
    Context ctx;
    ctx.ids = ids;
    segment_sum<T>(backend_, x, ctx.ids, num_segments, y);  // checks everything first
    ctx.num_segments = num_segments;
    ctx.cols = y.cols();
    return ctx;
  }

  /// dy: (S, C). If dx is given, overwrites it with dy[ids] (N, C); dx may be
  /// the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.num_segments && dy.cols() == ctx.cols, "SegmentSum::backward",
                  "dy is ", dy.rows(), "x", dy.cols(), ", expected ", ctx.num_segments, "x",
                  ctx.cols, " (num_segments x C of the forward)");
    if (dx == nullptr) return;
    require_ids_in_range(ctx.ids, ctx.num_segments, "SegmentSum::backward");
    *dx = detail::gather_rows_unchecked<T>(backend_, dy, ctx.ids);
  }

  ParameterList<T> parameters(const std::string& /*prefix*/ = "") { return {}; }
  void zero_grad() {}
  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
};

/// Layer form of scatter_to_map:
///   forward(x (N,C), y, coords (N,3) (b,y,x), MapShape) -> y (B*H*W, C)
///   backward(ctx, dy (B*H*W,C), dx) -> dx (N, C) = dy[row(coords)]   (overwritten)
template <class T, class Backend = cpu>
class ScatterToMap {
  static_assert(std::is_floating_point_v<T>, "ScatterToMap<T>: T must be float or double");

 public:
  struct Context {
    IndexVector rows;  // (N) map row of each input row
    MapShape shape;
    Index cols = 0;    // C
  };

  explicit ScatterToMap(Backend backend = {}) : backend_(std::move(backend)) {}

  /// y may be the same matrix as x.
  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y, ConstCoordsRef coords,
                  const MapShape& shape) const {
    Context ctx;
    ctx.rows = map_rows_of(coords, shape, "ScatterToMap::forward");
    VQKIT_REQUIRE(coords.rows() == x.rows(), "ScatterToMap::forward", "coords has ",
                  coords.rows(), " rows, expected one per row of x (", x.rows(), ")");
    RowMatrix<T> out = RowMatrix<T>::Zero(shape.rows(), x.cols());
    detail::segment_sum_add_unchecked<T>(backend_, x, ctx.rows, out);
    y = std::move(out);
    ctx.shape = shape;
    ctx.cols = x.cols();
    return ctx;
  }

  /// dy: (B*H*W, C). If dx is given, overwrites it with the gathered rows
  /// (N, C); dx may be the same matrix as dy.
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    VQKIT_REQUIRE(dy.rows() == ctx.shape.rows() && dy.cols() == ctx.cols,
                  "ScatterToMap::backward", "dy is ", dy.rows(), "x", dy.cols(), ", expected ",
                  ctx.shape.rows(), "x", ctx.cols, " (batch*height*width x C of the forward)");
    if (dx == nullptr) return;
    require_ids_in_range(ctx.rows, ctx.shape.rows(), "ScatterToMap::backward", "rows",
                         "map rows");
    *dx = detail::gather_rows_unchecked<T>(backend_, dy, ctx.rows);
  }

  ParameterList<T> parameters(const std::string& /*prefix*/ = "") { return {}; }
  void zero_grad() {}
  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
};

}  // namespace vqkit
