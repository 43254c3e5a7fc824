// vqkit/quantizer/init.hpp - normalised codebook initialisation.
//
// Each code is an isotropic Gaussian direction scaled to norm sqrt(D) (the
// seed's "unit sphere" init, F.normalize(randn) * sqrt(D)): the typical norm
// of a D-dimensional vector with unit-variance entries, so codes start on the
// shell where LayerNorm-ed encoder outputs live. The data-driven alternative
// is kmeans() in kmeans.hpp.
#pragma once

#include <cmath>

#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

template <class T>
RowMatrix<T> normalized_init(Index K, Index D, Rng& rng) {
  VQKIT_REQUIRE(K >= 1, "normalized_init", "codebook size must be >= 1, got K=", K);
  VQKIT_REQUIRE(D >= 1, "normalized_init", "code dimension must be >= 1, got D=", D);
  RowMatrix<T> e(K, D);
  const double radius = std::sqrt(double(D));
  for (Index k = 0; k < K; ++k) {
    double n2 = 0;
    do {
      n2 = 0;
      for (Index d = 0; d < D; ++d) {
        const double z = rng.normal();
        e(k, d) = T(z);
        n2 += z * z;
      }
    } while (n2 == 0.0);
    e.row(k) *= T(radius / std::sqrt(n2));
  }
  return e;
}

}  // namespace vqkit
