// vqkit/util/moving_clusters.hpp - a synthetic stream of encoder tokens from
// a "moving encoder", to test dead-code policies in seconds (issue 16).
//
// Each step draws N tokens around C cluster centres (D dims, unit spread per
// dimension); all centres drift together by drift * sqrt(D) per step at the
// start, decaying with a time constant of `settle` steps, mostly (70%) along
// one fixed direction. That is what a tokenizer's quantizer sees early in
// training, when its encoder moves fast and a memory bank still holds tokens
// it has moved away from (docs/tokenizer.md, docs/monitoring.md). drift = 0
// is a static stream. bench/collapse_stream and tests/test_collapse_stream.cpp
// train a VectorQuantizer on it.
#pragma once

#include <cmath>
#include <cstdint>

#include "vqkit/core/check.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

struct MovingClustersOptions {
  Index clusters = 48;    ///< C
  Index dim = 64;         ///< D
  Index tokens = 512;     ///< N, rows per step
  double drift = 0.3;     ///< initial drift per step, in units of sqrt(D)
  double settle = 150.0;  ///< time constant of the drift's decay, steps
  std::uint64_t seed = 5;
};

class MovingClusters {
 public:
  explicit MovingClusters(const MovingClustersOptions& o) : o_(o), rng_(o.seed) {
    constexpr const char* where = "MovingClusters";
    VQKIT_REQUIRE(o.clusters >= 1, where, "clusters must be >= 1, got ", o.clusters);
    VQKIT_REQUIRE(o.dim >= 1, where, "dim must be >= 1, got ", o.dim);
    VQKIT_REQUIRE(o.tokens >= 1, where, "tokens must be >= 1, got ", o.tokens);
    VQKIT_REQUIRE(std::isfinite(o.drift) && o.drift >= 0, where, "drift must be >= 0, got ", o.drift);
    VQKIT_REQUIRE(std::isfinite(o.settle) && o.settle > 0, where, "settle must be > 0, got ", o.settle);
    centre_.resize(o.clusters, o.dim);
    for (Index i = 0; i < centre_.size(); ++i) centre_.data()[i] = float(3.0 * rng_.normal());
    dir_.resize(1, o.dim);
    for (Index d = 0; d < o.dim; ++d) dir_(0, d) = float(rng_.normal());
    dir_ /= dir_.norm();
    shift_ = RowMatrix<float>::Zero(1, o.dim);
  }

  /// The next step's tokens (N x D) into x.
  void next(RowMatrix<float>& x) {
    const Index D = o_.dim;
    const double v = o_.drift * std::exp(-double(t_) / o_.settle) * std::sqrt(double(D));
    for (Index d = 0; d < D; ++d)
      shift_(0, d) += float(v * (0.7 * dir_(0, d) + 0.3 * rng_.normal() / std::sqrt(double(D))));
    x.resize(o_.tokens, D);
    for (Index i = 0; i < o_.tokens; ++i) {
      const Index j = Index(rng_.below(std::uint64_t(o_.clusters)));
      for (Index d = 0; d < D; ++d) x(i, d) = centre_(j, d) + shift_(0, d) + float(rng_.normal());
    }
    ++t_;
  }

  std::int64_t step() const { return t_; }

 private:
  MovingClustersOptions o_;
  Rng rng_;
  RowMatrix<float> centre_, dir_, shift_;
  std::int64_t t_ = 0;
};

}  // namespace vqkit
