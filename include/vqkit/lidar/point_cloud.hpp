// vqkit/lidar/point_cloud.hpp - a LiDAR scan as a matrix of points.
//
// Shapes and conventions:
//   points  (P, 4) float, one point per row: x y z reflectance
//           metres, in the sensor frame of the scan (KITTI's Velodyne frame:
//           x forward, y left, z up; the sensor sits at the origin, about
//           1.73 m above the road), reflectance in [0, 1] as KITTI stores it
//   origin  (3) the sensor position in the same frame as the points (zero for
//           a scan in its own sensor frame; the sensor position when the
//           points were moved to a world frame)
// Functions that only need geometry take any (P, >= 3) matrix and read the
// first three columns.
//
// Checks: require_points() rejects a matrix with fewer than 3 columns and
// any non-finite value, naming the row and column of the first bad value.
#pragma once

#include <cmath>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit::lidar {

/// One scan: (P, 4) rows x y z reflectance, plus the sensor position.
struct PointCloud {
  RowMatrix<float> points;                             ///< (P, 4)
  Eigen::Vector3f origin = Eigen::Vector3f::Zero();  ///< sensor position, same frame

  Index size() const { return points.rows(); }
};

/// Throws vqkit::error naming `where` unless m has >= 3 columns and every
/// entry is finite (names the first non-finite row/column).
template <class Derived>
void require_points(const Eigen::DenseBase<Derived>& m, const char* where, const char* what = "points") {
  VQKIT_REQUIRE(m.cols() >= 3, where, what, " has ", m.cols(),
                " columns, expected at least 3 (x y z [reflectance])");
  if (m.allFinite()) return;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j)
      VQKIT_REQUIRE(std::isfinite(static_cast<double>(m(i, j))), where, what,
                    " holds a non-finite value (", m(i, j), ") at point ", i, ", column ", j);
}

/// Applies the rigid transform pose = [R | t] (3x4, points_world = R p + t)
/// to the xyz columns and the origin; reflectance is kept.
inline PointCloud transformed(const PointCloud& cloud, const Eigen::Matrix<double, 3, 4>& pose) {
  require_points(cloud.points, "lidar::transformed");
  VQKIT_REQUIRE(pose.allFinite(), "lidar::transformed", "pose holds a non-finite value");
  PointCloud out = cloud;
  const Eigen::Matrix3d R = pose.leftCols<3>();
  const Eigen::Vector3d t = pose.col(3);
  for (Index i = 0; i < out.points.rows(); ++i) {
    const Eigen::Vector3d p = cloud.points.row(i).head<3>().transpose().cast<double>();
    out.points.row(i).head<3>() = (R * p + t).transpose().cast<float>();
  }
  out.origin = (R * cloud.origin.cast<double>() + t).cast<float>();
  return out;
}

}  // namespace vqkit::lidar
