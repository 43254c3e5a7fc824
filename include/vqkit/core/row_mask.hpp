// vqkit/core/row_mask.hpp - row masks for padded batches.
//
// A RowMask has one entry per batch row: true = a real row, false = padding.
// Every quantizer takes an optional mask; a padded row changes no statistic,
// metric, memory bank or loss, gets index -1, a zero output row and a zero
// gradient. The quantizers implement that by running on the real rows only:
// RowCompactor gathers them into a contiguous buffer (kept = their row
// numbers) and scatters results back. The buffers are reused across calls.
#pragma once

#include <cmath>
#include <cstdint>

#include "vqkit/core/check.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

using RowMask = Eigen::Array<bool, Eigen::Dynamic, 1>;

namespace detail {

/// Throws unless the mask has one entry per row of the batch.
inline void require_mask(const RowMask& mask, Index rows, const char* where) {
  VQKIT_REQUIRE(mask.size() == rows, where, "the row mask has ", mask.size(),
                " entries, the batch ", rows, " rows");
}

/// Throws unless every real row of x (every row without a mask) is finite;
/// names the first bad entry by its row in x. Padded rows may hold anything.
template <class T>
void require_finite_rows(ConstMatrixRef<T> x, const RowMask* mask, const char* where,
                         const char* what) {
  if (!mask) return require_finite(x, where, what);
  for (Index i = 0; i < x.rows(); ++i) {
    if (!(*mask)[i] || all_finite(x.row(i))) continue;
    for (Index j = 0; j < x.cols(); ++j)
      VQKIT_REQUIRE(std::isfinite(static_cast<double>(x(i, j))), where, what,
                    " holds a non-finite value (", x(i, j), ") at row ", i, ", column ", j);
  }
}

/// The real rows of a masked batch, gathered and scattered back.
template <class T>
struct RowCompactor {
  IndexVector kept;      ///< row numbers of the real rows, ascending
  RowMatrix<T> rows;     ///< gathered rows (gather's output)
  RowMatrix<T> scratch;  ///< a second buffer for a caller's gathered gradient

  void select(const RowMask& mask) {
    kept.resize(mask.count());
    Index n = 0;
    for (Index i = 0; i < mask.size(); ++i)
      if (mask[i]) kept[n++] = i;
  }
  Index size() const { return kept.size(); }

  /// out = the kept rows of x.
  void gather(ConstMatrixRef<T> x, RowMatrix<T>& out) const {
    out.resize(kept.size(), x.cols());
    for (Index i = 0; i < kept.size(); ++i) out.row(i) = x.row(kept[i]);
  }
  /// full (total x cols) = zero, with the kept rows from compact.
  void scatter(ConstMatrixRef<T> compact, Index total, RowMatrix<T>& full) const {
    full.setZero(total, compact.cols());
    for (Index i = 0; i < kept.size(); ++i) full.row(kept[i]) = compact.row(i);
  }
  /// full (total) = -1, with the kept entries from compact.
  void scatter(const IndexVector& compact, Index total, IndexVector& full) const {
    full.setConstant(total, -1);
    for (Index i = 0; i < kept.size(); ++i) full[kept[i]] = compact[i];
  }
};

}  // namespace detail
}  // namespace vqkit
