// vqkit/core/check.hpp - argument checks shared by the primitives.
#pragma once

#include <cmath>
#include <string>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit::detail {

/// Throws unless every entry of m is finite; names the first bad entry.
template <class Derived>
void require_finite(const Eigen::DenseBase<Derived>& m, const char* where, const char* what) {
  if (m.allFinite()) return;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j)
      VQKIT_REQUIRE(std::isfinite(static_cast<double>(m(i, j))), where, what,
                    " holds a non-finite value (", m(i, j), ") at row ", i, ", column ", j);
}

/// Throws unless m is a non-empty (rows x cols) matrix with cols == expected_cols.
template <class Derived>
void require_batch(const Eigen::DenseBase<Derived>& m, Index expected_cols, const char* where,
                   const char* what) {
  VQKIT_REQUIRE(m.rows() > 0, where, what, " is an empty batch (0 rows)");
  VQKIT_REQUIRE(m.cols() == expected_cols, where, what, " has ", m.cols(),
                " columns, expected ", expected_cols);
}

}  // namespace vqkit::detail
