// vqkit/lidar/bev_image.hpp - bird's-eye-view pictures of scans and
// occupancy grids, written as PNG without any image library.
//
// Image: width x height pixels, 1 (grey) or 3 (RGB) channels of 8 bits,
// row-major from the top row, channels interleaved.
//
// PNG (encode_png / write_png): the 8-byte signature, an IHDR chunk (8-bit,
// colour type 0 grey or 2 RGB, no interlace), one IDAT chunk and IEND; each
// chunk is length (big-endian u32), type, data, CRC-32 (ISO-HDLC polynomial
// 0xEDB88320 reflected, init and final xor 0xFFFFFFFF) of type + data. IDAT
// is a zlib stream (header 0x78 0x01, deflate *stored* blocks of at most
// 65535 bytes: no compression, so no compressor is needed, then the
// big-endian Adler-32 of the raw data) of the scanlines, each prefixed by
// filter byte 0 (none).
//
// BEV pictures (BevView: the ROI shown and the picture size). Pixel column
// c = floor((x - x_min) / (x_max - x_min) * width), row r = floor((y - y_min)
// / (y_max - y_min) * height): the picture is the BEV map as stored (map x ->
// column, map y -> row, row 0 = y_min at the top), i.e. mirrored against a
// map drawn with y up; set y_up = true for that view (row 0 = y_max).
//   bev_height_image(points, view): each pixel holding points shows the
//     highest z among them, coloured from blue (z <= z_lo) through cyan,
//     green and yellow to red (z >= z_hi); empty pixels are black.
//   bev_occupancy_image(occ, b, scale): each coarse BEV cell of frame b is a
//     scale x scale block, grey level = share of its z levels occupied.
//   side_by_side(left, right, gap): both pictures next to each other (same
//     height required) with a `gap`-pixel grey bar between them.
//   compare_bev(a, b, view): side_by_side of the two height images (input
//     scan vs reconstruction), both of the same view: same extent and scale.
//   square_pixel_view(x/y ranges, long_side): a view with square pixels;
//   draw_scale_bar(img, view, metres), scale_bar_metres(view): a scale bar.
#pragma once

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/lidar/voxelizer.hpp"

namespace vqkit::lidar {

struct Image {
  int width = 0, height = 0, channels = 3;
  std::vector<std::uint8_t> pixels;  ///< height * width * channels

  Image() = default;
  Image(int w, int h, int c, std::uint8_t fill = 0) : width(w), height(h), channels(c) {
    VQKIT_REQUIRE(w >= 1 && h >= 1 && w <= (1 << 15) && h <= (1 << 15), "Image",
                  "size must be in [1, 32768] per side, got ", w, "x", h);
    VQKIT_REQUIRE(c == 1 || c == 3, "Image", "channels must be 1 or 3, got ", c);
    pixels.assign(static_cast<std::size_t>(w) * h * c, fill);
  }
  std::uint8_t* at(int x, int y) {
    return pixels.data() + (static_cast<std::size_t>(y) * width + x) * channels;
  }
  const std::uint8_t* at(int x, int y) const {
    return pixels.data() + (static_cast<std::size_t>(y) * width + x) * channels;
  }
};

namespace png {

inline std::uint32_t crc32(const std::uint8_t* data, std::size_t n, std::uint32_t crc = 0) {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

inline std::uint32_t adler32(const std::uint8_t* data, std::size_t n) {
  constexpr std::uint32_t mod = 65521;
  std::uint32_t a = 1, b = 0;
  for (std::size_t i = 0; i < n;) {
    const std::size_t end = std::min(n, i + 5552);  // no u32 overflow before the modulo
    for (; i < end; ++i) {
      a += data[i];
      b += a;
    }
    a %= mod;
    b %= mod;
  }
  return (b << 16) | a;
}

namespace detail {
inline void put_u32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  out.push_back(static_cast<std::uint8_t>(v >> 24));
  out.push_back(static_cast<std::uint8_t>(v >> 16));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
  out.push_back(static_cast<std::uint8_t>(v));
}
inline void put_chunk(std::vector<std::uint8_t>& out, const char type[4],
                      const std::vector<std::uint8_t>& data) {
  put_u32(out, static_cast<std::uint32_t>(data.size()));
  const std::size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  put_u32(out, crc32(out.data() + start, out.size() - start));
}
}  // namespace detail

inline std::vector<std::uint8_t> encode(const Image& img) {
  VQKIT_REQUIRE(img.width >= 1 && img.height >= 1 && (img.channels == 1 || img.channels == 3) &&
                    img.pixels.size() ==
                        static_cast<std::size_t>(img.width) * img.height * img.channels,
                "png::encode", "inconsistent image: ", img.width, "x", img.height, "x",
                img.channels, " with ", img.pixels.size(), " bytes");
  std::vector<std::uint8_t> raw;  // scanlines with filter byte 0
  const std::size_t row = static_cast<std::size_t>(img.width) * img.channels;
  raw.reserve((row + 1) * img.height);
  for (int y = 0; y < img.height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), img.pixels.begin() + static_cast<std::ptrdiff_t>(y * row),
               img.pixels.begin() + static_cast<std::ptrdiff_t>((y + 1) * row));
  }
  std::vector<std::uint8_t> z = {0x78, 0x01};
  std::size_t pos = 0;
  do {
    const std::size_t len = std::min<std::size_t>(65535, raw.size() - pos);
    const bool last = pos + len == raw.size();
    z.push_back(last ? 1 : 0);  // BFINAL, BTYPE = 00 (stored)
    z.push_back(static_cast<std::uint8_t>(len & 0xFF));
    z.push_back(static_cast<std::uint8_t>(len >> 8));
    z.push_back(static_cast<std::uint8_t>(~len & 0xFF));
    z.push_back(static_cast<std::uint8_t>((~len >> 8) & 0xFF));
    z.insert(z.end(), raw.begin() + static_cast<std::ptrdiff_t>(pos),
             raw.begin() + static_cast<std::ptrdiff_t>(pos + len));
    pos += len;
  } while (pos < raw.size());
  detail::put_u32(z, adler32(raw.data(), raw.size()));

  std::vector<std::uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<std::uint8_t> ihdr;
  detail::put_u32(ihdr, static_cast<std::uint32_t>(img.width));
  detail::put_u32(ihdr, static_cast<std::uint32_t>(img.height));
  ihdr.insert(ihdr.end(), {8, static_cast<std::uint8_t>(img.channels == 1 ? 0 : 2), 0, 0, 0});
  detail::put_chunk(out, "IHDR", ihdr);
  detail::put_chunk(out, "IDAT", z);
  detail::put_chunk(out, "IEND", {});
  return out;
}

}  // namespace png

inline void write_png(const std::string& path, const Image& img) {
  const std::vector<std::uint8_t> bytes = png::encode(img);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  VQKIT_REQUIRE(out.good(), "write_png", "cannot open '", path, "' for writing (",
                std::strerror(errno), ")");
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  out.flush();
  VQKIT_REQUIRE(out.good(), "write_png", "write to '", path, "' failed");
}

struct BevView {
  double x_min = -25.6, x_max = 25.6, y_min = -25.6, y_max = 25.6;
  double z_lo = -2.5, z_hi = 2.5;  ///< colour range of the height
  int width = 512, height = 512;
  bool y_up = false;

  void validate(const char* where) const {
    VQKIT_REQUIRE(std::isfinite(x_min) && std::isfinite(x_max) && x_min < x_max &&
                      std::isfinite(y_min) && std::isfinite(y_max) && y_min < y_max,
                  where, "view needs x_min < x_max and y_min < y_max, got x [", x_min, ", ", x_max,
                  "] y [", y_min, ", ", y_max, "]");
    VQKIT_REQUIRE(std::isfinite(z_lo) && std::isfinite(z_hi) && z_lo < z_hi, where,
                  "view needs z_lo < z_hi, got ", z_lo, " and ", z_hi);
    VQKIT_REQUIRE(width >= 1 && height >= 1 && width <= (1 << 15) && height <= (1 << 15), where,
                  "picture size must be in [1, 32768] per side, got ", width, "x", height);
  }
};

/// Height colour: blue -> cyan -> green -> yellow -> red over s in [0, 1].
inline std::array<std::uint8_t, 3> height_colour(double s) {
  static constexpr double stops[5][3] = {
      {40, 60, 255}, {0, 220, 255}, {40, 230, 60}, {255, 230, 0}, {255, 40, 20}};
  s = std::clamp(s, 0.0, 1.0) * 4.0;
  const int i = std::min(3, static_cast<int>(s));
  const double f = s - i;
  std::array<std::uint8_t, 3> c{};
  for (int k = 0; k < 3; ++k)
    c[static_cast<std::size_t>(k)] =
        static_cast<std::uint8_t>(std::lround(stops[i][k] + f * (stops[i + 1][k] - stops[i][k])));
  return c;
}

template <class T>
Image bev_height_image(ConstMatrixRef<T> points, const BevView& view) {
  constexpr const char* where = "bev_height_image";
  view.validate(where);
  VQKIT_REQUIRE(points.cols() >= 3, where, "points have ", points.cols(),
                " columns, expected at least 3");
  VQKIT_REQUIRE(points.leftCols(3).allFinite(), where, "points must be finite");
  std::vector<double> top(static_cast<std::size_t>(view.width) * view.height,
                          -std::numeric_limits<double>::infinity());
  for (Index i = 0; i < points.rows(); ++i) {
    const double x = static_cast<double>(points(i, 0)), y = static_cast<double>(points(i, 1));
    if (!(x >= view.x_min && x < view.x_max && y >= view.y_min && y < view.y_max)) continue;
    const int c = std::min(view.width - 1, static_cast<int>((x - view.x_min) /
                                                            (view.x_max - view.x_min) * view.width));
    int r = std::min(view.height - 1, static_cast<int>((y - view.y_min) / (view.y_max - view.y_min) *
                                                       view.height));
    if (view.y_up) r = view.height - 1 - r;
    double& t = top[static_cast<std::size_t>(r) * view.width + c];
    t = std::max(t, static_cast<double>(points(i, 2)));
  }
  Image img(view.width, view.height, 3, 0);
  for (int r = 0; r < view.height; ++r)
    for (int c = 0; c < view.width; ++c) {
      const double t = top[static_cast<std::size_t>(r) * view.width + c];
      if (!std::isfinite(t)) continue;
      const auto col = height_colour((t - view.z_lo) / (view.z_hi - view.z_lo));
      std::copy(col.begin(), col.end(), img.at(c, r));
    }
  return img;
}

inline Image bev_occupancy_image(const OccupancyGrid& occ, Index b, int scale = 8, bool y_up = false) {
  constexpr const char* where = "bev_occupancy_image";
  VQKIT_REQUIRE(b >= 0 && b < occ.batch, where, "frame ", b, " out of range [0, ", occ.batch, ")");
  VQKIT_REQUIRE(scale >= 1, where, "scale must be >= 1, got ", scale);
  VQKIT_REQUIRE(occ.occupied.size() == static_cast<std::size_t>(occ.batch * occ.ny * occ.nx * occ.nz),
                where, "inconsistent OccupancyGrid");
  VQKIT_REQUIRE(occ.nx * scale <= (1 << 15) && occ.ny * scale <= (1 << 15), where,
                "picture too large: ", occ.nx, "x", occ.ny, " cells at scale ", scale);
  Image img(static_cast<int>(occ.nx) * scale, static_cast<int>(occ.ny) * scale, 1, 0);
  for (Index y = 0; y < occ.ny; ++y)
    for (Index x = 0; x < occ.nx; ++x) {
      Index n = 0;
      for (Index z = 0; z < occ.nz; ++z) n += occ.at(b, z, y, x) ? 1 : 0;
      const auto g = static_cast<std::uint8_t>(std::lround(255.0 * static_cast<double>(n) /
                                                           static_cast<double>(occ.nz)));
      const Index row0 = y_up ? occ.ny - 1 - y : y;
      for (int dy = 0; dy < scale; ++dy)
        for (int dx = 0; dx < scale; ++dx)
          *img.at(static_cast<int>(x) * scale + dx, static_cast<int>(row0) * scale + dy) = g;
    }
  return img;
}

inline Image side_by_side(const Image& left, const Image& right, int gap = 4) {
  constexpr const char* where = "side_by_side";
  VQKIT_REQUIRE(left.height == right.height, where, "heights differ: ", left.height, " and ",
                right.height);
  VQKIT_REQUIRE(gap >= 0, where, "gap must be >= 0, got ", gap);
  const int ch = std::max(left.channels, right.channels);
  Image out(left.width + gap + right.width, left.height, ch, 128);
  const auto blit = [&](const Image& src, int x0) {
    for (int y = 0; y < src.height; ++y)
      for (int x = 0; x < src.width; ++x) {
        const std::uint8_t* s = src.at(x, y);
        std::uint8_t* d = out.at(x0 + x, y);
        for (int k = 0; k < ch; ++k) d[k] = s[src.channels == 1 ? 0 : k];
      }
  };
  blit(left, 0);
  blit(right, left.width + gap);
  return out;
}

/// A view of [x_min, x_max) x [y_min, y_max) with square pixels (the same
/// metres per pixel along x and y): the longer side gets long_side pixels.
inline BevView square_pixel_view(double x_min, double x_max, double y_min, double y_max,
                                 int long_side = 512) {
  BevView v;
  v.x_min = x_min;
  v.x_max = x_max;
  v.y_min = y_min;
  v.y_max = y_max;
  v.width = v.height = 1;
  v.validate("square_pixel_view");
  VQKIT_REQUIRE(long_side >= 1 && long_side <= (1 << 15), "square_pixel_view",
                "long_side must be in [1, 32768], got ", long_side);
  const double w = x_max - x_min, h = y_max - y_min, px = std::max(w, h) / long_side;
  v.width = std::max(1, static_cast<int>(std::lround(w / px)));
  v.height = std::max(1, static_cast<int>(std::lround(h / px)));
  return v;
}

/// The longest of 1, 2, 5, 10, 20, 50, ... metres that is at most a quarter
/// of the view's x extent (at least 1 m): a scale bar's length.
inline double scale_bar_metres(const BevView& view) {
  const double quarter = (view.x_max - view.x_min) / 4;
  double best = 1;
  for (double decade = 1; decade <= quarter; decade *= 10)
    for (const double m : {1.0, 2.0, 5.0})
      if (m * decade <= quarter) best = m * decade;
  return best;
}

/// Draws a white scale bar `metres` long (measured along x of `view`, the
/// view img shows) in the bottom-left corner, `margin` pixels from the
/// edges: a 3-pixel-high bar with 9-pixel ticks at both ends. Throws if it
/// does not fit or the image is not view-sized.
inline void draw_scale_bar(Image& img, const BevView& view, double metres, int margin = 8) {
  constexpr const char* where = "draw_scale_bar";
  view.validate(where);
  VQKIT_REQUIRE(img.width == view.width && img.height == view.height, where, "the image is ", img.width, "x",
                img.height, ", the view ", view.width, "x", view.height);
  VQKIT_REQUIRE(std::isfinite(metres) && metres > 0, where, "metres must be finite and > 0, got ", metres);
  const int len = static_cast<int>(std::lround(metres / (view.x_max - view.x_min) * view.width));
  VQKIT_REQUIRE(len >= 2 && margin >= 0 && margin + len <= img.width && margin + 9 <= img.height, where,
                "a ", metres, " m bar (", len, " px) does not fit a ", img.width, "x", img.height,
                " image with a ", margin, " px margin");
  const auto white = [&](int x, int y) {
    std::uint8_t* p = img.at(x, y);
    for (int k = 0; k < img.channels; ++k) p[k] = 255;
  };
  const int y0 = img.height - 1 - margin;  // bottom row of the ticks
  for (int x = margin; x < margin + len; ++x)
    for (int dy = 0; dy < 3; ++dy) white(x, y0 - 3 - dy);
  for (int dy = 0; dy < 9; ++dy) {
    white(margin, y0 - dy);
    white(margin + len - 1, y0 - dy);
  }
}

template <class T>
Image compare_bev(ConstMatrixRef<T> a, ConstMatrixRef<T> b, const BevView& view, int gap = 4) {
  return side_by_side(bev_height_image<T>(a, view), bev_height_image<T>(b, view), gap);
}

}  // namespace vqkit::lidar
