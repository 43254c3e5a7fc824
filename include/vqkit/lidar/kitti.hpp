// vqkit/lidar/kitti.hpp - KITTI Velodyne scans (.bin) and frame folders.
//
// Format: a KITTI .bin file is raw little-endian float32, 4 per point
// (x y z reflectance), no header; P = file size / 16. See point_cloud.hpp for
// the frame conventions.
//
//   read_kitti_bin(path)      -> PointCloud (points (P, 4), origin 0)
//   write_kitti_bin(path, m)  writes an (P, 4) float matrix in the same format
//   list_kitti_frames(folder) -> the folder's *.bin paths, sorted: names whose
//                                stems are all digits by their number, others
//                                after them by name (KITTI's zero-padded
//                                000000.bin ... sort the same either way)
//
// Errors (vqkit::error, naming the path): a missing or unreadable file, a
// size that is not a multiple of 16 bytes (names the size and the remainder),
// a short read, a non-finite value (names the point index and column), a
// missing folder or a path that is not a folder. An empty file is a valid
// scan with 0 points.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/lidar/point_cloud.hpp"

namespace vqkit::lidar {

static_assert(std::endian::native == std::endian::little,
              "vqkit/lidar/kitti.hpp assumes a little-endian host");

inline PointCloud read_kitti_bin(const std::string& path) {
  constexpr const char* where = "read_kitti_bin";
  std::error_code ec;
  const bool exists = std::filesystem::exists(path, ec);
  VQKIT_REQUIRE(exists, where, "no such file '", path, "'");
  VQKIT_REQUIRE(!std::filesystem::is_directory(path, ec), where, "'", path,
                "' is a folder, expected a .bin file");
  std::ifstream in(path, std::ios::binary);
  VQKIT_REQUIRE(in.good(), where, "cannot open '", path, "' (", std::strerror(errno), ")");
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  VQKIT_REQUIRE(size >= 0, where, "cannot determine the size of '", path, "'");
  VQKIT_REQUIRE(size % 16 == 0, where, "'", path, "' has ", size,
                " bytes, not a multiple of 16 (4 float32 per point); ", size % 16,
                " trailing bytes: not a KITTI Velodyne scan");
  in.seekg(0, std::ios::beg);
  PointCloud cloud;
  const Index P = static_cast<Index>(size / 16);
  cloud.points.resize(P, 4);
  if (P > 0) {
    in.read(reinterpret_cast<char*>(cloud.points.data()), static_cast<std::streamsize>(size));
    VQKIT_REQUIRE(in.gcount() == static_cast<std::streamsize>(size), where, "short read of '", path,
                  "': got ", in.gcount(), " of ", size, " bytes");
  }
  const std::string what = "'" + path + "'";
  require_points(cloud.points, where, what.c_str());
  return cloud;
}

/// Writes m (P, 4) as float32 x y z reflectance (truncates an existing file).
template <class Derived>
void write_kitti_bin(const std::string& path, const Eigen::DenseBase<Derived>& m) {
  constexpr const char* where = "write_kitti_bin";
  VQKIT_REQUIRE(m.cols() == 4, where, "points have ", m.cols(),
                " columns, expected 4 (x y z reflectance)");
  const RowMatrix<float> f = m.template cast<float>();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  VQKIT_REQUIRE(out.good(), where, "cannot open '", path, "' for writing (", std::strerror(errno),
                ")");
  out.write(reinterpret_cast<const char*>(f.data()),
            static_cast<std::streamsize>(f.size() * sizeof(float)));
  out.flush();
  VQKIT_REQUIRE(out.good(), where, "write to '", path, "' failed");
}

namespace detail {
inline bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}
/// Digit strings compared as numbers (leading zeros ignored), ties by text.
inline bool numeric_less(const std::string& a, const std::string& b) {
  const auto strip = [](const std::string& s) {
    const auto p = s.find_first_not_of('0');
    return p == std::string::npos ? std::string("0") : s.substr(p);
  };
  const std::string sa = strip(a), sb = strip(b);
  if (sa.size() != sb.size()) return sa.size() < sb.size();
  if (sa != sb) return sa < sb;
  return a < b;
}
}  // namespace detail

/// The *.bin files of `folder`, sorted (see the header comment).
inline std::vector<std::string> list_kitti_frames(const std::string& folder) {
  constexpr const char* where = "list_kitti_frames";
  std::error_code ec;
  VQKIT_REQUIRE(std::filesystem::exists(folder, ec), where, "no such folder '", folder, "'");
  VQKIT_REQUIRE(std::filesystem::is_directory(folder, ec), where, "'", folder,
                "' is not a folder");
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(folder)) {
    if (!e.is_regular_file() || e.path().extension() != ".bin") continue;
    files.push_back(e.path());
  }
  std::sort(files.begin(), files.end(), [](const auto& a, const auto& b) {
    const std::string sa = a.stem().string(), sb = b.stem().string();
    const bool da = detail::all_digits(sa), db = detail::all_digits(sb);
    if (da != db) return da;  // numbered frames first
    if (da) return detail::numeric_less(sa, sb);
    return a.filename().string() < b.filename().string();
  });
  std::vector<std::string> out;
  out.reserve(files.size());
  for (const auto& f : files) out.push_back(f.string());
  return out;
}

/// Reads KITTI odometry poses: one 3x4 row-major matrix (12 numbers) per
/// line; blank lines are skipped. Throws naming the line on a bad line.
inline std::vector<Eigen::Matrix<double, 3, 4>> read_kitti_poses(const std::string& path) {
  constexpr const char* where = "read_kitti_poses";
  std::ifstream in(path);
  VQKIT_REQUIRE(in.good(), where, "cannot open '", path, "'");
  std::vector<Eigen::Matrix<double, 3, 4>> poses;
  std::string line;
  for (int lineno = 1; std::getline(in, line); ++lineno) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    std::istringstream is(line);
    Eigen::Matrix<double, 3, 4> m;
    for (int k = 0; k < 12; ++k) {
      double v = 0;
      VQKIT_REQUIRE(static_cast<bool>(is >> v), where, "'", path, "' line ", lineno,
                    ": expected 12 numbers, got ", k);
      VQKIT_REQUIRE(std::isfinite(v), where, "'", path, "' line ", lineno,
                    ": non-finite value ", v);
      m(k / 4, k % 4) = v;
    }
    std::string rest;
    VQKIT_REQUIRE(!(is >> rest), where, "'", path, "' line ", lineno,
                  ": more than 12 values (found '", rest, "')");
    poses.push_back(m);
  }
  return poses;
}

}  // namespace vqkit::lidar
