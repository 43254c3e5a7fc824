// vqkit/lidar/rays.hpp - LiDAR rays from scans, ray subsampling, and depth
// samples along each ray restricted to occupied coarse cells (spatial skipping).
//
// rays_from_points(frames, origins, min_depth, roi):
//   for point p of frame b with sensor origin o_b (default 0):
//     origin = o_b, depth = ||p - o_b||, direction = (p - o_b) / depth (unit)
//   Rays with depth <= min_depth are dropped (a point at the sensor has no
//   direction), and with a VoxelGrid `roi` so are points outside the ROI
//   (same half-open test as voxelize()); dropped[b] counts them.
//   RayBatch (R rays, frame by frame, in row order within a frame):
//     origin (R, 3), direction (R, 3), depth (R), batch (R) = b, source (R) = row in frame b.
//
// subsample_rays(rays, per_frame, rng): per frame, every ray if the frame has
// at most per_frame, else per_frame distinct rays drawn uniformly without
// replacement (partial Fisher-Yates with rng.below), kept in their original
// order. Deterministic from the Rng state.
//
// occupied_intervals(occ, b, o, d, near, far): the parts of the segment
// {o + t d : near <= t <= far} inside occupied cells of frame b's coarse grid,
// as sorted, disjoint, merged [t_enter, t_exit] intervals. The segment is first
// clipped to the grid's box (slab test), then walked cell by cell with a 3-D
// DDA (Amanatides & Woo): from cell i at t, the next cell boundary along axis
// k is at t_next_k, the walk steps along argmin_k t_next_k, and
// t_next_k += cell_k / |d_k|. Cost O(cells crossed), no dense sampling.
//
// sample_depths(rays, occ, S, near, far, rng) -> DepthSamples:
//   L = total length of the ray's occupied intervals. If L > 0, stratified
//   samples over their union: u_s = (s + U_s) / S * L, s = 0..S-1, U_s ~ U[0,1),
//   mapped to t through the cumulative interval lengths, so every sample lies
//   inside an occupied cell. If L = 0 (no occupied cell on the ray:
//   fallback[r] = 1), stratified uniform samples in [near, far]:
//   t_s = near + (s + U_s) / S * (far - near).
//   depth (R, S) ascending along each row; occupied_length (R) = L.
//   The rng draws S uniforms per ray, ray by ray.
// sample_points(rays, samples) -> (R*S, 3): o_r + t_rs d_r, rows ray-major
// (row r*S + s), for the trilinear feature-grid query.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/lidar/voxelizer.hpp"

namespace vqkit::lidar {

template <class T>
struct RayBatch {
  RowMatrix<T> origin;         ///< (R, 3)
  RowMatrix<T> direction;      ///< (R, 3), unit
  Vector<T> depth;             ///< (R), ground-truth range
  IndexVector batch;           ///< (R), frame
  IndexVector source;          ///< (R), row in the frame
  std::vector<Index> dropped;  ///< per frame: too close or outside the ROI

  Index size() const { return depth.size(); }
};

template <class T>
RayBatch<T> rays_from_points(const std::vector<ConstMatrixRef<T>>& frames,
                             const std::vector<Eigen::Vector3d>& origins = {},
                             double min_depth = 1e-3,
                             const std::optional<VoxelGrid>& roi = std::nullopt) {
  constexpr const char* where = "rays_from_points";
  VQKIT_REQUIRE(!frames.empty(), where, "no frames given (batch of 0)");
  VQKIT_REQUIRE(origins.empty() || origins.size() == frames.size(), where, "got ", origins.size(),
                " origins for ", frames.size(), " frames (give one per frame or none)");
  VQKIT_REQUIRE(std::isfinite(min_depth) && min_depth >= 0, where,
                "min_depth must be finite and >= 0, got ", min_depth);
  if (roi) roi->validate(where);
  for (std::size_t b = 0; b < frames.size(); ++b) {
    VQKIT_REQUIRE(frames[b].cols() >= 3, where, "frame ", b, " has ", frames[b].cols(),
                  " columns, expected at least 3 (x y z)");
    VQKIT_REQUIRE(frames[b].leftCols(3).allFinite(), where, "frame ", b,
                  " holds a non-finite coordinate");
    if (!origins.empty())
      VQKIT_REQUIRE(origins[b].allFinite(), where, "origin of frame ", b, " is not finite");
  }
  std::vector<Index> keep_b, keep_i;
  std::vector<double> depth;
  RayBatch<T> out;
  out.dropped.assign(frames.size(), 0);
  for (std::size_t b = 0; b < frames.size(); ++b) {
    const auto& f = frames[b];
    const Eigen::Vector3d o = origins.empty() ? Eigen::Vector3d::Zero().eval() : origins[b];
    for (Index i = 0; i < f.rows(); ++i) {
      const Eigen::Vector3d p(static_cast<double>(f(i, 0)), static_cast<double>(f(i, 1)),
                              static_cast<double>(f(i, 2)));
      bool inside = true;
      if (roi) {
        const VoxelGrid& g = *roi;
        inside = p.x() >= g.x_min && p.x() < g.x_max && p.y() >= g.y_min && p.y() < g.y_max &&
                 p.z() >= g.z_min && p.z() < g.z_max;
      }
      const double dist = (p - o).norm();
      if (!inside || !(dist > min_depth)) {
        ++out.dropped[b];
        continue;
      }
      keep_b.push_back(static_cast<Index>(b));
      keep_i.push_back(i);
      depth.push_back(dist);
    }
  }
  const Index R = static_cast<Index>(depth.size());
  out.origin.resize(R, 3);
  out.direction.resize(R, 3);
  out.depth.resize(R);
  out.batch.resize(R);
  out.source.resize(R);
  for (Index r = 0; r < R; ++r) {
    const std::size_t b = static_cast<std::size_t>(keep_b[static_cast<std::size_t>(r)]);
    const Index i = keep_i[static_cast<std::size_t>(r)];
    const Eigen::Vector3d o = origins.empty() ? Eigen::Vector3d::Zero().eval() : origins[b];
    const Eigen::Vector3d p(static_cast<double>(frames[b](i, 0)), static_cast<double>(frames[b](i, 1)),
                            static_cast<double>(frames[b](i, 2)));
    const double dist = depth[static_cast<std::size_t>(r)];
    const Eigen::Vector3d d = (p - o) / dist;
    for (int k = 0; k < 3; ++k) {
      out.origin(r, k) = T(o[k]);
      out.direction(r, k) = T(d[k]);
    }
    out.depth[r] = T(dist);
    out.batch[r] = static_cast<std::int64_t>(b);
    out.source[r] = i;
  }
  return out;
}

template <class T>
RayBatch<T> rays_from_points(const std::vector<RowMatrix<T>>& frames,
                             const std::vector<Eigen::Vector3d>& origins = {},
                             double min_depth = 1e-3,
                             const std::optional<VoxelGrid>& roi = std::nullopt) {
  std::vector<ConstMatrixRef<T>> refs;
  refs.reserve(frames.size());
  for (const auto& f : frames) refs.emplace_back(f);
  return rays_from_points<T>(refs, origins, min_depth, roi);
}

template <class T>
RayBatch<T> subsample_rays(const RayBatch<T>& rays, Index per_frame, Rng& rng) {
  constexpr const char* where = "subsample_rays";
  VQKIT_REQUIRE(per_frame >= 1, where, "per_frame must be >= 1, got ", per_frame);
  const Index R = rays.size();
  VQKIT_REQUIRE(rays.origin.rows() == R && rays.direction.rows() == R && rays.batch.size() == R &&
                    rays.source.size() == R && rays.origin.cols() == 3 && rays.direction.cols() == 3,
                where, "inconsistent RayBatch (", R, " depths, ", rays.origin.rows(), " origins, ",
                rays.direction.rows(), " directions, ", rays.batch.size(), " batch indices)");
  std::vector<Index> chosen;
  for (Index begin = 0; begin < R;) {
    Index end = begin;
    while (end < R && rays.batch[end] == rays.batch[begin]) ++end;
    const Index n = end - begin;
    if (n <= per_frame) {
      for (Index i = begin; i < end; ++i) chosen.push_back(i);
    } else {
      std::vector<Index> idx(static_cast<std::size_t>(n));
      for (Index i = 0; i < n; ++i) idx[static_cast<std::size_t>(i)] = i;
      for (Index k = 0; k < per_frame; ++k) {
        const Index j = k + static_cast<Index>(rng.below(static_cast<std::uint64_t>(n - k)));
        std::swap(idx[static_cast<std::size_t>(k)], idx[static_cast<std::size_t>(j)]);
      }
      std::sort(idx.begin(), idx.begin() + per_frame);
      for (Index k = 0; k < per_frame; ++k) chosen.push_back(begin + idx[static_cast<std::size_t>(k)]);
    }
    begin = end;
  }
  RayBatch<T> out;
  const Index M = static_cast<Index>(chosen.size());
  out.origin.resize(M, 3);
  out.direction.resize(M, 3);
  out.depth.resize(M);
  out.batch.resize(M);
  out.source.resize(M);
  out.dropped = rays.dropped;
  for (Index k = 0; k < M; ++k) {
    const Index i = chosen[static_cast<std::size_t>(k)];
    out.origin.row(k) = rays.origin.row(i);
    out.direction.row(k) = rays.direction.row(i);
    out.depth[k] = rays.depth[i];
    out.batch[k] = rays.batch[i];
    out.source[k] = rays.source[i];
  }
  return out;
}

struct Interval {
  double t0 = 0, t1 = 0;  ///< t_enter <= t_exit
};

inline std::vector<Interval> occupied_intervals(const OccupancyGrid& occ, Index b,
                                                const Eigen::Vector3d& o, const Eigen::Vector3d& d,
                                                double near, double far) {
  std::vector<Interval> out;
  const double lo[3] = {occ.x_min, occ.y_min, occ.z_min};
  const double cs[3] = {occ.cell_x, occ.cell_y, occ.cell_z};
  const Index n[3] = {occ.nx, occ.ny, occ.nz};
  // Clip [near, far] to the grid's box (slab test).
  double t0 = near, t1 = far;
  for (int k = 0; k < 3; ++k) {
    const double hi = lo[k] + static_cast<double>(n[k]) * cs[k];
    if (d[k] == 0.0) {
      if (o[k] < lo[k] || o[k] >= hi) return out;
      continue;
    }
    double ta = (lo[k] - o[k]) / d[k], tb = (hi - o[k]) / d[k];
    if (ta > tb) std::swap(ta, tb);
    t0 = std::max(t0, ta);
    t1 = std::min(t1, tb);
  }
  if (!(t0 < t1)) return out;
  Index cell[3];
  int step[3];
  double t_next[3], t_delta[3];
  for (int k = 0; k < 3; ++k) {
    const double p = o[k] + t0 * d[k];
    cell[k] = std::clamp<Index>(static_cast<Index>(std::floor((p - lo[k]) / cs[k])), 0, n[k] - 1);
    if (d[k] > 0) {
      step[k] = 1;
      t_next[k] = (lo[k] + static_cast<double>(cell[k] + 1) * cs[k] - o[k]) / d[k];
      t_delta[k] = cs[k] / d[k];
    } else if (d[k] < 0) {
      step[k] = -1;
      t_next[k] = (lo[k] + static_cast<double>(cell[k]) * cs[k] - o[k]) / d[k];
      t_delta[k] = -cs[k] / d[k];
    } else {
      step[k] = 0;
      t_next[k] = std::numeric_limits<double>::infinity();
      t_delta[k] = std::numeric_limits<double>::infinity();
    }
  }
  double t = t0;
  while (t < t1) {
    const int k = (t_next[0] <= t_next[1] && t_next[0] <= t_next[2]) ? 0
                  : (t_next[1] <= t_next[2])                        ? 1
                                                                    : 2;
    const double t_exit = std::min(std::max(t_next[k], t), t1);
    if (t_exit > t && occ.at(b, cell[2], cell[1], cell[0])) {
      if (!out.empty() && out.back().t1 >= t) out.back().t1 = t_exit;  // contiguous: merge
      else out.push_back({t, t_exit});
    }
    t = t_exit;
    if (t >= t1) break;
    cell[k] += step[k];
    if (cell[k] < 0 || cell[k] >= n[k]) break;
    t_next[k] += t_delta[k];
  }
  return out;
}

template <class T>
struct DepthSamples {
  RowMatrix<T> depth;                  ///< (R, S), ascending per row
  Vector<T> occupied_length;           ///< (R)
  std::vector<std::uint8_t> fallback;  ///< (R), 1 = no occupied cell, uniform in [near, far]
};

template <class T>
DepthSamples<T> sample_depths(const RayBatch<T>& rays, const OccupancyGrid& occ, Index S,
                              double near, double far, Rng& rng) {
  constexpr const char* where = "sample_depths";
  const Index R = rays.size();
  VQKIT_REQUIRE(S >= 1, where, "samples per ray must be >= 1, got S=", S);
  VQKIT_REQUIRE(std::isfinite(near) && std::isfinite(far) && near >= 0 && near < far, where,
                "need 0 <= near < far (finite), got near=", near, " far=", far);
  VQKIT_REQUIRE(rays.origin.rows() == R && rays.direction.rows() == R && rays.batch.size() == R &&
                    rays.origin.cols() == 3 && rays.direction.cols() == 3,
                where, "inconsistent RayBatch (", R, " depths, ", rays.origin.rows(), " origins, ",
                rays.direction.rows(), " directions, ", rays.batch.size(), " batch indices)");
  VQKIT_REQUIRE(occ.batch >= 1 && occ.nx >= 1 && occ.ny >= 1 && occ.nz >= 1 &&
                    occ.occupied.size() ==
                        static_cast<std::size_t>(occ.batch * occ.nx * occ.ny * occ.nz) &&
                    occ.cell_x > 0 && occ.cell_y > 0 && occ.cell_z > 0,
                where, "inconsistent OccupancyGrid (batch=", occ.batch, " nx=", occ.nx, " ny=", occ.ny,
                " nz=", occ.nz, ", ", occ.occupied.size(), " bytes)");
  for (Index r = 0; r < R; ++r)
    VQKIT_REQUIRE(rays.batch[r] >= 0 && rays.batch[r] < occ.batch, where, "ray ", r, " is of frame ",
                  rays.batch[r], " but the occupancy grid holds ", occ.batch, " frames");
  VQKIT_REQUIRE(rays.origin.allFinite() && rays.direction.allFinite(), where,
                "ray origins and directions must be finite");

  DepthSamples<T> out;
  out.depth.resize(R, S);
  out.occupied_length.resize(R);
  out.fallback.assign(static_cast<std::size_t>(R), 0);
  for (Index r = 0; r < R; ++r) {
    const Eigen::Vector3d o = rays.origin.row(r).transpose().template cast<double>();
    const Eigen::Vector3d d = rays.direction.row(r).transpose().template cast<double>();
    const std::vector<Interval> iv = occupied_intervals(occ, rays.batch[r], o, d, near, far);
    double L = 0;
    for (const Interval& v : iv) L += v.t1 - v.t0;
    out.occupied_length[r] = T(L);
    if (L <= 0) {
      out.fallback[static_cast<std::size_t>(r)] = 1;
      for (Index s = 0; s < S; ++s)
        out.depth(r, s) = T(near + (static_cast<double>(s) + rng.uniform()) / static_cast<double>(S) *
                                       (far - near));
      continue;
    }
    std::size_t j = 0;
    double cum = 0;  // length of the intervals before j
    for (Index s = 0; s < S; ++s) {
      const double u = (static_cast<double>(s) + rng.uniform()) / static_cast<double>(S) * L;
      while (j + 1 < iv.size() && u >= cum + (iv[j].t1 - iv[j].t0)) {
        cum += iv[j].t1 - iv[j].t0;
        ++j;
      }
      out.depth(r, s) = T(std::clamp(iv[j].t0 + (u - cum), iv[j].t0, iv[j].t1));
    }
  }
  return out;
}

/// Sample positions o_r + t_rs d_r as (R*S, 3), row r*S + s.
template <class T>
RowMatrix<T> sample_points(const RayBatch<T>& rays, const DepthSamples<T>& samples) {
  const Index R = rays.size(), S = samples.depth.cols();
  VQKIT_REQUIRE(samples.depth.rows() == R && rays.origin.rows() == R && rays.direction.rows() == R,
                "sample_points", "samples have ", samples.depth.rows(), " rows for ", R, " rays");
  RowMatrix<T> p(R * S, 3);
  for (Index r = 0; r < R; ++r)
    for (Index s = 0; s < S; ++s)
      p.row(r * S + s) = rays.origin.row(r) + samples.depth(r, s) * rays.direction.row(r);
  return p;
}

}  // namespace vqkit::lidar
