// Tests of include/vqkit/lidar/: KITTI reader, synthetic scene, voxeliser,
// rays and depth sampling, evaluation metrics, PNG writer. Every check is
// against an independent reference: file sizes and raw bytes, brute force over
// a dense tiny grid, analytic intersections, fine marching, all-pairs nearest
// neighbours, a bit-by-bit CRC and a stored-block inflater written here.
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>
#include <vqkit/core/map_shape.hpp>
#include <vqkit/lidar/bev_image.hpp>
#include <vqkit/lidar/eval_metrics.hpp>
#include <vqkit/lidar/kitti.hpp>
#include <vqkit/lidar/point_cloud.hpp>
#include <vqkit/lidar/rays.hpp>
#include <vqkit/lidar/synthetic_scene.hpp>
#include <vqkit/lidar/voxelizer.hpp>

#include "test_util.hpp"

using namespace vqkit;
using namespace vqkit::lidar;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("vqkit_test_lidar_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

void write_bytes(const std::string& path, const std::vector<char>& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(b.data(), static_cast<std::streamsize>(b.size()));
}

std::vector<std::uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

/// Uniform random points (n, 4) in a box, reflectance in [0, 1).
RowMatrix<float> random_points(Index n, std::uint64_t seed, double lo_x, double hi_x, double lo_y,
                               double hi_y, double lo_z, double hi_z) {
  Rng r(seed);
  RowMatrix<float> m(n, 4);
  for (Index i = 0; i < n; ++i) {
    m(i, 0) = float(lo_x + (hi_x - lo_x) * r.uniform());
    m(i, 1) = float(lo_y + (hi_y - lo_y) * r.uniform());
    m(i, 2) = float(lo_z + (hi_z - lo_z) * r.uniform());
    m(i, 3) = float(r.uniform());
  }
  return m;
}

}  // namespace

// ---------------------------------------------------------------- KITTI ---

TEST_CASE("KITTI reader reads the real scans: size, raw bytes, ranges, sorted listing") {
  const std::string first = test::data_file("kitti/seq00/000000.bin");
  if (first.empty()) VQKIT_SKIP("../shared/data/kitti/seq00 absent");
  const std::string folder = fs::path(first).parent_path().string();
  const auto frames = list_kitti_frames(folder);
  REQUIRE(frames.size() == 6);
  for (int k = 0; k < 6; ++k) {
    char name[16];
    std::snprintf(name, sizeof name, "%06d.bin", k);
    CHECK(fs::path(frames[static_cast<std::size_t>(k)]).filename() == name);
  }
  for (const auto& f : frames) {
    const PointCloud c = read_kitti_bin(f);
    const auto bytes = read_bytes(f);
    REQUIRE(c.size() * 16 == static_cast<Index>(bytes.size()));
    REQUIRE(c.size() > 100000);
    // first and last point against the raw bytes
    for (Index i : {Index(0), c.size() - 1})
      for (int k = 0; k < 4; ++k) {
        float v;
        std::memcpy(&v, bytes.data() + i * 16 + k * 4, 4);
        CHECK(c.points(i, k) == v);
      }
    CHECK(c.points.allFinite());
    CHECK(c.points.col(0).cwiseAbs().maxCoeff() < 81.0f);
    CHECK(c.points.col(1).cwiseAbs().maxCoeff() < 81.0f);
    CHECK(c.points.col(3).minCoeff() >= 0.0f);
    CHECK(c.points.col(3).maxCoeff() <= 1.0f);
    CHECK(c.origin.isZero());
  }
  const auto poses = read_kitti_poses(folder + "/poses.txt");
  REQUIRE(poses.size() == 6);
  CHECK(poses[0].leftCols<3>().isIdentity(1e-6));
  // The car moves ~0.86 m per frame (data README).
  const double step = (poses[1].col(3) - poses[0].col(3)).norm();
  CHECK(step > 0.5);
  CHECK(step < 1.2);
}

TEST_CASE("KITTI reader: clear errors for bad files, write/read round trip, frame order") {
  TempDir dir;
  SECTION("missing file names the path") {
    CHECK_THROWS_WITH(read_kitti_bin(dir / "nope.bin"), Contains("nope.bin") && Contains("no such file"));
  }
  SECTION("size not a multiple of 16") {
    write_bytes(dir / "odd.bin", std::vector<char>(16 * 3 + 5, 0));
    CHECK_THROWS_WITH(read_kitti_bin(dir / "odd.bin"),
                      Contains("odd.bin") && Contains("53 bytes") && Contains("multiple of 16"));
  }
  SECTION("non-finite values name the point and column") {
    RowMatrix<float> m = random_points(5, 1, -1, 1, -1, 1, -1, 1);
    m(3, 2) = std::numeric_limits<float>::quiet_NaN();
    write_kitti_bin(dir / "nan.bin", m);
    CHECK_THROWS_WITH(read_kitti_bin(dir / "nan.bin"),
                      Contains("nan.bin") && Contains("non-finite") && Contains("point 3") &&
                          Contains("column 2"));
    m(3, 2) = 0;
    m(1, 0) = std::numeric_limits<float>::infinity();
    write_kitti_bin(dir / "inf.bin", m);
    CHECK_THROWS_WITH(read_kitti_bin(dir / "inf.bin"), Contains("point 1"));
  }
  SECTION("round trip, empty file, bad column count, folder errors") {
    const RowMatrix<float> m = random_points(37, 2, -50, 50, -50, 50, -3, 3);
    write_kitti_bin(dir / "a.bin", m);
    CHECK(read_kitti_bin(dir / "a.bin").points == m);
    CHECK(fs::file_size(dir / "a.bin") == 37 * 16);
    write_bytes(dir / "empty.bin", {});
    CHECK(read_kitti_bin(dir / "empty.bin").size() == 0);
    CHECK_THROWS_WITH(write_kitti_bin(dir / "b.bin", RowMatrix<float>(3, 3)), Contains("4"));
    CHECK_THROWS_WITH(read_kitti_bin(dir.path.string()), Contains("folder"));
    CHECK_THROWS_WITH(list_kitti_frames(dir / "missing"), Contains("missing"));
    CHECK_THROWS_WITH(list_kitti_frames(dir / "a.bin"), Contains("not a folder"));
  }
  SECTION("listing sorts numbered frames by number, then the rest by name") {
    for (const char* n : {"10.bin", "2.bin", "000001.bin", "b.bin", "a.bin", "3.txt"})
      write_bytes(dir / n, {});
    fs::create_directories(dir / "4.bin");  // a folder, not a frame
    const auto f = list_kitti_frames(dir.path.string());
    std::vector<std::string> names;
    for (const auto& p : f) names.push_back(fs::path(p).filename().string());
    CHECK(names == std::vector<std::string>{"000001.bin", "2.bin", "10.bin", "a.bin", "b.bin"});
  }
}

TEST_CASE("point cloud: transformed() applies [R|t] to points and origin") {
  PointCloud c;
  c.points = random_points(9, 3, -5, 5, -5, 5, -1, 1);
  Eigen::Matrix<double, 3, 4> pose;
  const double a = 0.3;
  pose << std::cos(a), -std::sin(a), 0, 1.5,  //
      std::sin(a), std::cos(a), 0, -2.0,      //
      0, 0, 1, 0.25;
  const PointCloud w = transformed(c, pose);
  for (Index i = 0; i < 9; ++i) {
    const double x = c.points(i, 0), y = c.points(i, 1), z = c.points(i, 2);
    CHECK(w.points(i, 0) == Approx(std::cos(a) * x - std::sin(a) * y + 1.5).margin(1e-5));
    CHECK(w.points(i, 1) == Approx(std::sin(a) * x + std::cos(a) * y - 2.0).margin(1e-5));
    CHECK(w.points(i, 2) == Approx(z + 0.25).margin(1e-5));
    CHECK(w.points(i, 3) == c.points(i, 3));
  }
  CHECK(w.origin.isApprox(Eigen::Vector3f(1.5f, -2.0f, 0.25f)));
}

// ------------------------------------------------------------ voxeliser ---

namespace {
struct DenseRef {
  // per (b, z, y, x) the points inside, brute force over all points and voxels
  std::map<std::tuple<Index, Index, Index, Index>, std::vector<std::pair<Index, Index>>> cells;
  std::vector<Index> dropped;
};

DenseRef dense_reference(const std::vector<RowMatrix<float>>& frames, const VoxelGrid& g) {
  DenseRef ref;
  const double sx = (g.x_max - g.x_min) / double(g.nx), sy = (g.y_max - g.y_min) / double(g.ny),
               sz = (g.z_max - g.z_min) / double(g.nz);
  for (std::size_t b = 0; b < frames.size(); ++b) {
    std::vector<int> hits(static_cast<std::size_t>(frames[b].rows()), 0);
    for (Index z = 0; z < g.nz; ++z)
      for (Index y = 0; y < g.ny; ++y)
        for (Index x = 0; x < g.nx; ++x)
          for (Index i = 0; i < frames[b].rows(); ++i) {
            const double px = frames[b](i, 0), py = frames[b](i, 1), pz = frames[b](i, 2);
            if (px >= g.x_min + x * sx && px < g.x_min + (x + 1) * sx && py >= g.y_min + y * sy &&
                py < g.y_min + (y + 1) * sy && pz >= g.z_min + z * sz && pz < g.z_min + (z + 1) * sz) {
              ref.cells[{Index(b), z, y, x}].push_back({Index(b), i});
              ++hits[static_cast<std::size_t>(i)];
            }
          }
    Index d = 0;
    for (int h : hits) {
      REQUIRE(h <= 1);
      d += h == 0;
    }
    ref.dropped.push_back(d);
  }
  return ref;
}
}  // namespace

TEST_CASE("voxelize matches a dense brute-force reference on a tiny odd grid") {
  const VoxelGrid g{-3.0, 2.0, -1.5, 1.5, -1.0, 0.8, 5, 3, 4};
  std::vector<RowMatrix<float>> frames = {random_points(400, 11, -3.6, 2.4, -2, 2, -1.3, 1.1),
                                          random_points(251, 12, -3.6, 2.4, -2, 2, -1.3, 1.1),
                                          random_points(7, 13, -2.9, 1.9, -1.4, 1.4, -0.9, 0.7)};
  // boundary points: the lower faces are inside, the upper faces outside
  frames[2].row(0) << -3.0f, -1.5f, -1.0f, 0.5f;
  frames[2].row(1) << 2.0f, 0.0f, 0.0f, 0.5f;
  frames[2].row(2) << 0.0f, 1.5f, 0.0f, 0.5f;
  frames[2].row(3) << 0.0f, 0.0f, 0.8f, 0.5f;
  const auto vox = voxelize<float>(frames, g);
  const DenseRef ref = dense_reference(frames, g);

  REQUIRE(vox.batch == 3);
  REQUIRE(vox.voxel_count() == Index(ref.cells.size()));
  // std::map iterates (b, z, y, x) lexicographically: the documented order.
  Index v = 0;
  const MapShape bev{3, g.ny, g.nx};
  for (const auto& [key, pts] : ref.cells) {
    const auto [b, z, y, x] = key;
    CHECK(vox.voxels(v, 0) == b);
    CHECK(vox.voxels(v, 1) == z);
    CHECK(vox.voxels(v, 2) == y);
    CHECK(vox.voxels(v, 3) == x);
    CHECK(vox.voxel_bev_row[v] == bev.row(b, y, x));
    CHECK(vox.voxel_z[v] == z);
    CHECK(vox.voxel_points[v] == Index(pts.size()));
    ++v;
  }
  CHECK(vox.bev_shape() == bev);
  // kept points in input order, each in the voxel the reference found, with its offset
  std::map<std::pair<Index, Index>, std::tuple<Index, Index, Index, Index>> where;
  for (const auto& [key, pts] : ref.cells)
    for (const auto& p : pts) where[p] = key;
  REQUIRE(vox.point_count() == Index(where.size()));
  Index k = 0;
  for (const auto& [p, key] : where) {  // map order = (b, row) = input order
    CHECK(vox.point_batch[k] == p.first);
    CHECK(vox.point_source[k] == p.second);
    const Index vi = vox.point_voxel[k];
    REQUIRE(vi >= 0);
    REQUIRE(vi < vox.voxel_count());
    const auto [b, z, y, x] = key;
    CHECK(vox.voxels(vi, 0) == b);
    CHECK(vox.voxels(vi, 1) == z);
    CHECK(vox.voxels(vi, 2) == y);
    CHECK(vox.voxels(vi, 3) == x);
    const auto& f = frames[static_cast<std::size_t>(b)];
    const double cx = -3.0 + (x + 0.5) * 1.0, cy = -1.5 + (y + 0.5) * 1.0, cz = -1.0 + (z + 0.5) * 0.45;
    CHECK(vox.point_offset(k, 0) == Approx(f(p.second, 0) - cx).margin(1e-6));
    CHECK(vox.point_offset(k, 1) == Approx(f(p.second, 1) - cy).margin(1e-6));
    CHECK(vox.point_offset(k, 2) == Approx(f(p.second, 2) - cz).margin(1e-6));
    ++k;
  }
  for (std::size_t b = 0; b < 3; ++b) {
    CHECK(vox.dropped[b] == ref.dropped[b]);
    CHECK(vox.kept[b] + vox.dropped[b] == frames[b].rows());
  }
  CHECK(vox.dropped[2] == 3);  // the three points on upper faces
  CHECK(ref.cells.count({2, 0, 0, 0}) == 1);  // the point on the lower corner

  SECTION("coarse occupancy is the max-pool of the dense occupancy") {
    const VoxelGrid g2{-3.0, 3.0, -2.0, 2.0, -1.0, 1.0, 6, 4, 4};
    const std::vector<RowMatrix<float>> fr = {random_points(9, 21, -3, 3, -2, 2, -1, 1),
                                              random_points(3, 22, -3, 3, -2, 2, -1, 1)};
    const auto vx = voxelize<float>(fr, g2);
    const DenseRef r2 = dense_reference(fr, g2);
    for (auto [pxy, pz] : {std::pair<Index, Index>{2, 1}, {2, 2}, {1, 4}}) {
      const OccupancyGrid occ = coarse_occupancy(vx, pxy, pz);
      REQUIRE(occ.nx == 6 / pxy);
      REQUIRE(occ.ny == 4 / pxy);
      REQUIRE(occ.nz == 4 / pz);
      CHECK(occ.cell_x == Approx(1.0 * pxy));
      const RowMatrix<float> m = occ.as_matrix<float>();
      REQUIRE(m.rows() == 2 * occ.ny * occ.nx);
      REQUIRE(m.cols() == occ.nz);
      for (Index b = 0; b < 2; ++b)
        for (Index z = 0; z < occ.nz; ++z)
          for (Index y = 0; y < occ.ny; ++y)
            for (Index x = 0; x < occ.nx; ++x) {
              bool any = false;
              for (Index dz = 0; dz < pz; ++dz)
                for (Index dy = 0; dy < pxy; ++dy)
                  for (Index dx = 0; dx < pxy; ++dx)
                    any = any || r2.cells.count({b, z * pz + dz, y * pxy + dy, x * pxy + dx}) > 0;
              CHECK(occ.at(b, z, y, x) == any);
              CHECK(m(occ.map_shape().row(b, y, x), z) == (any ? 1.0f : 0.0f));
            }
    }
    CHECK_THROWS_WITH(coarse_occupancy(vx, 4), Contains("pool_xy=4"));
    CHECK_THROWS_WITH(coarse_occupancy(vx, 2, 3), Contains("pool_z=3"));
  }
}

TEST_CASE("voxelize rejects bad input before doing anything") {
  std::vector<RowMatrix<float>> frames = {random_points(5, 1, -1, 1, -1, 1, -1, 1)};
  frames[0](2, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(voxelize<float>(frames, VoxelGrid::small()),
                    Contains("frame 0") && Contains("point 2") && Contains("column 1"));
  CHECK_THROWS_WITH(voxelize<float>(RowMatrix<float>(3, 2), VoxelGrid::small()),
                    Contains("2 columns"));
  CHECK_THROWS_WITH(voxelize<float>(std::vector<RowMatrix<float>>{}, VoxelGrid::small()),
                    Contains("no frames"));
  VoxelGrid bad = VoxelGrid::small();
  bad.x_max = bad.x_min;
  CHECK_THROWS_WITH(voxelize<float>(RowMatrix<float>(3, 4), bad), Contains("x_max"));
  bad = VoxelGrid::small();
  bad.nz = 0;
  CHECK_THROWS_WITH(voxelize<float>(RowMatrix<float>(3, 4), bad), Contains("nz=0"));
}

TEST_CASE("voxelize on a real KITTI scan with the small and paper grids") {
  const std::string path = test::data_file("kitti/seq00/000000.bin");
  if (path.empty()) VQKIT_SKIP("../shared/data/kitti/seq00 absent");
  const PointCloud c = read_kitti_bin(path);
  for (const VoxelGrid& g : {VoxelGrid::small(), VoxelGrid::paper()}) {
    const auto vox = voxelize<float>(c.points, g);
    // ROI membership counted independently
    Index inside = 0;
    for (Index i = 0; i < c.size(); ++i) {
      const float x = c.points(i, 0), y = c.points(i, 1), z = c.points(i, 2);
      inside += x >= g.x_min && x < g.x_max && y >= g.y_min && y < g.y_max && z >= g.z_min &&
                z < g.z_max;
    }
    CHECK(vox.kept[0] == inside);
    CHECK(vox.dropped[0] == c.size() - inside);
    CHECK(vox.voxel_count() > 1000);
    CHECK(vox.voxel_count() <= inside);
    CHECK(vox.voxel_points.sum() == inside);
    CHECK(vox.point_offset.col(0).cwiseAbs().maxCoeff() <= g.size_x() / 2 + 1e-5);
    CHECK(vox.point_offset.col(1).cwiseAbs().maxCoeff() <= g.size_y() / 2 + 1e-5);
    CHECK(vox.point_offset.col(2).cwiseAbs().maxCoeff() <= g.size_z() / 2 + 1e-5);
    // strictly increasing keys = sorted and unique
    for (Index v = 1; v < vox.voxel_count(); ++v) {
      const auto key = [&](Index i) {
        return ((vox.voxels(i, 0) * g.nz + vox.voxels(i, 1)) * g.ny + vox.voxels(i, 2)) * g.nx +
               vox.voxels(i, 3);
      };
      REQUIRE(key(v - 1) < key(v));
    }
    const OccupancyGrid occ = coarse_occupancy(vox, 8);
    CHECK(occ.count() > 0);
    CHECK(occ.count() < occ.nx * occ.ny * occ.nz);
  }
}

// ------------------------------------------------------ synthetic scene ---

namespace {
/// Independent first-hit distance: ground plane, the box by its six faces,
/// the pole by its side (quadratic) and top disc.
double analytic_depth(const Eigen::Vector3d& o, const Eigen::Vector3d& d, double ground,
                      const Box& box, const Pole& pole, double t_min, double t_max) {
  double best = std::numeric_limits<double>::infinity();
  const auto take = [&](double t) {
    if (t > t_min && t <= t_max) best = std::min(best, t);
  };
  if (d.z() != 0) take((ground - o.z()) / d.z());
  for (int axis = 0; axis < 3; ++axis)
    for (double face : {box.lo[axis], box.hi[axis]}) {
      if (d[axis] == 0) continue;
      const double t = (face - o[axis]) / d[axis];
      const Eigen::Vector3d p = o + t * d;
      bool in = true;
      for (int k = 0; k < 3; ++k)
        if (k != axis && (p[k] < box.lo[k] - 1e-9 || p[k] > box.hi[k] + 1e-9)) in = false;
      if (in) take(t);
    }
  const double a = d.x() * d.x() + d.y() * d.y();
  const double b = 2 * ((o.x() - pole.x) * d.x() + (o.y() - pole.y) * d.y());
  const double c = (o.x() - pole.x) * (o.x() - pole.x) + (o.y() - pole.y) * (o.y() - pole.y) -
                   pole.radius * pole.radius;
  if (a > 0 && b * b - 4 * a * c >= 0)
    for (double sgn : {-1.0, 1.0}) {
      const double t = (-b + sgn * std::sqrt(b * b - 4 * a * c)) / (2 * a);
      const double z = o.z() + t * d.z();
      if (z >= ground && z <= pole.z_top) take(t);
    }
  if (d.z() != 0) {
    const double t = (pole.z_top - o.z()) / d.z();
    const Eigen::Vector3d p = o + t * d;
    if ((p.x() - pole.x) * (p.x() - pole.x) + (p.y() - pole.y) * (p.y() - pole.y) <=
        pole.radius * pole.radius)
      take(t);
  }
  return best;
}
}  // namespace

TEST_CASE("synthetic scene: every return is the analytic first hit") {
  SyntheticScene s;
  Box box;
  box.lo = {6.0, -2.0, 0.0};
  box.hi = {9.0, 1.5, 2.5};
  Pole pole;
  pole.x = -4.0;
  pole.y = 3.0;
  pole.radius = 0.4;
  pole.z_top = 3.0;
  s.boxes = {box};
  s.poles = {pole};
  ScanOptions opt;
  opt.range_noise = 0;
  opt.pattern.beams = 16;
  opt.pattern.azimuths = 360;
  const Eigen::Vector3d sensor(0.5, -0.25, 1.73);
  for (bool world : {false, true}) {
    opt.world_frame = world;
    const SyntheticFrame f = s.scan(sensor, opt, 7);
    REQUIRE(f.points.rows() > 1000);
    REQUIRE(f.rays_cast == 16 * 360);
    Index on_box = 0, on_pole = 0, on_ground = 0;
    for (Index i = 0; i < f.points.rows(); ++i) {
      const Eigen::Vector3d d = f.ray_direction.row(i).transpose().cast<double>();
      REQUIRE(d.norm() == Approx(1.0).margin(1e-6));
      const double expect = analytic_depth(sensor, d, 0.0, box, pole, 1.0, 120.0);
      REQUIRE(std::isfinite(expect));
      REQUIRE(f.ray_depth[i] == Approx(expect).margin(2e-5 * std::max(1.0, expect)));
      const Eigen::Vector3d o = world ? sensor : Eigen::Vector3d::Zero();
      CHECK((f.ray_origin.row(i).transpose().cast<double>() - o).norm() < 1e-5);
      const Eigen::Vector3d p = o + expect * d;
      for (int k = 0; k < 3; ++k) CHECK(f.points(i, k) == Approx(p[k]).margin(1e-3));
      const Eigen::Vector3d pw = sensor + expect * d;
      on_ground += std::abs(pw.z()) < 1e-6;
      on_box += std::abs(pw.x() - 6.0) < 1e-6;
      on_pole += std::hypot(pw.x() + 4.0, pw.y() - 3.0) < 0.4 + 1e-6;
    }
    CHECK(on_ground > 100);
    CHECK(on_box > 20);
    CHECK(on_pole > 5);
    // Beams that return nothing: the upward ones that miss everything.
    CHECK(f.points.rows() < f.rays_cast);
  }
}

TEST_CASE("synthetic street: deterministic, KITTI-like, sensor moves") {
  ScanOptions opt;
  opt.pattern.azimuths = 200;  // keep it quick under sanitizers
  const auto a = synthetic_sequence(5, 3, opt);
  const auto b = synthetic_sequence(5, 3, opt);
  const auto c = synthetic_sequence(6, 1, opt);
  REQUIRE(a.size() == 3);
  for (std::size_t k = 0; k < 3; ++k) CHECK(a[k].points == b[k].points);
  CHECK(a[0].points.rows() != c[0].points.rows());
  CHECK(a[1].sensor_position.x() == Approx(0.86));
  CHECK(a[2].sensor_position.z() == Approx(1.73));
  for (const auto& f : a) {
    CHECK(f.points.rows() > f.rays_cast / 2);
    CHECK(f.points.allFinite());
    CHECK(f.points.col(3).minCoeff() >= 0.0f);
    CHECK(f.points.col(3).maxCoeff() <= 1.0f);
    // sensor frame: the road is 1.73 m below; many returns lie on it
    Index ground = 0;
    for (Index i = 0; i < f.points.rows(); ++i) ground += std::abs(f.points(i, 2) + 1.73f) < 0.1f;
    CHECK(ground > f.points.rows() / 5);
    CHECK(f.points.col(2).minCoeff() > -1.73f - 0.2f);
    // depth = |point - origin| (noise included)
    for (Index i = 0; i < f.points.rows(); i += 97)
      CHECK((f.points.row(i).head<3>() - f.ray_origin.row(i)).norm() ==
            Approx(f.ray_depth[i]).margin(1e-4));
  }
  CHECK_THROWS_WITH(synthetic_sequence(1, 0), Contains("frames"));
  ScanOptions bad;
  bad.pattern.beams = 0;
  CHECK_THROWS_WITH(synthetic_sequence(1, 1, bad), Contains("beams"));
}

// ---------------------------------------------------------------- rays ---

TEST_CASE("rays from points: origin, unit direction, depth; ROI and near drops") {
  std::vector<RowMatrix<float>> frames = {random_points(50, 31, -30, 30, -30, 30, -3, 3),
                                          random_points(20, 32, -30, 30, -30, 30, -3, 3)};
  frames[0].row(4) << 0.f, 0.f, 0.f, 0.f;  // at the sensor: dropped
  const std::vector<Eigen::Vector3d> origins = {Eigen::Vector3d::Zero(),
                                                Eigen::Vector3d(1.0, -2.0, 0.5)};
  const auto rays = rays_from_points<float>(frames, origins, 0.1);
  REQUIRE(rays.size() == 69);
  CHECK(rays.dropped == std::vector<Index>{1, 0});
  for (Index r = 0; r < rays.size(); ++r) {
    const auto b = static_cast<std::size_t>(rays.batch[r]);
    const Eigen::Vector3d p = frames[b].row(rays.source[r]).head<3>().transpose().cast<double>();
    CHECK(rays.direction.row(r).norm() == Approx(1.0).margin(1e-6));
    CHECK(rays.depth[r] == Approx((p - origins[b]).norm()).epsilon(1e-6));
    const Eigen::Vector3d q =
        rays.origin.row(r).transpose().cast<double>() + rays.depth[r] * rays.direction.row(r).transpose().cast<double>();
    CHECK((q - p).norm() < 1e-4);
  }
  const auto in_roi = rays_from_points<float>(frames, {}, 1e-3, VoxelGrid::small());
  Index inside = 0;
  for (const auto& f : frames)
    for (Index i = 0; i < f.rows(); ++i)
      inside += std::abs(f(i, 0)) < 25.6f && std::abs(f(i, 1)) < 25.6f && f(i, 0) != 0.f;
  CHECK(in_roi.size() == inside);
  CHECK_THROWS_WITH(rays_from_points<float>(frames, {Eigen::Vector3d::Zero()}), Contains("1 origins"));
}

TEST_CASE("subsample_rays: per frame, distinct, deterministic from the Rng") {
  std::vector<RowMatrix<float>> frames = {random_points(100, 41, -9, 9, -9, 9, -2, 2),
                                          random_points(7, 42, -9, 9, -9, 9, -2, 2),
                                          random_points(30, 43, -9, 9, -9, 9, -2, 2)};
  const auto rays = rays_from_points<float>(frames);
  Rng r1(9), r2(9), r3(10);
  const auto a = subsample_rays(rays, 10, r1);
  const auto b = subsample_rays(rays, 10, r2);
  const auto c = subsample_rays(rays, 10, r3);
  REQUIRE(a.size() == 10 + 7 + 10);
  CHECK(a.source == b.source);
  CHECK(a.source != c.source);
  std::set<std::pair<Index, Index>> seen;
  for (Index i = 0; i < a.size(); ++i) {
    CHECK(seen.insert({a.batch[i], a.source[i]}).second);
    if (i > 0 && a.batch[i] == a.batch[i - 1]) CHECK(a.source[i] > a.source[i - 1]);
    const auto bsz = static_cast<std::size_t>(a.batch[i]);
    CHECK(a.depth[i] == Approx(frames[bsz].row(a.source[i]).head<3>().norm()));
  }
  Index from1 = 0;
  for (Index i = 0; i < a.size(); ++i) from1 += a.batch[i] == 1;
  CHECK(from1 == 7);
  CHECK_THROWS_WITH(subsample_rays(rays, 0, r1), Contains("per_frame"));
}

namespace {
/// Coarse cell of a point, or false when outside the grid.
bool cell_occupied(const OccupancyGrid& g, Index b, const Eigen::Vector3d& p) {
  const long x = long(std::floor((p.x() - g.x_min) / g.cell_x));
  const long y = long(std::floor((p.y() - g.y_min) / g.cell_y));
  const long z = long(std::floor((p.z() - g.z_min) / g.cell_z));
  if (x < 0 || y < 0 || z < 0 || x >= g.nx || y >= g.ny || z >= g.nz) return false;
  return g.at(b, z, y, x);
}

OccupancyGrid random_occupancy(std::uint64_t seed, double fill) {
  OccupancyGrid g;
  g.batch = 2;
  g.nx = 7;
  g.ny = 5;
  g.nz = 3;
  g.x_min = -7.0;
  g.y_min = -4.0;
  g.z_min = -1.5;
  g.cell_x = 2.0;
  g.cell_y = 1.6;
  g.cell_z = 1.1;
  Rng r(seed);
  g.occupied.resize(2 * 7 * 5 * 3);
  for (auto& v : g.occupied) v = r.uniform() < fill ? 1 : 0;
  return g;
}
}  // namespace

TEST_CASE("occupied_intervals match a fine march through the coarse grid") {
  const OccupancyGrid g = random_occupancy(51, 0.3);
  Rng r(52);
  for (int trial = 0; trial < 40; ++trial) {
    const Index b = trial % 2;
    const Eigen::Vector3d o(-8 + 16 * r.uniform(), -5 + 10 * r.uniform(), -2 + 4 * r.uniform());
    Eigen::Vector3d d(r.normal(), r.normal(), 0.3 * r.normal());
    if (trial == 0) d = Eigen::Vector3d(1, 0, 0);  // axis-parallel rays too
    if (trial == 1) d = Eigen::Vector3d(0, -1, 0);
    d.normalize();
    const double near = 0.5, far = 20.0;
    const auto iv = occupied_intervals(g, b, o, d, near, far);
    double length = 0;
    for (std::size_t k = 0; k < iv.size(); ++k) {
      CHECK(iv[k].t0 >= near - 1e-12);
      CHECK(iv[k].t1 <= far + 1e-12);
      CHECK(iv[k].t0 < iv[k].t1);
      if (k > 0) CHECK(iv[k - 1].t1 < iv[k].t0);  // merged: disjoint with gaps
      length += iv[k].t1 - iv[k].t0;
      // interval interiors are occupied
      for (double f : {0.01, 0.5, 0.99})
        CHECK(cell_occupied(g, b, o + (iv[k].t0 + f * (iv[k].t1 - iv[k].t0)) * d));
    }
    const int steps = 50000;
    double marched = 0;
    const double h = (far - near) / steps;
    for (int s = 0; s < steps; ++s)
      marched += cell_occupied(g, b, o + (near + (s + 0.5) * h) * d) ? h : 0.0;
    CHECK(length == Approx(marched).margin(20 * h));
  }
}

TEST_CASE("sample_depths: stratified samples inside occupied cells, uniform fallback") {
  const OccupancyGrid g = random_occupancy(61, 0.25);
  std::vector<RowMatrix<float>> frames = {random_points(40, 62, -7, 7, -4, 4, -1.5, 1.8),
                                          random_points(40, 63, -7, 7, -4, 4, -1.5, 1.8)};
  const std::vector<Eigen::Vector3d> origins = {Eigen::Vector3d(-6.5, 0.1, 0.2),
                                                Eigen::Vector3d(3.0, -3.0, -1.0)};
  const auto rays = rays_from_points<float>(frames, origins, 0.5);
  const Index S = 9;
  const double near = 0.3, far = 25.0;
  Rng r1(3), r2(3);
  const auto s = sample_depths(rays, g, S, near, far, r1);
  const auto s2 = sample_depths(rays, g, S, near, far, r2);
  CHECK(s.depth == s2.depth);
  REQUIRE(s.depth.rows() == rays.size());
  REQUIRE(s.depth.cols() == S);
  Index with_occupied = 0;
  for (Index i = 0; i < rays.size(); ++i) {
    const Eigen::Vector3d o = rays.origin.row(i).transpose().cast<double>();
    const Eigen::Vector3d d = rays.direction.row(i).transpose().cast<double>();
    const auto iv = occupied_intervals(g, rays.batch[i], o, d, near, far);
    for (Index k = 1; k < S; ++k) CHECK(s.depth(i, k) >= s.depth(i, k - 1));
    if (s.fallback[static_cast<std::size_t>(i)]) {
      CHECK(iv.empty());
      for (Index k = 0; k < S; ++k) {  // stratum k of [near, far]
        CHECK(s.depth(i, k) >= near + k * (far - near) / S - 1e-4);
        CHECK(s.depth(i, k) <= near + (k + 1) * (far - near) / S + 1e-4);
      }
      continue;
    }
    ++with_occupied;
    double L = 0;
    for (const auto& v : iv) L += v.t1 - v.t0;
    CHECK(s.occupied_length[i] == Approx(L).epsilon(1e-5));
    for (Index k = 0; k < S; ++k) {
      const double t = s.depth(i, k);
      bool in_interval = false;
      for (const auto& v : iv) in_interval = in_interval || (t >= v.t0 - 1e-5 && t <= v.t1 + 1e-5);
      CHECK(in_interval);
      CHECK(cell_occupied(g, rays.batch[i], o + t * d));
    }
  }
  CHECK(with_occupied > rays.size() / 3);
  // an empty grid: every ray falls back
  OccupancyGrid empty = g;
  std::fill(empty.occupied.begin(), empty.occupied.end(), 0);
  Rng r3(4);
  const auto e = sample_depths(rays, empty, S, near, far, r3);
  CHECK(std::all_of(e.fallback.begin(), e.fallback.end(), [](std::uint8_t f) { return f == 1; }));
  // sample_points = o + t d
  const RowMatrix<float> pts = sample_points(rays, s);
  REQUIRE(pts.rows() == rays.size() * S);
  CHECK((pts.row(3 * S + 2) - (rays.origin.row(3) + s.depth(3, 2) * rays.direction.row(3))).norm() < 1e-5);
  // bad input
  CHECK_THROWS_WITH(sample_depths(rays, g, 0, near, far, r1), Contains("S=0"));
  CHECK_THROWS_WITH(sample_depths(rays, g, S, 5.0, 1.0, r1), Contains("near=5"));
  OccupancyGrid one = g;
  one.batch = 1;
  one.occupied.resize(7 * 5 * 3);
  CHECK_THROWS_WITH(sample_depths(rays, one, S, near, far, r1), Contains("frame 1"));
}

TEST_CASE("spatial skipping on a synthetic scan: samples concentrate near the surfaces") {
  ScanOptions opt;
  opt.pattern.beams = 16;
  opt.pattern.azimuths = 180;
  const auto frames = synthetic_sequence(3, 1, opt);
  VoxelGrid g = VoxelGrid::small();
  const auto vox = voxelize<float>(frames[0].points, g);
  const OccupancyGrid occ = coarse_occupancy(vox, 4);
  const auto rays = rays_from_points<float>(std::vector<RowMatrix<float>>{frames[0].points}, {}, 1e-3, g);
  Rng rng(1);
  const auto sub = subsample_rays(rays, 300, rng);
  const auto s = sample_depths(sub, occ, 16, 1.0, 37.0, rng);
  // The true surface point of every ray lies in an occupied coarse cell, so
  // no ray falls back, and the samples cover its depth's cell.
  for (Index i = 0; i < sub.size(); ++i) {
    CHECK(s.fallback[static_cast<std::size_t>(i)] == 0);
    const Eigen::Vector3d p = sub.origin.row(i).transpose().cast<double>() +
                              double(sub.depth[i]) * sub.direction.row(i).transpose().cast<double>();
    CHECK(cell_occupied(occ, 0, p));
    CHECK(s.occupied_length[i] < 37.0);
  }
}

// -------------------------------------------------------------- metrics ---

TEST_CASE("depth_errors on hand-computed values") {
  Vector<double> gt(4), pred(4);
  gt << 10, 20, 5, 7;
  pred << 10.5, 18, 5, 8;
  const DepthErrors e = depth_errors<double>(pred, gt);
  CHECK(e.mae == Approx((0.5 + 2 + 0 + 1) / 4));
  CHECK(e.rmse == Approx(std::sqrt((0.25 + 4 + 0 + 1) / 4)));
  CHECK(e.within == Approx(0.5));  // 0.5 and 0 are < 1 m; 1.0 is not
  CHECK(e.count == 4);
  CHECK_THROWS_WITH(depth_errors<double>(pred, Vector<double>(3)), Contains("3"));
}

TEST_CASE("chamfer and the kd-tree match brute force") {
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    RowMatrix<double> a = test::gaussian<double>(301, 3, seed, 2.0);
    RowMatrix<double> b = test::gaussian<double>(217, 4, seed + 100, 2.0);
    // duplicates and a far cluster
    b.row(5) = b.row(6);
    for (Index i = 0; i < 20; ++i) b.row(i).head<3>() += Eigen::RowVector3d(30, 0, 0);
    a.row(0) = b.row(9).head<3>();
    for (bool sq : {false, true}) {
      const ChamferResult r = chamfer<double>(a, b, sq);
      const auto brute = [&](const RowMatrix<double>& p, const RowMatrix<double>& q) {
        double s = 0;
        for (Index i = 0; i < p.rows(); ++i) {
          double best = std::numeric_limits<double>::infinity();
          for (Index j = 0; j < q.rows(); ++j)
            best = std::min(best, (p.row(i).head<3>() - q.row(j).head<3>()).squaredNorm());
          s += sq ? best : std::sqrt(best);
        }
        return s / double(p.rows());
      };
      CHECK(r.a_to_b == Approx(brute(a, b)).epsilon(1e-12));
      CHECK(r.b_to_a == Approx(brute(b, a)).epsilon(1e-12));
      CHECK(r.chamfer == Approx(0.5 * (r.a_to_b + r.b_to_a)));
      CHECK(r.squared == sq);
    }
    const KdTree3 tree(b);
    for (Index i = 0; i < a.rows(); ++i) {
      const Eigen::Vector3d q = a.row(i).transpose();
      const auto nb = tree.nearest(q);
      double best = std::numeric_limits<double>::infinity();
      for (Index j = 0; j < b.rows(); ++j)
        best = std::min(best, (b.row(j).head<3>().transpose() - q).squaredNorm());
      CHECK(nb.dist2 == Approx(best).epsilon(1e-12));
      CHECK((b.row(nb.index).head<3>().transpose() - q).squaredNorm() == Approx(best).epsilon(1e-12));
    }
  }
  // identical sets: 0
  const RowMatrix<float> p = random_points(500, 7, -5, 5, -5, 5, -1, 1);
  CHECK(chamfer<float>(p, p).chamfer == 0.0);
  // all points equal (degenerate tree)
  RowMatrix<double> same = RowMatrix<double>::Ones(50, 3);
  CHECK(KdTree3(same).nearest(Eigen::Vector3d(1, 1, 2)).dist2 == Approx(1.0));
  CHECK_THROWS_WITH(chamfer<double>(RowMatrix<double>(0, 3), same), Contains("non-empty"));
}

// ------------------------------------------------------------------ PNG ---

namespace {
std::uint32_t be32(const std::uint8_t* p) {
  return (std::uint32_t(p[0]) << 24) | (std::uint32_t(p[1]) << 16) | (std::uint32_t(p[2]) << 8) | p[3];
}
/// CRC-32 bit by bit (no table), independent of the writer's.
std::uint32_t crc_bitwise(const std::uint8_t* d, std::size_t n) {
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = 0; i < n; ++i) {
    c ^= d[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return c ^ 0xFFFFFFFFu;
}

struct Decoded {
  int width = 0, height = 0, channels = 0;
  std::vector<std::uint8_t> pixels;
  int blocks = 0;
};

/// Parses a PNG whose IDAT holds stored deflate blocks; checks every CRC,
/// the zlib header, LEN/NLEN, the Adler-32 and the filter bytes.
Decoded decode_stored_png(const std::vector<std::uint8_t>& f) {
  const std::uint8_t sig[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  REQUIRE(f.size() > 8);
  REQUIRE(std::memcmp(f.data(), sig, 8) == 0);
  Decoded out;
  std::vector<std::uint8_t> z;
  std::size_t pos = 8;
  std::vector<std::string> types;
  while (pos < f.size()) {
    REQUIRE(pos + 12 <= f.size());
    const std::uint32_t len = be32(&f[pos]);
    REQUIRE(pos + 12 + len <= f.size());
    const std::string type(reinterpret_cast<const char*>(&f[pos + 4]), 4);
    types.push_back(type);
    CHECK(be32(&f[pos + 8 + len]) == crc_bitwise(&f[pos + 4], len + 4));
    const std::uint8_t* d = &f[pos + 8];
    if (type == "IHDR") {
      REQUIRE(len == 13);
      out.width = int(be32(d));
      out.height = int(be32(d + 4));
      CHECK(d[8] == 8);
      REQUIRE((d[9] == 0 || d[9] == 2));
      out.channels = d[9] == 0 ? 1 : 3;
      CHECK(d[10] == 0);
      CHECK(d[11] == 0);
      CHECK(d[12] == 0);
    } else if (type == "IDAT") {
      z.insert(z.end(), d, d + len);
    }
    pos += 12 + len;
  }
  CHECK(pos == f.size());
  REQUIRE(types.size() >= 3);
  CHECK(types.front() == "IHDR");
  CHECK(types.back() == "IEND");
  // zlib
  REQUIRE(z.size() >= 6);
  CHECK((z[0] & 0x0F) == 8);
  CHECK((z[0] * 256 + z[1]) % 31 == 0);
  CHECK((z[1] & 0x20) == 0);  // no preset dictionary
  std::vector<std::uint8_t> raw;
  std::size_t p = 2;
  bool final = false;
  while (!final) {
    REQUIRE(p + 5 <= z.size());
    final = (z[p] & 1) != 0;
    REQUIRE(((z[p] >> 1) & 3) == 0);  // stored
    const unsigned len = z[p + 1] | (z[p + 2] << 8);
    const unsigned nlen = z[p + 3] | (z[p + 4] << 8);
    CHECK((len ^ 0xFFFFu) == nlen);
    REQUIRE(p + 5 + len <= z.size());
    raw.insert(raw.end(), z.begin() + long(p + 5), z.begin() + long(p + 5 + len));
    p += 5 + len;
    ++out.blocks;
  }
  REQUIRE(p + 4 == z.size());
  std::uint64_t a = 1, b = 0;  // Adler-32 by its definition
  for (std::uint8_t v : raw) {
    a = (a + v) % 65521;
    b = (b + a) % 65521;
  }
  CHECK(be32(&z[p]) == std::uint32_t((b << 16) | a));
  const std::size_t row = std::size_t(out.width) * out.channels;
  REQUIRE(raw.size() == (row + 1) * std::size_t(out.height));
  for (int y = 0; y < out.height; ++y) {
    CHECK(raw[y * (row + 1)] == 0);
    out.pixels.insert(out.pixels.end(), raw.begin() + long(y * (row + 1) + 1),
                      raw.begin() + long((y + 1) * (row + 1)));
  }
  return out;
}
}  // namespace

TEST_CASE("PNG writer: signature, CRCs, stored zlib blocks and pixels round-trip") {
  Rng r(77);
  for (auto [w, h, c] : {std::tuple<int, int, int>{70, 1000, 3}, {1, 1, 1}, {33, 17, 1}}) {
    Image img(w, h, c);
    for (auto& v : img.pixels) v = std::uint8_t(r.below(256));
    const auto bytes = png::encode(img);
    const Decoded d = decode_stored_png(bytes);
    CHECK(d.width == w);
    CHECK(d.height == h);
    CHECK(d.channels == c);
    CHECK(d.pixels == img.pixels);
    if (w == 70) CHECK(d.blocks == 4);  // 211,000 bytes of scanlines
  }
  TempDir dir;
  Image img(5, 4, 3, 200);
  write_png(dir / "x.png", img);
  CHECK(read_bytes(dir / "x.png") == png::encode(img));
  CHECK(png::crc32(reinterpret_cast<const std::uint8_t*>("123456789"), 9) == 0xCBF43926u);
  CHECK(png::adler32(reinterpret_cast<const std::uint8_t*>("Wikipedia"), 9) == 0x11E60398u);
  CHECK_THROWS_WITH(Image(0, 3, 3), Contains("0x3"));
  CHECK_THROWS_WITH(Image(2, 3, 2), Contains("channels"));
}

TEST_CASE("BEV pictures: pixels where the points are, side by side") {
  RowMatrix<float> pts(3, 4);
  pts << -25.0f, -25.0f, 2.5f, 0.f,  // top-left pixel, highest: red
      25.5f, -25.5f, -2.5f, 0.f,     // top-right pixel, lowest: blue
      25.5f, 25.5f, 0.0f, 0.f;       // bottom-right
  BevView view;
  view.width = 64;
  view.height = 32;
  const Image img = bev_height_image<float>(pts, view);
  REQUIRE(img.width == 64);
  REQUIRE(img.height == 32);
  const auto px = [&](const Image& im, int x, int y) {
    const std::uint8_t* p = im.at(x, y);
    return std::array<int, 3>{p[0], p[1], p[2]};
  };
  CHECK(px(img, 0, 0) == std::array<int, 3>{255, 40, 20});
  CHECK(px(img, 63, 0) == std::array<int, 3>{40, 60, 255});
  CHECK(px(img, 63, 31) != std::array<int, 3>{0, 0, 0});
  Index lit = 0;
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 64; ++x) lit += px(img, x, y) != std::array<int, 3>{0, 0, 0};
  CHECK(lit == 3);
  view.y_up = true;
  const Image up = bev_height_image<float>(pts, view);
  CHECK(px(up, 0, 31) == std::array<int, 3>{255, 40, 20});
  const Image both = compare_bev<float>(pts, pts.topRows(1), view, 3);
  CHECK(both.width == 64 + 3 + 64);
  CHECK(px(both, 64 + 3 + 0, 31) == std::array<int, 3>{255, 40, 20});
  CHECK(px(both, 64 + 3 + 63, 31) == std::array<int, 3>{0, 0, 0});
  CHECK(px(both, 65, 5) == std::array<int, 3>{128, 128, 128});
  // occupancy picture: grey level = share of occupied z levels
  OccupancyGrid occ = random_occupancy(5, 0.5);
  const Image o = bev_occupancy_image(occ, 1, 2);
  REQUIRE(o.width == 14);
  REQUIRE(o.height == 10);
  REQUIRE(o.channels == 1);
  for (Index y = 0; y < 5; ++y)
    for (Index x = 0; x < 7; ++x) {
      int n = 0;
      for (Index z = 0; z < 3; ++z) n += occ.at(1, z, y, x);
      CHECK(*o.at(int(2 * x + 1), int(2 * y + 1)) == std::lround(255.0 * n / 3));
    }
  CHECK_THROWS_WITH(side_by_side(img, o), Contains("heights differ"));
  CHECK_THROWS_WITH(bev_occupancy_image(occ, 2), Contains("frame 2"));
  TempDir dir;
  write_png(dir / "cmp.png", both);
  CHECK(decode_stored_png(read_bytes(dir / "cmp.png")).pixels == both.pixels);
}

TEST_CASE("BEV pictures: square pixels and a scale bar of the right length") {
  const BevView v = square_pixel_view(-40.0, 40.0, -20.0, 20.0, 400);
  CHECK(v.width == 400);
  CHECK(v.height == 200);  // 0.2 m per pixel both ways
  CHECK(scale_bar_metres(v) == 20.0);
  CHECK(scale_bar_metres(square_pixel_view(0.0, 3.0, 0.0, 3.0)) == 1.0);
  CHECK(scale_bar_metres(square_pixel_view(0.0, 250.0, 0.0, 1.0)) == 50.0);
  Image img(v.width, v.height, 3, 0);
  draw_scale_bar(img, v, 10.0, 5);  // 10 m = 50 px
  int bar = 0, lit = 0;
  const int y_bar = v.height - 1 - 5 - 4;
  for (int x = 0; x < v.width; ++x) bar += img.at(x, y_bar)[0] == 255;
  for (int y = 0; y < v.height; ++y)
    for (int x = 0; x < v.width; ++x) lit += img.at(x, y)[1] == 255;
  CHECK(bar == 50);
  CHECK(img.at(5, y_bar)[2] == 255);
  CHECK(img.at(54, y_bar)[2] == 255);
  CHECK(img.at(55, y_bar)[2] == 0);
  CHECK(lit == 50 * 3 + 2 * 6);  // the bar, and the ticks' pixels above and below it
  CHECK_THROWS_WITH(draw_scale_bar(img, v, 100.0), Contains("does not fit"));
  CHECK_THROWS_WITH(draw_scale_bar(img, v, -1.0), Contains("metres must be finite and > 0"));
  Image small(10, 10, 3, 0);
  CHECK_THROWS_WITH(draw_scale_bar(small, v, 1.0), Contains("the image is 10x10"));
}
