// vqkit/layers.hpp - umbrella header for the neural-network layers and their
// optimiser: <vqkit/quantizer.hpp> plus every layer (Linear, LayerNorm,
// activations, Mlp, Residual, Embedding, patches, Swin, window attention,
// segment sums, trilinear sampling, volume rendering, reconstruction
// losses) and AdamW, gradient clipping and the learning-rate schedule. Like
// quantizer.hpp: Eigen only, no JSON, no LiDAR, no file I/O, no process
// spawning (tests/umbrella/run.cmake).
#pragma once

#include "vqkit/quantizer.hpp"

#include "vqkit/core/blocked_sum.hpp"
#include "vqkit/core/map_shape.hpp"
#include "vqkit/core/parameter.hpp"

#include "vqkit/layers/activations.hpp"
#include "vqkit/layers/embedding.hpp"
#include "vqkit/layers/gelu.hpp"
#include "vqkit/layers/layer_norm.hpp"
#include "vqkit/layers/linear.hpp"
#include "vqkit/layers/mlp.hpp"
#include "vqkit/layers/patch.hpp"
#include "vqkit/layers/recon_loss.hpp"
#include "vqkit/layers/residual.hpp"
#include "vqkit/layers/segment_sum.hpp"
#include "vqkit/layers/swin_block.hpp"
#include "vqkit/layers/trilinear.hpp"
#include "vqkit/layers/volume_render.hpp"
#include "vqkit/layers/window_attention.hpp"
#include "vqkit/optim/adamw.hpp"
#include "vqkit/optim/clip.hpp"
#include "vqkit/optim/schedule.hpp"
