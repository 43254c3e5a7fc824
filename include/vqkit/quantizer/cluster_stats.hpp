// vqkit/quantizer/cluster_stats.hpp - per-code counts and sums of a batch.
//
//   n_k = #{i : a_i = k},  s_k = sum_{i : a_i = k} x_i      (x: N x D, a: N)
// computed by a scatter-add in O(N·D) (no one-hot matrix). The rows are first
// bucketed by code with a stable counting sort, then each code's sum is taken
// over its rows in increasing row order, one code per task; the order of
// additions is therefore fixed and the result bit-identical for any number
// of threads.
#pragma once

#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

template <class T>
struct ClusterStats {
  Vector<T> counts;  ///< K: n_k
  RowMatrix<T> sums; ///< K x D: s_k
};

/// Checks that every index lies in [0, K); names the first that does not.
inline void require_indices(const Eigen::Ref<const IndexVector>& idx, Index K, const char* where) {
  for (Index i = 0; i < idx.size(); ++i)
    VQKIT_REQUIRE(idx[i] >= 0 && idx[i] < K, where, "index ", idx[i], " at row ", i,
                  " is out of range [0, ", K, ")");
}

/// Counts only: n_k (size K).
template <class T>
Vector<T> cluster_counts(const cpu&, const Eigen::Ref<const IndexVector>& idx, Index K) {
  require_indices(idx, K, "cluster_counts");
  Vector<T> n = Vector<T>::Zero(K);
  for (Index i = 0; i < idx.size(); ++i) n[idx[i]] += T(1);
  return n;
}

/// Counts and sums (see the file comment).
template <class T>
ClusterStats<T> cluster_stats(const cpu& be, ConstMatrixRef<T> x,
                              const Eigen::Ref<const IndexVector>& idx, Index K) {
  constexpr const char* where = "cluster_stats";
  VQKIT_REQUIRE(K >= 1, where, "K must be >= 1, got ", K);
  VQKIT_REQUIRE(idx.size() == x.rows(), where, "indices has size ", idx.size(),
                ", expected one per row of x (", x.rows(), ")");
  require_indices(idx, K, where);
  const Index N = x.rows(), D = x.cols();

  // Stable counting sort of row numbers by code.
  std::vector<Index> start(K + 1, 0), order(N);
  for (Index i = 0; i < N; ++i) ++start[idx[i] + 1];
  for (Index k = 0; k < K; ++k) start[k + 1] += start[k];
  {
    std::vector<Index> fill(start.begin(), start.end() - 1);
    for (Index i = 0; i < N; ++i) order[fill[idx[i]]++] = i;
  }

  ClusterStats<T> st;
  st.counts.resize(K);
  st.sums.setZero(K, D);
#pragma omp parallel for schedule(dynamic, 16) num_threads(be.num_threads())
  for (Index k = 0; k < K; ++k) {
    st.counts[k] = T(start[k + 1] - start[k]);
    auto s = st.sums.row(k);
    for (Index p = start[k]; p < start[k + 1]; ++p) s += x.row(order[p]);
  }
  return st;
}

}  // namespace vqkit
