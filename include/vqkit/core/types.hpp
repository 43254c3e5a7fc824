// vqkit/core/types.hpp - matrix and view types shared by every header.
//
// Rows are samples: an (N x D) batch is N rows of D values, row-major, as in
// PyTorch and numpy. Inputs are taken as ConstMatrixRef<T>: it binds to a
// row-major Eigen matrix, a block of one, or an Eigen::Map over the caller's
// memory without copying. (Eigen copies into a temporary only if it is given
// a column-major or otherwise incompatible expression; pass row-major data to
// keep the hot path copy-free.)
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace vqkit {

using Index = Eigen::Index;

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
using IndexVector = Eigen::Matrix<std::int64_t, Eigen::Dynamic, 1>;
/// Indices of multi-code quantizers: one row per sample, one column per level or head.
using IndexMatrix = Eigen::Matrix<std::int64_t, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using ConstMatrixRef = Eigen::Ref<const RowMatrix<T>>;
template <class T>
using MatrixRef = Eigen::Ref<RowMatrix<T>>;
template <class T>
using ConstVectorRef = Eigen::Ref<const Vector<T>>;
template <class T>
using VectorRef = Eigen::Ref<Vector<T>>;

/// Maps caller memory as an (rows x cols) row-major matrix, without copying.
template <class T>
Eigen::Map<const RowMatrix<T>> map_rows(const T* data, Index rows, Index cols) {
  return Eigen::Map<const RowMatrix<T>>(data, rows, cols);
}

}  // namespace vqkit
