// vqkit/layers/trilinear.hpp - trilinear sampling of a neural feature grid at
// continuous world points (PyTorch's 3-D F.grid_sample with mode='bilinear',
// padding_mode='zeros', align_corners=False, in world units).
//
// The grid is the decoder's BEV map, one feature column block per z level:
//   grid    (B*NY*NX, NZ*C)  rows in (b, y, x) order (MapShape{B, NY, NX}),
//                            columns in (z, c) order: col = z*C + c
//   points  (P, 3)           world coordinates (x, y, z), one point per row
//   batch   (P)              int64 batch index of each point, in [0, B)
//   out     (P, C)
// B is grid.rows() / (NY*NX) (the rows must divide evenly).
//
// Geometry (GridGeometry): origin (x0, y0, z0), voxel size (sx, sy, sz) > 0,
// NX x NY x NZ cells, C channels. Cell (ix, iy, iz) covers
// [x0 + ix*sx, x0 + (ix+1)*sx) x ... and has its centre at
// origin + (i + 0.5) * size (align_corners=False). World x indexes the x
// (width, column) axis of the map, world y the y (height, row) axis and world
// z the z levels, never swapped.
//
// forward, per point p with batch index b:
//   continuous cell coordinates  u = (x - x0)/sx - 0.5,  v = (y - y0)/sy - 0.5,
//                                s = (z - z0)/sz - 0.5     (cell centres at integers)
//   i0 = floor(u), j0 = floor(v), k0 = floor(s);  fu = u - i0, fv = v - j0, fs = s - k0
//   out[p, c] = sum over the 8 corners (i, j, k) in {i0, i0+1} x {j0, j0+1} x {k0, k0+1}
//               of  wu(i) * wv(j) * ws(k) * grid[row(b, j, i), k*C + c]
//   with wu(i0) = 1 - fu, wu(i0+1) = fu (likewise wv, ws).
//   Corners outside the grid (i not in [0, NX), j not in [0, NY), k not in
//   [0, NZ)) contribute zero (padding_mode='zeros'): a point half a cell
//   outside the grid fades linearly to zero, one a whole cell outside reads 0.
//
// backward, given dy = dL/dout (P, C):
//   dgrid[row(b, j, i), k*C + c] = sum over (p, corner) hitting that cell of
//                                  wu * wv * ws * dy[p, c]           (scatter-add)
//   dpoints[p, 0] = sum_c dy[p, c] * dout[p, c]/dx   with dout/dx = sum over corners of
//                   (+-1) * wv * ws * grid[...] / sx  (+ for i0+1, - for i0); likewise y, z.
//   The point gradient is the one-sided derivative at cell-centre planes
//   (where the interpolation has a kink), the side chosen by floor() as in
//   PyTorch. Both outputs are overwritten (the grid is an input, not a
//   parameter). The point Jacobian (P, 3C) is kept in the Context only when
//   forward is asked for it (point_grad = true).
//
// Determinism: forward and the point gradient are parallel over points; the
// grid gradient sorts the (point, corner) contributions by target grid row
// (a stable counting sort) and sums each row's contributions in (point,
// corner) order, in parallel over rows, so the result is bit-identical for
// every thread count.
//
// Every check happens before the first write: bad shapes, a batch index
// outside [0, B), non-finite points or a bad geometry throw vqkit::error and
// leave the outputs untouched.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
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

/// Where the feature grid sits in the world and how it is laid out.
struct GridGeometry {
  std::array<double, 3> origin{0.0, 0.0, 0.0};  // (x0, y0, z0), the grid's min corner
  std::array<double, 3> voxel{1.0, 1.0, 1.0};   // (sx, sy, sz), cell size per axis
  Index nx = 0;        // cells along world x (map width)
  Index ny = 0;        // cells along world y (map height)
  Index nz = 0;        // cells along world z (z levels)
  Index channels = 0;  // C, features per cell

  Index grid_cols() const { return nz * channels; }
  /// The BEV map layout of a grid holding `batch` scenes.
  MapShape map_shape(Index batch) const { return MapShape{batch, ny, nx}; }

  /// World coordinates of the centre of cell (ix, iy, iz).
  std::array<double, 3> cell_center(Index ix, Index iy, Index iz) const {
    return {origin[0] + (static_cast<double>(ix) + 0.5) * voxel[0],
            origin[1] + (static_cast<double>(iy) + 0.5) * voxel[1],
            origin[2] + (static_cast<double>(iz) + 0.5) * voxel[2]};
  }

  /// Throws vqkit::error naming `where` unless the geometry is usable.
  void validate(const char* where) const {
    VQKIT_REQUIRE(nx >= 1 && ny >= 1 && nz >= 1, where,
                  "grid size must be positive, got nx=", nx, " ny=", ny, " nz=", nz);
    VQKIT_REQUIRE(channels >= 1, where, "channels must be >= 1, got channels=", channels);
    for (int a = 0; a < 3; ++a) {
      VQKIT_REQUIRE(std::isfinite(origin[a]), where, "origin[", a, "] must be finite, got ",
                    origin[a]);
      VQKIT_REQUIRE(std::isfinite(voxel[a]) && voxel[a] > 0.0, where, "voxel[", a,
                    "] must be finite and > 0, got ", voxel[a]);
    }
  }
};

template <class T, class Backend = cpu>
class TrilinearSampler {
  static_assert(std::is_floating_point_v<T>, "TrilinearSampler<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned).
  struct Context {
    Index batch = 0;           // B of the forward grid
    RowMatrix<T> points;       // (P, 3)
    IndexVector batch_index;   // (P)
    RowMatrix<T> jacobian;     // (P, 3C) dout/dx | dout/dy | dout/dz, or 0 x 0
  };

  explicit TrilinearSampler(const GridGeometry& geometry, Backend backend = {})
      : backend_(std::move(backend)), geo_(geometry) {
    geo_.validate("TrilinearSampler");
  }

  /// grid (B*NY*NX, NZ*C), points (P, 3), batch_index (P). Resizes and fills
  /// out (P, C). With point_grad, keeps the point Jacobian so that backward
  /// can return dL/dpoints.
  Context forward(ConstMatrixRef<T> grid, ConstMatrixRef<T> points,
                  const Eigen::Ref<const IndexVector>& batch_index, RowMatrix<T>& out,
                  bool point_grad = true) const {
    const char* where = "TrilinearSampler::forward";
    const Index batch = check_grid(grid, where);
    check_points(points, batch_index, batch, where);
    const Index P = points.rows(), C = geo_.channels;
    Context ctx;
    ctx.batch = batch;
    ctx.points = points;  // copied before out is written, so out may alias points
    ctx.batch_index = batch_index;
    if (point_grad) ctx.jacobian.resize(P, 3 * C);
    RowMatrix<T> result(P, C);
    const RowMatrix<T>& pts = ctx.points;
    const std::int64_t* bidx = ctx.batch_index.data();
    RowMatrix<T>* jac = point_grad ? &ctx.jacobian : nullptr;
#pragma omp parallel for schedule(static) num_threads(backend_.num_threads()) if (P >= 256)
    for (Index p = 0; p < P; ++p) {
      const Cell cell = locate(pts(p, 0), pts(p, 1), pts(p, 2));
      auto o = result.row(p);
      o.setZero();
      if (jac != nullptr) jac->row(p).setZero();
      if (!cell.inside) continue;
      for (int k = 0; k < 8; ++k) {
        Index row, col;
        if (!corner_index(cell, k, bidx[p], row, col)) continue;
        const auto value = grid.row(row).segment(col, C);
        o += static_cast<T>(corner_weight(cell, k)) * value;
        if (jac != nullptr) {
          for (int a = 0; a < 3; ++a)
            jac->row(p).segment(a * C, C) += static_cast<T>(corner_dweight(cell, k, a)) * value;
        }
      }
    }
    out = std::move(result);
    return ctx;
  }

  /// dy: (P, C). Overwrites dgrid (B*NY*NX, NZ*C) with dL/dgrid and dpoints
  /// (P, 3) with dL/dpoints; either may be null. dpoints needs a Context from
  /// forward(..., point_grad = true).
  void backward(const Context& ctx, ConstMatrixRef<T> dy, RowMatrix<T>* dgrid,
                RowMatrix<T>* dpoints) const {
    const char* where = "TrilinearSampler::backward";
    const Index P = ctx.points.rows(), C = geo_.channels;
    VQKIT_REQUIRE(ctx.batch >= 1, where, "context batch must be >= 1, got ", ctx.batch);
    check_points(ctx.points, ctx.batch_index, ctx.batch, where);
    VQKIT_REQUIRE(dy.rows() == P && dy.cols() == C, where, "dy is ", dy.rows(), "x", dy.cols(),
                  ", expected ", P, "x", C, " (P from the forward points, channels=", C, ")");
    if (dpoints != nullptr) {
      VQKIT_REQUIRE(ctx.jacobian.rows() == P && ctx.jacobian.cols() == 3 * C, where,
                    "dpoints requested but the context holds no point Jacobian (call forward "
                    "with point_grad = true); jacobian is ",
                    ctx.jacobian.rows(), "x", ctx.jacobian.cols(), ", expected ", P, "x", 3 * C);
    }
    // Everything is computed into temporaries first, so dy may alias an output.
    RowMatrix<T> dpts;
    if (dpoints != nullptr) {
      dpts.resize(P, 3);
#pragma omp parallel for schedule(static) num_threads(backend_.num_threads()) if (P >= 256)
      for (Index p = 0; p < P; ++p)
        for (int a = 0; a < 3; ++a)
          dpts(p, a) = dy.row(p).dot(ctx.jacobian.row(p).segment(a * C, C));
    }
    if (dgrid != nullptr) {
      const T* d0 = dgrid->data();
      const T* y0 = dy.data();
      const T* y1 = dy.size() > 0 ? y0 + (dy.rows() - 1) * dy.outerStride() + dy.cols() : y0;
      const std::less<const T*> lt;
      if (dgrid->size() > 0 && dy.size() > 0 && lt(d0, y1) && lt(y0, d0 + dgrid->size())) {
        RowMatrix<T> dg;  // dy lives in *dgrid: a temporary first
        grid_gradient(ctx, dy, dg);
        *dgrid = std::move(dg);
      } else {
        grid_gradient(ctx, dy, *dgrid);  // reuses dgrid's buffer when the size matches
      }
    }
    if (dpoints != nullptr) *dpoints = std::move(dpts);
  }

  /// No trainable parameters.
  ParameterList<T> parameters(const std::string& = "") { return {}; }
  void zero_grad() {}

  const GridGeometry& geometry() const { return geo_; }
  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
  GridGeometry geo_;

  // Where a point falls: the lower corner (i0, j0, k0) and the fractions.
  struct Cell {
    std::array<std::int64_t, 3> i0{0, 0, 0};
    std::array<double, 3> f{0.0, 0.0, 0.0};
    bool inside = false;  // false: every corner is outside, the sample is 0
  };

  Cell locate(double x, double y, double z) const {
    const double w[3] = {x, y, z};
    const Index n[3] = {geo_.nx, geo_.ny, geo_.nz};
    Cell c;
    for (int a = 0; a < 3; ++a) {
      const double u = (w[a] - geo_.origin[a]) / geo_.voxel[a] - 0.5;
      // Only u in (-1, n) has a corner inside with a non-zero weight; the
      // test also keeps huge values away from floor() -> int64.
      if (!(u > -1.0 && u < static_cast<double>(n[a]))) return c;
      const double fl = std::floor(u);
      c.i0[a] = static_cast<std::int64_t>(fl);
      c.f[a] = u - fl;
    }
    c.inside = true;
    return c;
  }

  // Corner k (bit 0: +1 in x, bit 1: +1 in y, bit 2: +1 in z) of a cell:
  // its grid row and first column, or false when it lies outside the grid.
  bool corner_index(const Cell& c, int k, std::int64_t b, Index& row, Index& col) const {
    const std::int64_t ix = c.i0[0] + (k & 1), iy = c.i0[1] + ((k >> 1) & 1),
                       iz = c.i0[2] + ((k >> 2) & 1);
    if (ix < 0 || ix >= geo_.nx || iy < 0 || iy >= geo_.ny || iz < 0 || iz >= geo_.nz)
      return false;
    row = (static_cast<Index>(b) * geo_.ny + iy) * geo_.nx + ix;
    col = static_cast<Index>(iz) * geo_.channels;
    return true;
  }

  static double axis_weight(const Cell& c, int k, int a) {
    return ((k >> a) & 1) ? c.f[a] : 1.0 - c.f[a];
  }
  static double corner_weight(const Cell& c, int k) {
    return axis_weight(c, k, 0) * axis_weight(c, k, 1) * axis_weight(c, k, 2);
  }
  // d(corner weight)/d(world coordinate a).
  double corner_dweight(const Cell& c, int k, int a) const {
    double d = (((k >> a) & 1) ? 1.0 : -1.0) / geo_.voxel[a];
    for (int o = 0; o < 3; ++o)
      if (o != a) d *= axis_weight(c, k, o);
    return d;
  }

  void grid_gradient(const Context& ctx, const ConstMatrixRef<T>& dy, RowMatrix<T>& dg) const {
    const Index P = ctx.points.rows(), C = geo_.channels;
    const Index rows = ctx.batch * geo_.ny * geo_.nx;
    dg.resize(rows, geo_.grid_cols());  // each row zeroed by the thread that sums into it (below)
    std::vector<Cell> cells(static_cast<std::size_t>(P));
#pragma omp parallel for schedule(static) num_threads(backend_.num_threads()) if (P >= 256)
    for (Index p = 0; p < P; ++p)
      cells[static_cast<std::size_t>(p)] =
          locate(ctx.points(p, 0), ctx.points(p, 1), ctx.points(p, 2));
    // Stable counting sort of the (point, corner) pairs by target row.
    std::vector<Index> start(static_cast<std::size_t>(rows) + 1, 0);
    for (Index p = 0; p < P; ++p) {
      const Cell& c = cells[static_cast<std::size_t>(p)];
      if (!c.inside) continue;
      for (int k = 0; k < 8; ++k) {
        Index row, col;
        if (corner_index(c, k, ctx.batch_index[p], row, col))
          ++start[static_cast<std::size_t>(row) + 1];
      }
    }
    for (std::size_t r = 0; r < static_cast<std::size_t>(rows); ++r) start[r + 1] += start[r];
    std::vector<Index> fill(start.begin(), start.end() - 1);
    std::vector<std::int64_t> entries(static_cast<std::size_t>(start.back()));
    for (Index p = 0; p < P; ++p) {
      const Cell& c = cells[static_cast<std::size_t>(p)];
      if (!c.inside) continue;
      for (int k = 0; k < 8; ++k) {
        Index row, col;
        if (corner_index(c, k, ctx.batch_index[p], row, col))
          entries[static_cast<std::size_t>(fill[static_cast<std::size_t>(row)]++)] = p * 8 + k;
      }
    }
#pragma omp parallel for schedule(dynamic, 64) num_threads(backend_.num_threads()) \
    if (start.back() >= 2048)
    for (Index r = 0; r < rows; ++r) {
      dg.row(r).setZero();
      for (Index e = start[static_cast<std::size_t>(r)]; e < start[static_cast<std::size_t>(r) + 1];
           ++e) {
        const std::int64_t code = entries[static_cast<std::size_t>(e)];
        const Index p = code / 8;
        const int k = static_cast<int>(code % 8);
        const Cell& c = cells[static_cast<std::size_t>(p)];
        Index row = 0, col = 0;  // corner_index sets both
        corner_index(c, k, ctx.batch_index[p], row, col);
        dg.row(r).segment(col, C) += static_cast<T>(corner_weight(c, k)) * dy.row(p);
      }
    }
  }

  // Returns B; throws unless grid is (B*NY*NX, NZ*C) with B >= 1.
  Index check_grid(const ConstMatrixRef<T>& grid, const char* where) const {
    const Index cells = geo_.ny * geo_.nx;
    VQKIT_REQUIRE(grid.cols() == geo_.grid_cols(), where, "grid has ", grid.cols(),
                  " columns, expected nz*channels=", geo_.nz, "*", geo_.channels, "=",
                  geo_.grid_cols());
    VQKIT_REQUIRE(grid.rows() >= cells && grid.rows() % cells == 0, where, "grid has ",
                  grid.rows(), " rows, expected a positive multiple of ny*nx=", geo_.ny, "*",
                  geo_.nx, "=", cells);
    return grid.rows() / cells;
  }

  template <class PointsT>
  void check_points(const PointsT& points, const Eigen::Ref<const IndexVector>& batch_index,
                    Index batch, const char* where) const {
    VQKIT_REQUIRE(points.cols() == 3, where, "points has ", points.cols(),
                  " columns, expected 3 (x, y, z)");
    VQKIT_REQUIRE(batch_index.size() == points.rows(), where, "batch_index has ",
                  batch_index.size(), " entries, expected one per point (P=", points.rows(),
                  ")");
    for (Index p = 0; p < points.rows(); ++p) {
      VQKIT_REQUIRE(batch_index[p] >= 0 && batch_index[p] < batch, where, "batch_index[", p,
                    "] = ", batch_index[p], " is outside [0, B=", batch, ")");
      for (int a = 0; a < 3; ++a)
        VQKIT_REQUIRE(std::isfinite(static_cast<double>(points(p, a))), where, "points(", p,
                      ", ", a, ") is not finite (", points(p, a), ")");
    }
  }
};

}  // namespace vqkit
