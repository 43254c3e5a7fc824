// vqkit/lidar/voxelizer.hpp - sparse voxelisation of a batch of scans, and the
// coarse occupancy grid used for spatial skipping.
//
// Grid (VoxelGrid): the ROI [x_min, x_max) x [y_min, y_max) x [z_min, z_max)
// cut into nx x ny x nz voxels of size s = ((x_max-x_min)/nx, (y_max-y_min)/ny,
// (z_max-z_min)/nz). Presets: paper() = +-80 m, 1024 x 1024 x 64 over z
// [-4.5, 4.5] (s = 0.15625 x 0.15625 x 0.140625 m); small() = +-25.6 m,
// 128 x 128 x 16 (s = 0.4 x 0.4 x 0.5625 m).
//
// A point p = (x, y, z) lies in the ROI iff x_min <= x < x_max and likewise
// for y and z (half-open: a point exactly on the far face is outside); its
// voxel is ix = floor((x - x_min) / s_x) (clamped to nx-1 against rounding),
// likewise iy, iz, and its offset to the voxel centre is
//   offset = p - (x_min + (ix + 0.5) s_x, y_min + (iy + 0.5) s_y, z_min + (iz + 0.5) s_z)
// in metres, each component in [-s/2, s/2].
//
// voxelize(frames, grid), B = frames.size(), frame b (P_b, >= 3) (columns
// x y z [...]). The dense nx*ny*nz volume is never built: each kept point gets
// the key ((b*nz + iz)*ny + iy)*nx + ix, the keys are sorted, and runs of
// equal keys are the voxels. Output (Pk kept points, V occupied voxels):
//   voxels         (V, 4) int64, columns (b, z, y, x), sorted ascending by the
//                  key above, i.e. lexicographically by (b, z, y, x); unique
//   voxel_bev_row  (V)   row of the voxel's BEV cell in MapShape order
//                        (B, H = ny, W = nx): (b*ny + y)*nx + x
//   voxel_z        (V)   its z index (= voxels(:, 1))
//   voxel_points   (V)   points in the voxel (>= 1)
//   point_voxel    (Pk)  row of `voxels` holding each kept point
//   point_batch    (Pk)  its frame b
//   point_source   (Pk)  its row in frame b
//   point_offset   (Pk, 3) offset to its voxel centre (x, y, z), metres
//   kept, dropped  (B)   points per frame inside / outside the ROI
// Kept points are listed in input order (frame 0's in row order, then frame
// 1's, ...). Every input value must be finite (throws naming frame and row).
// A scatter-add over point_voxel sums a PointNet's per-point features into
// voxels; one over voxel_bev_row sums voxels into BEV pillars.
//
// Coarse occupancy (OccupancyGrid), for spatial skipping and as the target
// of the spatial-skip head: voxel occupancy max-pooled by `pool_xy` in x and
// y and by `pool_z` in z (default 1: z is kept, not collapsed; a coarse cell
// is occupied iff any voxel inside it holds a point). Paper: pool_xy = 8
// (1024 -> 128); small config: pool_xy = 4 (128 -> 32, one coarse cell per
// decoder token, see docs/tokenizer.md). It is dense but small
// (B * ny/pool * nx/pool * nz/pool_z bytes) and laid out as the
// (B * Hc * Wc, Zc) matrix of the head's logits: byte ((b*Hc + y)*Wc + x)*Zc + z.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/map_shape.hpp"

namespace vqkit::lidar {

struct VoxelGrid {
  double x_min = -25.6, x_max = 25.6;
  double y_min = -25.6, y_max = 25.6;
  double z_min = -4.5, z_max = 4.5;
  Index nx = 128, ny = 128, nz = 16;

  static VoxelGrid paper() { return {-80.0, 80.0, -80.0, 80.0, -4.5, 4.5, 1024, 1024, 64}; }
  static VoxelGrid small() { return {-25.6, 25.6, -25.6, 25.6, -4.5, 4.5, 128, 128, 16}; }

  double size_x() const { return (x_max - x_min) / static_cast<double>(nx); }
  double size_y() const { return (y_max - y_min) / static_cast<double>(ny); }
  double size_z() const { return (z_max - z_min) / static_cast<double>(nz); }

  void validate(const char* where) const {
    VQKIT_REQUIRE(std::isfinite(x_min) && std::isfinite(x_max) && x_min < x_max, where,
                  "ROI needs x_min < x_max (finite), got x_min=", x_min, " x_max=", x_max);
    VQKIT_REQUIRE(std::isfinite(y_min) && std::isfinite(y_max) && y_min < y_max, where,
                  "ROI needs y_min < y_max (finite), got y_min=", y_min, " y_max=", y_max);
    VQKIT_REQUIRE(std::isfinite(z_min) && std::isfinite(z_max) && z_min < z_max, where,
                  "ROI needs z_min < z_max (finite), got z_min=", z_min, " z_max=", z_max);
    VQKIT_REQUIRE(nx >= 1 && ny >= 1 && nz >= 1, where, "voxel counts must be >= 1, got nx=", nx,
                  " ny=", ny, " nz=", nz);
    // keys ((b*nz + z)*ny + y)*nx + x must fit in int64 for any sane batch
    VQKIT_REQUIRE(nx <= (Index(1) << 20) && ny <= (Index(1) << 20) && nz <= (Index(1) << 16),
                  where, "voxel counts too large, got nx=", nx, " ny=", ny, " nz=", nz);
  }
};

/// Dense coarse occupancy, byte ((b*ny + y)*nx + x)*nz + z (see the header comment).
struct OccupancyGrid {
  Index batch = 0, nx = 0, ny = 0, nz = 0;        ///< coarse cells
  double x_min = 0, y_min = 0, z_min = 0;         ///< ROI corner
  double cell_x = 1, cell_y = 1, cell_z = 1;      ///< coarse cell size, metres
  std::vector<std::uint8_t> occupied;             ///< 0 or 1

  Index index(Index b, Index z, Index y, Index x) const { return ((b * ny + y) * nx + x) * nz + z; }
  bool at(Index b, Index z, Index y, Index x) const {
    return occupied[static_cast<std::size_t>(index(b, z, y, x))] != 0;
  }
  MapShape map_shape() const { return {batch, ny, nx}; }
  Index count() const {
    return static_cast<Index>(std::count(occupied.begin(), occupied.end(), std::uint8_t{1}));
  }
  /// (B*ny*nx, nz) of 0/1: the BCE target of the spatial-skip head's logits.
  template <class T>
  RowMatrix<T> as_matrix() const {
    RowMatrix<T> m(batch * ny * nx, nz);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = T(occupied[static_cast<std::size_t>(i)]);
    return m;
  }
};

using VoxelCoords = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 4, Eigen::RowMajor>;

template <class T>
struct Voxelization {
  VoxelGrid grid;
  Index batch = 0;
  VoxelCoords voxels;          ///< (V, 4): b z y x
  IndexVector voxel_bev_row;   ///< (V)
  IndexVector voxel_z;         ///< (V)
  IndexVector voxel_points;    ///< (V)
  IndexVector point_voxel;     ///< (Pk)
  IndexVector point_batch;     ///< (Pk)
  IndexVector point_source;    ///< (Pk)
  RowMatrix<T> point_offset;   ///< (Pk, 3)
  std::vector<Index> kept;     ///< (B)
  std::vector<Index> dropped;  ///< (B)

  Index voxel_count() const { return voxels.rows(); }
  Index point_count() const { return point_voxel.size(); }
  /// The BEV map the voxels scatter into: (B, ny, nx).
  MapShape bev_shape() const { return {batch, grid.ny, grid.nx}; }
};

namespace detail {
/// Cell index of coordinate v in [lo, lo + n*s), or -1 when outside.
inline Index cell_of(double v, double lo, double hi, double s, Index n) {
  if (!(v >= lo && v < hi)) return -1;
  const Index i = static_cast<Index>(std::floor((v - lo) / s));
  return std::clamp<Index>(i, 0, n - 1);
}
}  // namespace detail

template <class T>
Voxelization<T> voxelize(const std::vector<ConstMatrixRef<T>>& frames, const VoxelGrid& grid) {
  constexpr const char* where = "voxelize";
  grid.validate(where);
  VQKIT_REQUIRE(!frames.empty(), where, "no frames given (batch of 0)");
  for (std::size_t b = 0; b < frames.size(); ++b) {
    const auto& f = frames[b];
    VQKIT_REQUIRE(f.cols() >= 3, where, "frame ", b, " has ", f.cols(),
                  " columns, expected at least 3 (x y z)");
    if (!f.allFinite())
      for (Index i = 0; i < f.rows(); ++i)
        for (Index j = 0; j < f.cols(); ++j)
          VQKIT_REQUIRE(std::isfinite(static_cast<double>(f(i, j))), where, "frame ", b,
                        " holds a non-finite value (", f(i, j), ") at point ", i, ", column ", j);
  }
  const Index B = static_cast<Index>(frames.size());
  const double sx = grid.size_x(), sy = grid.size_y(), sz = grid.size_z();

  Voxelization<T> out;
  out.grid = grid;
  out.batch = B;
  out.kept.assign(frames.size(), 0);
  out.dropped.assign(frames.size(), 0);

  struct Kept {
    std::int64_t key;
    Index point;  // position among kept points
  };
  std::vector<Kept> keys;
  std::vector<std::int64_t> pb, ps;
  std::vector<std::array<Index, 3>> cell;
  Index total = 0;
  for (const auto& f : frames) total += f.rows();
  keys.reserve(static_cast<std::size_t>(total));
  for (Index b = 0; b < B; ++b) {
    const auto& f = frames[static_cast<std::size_t>(b)];
    for (Index i = 0; i < f.rows(); ++i) {
      const Index ix = detail::cell_of(static_cast<double>(f(i, 0)), grid.x_min, grid.x_max, sx, grid.nx);
      const Index iy = detail::cell_of(static_cast<double>(f(i, 1)), grid.y_min, grid.y_max, sy, grid.ny);
      const Index iz = detail::cell_of(static_cast<double>(f(i, 2)), grid.z_min, grid.z_max, sz, grid.nz);
      if (ix < 0 || iy < 0 || iz < 0) {
        ++out.dropped[static_cast<std::size_t>(b)];
        continue;
      }
      ++out.kept[static_cast<std::size_t>(b)];
      const std::int64_t key = ((b * grid.nz + iz) * grid.ny + iy) * grid.nx + ix;
      keys.push_back({key, static_cast<Index>(pb.size())});
      pb.push_back(b);
      ps.push_back(i);
      cell.push_back({ix, iy, iz});
    }
  }
  const Index Pk = static_cast<Index>(pb.size());
  out.point_voxel.resize(Pk);
  out.point_batch.resize(Pk);
  out.point_source.resize(Pk);
  out.point_offset.resize(Pk, 3);
  for (Index k = 0; k < Pk; ++k) {
    const auto& f = frames[static_cast<std::size_t>(pb[static_cast<std::size_t>(k)])];
    const Index i = ps[static_cast<std::size_t>(k)];
    const auto& c = cell[static_cast<std::size_t>(k)];
    out.point_batch[k] = pb[static_cast<std::size_t>(k)];
    out.point_source[k] = i;
    out.point_offset(k, 0) = T(static_cast<double>(f(i, 0)) - (grid.x_min + (c[0] + 0.5) * sx));
    out.point_offset(k, 1) = T(static_cast<double>(f(i, 1)) - (grid.y_min + (c[1] + 0.5) * sy));
    out.point_offset(k, 2) = T(static_cast<double>(f(i, 2)) - (grid.z_min + (c[2] + 0.5) * sz));
  }

  // Sort by (key, point); points were appended in increasing order, so a
  // stable sort by key alone gives the same order. Where the key range is
  // not much larger than the point count (the small grid: 2 x 16 x 128 x 128
  // keys for ~240 K points), a counting sort; else a comparison sort.
  const std::int64_t range = std::int64_t(B) * grid.nz * grid.ny * grid.nx;
  if (range <= 4 * std::int64_t(keys.size()) + (std::int64_t(1) << 20)) {
    std::vector<Index> start(static_cast<std::size_t>(range) + 1, 0);
    for (const Kept& k : keys) ++start[static_cast<std::size_t>(k.key) + 1];
    for (std::size_t r = 0; r < static_cast<std::size_t>(range); ++r) start[r + 1] += start[r];
    std::vector<Kept> sorted(keys.size());
    for (const Kept& k : keys) sorted[static_cast<std::size_t>(start[static_cast<std::size_t>(k.key)]++)] = k;
    keys.swap(sorted);
  } else {
    std::sort(keys.begin(), keys.end(), [](const Kept& a, const Kept& b) {
      return a.key != b.key ? a.key < b.key : a.point < b.point;
    });
  }
  Index V = 0;
  for (std::size_t k = 0; k < keys.size(); ++k)
    if (k == 0 || keys[k].key != keys[k - 1].key) ++V;
  out.voxels.resize(V, 4);
  out.voxel_bev_row.resize(V);
  out.voxel_z.resize(V);
  out.voxel_points = IndexVector::Zero(V);
  Index v = -1;
  for (std::size_t k = 0; k < keys.size(); ++k) {
    if (k == 0 || keys[k].key != keys[k - 1].key) {
      ++v;
      std::int64_t r = keys[k].key;
      const std::int64_t x = r % grid.nx;
      r /= grid.nx;
      const std::int64_t y = r % grid.ny;
      r /= grid.ny;
      const std::int64_t z = r % grid.nz;
      const std::int64_t b = r / grid.nz;
      out.voxels.row(v) << b, z, y, x;
      out.voxel_bev_row[v] = (b * grid.ny + y) * grid.nx + x;
      out.voxel_z[v] = z;
    }
    out.point_voxel[keys[k].point] = v;
    ++out.voxel_points[v];
  }
  return out;
}

template <class T>
Voxelization<T> voxelize(const std::vector<RowMatrix<T>>& frames, const VoxelGrid& grid) {
  std::vector<ConstMatrixRef<T>> refs;
  refs.reserve(frames.size());
  for (const auto& f : frames) refs.emplace_back(f);
  return voxelize<T>(refs, grid);
}

/// One frame (batch of 1).
template <class T>
Voxelization<T> voxelize(ConstMatrixRef<T> frame, const VoxelGrid& grid) {
  std::vector<ConstMatrixRef<T>> refs;
  refs.emplace_back(frame);
  return voxelize<T>(refs, grid);
}

/// Coarse occupancy of a voxelisation, max-pooled by pool_xy in x and y and
/// by pool_z in z; nx, ny must be multiples of pool_xy and nz of pool_z.
template <class T>
OccupancyGrid coarse_occupancy(const Voxelization<T>& vox, Index pool_xy, Index pool_z = 1) {
  constexpr const char* where = "coarse_occupancy";
  const VoxelGrid& g = vox.grid;
  VQKIT_REQUIRE(pool_xy >= 1 && pool_z >= 1, where, "pool factors must be >= 1, got pool_xy=",
                pool_xy, " pool_z=", pool_z);
  VQKIT_REQUIRE(g.nx % pool_xy == 0 && g.ny % pool_xy == 0, where, "nx=", g.nx, " and ny=", g.ny,
                " must be multiples of pool_xy=", pool_xy);
  VQKIT_REQUIRE(g.nz % pool_z == 0, where, "nz=", g.nz, " must be a multiple of pool_z=", pool_z);
  OccupancyGrid occ;
  occ.batch = vox.batch;
  occ.nx = g.nx / pool_xy;
  occ.ny = g.ny / pool_xy;
  occ.nz = g.nz / pool_z;
  occ.x_min = g.x_min;
  occ.y_min = g.y_min;
  occ.z_min = g.z_min;
  occ.cell_x = g.size_x() * static_cast<double>(pool_xy);
  occ.cell_y = g.size_y() * static_cast<double>(pool_xy);
  occ.cell_z = g.size_z() * static_cast<double>(pool_z);
  occ.occupied.assign(static_cast<std::size_t>(occ.batch * occ.ny * occ.nx * occ.nz), 0);
  for (Index v = 0; v < vox.voxel_count(); ++v) {
    const Index b = vox.voxels(v, 0), z = vox.voxels(v, 1) / pool_z, y = vox.voxels(v, 2) / pool_xy,
                x = vox.voxels(v, 3) / pool_xy;
    occ.occupied[static_cast<std::size_t>(occ.index(b, z, y, x))] = 1;
  }
  return occ;
}

}  // namespace vqkit::lidar
