// vqkit/cuda/kmeans.cuh - k-means on the GPU (init and re-init of the codebook).
//
// There is no CUDA copy of k-means: vqkit::kmeans (quantizer/kmeans.hpp) is
// written once over the backend's primitives, and this header brings in the
// CUDA ones it calls - the search (detail::PlainSearch<cuda>, with the CPU's
// range scaling) and cluster_stats - so kmeans<float>(vqkit::cuda{}, ...)
// runs each Lloyd iteration's search and counts/sums on the GPU. The seeding
// is the CPU's host code, so both backends draw the same Rng numbers; the
// result equals the CPU's up to near-ties of the search (the two backends
// sum the code norms in different orders). Each iteration copies the data in
// for the search and for the statistics (k-means is not in the hot path:
// the first init, its refinement and kmeans_reinit).
// (A separate GPU k-means drifted from the CPU's when the CPU's seeding
// changed; the first GPU run caught it.)
#pragma once

#include "vqkit/cuda/backend.cuh"
#include "vqkit/cuda/search.cuh"
#include "vqkit/cuda/stats.cuh"
#include "vqkit/quantizer/kmeans.hpp"
