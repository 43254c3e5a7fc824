// vqkit/quantizer.hpp - umbrella header for the quantizer: the core (types,
// backend, checks, GEMM), every quantizer primitive (search, cluster
// statistics, EMA, k-means and initialisation, losses, metrics, dead codes,
// memory bank) and the quantizer layers (VectorQuantizer, QuantizerBlock with
// its Linear / LayerNorm / GELU). Needs only Eigen (and OpenMP, optional): no
// JSON, no LiDAR code, no file I/O, no process spawning, and no POSIX header
// of vqkit's own (tests/umbrella/run.cmake checks all of this).
// <vqkit/layers.hpp> adds the other layers, <vqkit/tokenizer.hpp> the LiDAR
// tokenizer, <vqkit/vqkit.hpp> is everything.
#pragma once

#include "vqkit/core/backend.hpp"
#include "vqkit/core/check.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/gemm.hpp"
#include "vqkit/core/half.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/core/simd.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/fsq.hpp"
#include "vqkit/layers/grouped_vq.hpp"
#include "vqkit/layers/lfq.hpp"
#include "vqkit/layers/quantizer_block.hpp"
#include "vqkit/layers/residual_vq.hpp"
#include "vqkit/layers/vector_quantizer.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/codebook.hpp"
#include "vqkit/quantizer/dead_codes.hpp"
#include "vqkit/quantizer/ema.hpp"
#include "vqkit/quantizer/init.hpp"
#include "vqkit/quantizer/kmeans.hpp"
#include "vqkit/quantizer/loss.hpp"
#include "vqkit/quantizer/memory_bank.hpp"
#include "vqkit/quantizer/metrics.hpp"
#include "vqkit/quantizer/nearest_code.hpp"
