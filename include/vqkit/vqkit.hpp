// vqkit/vqkit.hpp - umbrella header: the whole CPU library.
#pragma once

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/quantizer/cluster_stats.hpp"
#include "vqkit/quantizer/dead_codes.hpp"
#include "vqkit/quantizer/ema.hpp"
#include "vqkit/quantizer/init.hpp"
#include "vqkit/quantizer/kmeans.hpp"
#include "vqkit/quantizer/loss.hpp"
#include "vqkit/quantizer/memory_bank.hpp"
#include "vqkit/quantizer/metrics.hpp"
#include "vqkit/quantizer/nearest_code.hpp"
#include "vqkit/layers/parameter.hpp"
#include "vqkit/layers/vector_quantizer.hpp"
