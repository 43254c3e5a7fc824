// vqkit/core/map_shape.hpp - how a spatial feature map is laid out.
//
// Layers take activations as a RowMatrix (rows, C): one feature vector per
// row, channels last. A batch of B two-dimensional maps of H x W cells (a BEV
// map, a token grid) is the matrix (B*H*W, C) with rows in (b, y, x) order:
//   row(b, y, x) = (b * H + y) * W + x
// which is PyTorch's (B, H, W, C) tensor flattened. Layers that need the
// spatial arrangement (attention windows, patch merging, scatter to a BEV
// map) take the MapShape alongside the matrix and check rows() == B*H*W.
#pragma once

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

struct MapShape {
  Index batch = 1;
  Index height = 0;  // y, rows of the map
  Index width = 0;   // x, columns of the map

  Index cells() const { return height * width; }
  Index rows() const { return batch * height * width; }
  Index row(Index b, Index y, Index x) const { return (b * height + y) * width + x; }
  bool operator==(const MapShape&) const = default;
};

/// Throws vqkit::error naming `where` unless the shape is positive and x has
/// exactly shape.rows() rows.
template <class Derived>
void require_map(const Eigen::EigenBase<Derived>& x, const MapShape& s, const char* where) {
  VQKIT_REQUIRE(s.batch >= 1 && s.height >= 1 && s.width >= 1, where,
                "map shape must be positive, got batch=", s.batch, " height=", s.height,
                " width=", s.width);
  VQKIT_REQUIRE(x.rows() == s.rows(), where, "input has ", x.rows(), " rows, expected batch*height*width=",
                s.batch, "*", s.height, "*", s.width, "=", s.rows());
}

}  // namespace vqkit
