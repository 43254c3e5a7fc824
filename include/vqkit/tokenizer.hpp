// vqkit/tokenizer.hpp - umbrella header for the CoPilot4D LiDAR tokenizer:
// <vqkit/layers.hpp> plus the LiDAR code (KITTI reader, voxeliser, rays,
// augmentation, evaluation metrics, bird's-eye images), the tokenizer's
// config (JSON: needs nlohmann-json), network, training checkpoints and the
// I/O (safetensors, .npy, vecs, quantizer checkpoints, codebook import). Not the training
// programs' progress plots (vqkit/util/progress.hpp runs gnuplot):
// <vqkit/vqkit.hpp> has those too.
#pragma once

#include "vqkit/layers.hpp"

#include "vqkit/io/atomic_file.hpp"
#include "vqkit/io/checkpoint.hpp"
#include "vqkit/io/codebook.hpp"
#include "vqkit/io/config_json.hpp"
#include "vqkit/io/npy.hpp"
#include "vqkit/io/safetensors.hpp"
#include "vqkit/io/vecs.hpp"
#include "vqkit/lidar/augment.hpp"
#include "vqkit/lidar/bev_image.hpp"
#include "vqkit/lidar/eval_metrics.hpp"
#include "vqkit/lidar/kitti.hpp"
#include "vqkit/lidar/point_cloud.hpp"
#include "vqkit/lidar/rays.hpp"
#include "vqkit/lidar/synthetic_scene.hpp"
#include "vqkit/lidar/voxelizer.hpp"
#include "vqkit/models/tokenizer.hpp"
#include "vqkit/models/tokenizer_checkpoint.hpp"
#include "vqkit/models/tokenizer_net.hpp"
#include "vqkit/tokenizer/config.hpp"
