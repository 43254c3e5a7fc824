// vqkit/lidar/eval_metrics.hpp - depth errors and the Chamfer distance for
// evaluating reconstructed LiDAR scans.
//
// depth_errors(pred, gt, threshold = 1 m), pred and gt (R) depths of the same rays:
//   mae    = (1/R) sum |pred_r - gt_r|
//   rmse   = sqrt((1/R) sum (pred_r - gt_r)^2)
//   within = share of rays with |pred_r - gt_r| < threshold   (in [0, 1])
//
// chamfer(A, B, squared), A (Na, >= 3), B (Nb, >= 3) point sets (first three
// columns are x y z):
//   a_to_b = (1/Na) sum_{a in A} min_{b in B} dist(a, b)
//   b_to_a = (1/Nb) sum_{b in B} min_{a in A} dist(a, b)
//   chamfer = (a_to_b + b_to_a) / 2          (the mean of both directions)
// with dist the plain Euclidean distance ||a - b|| by default (metres, as in
// the 4D occupancy-forecasting evaluations CoPilot4D reports), or the squared
// distance ||a - b||^2 with squared = true. Some papers report the sum
// a_to_b + b_to_a instead: both terms are returned.
// Nearest neighbours come from a kd-tree (KdTree3, median splits on the
// widest axis, leaves of <= 8 points): O(N log N) to build, about O(log N)
// per query, never the O(Na*Nb) all-pairs loop. Queries run in parallel
// (OpenMP); the result does not depend on the thread count (per-point
// distances are summed in order).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit::lidar {

struct DepthErrors {
  double mae = 0, rmse = 0, within = 0;
  Index count = 0;
};

template <class T>
DepthErrors depth_errors(ConstVectorRef<T> pred, ConstVectorRef<T> gt, double threshold = 1.0) {
  constexpr const char* where = "depth_errors";
  VQKIT_REQUIRE(pred.size() == gt.size(), where, "pred has ", pred.size(), " depths, gt has ",
                gt.size());
  VQKIT_REQUIRE(pred.size() > 0, where, "no rays (0 depths)");
  VQKIT_REQUIRE(std::isfinite(threshold) && threshold > 0, where,
                "threshold must be finite and > 0, got ", threshold);
  VQKIT_REQUIRE(pred.allFinite() && gt.allFinite(), where, "depths must be finite");
  DepthErrors e;
  e.count = pred.size();
  double abs_sum = 0, sq_sum = 0;
  Index inside = 0;
  for (Index r = 0; r < pred.size(); ++r) {
    const double err = std::abs(static_cast<double>(pred[r]) - static_cast<double>(gt[r]));
    abs_sum += err;
    sq_sum += err * err;
    if (err < threshold) ++inside;
  }
  const double n = static_cast<double>(e.count);
  e.mae = abs_sum / n;
  e.rmse = std::sqrt(sq_sum / n);
  e.within = static_cast<double>(inside) / n;
  return e;
}

/// A static 3-D kd-tree over a copy of the points (double).
class KdTree3 {
 public:
  template <class Derived>
  explicit KdTree3(const Eigen::DenseBase<Derived>& points) {
    constexpr const char* where = "KdTree3";
    VQKIT_REQUIRE(points.cols() >= 3, where, "points have ", points.cols(),
                  " columns, expected at least 3 (x y z)");
    VQKIT_REQUIRE(points.rows() >= 1, where, "no points to index");
    VQKIT_REQUIRE(points.leftCols(3).allFinite(), where, "points must be finite");
    const Index n = points.rows();
    pts_.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i)
      pts_[static_cast<std::size_t>(i)] = {static_cast<double>(points(i, 0)),
                                           static_cast<double>(points(i, 1)),
                                           static_cast<double>(points(i, 2))};
    perm_.resize(static_cast<std::size_t>(n));
    std::iota(perm_.begin(), perm_.end(), Index{0});
    nodes_.reserve(static_cast<std::size_t>(2 * n / kLeaf + 2));
    build(0, n);
  }

  Index size() const { return static_cast<Index>(pts_.size()); }

  struct Nearest {
    Index index = -1;  ///< row in the indexed points
    double dist2 = std::numeric_limits<double>::infinity();
  };

  /// Nearest indexed point to q (ties: whichever the search meets first).
  Nearest nearest(const Eigen::Vector3d& q) const {
    Nearest best;
    search(0, {q.x(), q.y(), q.z()}, best);
    return best;
  }

 private:
  static constexpr Index kLeaf = 8;
  struct Node {
    Index lo = 0, hi = 0;  // perm_ range
    int axis = -1;         // -1: leaf
    double split = 0;
    Index left = -1, right = -1;
  };
  using P3 = std::array<double, 3>;

  Index build(Index lo, Index hi) {
    const Index id = static_cast<Index>(nodes_.size());
    nodes_.push_back({lo, hi, -1, 0.0, -1, -1});
    if (hi - lo <= kLeaf) return id;
    P3 mn, mx;
    mn.fill(std::numeric_limits<double>::infinity());
    mx.fill(-std::numeric_limits<double>::infinity());
    for (Index i = lo; i < hi; ++i)
      for (int k = 0; k < 3; ++k) {
        mn[k] = std::min(mn[k], at(i)[k]);
        mx[k] = std::max(mx[k], at(i)[k]);
      }
    int axis = 0;
    for (int k = 1; k < 3; ++k)
      if (mx[k] - mn[k] > mx[axis] - mn[axis]) axis = k;
    if (mx[axis] - mn[axis] <= 0) return id;  // all points equal: one leaf
    const Index mid = lo + (hi - lo) / 2;
    std::nth_element(perm_.begin() + lo, perm_.begin() + mid, perm_.begin() + hi,
                     [&](Index a, Index b) {
                       return pts_[static_cast<std::size_t>(a)][axis] <
                              pts_[static_cast<std::size_t>(b)][axis];
                     });
    const double split = at(mid)[axis];
    const Index left = build(lo, mid);
    const Index right = build(mid, hi);
    Node& n = nodes_[static_cast<std::size_t>(id)];
    n.axis = axis;
    n.split = split;
    n.left = left;
    n.right = right;
    return id;
  }

  const P3& at(Index perm_pos) const {
    return pts_[static_cast<std::size_t>(perm_[static_cast<std::size_t>(perm_pos)])];
  }

  // Points of the left child have coordinate <= split, the right >= split.
  void search(Index id, const P3& q, Nearest& best) const {
    const Node& n = nodes_[static_cast<std::size_t>(id)];
    if (n.axis < 0) {
      for (Index i = n.lo; i < n.hi; ++i) {
        const P3& p = at(i);
        const double dx = p[0] - q[0], dy = p[1] - q[1], dz = p[2] - q[2];
        const double d2 = dx * dx + dy * dy + dz * dz;
        if (d2 < best.dist2) best = {perm_[static_cast<std::size_t>(i)], d2};
      }
      return;
    }
    const double diff = q[static_cast<std::size_t>(n.axis)] - n.split;
    const Index first = diff <= 0 ? n.left : n.right;
    const Index second = diff <= 0 ? n.right : n.left;
    search(first, q, best);
    if (diff * diff < best.dist2) search(second, q, best);
  }

  std::vector<P3> pts_;
  std::vector<Index> perm_;
  std::vector<Node> nodes_;
};

struct ChamferResult {
  double a_to_b = 0;   ///< mean over A of the distance to the nearest point of B
  double b_to_a = 0;   ///< mean over B of the distance to the nearest point of A
  double chamfer = 0;  ///< (a_to_b + b_to_a) / 2
  bool squared = false;
};

namespace detail {
template <class T>
double mean_nearest(ConstMatrixRef<T> from, const KdTree3& to, bool squared, const cpu& be) {
  const Index n = from.rows();
  std::vector<double> d(static_cast<std::size_t>(n));
#pragma omp parallel for schedule(static) num_threads(be.num_threads())
  for (Index i = 0; i < n; ++i) {
    const auto nb = to.nearest(Eigen::Vector3d(static_cast<double>(from(i, 0)),
                                               static_cast<double>(from(i, 1)),
                                               static_cast<double>(from(i, 2))));
    d[static_cast<std::size_t>(i)] = squared ? nb.dist2 : std::sqrt(nb.dist2);
  }
  double s = 0;
  for (double v : d) s += v;
  return s / static_cast<double>(n);
}
}  // namespace detail

template <class T>
ChamferResult chamfer(ConstMatrixRef<T> a, ConstMatrixRef<T> b, bool squared = false,
                      const cpu& be = {}) {
  constexpr const char* where = "chamfer";
  VQKIT_REQUIRE(a.cols() >= 3 && b.cols() >= 3, where, "point sets need >= 3 columns, got ",
                a.cols(), " and ", b.cols());
  VQKIT_REQUIRE(a.rows() >= 1 && b.rows() >= 1, where, "point sets must be non-empty, got ",
                a.rows(), " and ", b.rows(), " points");
  VQKIT_REQUIRE(a.leftCols(3).allFinite() && b.leftCols(3).allFinite(), where,
                "points must be finite");
  const KdTree3 ta(a), tb(b);
  ChamferResult r;
  r.squared = squared;
  r.a_to_b = detail::mean_nearest<T>(a, tb, squared, be);
  r.b_to_a = detail::mean_nearest<T>(b, ta, squared, be);
  r.chamfer = 0.5 * (r.a_to_b + r.b_to_a);
  return r;
}

}  // namespace vqkit::lidar
