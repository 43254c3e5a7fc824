// vqkit/lidar/synthetic_scene.hpp - a built-in street scene, ray-cast like a
// 64-beam Velodyne, so a fresh machine (no KITTI folder) can run the demo.
//
// Scene (world frame, metres, z up): the ground plane z = ground_z (0), axis-
// aligned boxes (buildings along both sides of a road that runs along x, cars
// parked beside it and in the oncoming lane) and vertical poles (solid
// cylinders from the ground to z_top, top cap included). street(seed) lays
// them out from a seed; the corridor |y| < 2.4 m stays free for the sensor.
//
// Sensor: BeamPattern, by default 64 beams with elevations spaced evenly from
// -24.8 deg to +2 deg (the HDL-64E's field of view) and 1800 azimuths over
// 360 deg, ranges in [min_range, max_range] = [1, 120] m. Beam (e, a) has
// the unit direction
//   d = (cos(el_e) cos(az_a), cos(el_e) sin(az_a), sin(el_e)),
//   el_e = el_min + e (el_max - el_min) / (beams - 1),
//   az_a = (a + u) 2 pi / azimuths,   u in [0, 1) drawn once per scan.
// The sensor rides at sensor_position (synthetic_sequence: z = 1.73 m above
// the ground, as KITTI's, moving `step` metres along +x per frame).
//
// scan(): each beam returns the first surface it meets at t in
// (min_range, max_range] (no return, no point, otherwise), with range
// t + n, n ~ N(0, range_noise^2) (clamped so the range stays >= min_range).
// Output (P returns, in the order e-major then a):
//   points         (P, 4)  x y z reflectance; sensor frame (origin at the
//                          sensor, axes as the world's; KITTI's convention) by
//                          default, the world frame with world_frame = true
//   ray_origin     (P, 3)  the sensor position in that frame (0 or the world position)
//   ray_direction  (P, 3)  unit d
//   ray_depth      (P)     the returned range: point = origin + depth * d
// Reflectance is the surface's value plus uniform(-0.05, 0.05), clamped to [0, 1].
// Everything is deterministic from the seeds (vqkit::Rng).
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

namespace vqkit::lidar {

/// Axis-aligned box [lo, hi] (world frame).
struct Box {
  Eigen::Vector3d lo = Eigen::Vector3d::Zero();
  Eigen::Vector3d hi = Eigen::Vector3d::Ones();
  float reflectance = 0.3f;
};

/// Vertical solid cylinder: centre (x, y), radius, from the ground to z_top.
struct Pole {
  double x = 0, y = 0, radius = 0.15, z_top = 6.0;
  float reflectance = 0.5f;
};

struct BeamPattern {
  int beams = 64;
  double elevation_min_deg = -24.8;
  double elevation_max_deg = 2.0;
  int azimuths = 1800;
  double min_range = 1.0;
  double max_range = 120.0;

  void validate(const char* where) const {
    VQKIT_REQUIRE(beams >= 1, where, "beams must be >= 1, got ", beams);
    VQKIT_REQUIRE(azimuths >= 1, where, "azimuths must be >= 1, got ", azimuths);
    VQKIT_REQUIRE(std::isfinite(elevation_min_deg) && std::isfinite(elevation_max_deg) &&
                      elevation_min_deg <= elevation_max_deg && elevation_min_deg > -90 &&
                      elevation_max_deg < 90,
                  where, "elevations must satisfy -90 < min <= max < 90, got min=",
                  elevation_min_deg, " max=", elevation_max_deg);
    VQKIT_REQUIRE(std::isfinite(min_range) && std::isfinite(max_range) && min_range >= 0 &&
                      min_range < max_range,
                  where, "ranges must satisfy 0 <= min_range < max_range, got min_range=",
                  min_range, " max_range=", max_range);
  }
  double elevation_rad(int e) const {
    const double deg = beams == 1 ? elevation_max_deg
                                  : elevation_min_deg + e * (elevation_max_deg - elevation_min_deg) /
                                                            (beams - 1);
    return deg * 3.14159265358979323846 / 180.0;
  }
};

struct ScanOptions {
  BeamPattern pattern;
  double range_noise = 0.02;  ///< standard deviation of the range noise, metres
  bool world_frame = false;   ///< points in the world frame instead of the sensor frame
};

struct SyntheticFrame {
  RowMatrix<float> points;         ///< (P, 4)
  RowMatrix<float> ray_origin;     ///< (P, 3)
  RowMatrix<float> ray_direction;  ///< (P, 3), unit
  Vector<float> ray_depth;         ///< (P)
  Eigen::Vector3d sensor_position = Eigen::Vector3d::Zero();  ///< world frame
  Index rays_cast = 0;                                        ///< beams * azimuths
};

class SyntheticScene {
 public:
  double ground_z = 0.0;
  std::vector<Box> boxes;
  std::vector<Pole> poles;
  float ground_reflectance = 0.2f;

  struct Hit {
    double t = 0;
    float reflectance = 0;
  };

  /// First surface along o + t d (d unit) with t in (t_min, t_max].
  std::optional<Hit> cast(const Eigen::Vector3d& o, const Eigen::Vector3d& d, double t_min,
                          double t_max) const {
    Hit best{std::numeric_limits<double>::infinity(), 0.f};
    const auto consider = [&](double t, float r) {
      if (t > t_min && t <= t_max && t < best.t) best = {t, r};
    };
    if (d.z() < 0) consider((ground_z - o.z()) / d.z(), ground_reflectance);
    for (const Box& b : boxes) {
      double t0 = -std::numeric_limits<double>::infinity();
      double t1 = std::numeric_limits<double>::infinity();
      bool miss = false;
      for (int k = 0; k < 3 && !miss; ++k) {
        if (d[k] == 0.0) {
          if (o[k] < b.lo[k] || o[k] > b.hi[k]) miss = true;
          continue;
        }
        double ta = (b.lo[k] - o[k]) / d[k], tb = (b.hi[k] - o[k]) / d[k];
        if (ta > tb) std::swap(ta, tb);
        t0 = std::max(t0, ta);
        t1 = std::min(t1, tb);
        if (t0 > t1) miss = true;
      }
      if (miss) continue;
      consider(t0 > t_min ? t0 : t1, b.reflectance);  // from inside: the far wall
    }
    for (const Pole& p : poles) {
      const double ox = o.x() - p.x, oy = o.y() - p.y;
      const double a = d.x() * d.x() + d.y() * d.y();
      if (a > 1e-18) {
        const double bq = 2 * (ox * d.x() + oy * d.y());
        const double c = ox * ox + oy * oy - p.radius * p.radius;
        const double disc = bq * bq - 4 * a * c;
        if (disc >= 0) {
          const double s = std::sqrt(disc);
          for (double t : {(-bq - s) / (2 * a), (-bq + s) / (2 * a)}) {
            const double z = o.z() + t * d.z();
            if (t > t_min && z >= ground_z && z <= p.z_top) {
              consider(t, p.reflectance);
              break;
            }
          }
        }
      }
      if (d.z() != 0.0) {  // top cap
        const double t = (p.z_top - o.z()) / d.z();
        const double x = ox + t * d.x(), y = oy + t * d.y();
        if (x * x + y * y <= p.radius * p.radius) consider(t, p.reflectance);
      }
    }
    if (!std::isfinite(best.t)) return std::nullopt;
    return best;
  }

  /// One scan from sensor_position (world frame); see the header comment.
  SyntheticFrame scan(const Eigen::Vector3d& sensor_position, const ScanOptions& opt,
                      std::uint64_t seed) const {
    constexpr const char* where = "SyntheticScene::scan";
    opt.pattern.validate(where);
    VQKIT_REQUIRE(std::isfinite(opt.range_noise) && opt.range_noise >= 0, where,
                  "range_noise must be finite and >= 0, got ", opt.range_noise);
    VQKIT_REQUIRE(sensor_position.allFinite(), where, "sensor_position must be finite");
    const BeamPattern& bp = opt.pattern;
    Rng rng(seed);
    const double az_offset = rng.uniform();
    std::vector<double> rows;  // 11 per return: p(3) refl o(3) d(3) depth
    rows.reserve(static_cast<std::size_t>(bp.beams) * bp.azimuths * 11 / 2);
    constexpr double two_pi = 6.283185307179586476925;
    for (int e = 0; e < bp.beams; ++e) {
      const double el = bp.elevation_rad(e);
      for (int a = 0; a < bp.azimuths; ++a) {
        const double az = (a + az_offset) * two_pi / bp.azimuths;
        const Eigen::Vector3d d(std::cos(el) * std::cos(az), std::cos(el) * std::sin(az),
                                std::sin(el));
        const auto hit = cast(sensor_position, d, bp.min_range, bp.max_range);
        if (!hit) continue;
        double depth = hit->t;
        if (opt.range_noise > 0) depth = std::max(bp.min_range, depth + opt.range_noise * rng.normal());
        const double refl =
            std::clamp(static_cast<double>(hit->reflectance) + 0.1 * (rng.uniform() - 0.5), 0.0, 1.0);
        const Eigen::Vector3d origin =
            opt.world_frame ? sensor_position : Eigen::Vector3d::Zero().eval();
        const Eigen::Vector3d p = origin + depth * d;
        rows.insert(rows.end(), {p.x(), p.y(), p.z(), refl, origin.x(), origin.y(), origin.z(),
                                 d.x(), d.y(), d.z(), depth});
      }
    }
    const Index P = static_cast<Index>(rows.size() / 11);
    SyntheticFrame f;
    f.sensor_position = sensor_position;
    f.rays_cast = static_cast<Index>(bp.beams) * bp.azimuths;
    f.points.resize(P, 4);
    f.ray_origin.resize(P, 3);
    f.ray_direction.resize(P, 3);
    f.ray_depth.resize(P);
    for (Index i = 0; i < P; ++i) {
      const double* r = rows.data() + 11 * i;
      for (int k = 0; k < 4; ++k) f.points(i, k) = static_cast<float>(r[k]);
      for (int k = 0; k < 3; ++k) {
        f.ray_origin(i, k) = static_cast<float>(r[4 + k]);
        f.ray_direction(i, k) = static_cast<float>(r[7 + k]);
      }
      f.ray_depth[i] = static_cast<float>(r[10]);
    }
    return f;
  }

  /// A street along x over [x_begin, x_end], laid out from `seed`.
  static SyntheticScene street(std::uint64_t seed, double x_begin = -130.0, double x_end = 150.0) {
    VQKIT_REQUIRE(std::isfinite(x_begin) && std::isfinite(x_end) && x_begin < x_end,
                  "SyntheticScene::street", "need x_begin < x_end, got ", x_begin, " and ", x_end);
    Rng rng(seed);
    const auto U = [&rng](double lo, double hi) { return lo + (hi - lo) * rng.uniform(); };
    SyntheticScene s;
    for (int side : {-1, 1}) {
      // Buildings: a row of blocks set back 10-14 m from the road's centre.
      for (double x = x_begin + U(0, 5); x < x_end;) {
        const double len = U(8, 25), setback = U(10, 14), depth = U(6, 12), h = U(5, 18);
        Box b;
        b.lo = {x, side > 0 ? setback : -setback - depth, 0.0};
        b.hi = {x + len, side > 0 ? setback + depth : -setback, h};
        b.reflectance = static_cast<float>(U(0.1, 0.4));
        s.boxes.push_back(b);
        x += len + U(2, 8);
      }
      // Parked cars (centre |y| 5.4-5.9 m) with gaps.
      for (double x = x_begin + U(0, 10); x < x_end;) {
        const double len = U(3.8, 4.8), wid = U(1.6, 1.9), h = U(1.4, 1.7);
        if (rng.uniform() < 0.6) {
          const double yc = side * U(5.4, 5.9);
          Box b;
          b.lo = {x, yc - wid / 2, 0.2};
          b.hi = {x + len, yc + wid / 2, 0.2 + h};
          b.reflectance = static_cast<float>(U(0.3, 0.7));
          s.boxes.push_back(b);
        }
        x += len + U(1.5, 8);
      }
      // Poles along the sidewalk (|y| 7.5-8.5 m).
      for (double x = x_begin + U(0, 15); x < x_end; x += U(12, 25)) {
        Pole p;
        p.x = x;
        p.y = side * U(7.5, 8.5);
        p.radius = U(0.1, 0.2);
        p.z_top = U(5, 9);
        p.reflectance = static_cast<float>(U(0.4, 0.8));
        s.poles.push_back(p);
      }
    }
    // A few cars in the oncoming lane (centre y = 3.3 m, |y| >= 2.4 m).
    for (double x = x_begin + U(0, 20); x < x_end; x += U(15, 40)) {
      const double len = U(3.8, 4.8), wid = U(1.6, 1.8), h = U(1.4, 1.7);
      Box b;
      b.lo = {x, 3.3 - wid / 2, 0.2};
      b.hi = {x + len, 3.3 + wid / 2, 0.2 + h};
      b.reflectance = static_cast<float>(U(0.3, 0.7));
      s.boxes.push_back(b);
    }
    return s;
  }
};

/// `frames` scans of SyntheticScene::street(seed), the sensor at
/// (k * step, 0, ground + sensor_height) for frame k; frame k's noise and
/// azimuth offset come from seed + 1 + k.
inline std::vector<SyntheticFrame> synthetic_sequence(std::uint64_t seed, int frames,
                                                      const ScanOptions& opt = {},
                                                      double step = 0.86,
                                                      double sensor_height = 1.73) {
  constexpr const char* where = "synthetic_sequence";
  VQKIT_REQUIRE(frames >= 1, where, "frames must be >= 1, got ", frames);
  VQKIT_REQUIRE(std::isfinite(step) && std::abs(step) * frames <= 100.0, where,
                "step * frames must stay within the 100 m street ahead, got step=", step,
                " frames=", frames);
  VQKIT_REQUIRE(std::isfinite(sensor_height) && sensor_height > 0, where,
                "sensor_height must be > 0, got ", sensor_height);
  opt.pattern.validate(where);
  const SyntheticScene scene = SyntheticScene::street(seed);
  std::vector<SyntheticFrame> out;
  out.reserve(static_cast<std::size_t>(frames));
  for (int k = 0; k < frames; ++k)
    out.push_back(scene.scan(Eigen::Vector3d(k * step, 0.0, scene.ground_z + sensor_height), opt,
                             seed + 1 + static_cast<std::uint64_t>(k)));
  return out;
}

}  // namespace vqkit::lidar
