// vqkit/tokenizer/config.hpp - every setting of the CoPilot4D LiDAR tokenizer
// (design.md §3), its two presets, and its JSON form.
//
// Presets (paper() / small(); "ours" marks a value design.md does not give):
//   key                    paper         small        meaning
//   roi_x/y_min, _max      -80, 80       -25.6, 25.6  ROI, metres (half-open)
//   roi_z_min, _max        -4.5, 4.5     -4.5, 4.5
//   voxels_x, _y, _z       1024,1024,64  128,128,16   voxel grid
//   pointnet_dim           16            16           PointNet width
//   bev_dim                64            64           BEV pooling MLP width
//   patch_size             4             4            patch embedding (cells)
//   embed_dim              128           128          stage-1 width
//   window_size            8             8            Swin window (tokens)
//   num_heads              8             8
//   stage1_depth           2             2            Swin blocks before merging
//   stage2_depth           6             6            Swin blocks after merging
//   merged_dim             256           256          width after patch merging
//   codebook_size          1024          256 (*)      K
//   code_dim               1024          64           VQ code dimension
//   codebook_weight        0.25          0.25         weight of ||sg[E(o)] - z||^2
//   commitment_weight      1.0           1.0          weight of ||sg[z] - E(o)||^2
//   ema_decay              0.99          0.8 (*)      EMA codebook decay (VectorQuantizer)
//   dead_code_policy       kmeans_reinit replace (*)  "kmeans_reinit", "replace" or "none"
//   dead_code_after        256           256          steps unused before a code is dead
//   replace_threshold      0.1           0.5 (*)      replace: fraction of the mean EMA size
//   memory_bank_size       20480         512 (*)      rows of the memory bank (paper: 20 K;
//                                                       small: one step's tokens)
//   ema_warmup_decay       0.8           0.8          EMA decay at step 0 of the warm-up (ours)
//   ema_warmup_steps       0             0            EMA decay warm-up, steps (0: off)
//   reinit_below_usage     0             0            kmeans_reinit health trigger (0: off)
//   replace_after          -1 (ours)     0            re-seed codes idle this many steps
//                                                       (-1: max(10, 10 K / tokens per step);
//                                                       0: off, the seed's behaviour)
//   replace_from_steps     1 (ours)      0            replacements draw from the tokens of
//                                                       the last this-many steps (0: whole bank)
//   (issue 16, docs/tokenizer.md: with the seed's quantizer settings the
//   small model's codebook collapses under its fast-moving encoder unless
//   idle codes are re-seeded from current tokens; the paper preset re-seeds
//   them too (not trained at scale here); examples/configs/seed_vq_512.json
//   and seed_vq_1024.json are the small model with the seed's settings)
//   usage_window           10            10           steps of the window-usage metric
//   vq_search_precision    fp32          fp32         "fp32" or "bf16_rerank" (same results;
//                                                       bf16 dot products + exact re-rank)
//   feature_grid_xy        512           128          feature grid, cells per side
//   feature_grid_z         64            16           feature grid, z levels
//   feature_channels       16            16           features per grid point
//   render_mlp_dim         32 (ours)     32 (ours)    hidden width of the alpha MLP
//   occupancy_pool         8             4            coarse occupancy pooling in x, y
//   rays_per_frame         8192 (ours)   2048 (ours)  rays rendered per frame and step
//   samples_per_ray        64 (ours)     32 (ours)    depth samples per ray
//   ray_near, ray_far      1, 114 (ours) 1, 37 (ours) fallback sampling range, metres
//   depth_eps              0.4           0.4          eps of the sharpness term, metres
//   depth_weight           1             1            L1 depth term
//   sharpness_weight       1             1            sum 1(|h_i - D| > eps) w_i^2 term
//   occupancy_weight       1             1            BCE of the spatial-skip head
//   lr                     1e-3          3e-4 (*)     AdamW
//   beta1, beta2           0.9, 0.95     0.9, 0.95    (beta1 ours: PyTorch's default)
//   weight_decay           1e-4          1e-4         none on biases/norms/embeddings
//   warmup_steps           4000          20 (*)       linear warm-up, then cosine decay
//   total_steps            100000 (ours) 2000 (ours)  end of the cosine decay
//   grad_clip              0.1           0.1          global gradient-norm clip
//   batch_size             16            2 (ours)
//   augment_yaw_deg        0             180 (*)      random yaw rotation about the sensor, degrees
//   augment_flip           0             0.5 (*)      probability of mirroring y
// (*) tuned for the 15-minute CPU run on 6 KITTI frames (docs/tokenizer.md,
// "Choosing the small config"): with the paper's quantizer settings the
// codebook of this short, small-data run collapses to < 10% usage.
//   seed                   0             0
// Derived (not stored): patch grid = voxels / patch_size (256 / 32), token
// grid = patch grid / 2 (128 / 16); the decoder upsamples back to the patch
// grid and the grid head by feature_grid_xy / patch grid (2 / 4); the coarse
// occupancy grid is voxels / occupancy_pool in x and y, every z level
// (128 / 32). The small config's coarse grid has one cell per decoder token
// (docs/tokenizer.md); the paper's max-pools by 8 (design.md §3.8).
// The VQ loss weights name the term they multiply (design.md §2; the seed's
// fix: codebook 0.25, commitment 1.0, the paper's coefficients).
//
// JSON: one object whose keys are the names above (flat). Optional key
// "preset": "paper" or "small" picks the base (default "small"); the other
// keys override it. An optional object "quantizer" sets any other field of
// the VectorQuantizerConfig by its key (io/config_json.hpp; applied last, see
// the member). from_json/load reject, naming the key and the value: an
// unknown key, a value of the wrong type (integers must be JSON integers;
// booleans, strings, null are never numbers), and any value validate()
// refuses. to_json/save write every key in the order above (no "preset";
// "quantizer" only when it is not empty), so
// load(save(c)) == c. A config object is never left half-changed: parsing
// builds a new one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/io/config_json.hpp"
#include "vqkit/layers/vector_quantizer.hpp"
#include "vqkit/lidar/voxelizer.hpp"

namespace vqkit {

struct TokenizerConfig {
  double roi_x_min = -25.6, roi_x_max = 25.6;
  double roi_y_min = -25.6, roi_y_max = 25.6;
  double roi_z_min = -4.5, roi_z_max = 4.5;
  Index voxels_x = 128, voxels_y = 128, voxels_z = 16;
  Index pointnet_dim = 16;
  Index bev_dim = 64;
  Index patch_size = 4;
  Index embed_dim = 128;
  Index window_size = 8;
  Index num_heads = 8;
  Index stage1_depth = 2;
  Index stage2_depth = 6;
  Index merged_dim = 256;
  Index codebook_size = 256;
  Index code_dim = 64;
  double codebook_weight = 0.25;
  double commitment_weight = 1.0;
  double ema_decay = 0.8;
  std::string dead_code_policy = "replace";
  Index dead_code_after = 256;
  double replace_threshold = 0.5;
  Index memory_bank_size = 512;
  double ema_warmup_decay = 0.8;
  Index ema_warmup_steps = 0;
  double reinit_below_usage = 0.0;
  Index replace_after = 0;
  Index replace_from_steps = 0;
  Index usage_window = 10;
  std::string vq_search_precision = "fp32";
  Index feature_grid_xy = 128;
  Index feature_grid_z = 16;
  Index feature_channels = 16;
  Index render_mlp_dim = 32;
  Index occupancy_pool = 4;
  Index rays_per_frame = 2048;
  Index samples_per_ray = 32;
  double ray_near = 1.0;
  double ray_far = 37.0;
  double depth_eps = 0.4;
  double depth_weight = 1.0;
  double sharpness_weight = 1.0;
  double occupancy_weight = 1.0;
  double lr = 3e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double weight_decay = 1e-4;
  Index warmup_steps = 20;
  Index total_steps = 2000;
  double grad_clip = 0.1;
  Index batch_size = 2;
  double augment_yaw_deg = 180.0;
  double augment_flip = 0.5;
  std::uint64_t seed = 0;
  /// Any VectorQuantizerConfig field by its key (io/config_json.hpp), e.g.
  /// {"gradient_estimator": "rotation", "non_finite": "skip"}: applied after
  /// the keys above, so a key here wins over what they derive. codebook_size
  /// and dim are refused (codebook_size and code_dim size the network too).
  /// Empty by default, and then not written by to_json.
  nlohmann::ordered_json quantizer = nlohmann::ordered_json::object();

  static TokenizerConfig small() { return TokenizerConfig{}; }
  static TokenizerConfig paper() {
    TokenizerConfig c;
    c.roi_x_min = c.roi_y_min = -80.0;
    c.roi_x_max = c.roi_y_max = 80.0;
    c.voxels_x = c.voxels_y = 1024;
    c.voxels_z = 64;
    c.codebook_size = 1024;
    c.code_dim = 1024;
    c.memory_bank_size = 20480;
    c.ema_decay = 0.99;
    c.dead_code_policy = "kmeans_reinit";
    c.replace_threshold = 0.1;
    c.replace_after = -1;  // issue 16: idle codes re-seeded from the last step's tokens
    c.replace_from_steps = 1;
    c.lr = 1e-3;
    c.augment_yaw_deg = 0.0;
    c.augment_flip = 0.0;
    c.feature_grid_xy = 512;
    c.feature_grid_z = 64;
    c.occupancy_pool = 8;
    c.rays_per_frame = 8192;
    c.samples_per_ray = 64;
    c.ray_far = 114.0;
    c.warmup_steps = 4000;
    c.total_steps = 100000;
    c.batch_size = 16;
    return c;
  }

  // ---- derived sizes ----
  Index patch_grid_x() const { return voxels_x / patch_size; }
  Index patch_grid_y() const { return voxels_y / patch_size; }
  Index token_grid_x() const { return patch_grid_x() / 2; }
  Index token_grid_y() const { return patch_grid_y() / 2; }
  Index tokens_per_frame() const { return token_grid_x() * token_grid_y(); }
  Index feature_upsample() const { return feature_grid_xy / patch_grid_x(); }
  Index occupancy_x() const { return voxels_x / occupancy_pool; }
  Index occupancy_y() const { return voxels_y / occupancy_pool; }

  lidar::VoxelGrid voxel_grid() const {
    return {roi_x_min, roi_x_max, roi_y_min, roi_y_max, roi_z_min, roi_z_max,
            voxels_x,  voxels_y,  voxels_z};
  }

  /// The quantizer's config: K, D, the loss weights, EMA decay, dead-code
  /// policy (check period and warm-up capped at dead_code_after), memory bank
  /// (the k-means init waits for min(bank, 2 K) rows) and usage window from
  /// here; seed = seed; then the `quantizer` keys; the rest at
  /// VectorQuantizerConfig's defaults.
  VectorQuantizerConfig quantizer_config() const {
    VectorQuantizerConfig q;
    q.codebook_size = codebook_size;
    q.dim = code_dim;
    q.loss.codebook_weight = codebook_weight;
    q.loss.commitment_weight = commitment_weight;
    q.ema.decay = ema_decay;
    q.dead.policy = parse_dead_code_policy(dead_code_policy);
    q.dead.dead_after = dead_code_after;
    q.dead.check_every = std::min<std::int64_t>(q.dead.check_every, dead_code_after);
    q.dead.min_steps = std::min<std::int64_t>(q.dead.min_steps, dead_code_after);
    q.dead.replace_threshold = replace_threshold;
    q.memory_bank_size = memory_bank_size;
    q.ema.warmup_decay = ema_warmup_decay;
    q.ema.warmup_steps = ema_warmup_steps;
    q.dead.reinit_below_usage = reinit_below_usage;
    q.dead.replace_after = replace_after;
    q.dead.replace_from_steps = replace_from_steps;
    q.init_min_rows = std::min(memory_bank_size, 2 * codebook_size);
    q.usage_window = usage_window;
    q.search_precision = vq_search_precision == "bf16_rerank" ? Precision::bf16_rerank : Precision::fp32;
    q.seed = seed;
    if (!quantizer.empty()) q = config_from_json(quantizer, q, "TokenizerConfig: quantizer");
    return q;
  }

  /// Throws vqkit::error("TokenizerConfig: ...") naming the key and value.
  void validate() const {
    constexpr const char* w = "TokenizerConfig";
    const auto roi = [&](const char* lo_name, double lo, const char* hi_name, double hi) {
      VQKIT_REQUIRE(std::isfinite(lo) && std::isfinite(hi) && lo < hi, w, lo_name, "=", lo,
                    " must be finite and < ", hi_name, "=", hi);
    };
    roi("roi_x_min", roi_x_min, "roi_x_max", roi_x_max);
    roi("roi_y_min", roi_y_min, "roi_y_max", roi_y_max);
    roi("roi_z_min", roi_z_min, "roi_z_max", roi_z_max);
    const auto positive = [&](const char* name, Index v) {
      VQKIT_REQUIRE(v >= 1, w, name, "=", v, " must be >= 1");
    };
    for (const auto& f : fields()) {
      const std::string name = f.name;
      // These may be 0 (checked below): 0 turns the feature off.
      const bool may_be_zero = name == "warmup_steps" || name == "replace_from_steps" ||
                               name == "ema_warmup_steps" || name == "replace_after";
      if (f.kind == Kind::integer && !may_be_zero) positive(f.name, this->*(f.integer));
    }
    VQKIT_REQUIRE(warmup_steps >= 0, w, "warmup_steps=", warmup_steps, " must be >= 0");
    VQKIT_REQUIRE(voxels_x <= (Index(1) << 20) && voxels_y <= (Index(1) << 20) &&
                      voxels_z <= (Index(1) << 16),
                  w, "voxel grid too large: voxels_x=", voxels_x, " voxels_y=", voxels_y,
                  " voxels_z=", voxels_z);
    VQKIT_REQUIRE(voxels_x % (2 * patch_size) == 0, w, "voxels_x=", voxels_x,
                  " must be a multiple of 2 * patch_size=", 2 * patch_size,
                  " (patch embedding, then 2x2 merging)");
    VQKIT_REQUIRE(voxels_y % (2 * patch_size) == 0, w, "voxels_y=", voxels_y,
                  " must be a multiple of 2 * patch_size=", 2 * patch_size,
                  " (patch embedding, then 2x2 merging)");
    VQKIT_REQUIRE(patch_grid_x() % window_size == 0 && patch_grid_y() % window_size == 0 &&
                      token_grid_x() % window_size == 0 && token_grid_y() % window_size == 0,
                  w, "window_size=", window_size, " must divide the patch grid ", patch_grid_x(),
                  "x", patch_grid_y(), " and the token grid ", token_grid_x(), "x",
                  token_grid_y());
    VQKIT_REQUIRE(embed_dim % num_heads == 0, w, "num_heads=", num_heads,
                  " must divide embed_dim=", embed_dim);
    VQKIT_REQUIRE(merged_dim % num_heads == 0, w, "num_heads=", num_heads,
                  " must divide merged_dim=", merged_dim);
    VQKIT_REQUIRE(feature_grid_xy % patch_grid_x() == 0 && feature_grid_xy % patch_grid_y() == 0 &&
                      patch_grid_x() == patch_grid_y(),
                  w, "feature_grid_xy=", feature_grid_xy,
                  " must be a multiple of the (square) patch grid ", patch_grid_x(), "x",
                  patch_grid_y(), " that the decoder returns to");
    VQKIT_REQUIRE(voxels_x % occupancy_pool == 0 && voxels_y % occupancy_pool == 0, w,
                  "occupancy_pool=", occupancy_pool, " must divide voxels_x=", voxels_x,
                  " and voxels_y=", voxels_y);
    VQKIT_REQUIRE(std::isfinite(ray_near) && std::isfinite(ray_far) && ray_near >= 0 &&
                      ray_near < ray_far,
                  w, "need 0 <= ray_near < ray_far, got ray_near=", ray_near, " ray_far=", ray_far);
    const auto nonneg = [&](const char* name, double v) {
      VQKIT_REQUIRE(std::isfinite(v) && v >= 0, w, name, "=", v, " must be finite and >= 0");
    };
    const auto pos = [&](const char* name, double v) {
      VQKIT_REQUIRE(std::isfinite(v) && v > 0, w, name, "=", v, " must be finite and > 0");
    };
    nonneg("codebook_weight", codebook_weight);
    nonneg("commitment_weight", commitment_weight);
    pos("depth_eps", depth_eps);
    nonneg("depth_weight", depth_weight);
    nonneg("sharpness_weight", sharpness_weight);
    nonneg("occupancy_weight", occupancy_weight);
    pos("lr", lr);
    VQKIT_REQUIRE(std::isfinite(beta1) && beta1 >= 0 && beta1 < 1, w, "beta1=", beta1,
                  " must lie in [0, 1)");
    VQKIT_REQUIRE(std::isfinite(beta2) && beta2 > 0 && beta2 < 1, w, "beta2=", beta2,
                  " must lie in (0, 1)");
    nonneg("weight_decay", weight_decay);
    VQKIT_REQUIRE(warmup_steps <= total_steps, w, "warmup_steps=", warmup_steps,
                  " must be <= total_steps=", total_steps);
    pos("grad_clip", grad_clip);
    VQKIT_REQUIRE(std::isfinite(ema_decay) && ema_decay > 0 && ema_decay < 1, w, "ema_decay=",
                  ema_decay, " must lie in (0, 1)");
    VQKIT_REQUIRE(dead_code_policy == "kmeans_reinit" || dead_code_policy == "replace" ||
                      dead_code_policy == "none",
                  w, "dead_code_policy=\"", dead_code_policy,
                  "\" must be \"kmeans_reinit\", \"replace\" or \"none\"");
    nonneg("replace_threshold", replace_threshold);
    VQKIT_REQUIRE(replace_from_steps >= 0, w, "replace_from_steps=", replace_from_steps,
                  " must be >= 0");
    VQKIT_REQUIRE(std::isfinite(ema_warmup_decay) && ema_warmup_decay > 0 && ema_warmup_decay < 1,
                  w, "ema_warmup_decay=", ema_warmup_decay, " must lie in (0, 1)");
    VQKIT_REQUIRE(ema_warmup_steps >= 0, w, "ema_warmup_steps=", ema_warmup_steps, " must be >= 0");
    VQKIT_REQUIRE(replace_after >= -1, w, "replace_after=", replace_after,
                  " must be >= 0 (steps) or -1 (automatic)");
    VQKIT_REQUIRE(std::isfinite(reinit_below_usage) && reinit_below_usage >= 0 &&
                      reinit_below_usage < 1,
                  w, "reinit_below_usage=", reinit_below_usage, " must lie in [0, 1)");
    VQKIT_REQUIRE(vq_search_precision == "fp32" || vq_search_precision == "bf16_rerank", w,
                  "vq_search_precision=\"", vq_search_precision,
                  "\" must be \"fp32\" or \"bf16_rerank\"");
    VQKIT_REQUIRE(memory_bank_size >= codebook_size, w, "memory_bank_size=", memory_bank_size,
                  " must be >= codebook_size=", codebook_size, " (k-means over the bank)");
    VQKIT_REQUIRE(std::isfinite(augment_yaw_deg) && augment_yaw_deg >= 0 && augment_yaw_deg <= 180,
                  w, "augment_yaw_deg=", augment_yaw_deg, " must lie in [0, 180]");
    VQKIT_REQUIRE(std::isfinite(augment_flip) && augment_flip >= 0 && augment_flip <= 1, w,
                  "augment_flip=", augment_flip, " must lie in [0, 1]");
    VQKIT_REQUIRE(quantizer.is_object(), w, "quantizer=", quantizer.dump(),
                  " must be a JSON object of VectorQuantizerConfig keys");
    for (const char* sized : {"codebook_size", "dim"})
      VQKIT_REQUIRE(!quantizer.contains(sized), w, "quantizer.", sized,
                    " is refused: set the top-level ", sized == std::string("dim") ? "code_dim" : sized,
                    " (it sizes the network too)");
    if (!quantizer.empty()) (void)quantizer_config();  // its keys, types and values
  }

  // ---- JSON ----
  enum class Kind { real, integer, unsigned64, text };
  struct Field {
    const char* name;
    Kind kind;
    double TokenizerConfig::*real = nullptr;
    Index TokenizerConfig::*integer = nullptr;
    std::uint64_t TokenizerConfig::*unsigned64 = nullptr;
    std::string TokenizerConfig::*text = nullptr;
  };
  static const std::vector<Field>& fields() {
    using C = TokenizerConfig;
    const auto R = [](const char* n, double C::*p) { return Field{n, Kind::real, p, nullptr, nullptr}; };
    const auto I = [](const char* n, Index C::*p) { return Field{n, Kind::integer, nullptr, p, nullptr}; };
    const auto S = [](const char* n, std::string C::*p) {
      return Field{n, Kind::text, nullptr, nullptr, nullptr, p};
    };
    static const std::vector<Field> list = {
        R("roi_x_min", &C::roi_x_min), R("roi_x_max", &C::roi_x_max),
        R("roi_y_min", &C::roi_y_min), R("roi_y_max", &C::roi_y_max),
        R("roi_z_min", &C::roi_z_min), R("roi_z_max", &C::roi_z_max),
        I("voxels_x", &C::voxels_x), I("voxels_y", &C::voxels_y), I("voxels_z", &C::voxels_z),
        I("pointnet_dim", &C::pointnet_dim), I("bev_dim", &C::bev_dim),
        I("patch_size", &C::patch_size), I("embed_dim", &C::embed_dim),
        I("window_size", &C::window_size), I("num_heads", &C::num_heads),
        I("stage1_depth", &C::stage1_depth), I("stage2_depth", &C::stage2_depth),
        I("merged_dim", &C::merged_dim), I("codebook_size", &C::codebook_size),
        I("code_dim", &C::code_dim), R("codebook_weight", &C::codebook_weight),
        R("commitment_weight", &C::commitment_weight), R("ema_decay", &C::ema_decay),
        S("dead_code_policy", &C::dead_code_policy), I("dead_code_after", &C::dead_code_after),
        R("replace_threshold", &C::replace_threshold),
        I("memory_bank_size", &C::memory_bank_size),
        R("ema_warmup_decay", &C::ema_warmup_decay), I("ema_warmup_steps", &C::ema_warmup_steps),
        R("reinit_below_usage", &C::reinit_below_usage), I("replace_after", &C::replace_after),
        I("replace_from_steps", &C::replace_from_steps),
        I("usage_window", &C::usage_window),
        S("vq_search_precision", &C::vq_search_precision),
        I("feature_grid_xy", &C::feature_grid_xy),
        I("feature_grid_z", &C::feature_grid_z), I("feature_channels", &C::feature_channels),
        I("render_mlp_dim", &C::render_mlp_dim), I("occupancy_pool", &C::occupancy_pool),
        I("rays_per_frame", &C::rays_per_frame), I("samples_per_ray", &C::samples_per_ray),
        R("ray_near", &C::ray_near), R("ray_far", &C::ray_far), R("depth_eps", &C::depth_eps),
        R("depth_weight", &C::depth_weight), R("sharpness_weight", &C::sharpness_weight),
        R("occupancy_weight", &C::occupancy_weight), R("lr", &C::lr), R("beta1", &C::beta1),
        R("beta2", &C::beta2), R("weight_decay", &C::weight_decay),
        I("warmup_steps", &C::warmup_steps), I("total_steps", &C::total_steps),
        R("grad_clip", &C::grad_clip), I("batch_size", &C::batch_size),
        R("augment_yaw_deg", &C::augment_yaw_deg), R("augment_flip", &C::augment_flip),
        Field{"seed", Kind::unsigned64, nullptr, nullptr, &C::seed}};
    return list;
  }

  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    for (const auto& f : fields()) {
      switch (f.kind) {
        case Kind::real: j[f.name] = this->*(f.real); break;
        case Kind::integer: j[f.name] = static_cast<std::int64_t>(this->*(f.integer)); break;
        case Kind::unsigned64: j[f.name] = this->*(f.unsigned64); break;
        case Kind::text: j[f.name] = this->*(f.text); break;
      }
    }
    if (!quantizer.empty()) j["quantizer"] = quantizer;
    return j;
  }

  template <class Json>
  static TokenizerConfig from_json(const Json& j) {
    constexpr const char* w = "TokenizerConfig";
    VQKIT_REQUIRE(j.is_object(), w, "expected a JSON object, got ", j.dump());
    TokenizerConfig c = small();
    if (j.contains("preset")) {
      const auto& p = j.at("preset");
      VQKIT_REQUIRE(p.is_string() && (p == "small" || p == "paper"), w,
                    "preset must be \"small\" or \"paper\", got preset=", p.dump());
      if (p == "paper") c = paper();
    }
    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& key = it.key();
      if (key == "preset") continue;
      if (key == "quantizer") {
        VQKIT_REQUIRE(it.value().is_object(), w, "quantizer=", it.value().dump(),
                      " must be a JSON object of VectorQuantizerConfig keys");
        c.quantizer = nlohmann::ordered_json::parse(it.value().dump());
        continue;
      }
      const Field* f = nullptr;
      for (const auto& g : fields())
        if (key == g.name) f = &g;
      if (f == nullptr) {
        std::string known;
        for (const auto& g : fields()) known += std::string(known.empty() ? "" : ", ") + g.name;
        detail::throw_error(w, "unknown key '", key, "' (value ", it.value().dump(),
                            "); known keys: preset, ", known, ", quantizer");
      }
      const auto& v = it.value();
      switch (f->kind) {
        case Kind::real:
          VQKIT_REQUIRE(v.is_number(), w, key, "=", v.dump(), " must be a number");
          c.*(f->real) = v.template get<double>();
          break;
        case Kind::integer:
          VQKIT_REQUIRE(v.is_number_integer() &&
                            (v.is_number_unsigned()
                                 ? v.template get<std::uint64_t>() <=
                                       static_cast<std::uint64_t>(std::numeric_limits<Index>::max())
                                 : true),
                        w, key, "=", v.dump(), " must be an integer");
          c.*(f->integer) = static_cast<Index>(v.template get<std::int64_t>());
          break;
        case Kind::unsigned64:
          VQKIT_REQUIRE(v.is_number_unsigned() || (v.is_number_integer() && v.template get<std::int64_t>() >= 0),
                        w, key, "=", v.dump(), " must be a non-negative integer");
          c.*(f->unsigned64) = v.template get<std::uint64_t>();
          break;
        case Kind::text:
          VQKIT_REQUIRE(v.is_string(), w, key, "=", v.dump(), " must be a string");
          c.*(f->text) = v.template get<std::string>();
          break;
      }
    }
    c.validate();
    return c;
  }

  /// Parses JSON text (errors name `source`, e.g. the file).
  static TokenizerConfig parse(const std::string& text, const std::string& source = "<string>") {
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      detail::throw_error("TokenizerConfig", "invalid JSON in ", source, ": ", e.what());
    }
    return from_json(j);
  }

  static TokenizerConfig load(const std::string& path) {
    std::ifstream in(path);
    VQKIT_REQUIRE(in.good(), "TokenizerConfig", "cannot open '", path, "'");
    std::stringstream ss;
    ss << in.rdbuf();
    try {
      return parse(ss.str(), "'" + path + "'");
    } catch (const error& e) {
      // name the file in value errors too
      const std::string msg = e.what();
      if (msg.find(path) != std::string::npos) throw;
      detail::throw_error("TokenizerConfig", "'", path, "': ", msg);
    }
  }

  void save(const std::string& path) const {
    validate();
    std::ofstream out(path, std::ios::trunc);
    VQKIT_REQUIRE(out.good(), "TokenizerConfig", "cannot open '", path, "' for writing");
    out << to_json().dump(2) << "\n";
    out.flush();
    VQKIT_REQUIRE(out.good(), "TokenizerConfig", "write to '", path, "' failed");
  }

  bool operator==(const TokenizerConfig&) const = default;
};

}  // namespace vqkit
