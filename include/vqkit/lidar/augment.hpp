// vqkit/lidar/augment.hpp - training-time augmentation of a LiDAR scan: a
// random rotation about the sensor's z axis and a random left/right mirror.
//
// A frame is a (P, >= 3) matrix in the sensor frame (point_cloud.hpp: the
// sensor at the origin, x forward, y left, z up); columns past the third
// (reflectance, ...) are copied unchanged.
//
// Draw (draw_augment(rng, yaw_deg, flip_prob)), always exactly two uniforms
// from the Rng, in this order, whatever the settings (so switching the
// augmentation on or off does not shift any later draw of the same Rng):
//   u1, u2 ~ U[0, 1)
//   theta = (2 u1 - 1) * yaw_deg * pi / 180     uniform in [-yaw_deg, +yaw_deg] degrees
//   flip  = u2 < flip_prob                      (never for 0, always for 1)
// Apply (apply_augment(points, a)), per point p = (x, y, z), in double:
//   rotate:  x' = cos(theta) x - sin(theta) y
//            y' = sin(theta) x + cos(theta) y
//            z' = z
//   mirror:  y'' = -y' when flip (a reflection in the x-z plane), else y'' = y'
// i.e. p'' = F Rz(theta) p. Both maps are isometries that fix the sensor,
// so every point's range ||p|| (the ray depth) and its height z are kept;
// the rotation is proper (det +1), the mirror improper (det -1). yaw_deg = 0
// and flip_prob = 0 give back the frame exactly (theta = 0 copies x and y).
//
// augment_frame(points, rng, yaw_deg, flip_prob) = draw, then apply, on a copy.
// The result is a function of the Rng state only (no other source of
// randomness); the Rng advances by exactly two draws.
//
// Checks (vqkit::error, before any draw or write): yaw_deg finite in
// [0, 180], flip_prob in [0, 1], points with >= 3 columns; apply_augment
// also requires a finite theta. The same ranges as TokenizerConfig's
// augment_yaw_deg and augment_flip.
#pragma once

#include <cmath>
#include <numbers>

#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit::lidar {

/// One drawn augmentation.
struct Augmentation {
  double yaw = 0.0;   ///< rotation about z, radians (counter-clockwise seen from above)
  bool flip = false;  ///< mirror y -> -y after the rotation
};

namespace detail {
inline void check_augment_settings(const char* where, double yaw_deg, double flip_prob) {
  VQKIT_REQUIRE(std::isfinite(yaw_deg) && yaw_deg >= 0.0 && yaw_deg <= 180.0, where,
                "yaw_deg=", yaw_deg, " must lie in [0, 180]");
  VQKIT_REQUIRE(std::isfinite(flip_prob) && flip_prob >= 0.0 && flip_prob <= 1.0, where,
                "flip_prob=", flip_prob, " must lie in [0, 1]");
}
}  // namespace detail

/// Draws one augmentation (two uniforms, see the file comment).
inline Augmentation draw_augment(Rng& rng, double yaw_deg, double flip_prob) {
  detail::check_augment_settings("draw_augment", yaw_deg, flip_prob);
  const double u1 = rng.uniform();
  const double u2 = rng.uniform();
  Augmentation a;
  a.yaw = (2.0 * u1 - 1.0) * yaw_deg * std::numbers::pi / 180.0;
  a.flip = u2 < flip_prob;
  return a;
}

/// Applies a to the xyz columns of points, in place.
template <class T>
void apply_augment(RowMatrix<T>& points, const Augmentation& a) {
  constexpr const char* where = "apply_augment";
  VQKIT_REQUIRE(points.cols() >= 3, where, "points have ", points.cols(),
                " columns, expected at least 3 (x y z ...)");
  VQKIT_REQUIRE(std::isfinite(a.yaw), where, "yaw=", a.yaw, " is not finite");
  if (a.yaw != 0.0) {
    const double c = std::cos(a.yaw), s = std::sin(a.yaw);
    for (Index i = 0; i < points.rows(); ++i) {
      const double x = static_cast<double>(points(i, 0)), y = static_cast<double>(points(i, 1));
      points(i, 0) = static_cast<T>(c * x - s * y);
      points(i, 1) = static_cast<T>(s * x + c * y);
    }
  }
  if (a.flip) points.col(1) = -points.col(1);
}

/// A randomly rotated and mirrored copy of points; `drawn` (optional)
/// receives the augmentation used.
template <class T>
RowMatrix<T> augment_frame(const RowMatrix<T>& points, Rng& rng, double yaw_deg, double flip_prob,
                           Augmentation* drawn = nullptr) {
  VQKIT_REQUIRE(points.cols() >= 3, "augment_frame", "points have ", points.cols(),
                " columns, expected at least 3 (x y z ...)");
  const Augmentation a = draw_augment(rng, yaw_deg, flip_prob);
  RowMatrix<T> out = points;
  apply_augment(out, a);
  if (drawn != nullptr) *drawn = a;
  return out;
}

}  // namespace vqkit::lidar
