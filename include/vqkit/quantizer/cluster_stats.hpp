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

/// Counts only: n_k, into `out` (resized to K; no allocation once it fits).
template <class T>
void cluster_counts(const cpu&, const Eigen::Ref<const IndexVector>& idx, Index K, Vector<T>& out) {
  require_indices(idx, K, "cluster_counts");
  out.setZero(K);
  for (Index i = 0; i < idx.size(); ++i) out[idx[i]] += T(1);
}

/// Counts only: n_k (size K).
template <class T>
Vector<T> cluster_counts(const cpu& be, const Eigen::Ref<const IndexVector>& idx, Index K) {
  Vector<T> n;
  cluster_counts<T>(be, idx, K, n);
  return n;
}

/// Scratch of cluster_stats (the counting sort's offsets and row order),
/// kept by a caller between calls so that a step allocates nothing.
struct ClusterStatsWorkspace {
  std::vector<Index> start, order, fill;
};

/// Counts and sums (see the file comment), written into `out` (resized; no
/// allocation when its shapes and the workspace's already fit).
template <class T>
void cluster_stats(const cpu& be, ConstMatrixRef<T> x, const Eigen::Ref<const IndexVector>& idx,
                   Index K, ClusterStats<T>& out, ClusterStatsWorkspace& ws) {
  constexpr const char* where = "cluster_stats";
  VQKIT_REQUIRE(K >= 1, where, "K must be >= 1, got ", K);
  VQKIT_REQUIRE(idx.size() == x.rows(), where, "indices has size ", idx.size(),
                ", expected one per row of x (", x.rows(), ")");
  require_indices(idx, K, where);
  const Index N = x.rows(), D = x.cols();

  // Stable counting sort of row numbers by code.
  auto& start = ws.start;
  auto& order = ws.order;
  auto& fill = ws.fill;
  start.assign(std::size_t(K + 1), 0);
  order.resize(std::size_t(N));
  for (Index i = 0; i < N; ++i) ++start[std::size_t(idx[i] + 1)];
  for (Index k = 0; k < K; ++k) start[std::size_t(k + 1)] += start[std::size_t(k)];
  fill.assign(start.begin(), start.end() - 1);
  for (Index i = 0; i < N; ++i) order[std::size_t(fill[std::size_t(idx[i])]++)] = i;

  out.counts.resize(K);
  out.sums.resize(K, D);
  parallel_for_dynamic(be, K, 16, [&](Index k) {
    out.counts[k] = T(start[std::size_t(k + 1)] - start[std::size_t(k)]);
    auto s = out.sums.row(k);
    s.setZero();
    for (Index p = start[std::size_t(k)]; p < start[std::size_t(k + 1)]; ++p) s += x.row(order[std::size_t(p)]);
  });
}

/// Counts and sums (see the file comment); allocates its result.
template <class T>
ClusterStats<T> cluster_stats(const cpu& be, ConstMatrixRef<T> x,
                              const Eigen::Ref<const IndexVector>& idx, Index K) {
  ClusterStats<T> st;
  ClusterStatsWorkspace ws;
  cluster_stats<T>(be, x, idx, K, st, ws);
  return st;
}

}  // namespace vqkit
