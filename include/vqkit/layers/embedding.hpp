// vqkit/layers/embedding.hpp - lookup table of learned vectors (PyTorch's
// nn.Embedding(num_embeddings, embedding_dim), no padding_idx, no max_norm).
//
// Shapes (N lookups, E = num_embeddings, D = embedding_dim; row-major):
//   idx     (N)      int64 rows of the table, 0 <= idx[n] < E
//   weight  (E, D)   the table, as in PyTorch
//   y       (N, D)
//
// forward:   y[n,:] = weight[idx[n],:]                          (a gather)
// backward:  dweight[e,:] += sum over n with idx[n] == e of dy[n,:]
//            (a scatter-add, segment_sum_add of segment_sum.hpp: each table
//            row sums its lookups in increasing n, so the gradient is
//            bit-identical for any number of OpenMP threads). Indices are
//            not differentiable, so backward has no dx: backward(ctx, dy).
//
// Initialisation (PyTorch's default): every entry ~ N(0, 1), drawn in
// row-major order from the caller's Rng.
//
// Parameters: "weight" {E, D}, without weight decay (an embedding).
//
// Every check (indices in range, naming the bad index and its position; dy's
// shape; the table's shape) happens before the first write, so a call that
// throws vqkit::error leaves the layer, its gradient and the outputs unchanged.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"
#include "vqkit/layers/segment_sum.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class Embedding {
  static_assert(std::is_floating_point_v<T>, "Embedding<T>: T must be float or double");

 public:
  /// What backward needs from forward (owned copy of the indices).
  struct Context {
    IndexVector indices;  // (N)
  };

  Embedding(Index num_embeddings, Index embedding_dim, Rng& rng, Backend backend = {})
      : backend_(std::move(backend)), num_(num_embeddings), dim_(embedding_dim) {
    VQKIT_REQUIRE(num_embeddings >= 1, "Embedding",
                  "num_embeddings must be >= 1, got num_embeddings=", num_embeddings);
    VQKIT_REQUIRE(embedding_dim >= 1, "Embedding",
                  "embedding_dim must be >= 1, got embedding_dim=", embedding_dim);
    weight.resize(num_, dim_);
    for (Index i = 0; i < weight.size(); ++i) weight.data()[i] = static_cast<T>(rng.normal());
    weight_grad = RowMatrix<T>::Zero(num_, dim_);
  }

  /// idx: (N) int64. Resizes and fills y (N, D).
  Context forward(ConstIndexVectorRef idx, RowMatrix<T>& y) const {
    Context ctx;
    forward(idx, y, ctx);
    return ctx;
  }

  /// The same into a context (and y) whose buffers are reused when they have
  /// the size.
  void forward(ConstIndexVectorRef idx, RowMatrix<T>& y, Context& ctx) const {
    check_state("Embedding::forward");
    require_ids_in_range(idx, num_, "Embedding::forward", "index", "num_embeddings");
    ctx.indices = idx;
    detail::gather_rows_into<T>(backend_, weight, ctx.indices, y);  // y may be the table
  }

  /// dy: (N, D). Accumulates weight_grad (scatter-add by the forward indices).
  void backward(const Context& ctx, ConstMatrixRef<T> dy) {
    check_state("Embedding::backward");
    VQKIT_REQUIRE(dy.rows() == ctx.indices.size() && dy.cols() == dim_, "Embedding::backward",
                  "dy is ", dy.rows(), "x", dy.cols(), ", expected ", ctx.indices.size(), "x",
                  dim_, " (N lookups x embedding_dim)");
    require_ids_in_range(ctx.indices, num_, "Embedding::backward", "index", "num_embeddings");
    detail::segment_sum_add_unchecked<T>(backend_, dy, ctx.indices, weight_grad);
  }

  /// "weight" {E, D}, no weight decay; prefixed with `prefix`.
  ParameterList<T> parameters(const std::string& prefix = "") {
    return {{prefix + "weight", &weight, &weight_grad, {num_, dim_}, false}};
  }

  void zero_grad() { weight_grad.setZero(); }

  Index num_embeddings() const { return num_; }
  Index embedding_dim() const { return dim_; }
  const Backend& backend() const { return backend_; }

 private:
  Backend backend_;
  Index num_;
  Index dim_;

 public:
  RowMatrix<T> weight;       // (E, D)
  RowMatrix<T> weight_grad;  // (E, D)

 private:
  void check_state(const char* where) const {
    VQKIT_REQUIRE(weight.rows() == num_ && weight.cols() == dim_, where, "weight is ",
                  weight.rows(), "x", weight.cols(), ", expected ", num_, "x", dim_);
    VQKIT_REQUIRE(weight_grad.rows() == num_ && weight_grad.cols() == dim_, where,
                  "weight_grad is ", weight_grad.rows(), "x", weight_grad.cols(), ", expected ",
                  num_, "x", dim_);
  }
};

}  // namespace vqkit
