// vqkit/cuda/vector_quantizer.cuh - everything of the CUDA backend, and the
// quantizer layer on it: VectorQuantizer<float, vqkit::cuda>.
//
// The layer (layers/vector_quantizer.hpp) calls nearest_code, cluster_stats,
// ema_update, cluster_counts, kmeans, vq_loss, vq_input_grad and
// vq_codebook_grad with its backend object first; this header declares the
// CUDA overloads of all of them before the layer, so
//
//   vqkit::VectorQuantizer<float, vqkit::cuda> vq(cfg, vqkit::cuda{});
//
// runs every one of those steps on the GPU, with the CPU layer's state and
// semantics (its state stays in host memory: each primitive copies its
// inputs in and its results out; see docs/cuda.md for what a device-resident
// step would change). Compile with nvcc.
#pragma once

#include "vqkit/cuda/backend.cuh"
#include "vqkit/cuda/kmeans.cuh"
#include "vqkit/cuda/search.cuh"
#include "vqkit/cuda/stats.cuh"
#include "vqkit/cuda/train.cuh"
#include "vqkit/layers/vector_quantizer.hpp"
