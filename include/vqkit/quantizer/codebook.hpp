// vqkit/quantizer/codebook.hpp - a fixed codebook for inference: encode
// vectors to code indices and decode indices back to vectors.
//
// Codebook<T, Backend> holds K x D codes and nothing of a training state (no
// EMA statistics, no memory bank, no metrics): the serving side of a
// quantizer trained here (VectorQuantizer::codes()) or elsewhere, e.g. a
// PyTorch codebook read by io::load_codebook (<vqkit/io/codebook.hpp>).
//
//   vqkit::Codebook<float> cb(vqkit::io::load_codebook("vq.safetensors", "vq._codebook.embed"));
//   vqkit::IndexVector idx = cb.encode(x);      // x: N x D
//   vqkit::RowMatrix<float> xq = cb.decode(idx);
//
// encode is nearest_code with the code norms cached and a search workspace
// kept, so a stream of batches of one shape makes no heap allocation after
// the first (with the in-place overloads). Results are those of nearest_code:
// exact argmin (L2) or argmax (cosine), ties to the lowest index,
// independent of the thread count and of precision (bf16_rerank returns the
// same indices as fp32). An empty batch (0 rows) is allowed and yields no
// indices. encode is not const: it reuses the search workspace, so one
// Codebook serves one calling thread at a time (copy it for more).
#pragma once

#include <utility>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/quantizer/nearest_code.hpp"

namespace vqkit {

template <class T = float, class Backend = cpu>
class Codebook {
 public:
  /// Takes the codes (K x D, K >= 1, D >= 1, finite). `precision` applies to
  /// float searches (see Precision); `backend` sets the threads.
  explicit Codebook(RowMatrix<T> codes, Metric metric = Metric::l2,
                    Precision precision = Precision::fp32, Backend backend = {})
      : be_(backend), precision_(precision) {
    constexpr const char* where = "Codebook";
    VQKIT_REQUIRE(codes.rows() >= 1, where, "the codebook is empty (K=0)");
    VQKIT_REQUIRE(codes.cols() >= 1, where, "the codebook has dimension D=0");
    detail::require_finite(codes, where, "codes");
    opt_.metric = metric;
    norms_ = code_norms<T>(be_, codes, metric);
    codes_ = std::move(codes);
  }

  Index size() const { return codes_.rows(); }  ///< K
  Index dim() const { return codes_.cols(); }    ///< D
  Metric metric() const { return opt_.metric; }
  Precision precision() const { return precision_; }
  const RowMatrix<T>& codes() const { return codes_; }

  /// Nearest code of every row of x (N x D) into indices (size N), and its
  /// distance (squared L2, or 1 - cosine) into *distances when non-null
  /// (resized to N). `stats`, if set, receives what the search did.
  void encode(ConstMatrixRef<T> x, Eigen::Ref<IndexVector> indices, Vector<T>* distances = nullptr,
              SearchStats* stats = nullptr) {
    constexpr const char* where = "Codebook::encode";
    VQKIT_REQUIRE(x.cols() == dim() || x.rows() == 0, where, "x has ", x.cols(), " columns, expected D=",
                  dim());
    VQKIT_REQUIRE(indices.size() == x.rows(), where, "indices has size ", indices.size(), ", expected N=",
                  x.rows());
    if (x.rows() == 0) {
      if (distances) distances->resize(0);
      return;
    }
    SearchMode mode;
    mode.precision = precision_;
    mode.stats = stats;
    mode.workspace = &ws_;
    nearest_code<T>(be_, codes_, x, indices, distances, opt_, &norms_, mode);
  }

  /// Convenience form: returns the indices.
  IndexVector encode(ConstMatrixRef<T> x) {
    IndexVector idx(x.rows());
    encode(x, idx);
    return idx;
  }

  /// The codes of `indices` into out (N x D, N = indices.size()). Every
  /// index is checked to lie in [0, K) before anything is written.
  void decode(const Eigen::Ref<const IndexVector>& indices, MatrixRef<T> out) const {
    constexpr const char* where = "Codebook::decode";
    const Index N = indices.size();
    VQKIT_REQUIRE(out.rows() == N && out.cols() == dim(), where, "out is ", out.rows(), " x ", out.cols(),
                  ", expected ", N, " x ", dim());
    for (Index i = 0; i < N; ++i)
      VQKIT_REQUIRE(indices[i] >= 0 && indices[i] < size(), where, "indices[", i, "] = ", indices[i],
                    " is outside [0, K=", size(), ")");
    for (Index i = 0; i < N; ++i) out.row(i) = codes_.row(indices[i]);
  }

  /// Convenience form: returns the N x D decoded vectors.
  RowMatrix<T> decode(const Eigen::Ref<const IndexVector>& indices) const {
    RowMatrix<T> out(indices.size(), dim());
    decode(indices, out);
    return out;
  }

 private:
  Backend be_;
  Precision precision_;
  RowMatrix<T> codes_;
  Vector<T> norms_;
  SearchOptions opt_;
  SearchWorkspace ws_;
};

}  // namespace vqkit
