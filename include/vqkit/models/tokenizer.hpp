// vqkit/models/tokenizer.hpp - the CoPilot4D LiDAR tokenizer end to end:
// point clouds -> TokenizerNet (tokenizer_net.hpp) -> neural feature grid ->
// rendered depth along LiDAR rays, with the losses of design.md §3 and their
// gradients (docs/tokenizer.md).
//
// One training step on a batch of frames (each frame (P, >=3) in the sensor
// frame, metres):
//   vox      = voxelize(frames)                         sparse, never dense
//   occ      = coarse_occupancy(vox, occupancy_pool)    real occupancy (small config: one
//                                                       cell per decoder token and z level)
//   rays     = rays_per_frame rays subsampled from the frames' points (inside the ROI)
//   h        = samples_per_ray depths along each ray, stratified over the ray's
//              OCCUPIED coarse cells (spatial skipping; real occupancy in training,
//              predicted occupancy (logit > 0) at inference)
//   grid, logits, tokens = net(vox)
//   f        = trilinear(grid, o + h d)                 (R*S, Cf)
//   alpha    = sigmoid(MLP(f))                          (R, S)
//   w, D     = render(alpha, h)                         w_i = a_i prod_{j<i}(1-a_j), D = sum w_i h_i
//   loss     = depth_weight * L1(D, D_gt)
//            + sharpness_weight * mean_r sum_i 1(|h_i - D_gt| > depth_eps) w_i^2
//            + occupancy_weight * BCE(logits, occ)
//            + VQ loss (codebook_weight, commitment_weight: VectorQuantizerConfig::loss;
//              under EMA only the commitment term has a gradient, to the encoder)
// Backward runs the chain in reverse and accumulates every parameter gradient.
#pragma once

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/activations.hpp"
#include "vqkit/layers/mlp.hpp"
#include "vqkit/layers/recon_loss.hpp"
#include "vqkit/layers/trilinear.hpp"
#include "vqkit/layers/volume_render.hpp"
#include "vqkit/lidar/rays.hpp"
#include "vqkit/lidar/voxelizer.hpp"
#include "vqkit/models/tokenizer_net.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class Tokenizer {
 public:
  /// A prepared batch: voxels, real coarse occupancy, rays and their samples.
  struct Batch {
    lidar::Voxelization<T> vox;
    lidar::OccupancyGrid occupancy;  ///< real, coarse (one cell per decoder token and z)
    lidar::RayBatch<T> rays;
    lidar::DepthSamples<T> samples;
  };

  struct Losses {
    double depth_l1 = 0, surface = 0, occupancy = 0, vq = 0, total = 0;
  };

  struct StepResult {
    Losses loss;
    CodebookMetrics metrics;
    Vector<T> depth;       ///< (R) rendered depth
    RowMatrix<T> logits;   ///< spatial-skip logits (B*occupancy_y*occupancy_x, voxels_z)
    IndexVector codes;     ///< (B*t*t) token indices
    RowMatrix<T> tokens;   ///< (B*t*t, code_dim) pre-quantization tokens
    bool reinitialized = false, data_initialized = false;
  };

  Tokenizer(const TokenizerConfig& cfg, Rng& rng, Backend backend = {})
      : net(cfg, rng, backend),
        alpha_mlp(cfg.feature_channels, cfg.render_mlp_dim, 1, rng, Activation::relu, backend),
        sampler(geometry(cfg), backend),
        renderer(backend),
        backend_(backend) {}

  const TokenizerConfig& config() const { return net.config; }

  /// Voxelises the frames and draws rays and samples (real occupancy).
  /// rays_per_frame <= 0 keeps every ray (evaluation).
  Batch make_batch(const std::vector<RowMatrix<T>>& frames, Rng& rng,
                   Index rays_per_frame) const {
    Batch b;
    const TokenizerConfig& c = config();
    b.vox = lidar::voxelize<T>(frames, c.voxel_grid());
    b.occupancy = lidar::coarse_occupancy<T>(b.vox, c.occupancy_pool);
    lidar::RayBatch<T> all = lidar::rays_from_points<T>(frames, {}, c.ray_near, c.voxel_grid());
    b.rays = rays_per_frame > 0 ? lidar::subsample_rays<T>(all, rays_per_frame, rng) : std::move(all);
    b.samples = lidar::sample_depths<T>(b.rays, b.occupancy, c.samples_per_ray, c.ray_near,
                                        c.ray_far, rng);
    return b;
  }

  /// Forward, losses and (when `backward`) gradients accumulated into every
  /// parameter. The quantizer updates its EMA codebook in training mode.
  StepResult step(const Batch& b, bool backward) {
    // Kept between steps: the feature grid and every layer's context reuse
    // their buffers (fresh ones would be mapped and faulted in each step).
    auto& out = out_;
    auto& nctx = nctx_;
    net.forward(net_input(b.vox), out, nctx);
    StepResult r;
    r.metrics = nctx.vq.metrics;
    r.codes = nctx.vq.indices;
    r.tokens = std::move(out.tokens);
    r.reinitialized = nctx.vq.reinitialized;
    r.data_initialized = nctx.vq.data_initialized;
    r.loss.vq = double(nctx.vq.loss.total);

    RenderContext& rc = rc_;  // kept between steps: its buffers are reused
    RowMatrix<T>& weights = weights_;
    render_depth(out.grid, b.rays, b.samples.depth, rc, weights, r.depth);

    const RowMatrix<T> target_occ = b.occupancy.template as_matrix<T>();
    RowMatrix<T> dD, dw, dlogits;
    const TokenizerConfig& c = config();
    const T wd = T(c.depth_weight), ws = T(c.sharpness_weight), wo = T(c.occupancy_weight);
    r.loss.depth_l1 = double(l1_loss<T>(backend_, r.depth, b.rays.depth, backward ? &dD : nullptr));
    r.loss.surface = double(surface_loss<T>(backend_, weights, b.samples.depth, b.rays.depth,
                                            backward ? &dw : nullptr, T(c.depth_eps)));
    r.loss.occupancy =
        double(bce_with_logits<T>(backend_, out.logits, target_occ, backward ? &dlogits : nullptr));
    r.loss.total = c.depth_weight * r.loss.depth_l1 + c.sharpness_weight * r.loss.surface +
                   c.occupancy_weight * r.loss.occupancy + r.loss.vq;
    r.logits = std::move(out.logits);
    if (!backward) return r;

    dD *= wd;
    dw *= ws;
    dlogits *= wo;
    render_backward(rc, dw, dD, dgrid_);
    net.backward(nctx, dgrid_, dlogits);
    return r;
  }

  /// Inference: every ray of the frames, samples restricted to the cells the
  /// skip head predicts occupied (logit > 0). Returns the rendered depth per
  /// ray (and the rays, for evaluation). Runs the quantizer in eval mode.
  struct Reconstruction {
    lidar::RayBatch<T> rays;
    Vector<T> depth;
    lidar::OccupancyGrid predicted;
    IndexVector codes;
    CodebookMetrics metrics;
  };
  Reconstruction reconstruct(const std::vector<RowMatrix<T>>& frames, Rng& rng,
                             Index rays_per_frame = 0) {
    const bool was_training = net.vq.is_training();
    struct Restore {  // train mode comes back even when a step below throws
      TokenizerNet<T, Backend>& n;
      bool on;
      ~Restore() { n.train(on); }
    } restore{net, was_training};
    net.eval();
    Batch b = make_batch(frames, rng, rays_per_frame);
    typename TokenizerNet<T, Backend>::Output out;
    const auto nctx = net.forward(net_input(b.vox), out);
    Reconstruction rec;
    rec.predicted = b.occupancy;
    for (Index i = 0; i < out.logits.size(); ++i)
      rec.predicted.occupied[static_cast<std::size_t>(i)] = out.logits.data()[i] > T(0) ? 1 : 0;
    const lidar::DepthSamples<T> s = lidar::sample_depths<T>(
        b.rays, rec.predicted, config().samples_per_ray, config().ray_near, config().ray_far, rng);
    RenderContext rc;
    RowMatrix<T> weights;
    render_depth(out.grid, b.rays, s.depth, rc, weights, rec.depth);
    rec.rays = std::move(b.rays);
    rec.codes = nctx.vq.indices;
    rec.metrics = nctx.vq.metrics;
    return rec;
  }

  ParameterList<T> parameters() {
    ParameterList<T> all = net.parameters();
    append_parameters(all, alpha_mlp.parameters(), "render.mlp.");
    return all;
  }
  void zero_grad() {
    net.zero_grad();
    alpha_mlp.zero_grad();
  }
  void train(bool on = true) { net.train(on); }
  void eval() { net.eval(); }

  /// Frees the buffers kept between steps (the net's context and scratch,
  /// the feature grid, its gradient and the render context: about the step's
  /// activations, ~200 MB at the small config). The next step allocates them
  /// afresh (and, with glibc, faults their pages in again); call it before
  /// something memory-hungry between steps (a checkpoint, a validation
  /// pass), or when training is done. Changes no parameter or state.
  void release_buffers() {
    out_ = {};
    nctx_ = {};
    dgrid_ = RowMatrix<T>();
    rc_ = {};
    weights_ = RowMatrix<T>();
    net.release_buffers();
  }

  static typename TokenizerNet<T, Backend>::Input net_input(const lidar::Voxelization<T>& v) {
    typename TokenizerNet<T, Backend>::Input in;
    in.point_offset = v.point_offset;
    in.point_voxel = v.point_voxel;
    in.voxel_z = v.voxel_z;
    in.voxel_bev_row = v.voxel_bev_row;
    in.voxels = v.voxel_count();
    in.batch = v.batch;
    return in;
  }

  /// The feature grid's geometry: the ROI split into feature_grid_xy^2 x
  /// feature_grid_z cells (cell centres at origin + (i + 0.5) * size).
  static GridGeometry geometry(const TokenizerConfig& c) {
    GridGeometry geo;
    geo.origin = {c.roi_x_min, c.roi_y_min, c.roi_z_min};
    geo.voxel = {(c.roi_x_max - c.roi_x_min) / double(c.feature_grid_xy),
                 (c.roi_y_max - c.roi_y_min) / double(c.feature_grid_xy),
                 (c.roi_z_max - c.roi_z_min) / double(c.feature_grid_z)};
    geo.nx = c.feature_grid_xy;
    geo.ny = c.feature_grid_xy;
    geo.nz = c.feature_grid_z;
    geo.channels = c.feature_channels;
    return geo;
  }

 public:
  TokenizerNet<T, Backend> net;
  Mlp<T, Backend> alpha_mlp;
  TrilinearSampler<T, Backend> sampler;
  VolumeRenderer<T, Backend> renderer;

 private:
  Backend backend_;
  // Buffers of the feature grid's size, the step's largest, reused across
  // steps (fresh ones would be mapped and faulted in page by page each step).
  typename TokenizerNet<T, Backend>::Output out_;
  typename TokenizerNet<T, Backend>::Context nctx_;
  RowMatrix<T> dgrid_;

  struct RenderContext {
    typename TrilinearSampler<T, Backend>::Context sample;
    typename Mlp<T, Backend>::Context mlp;
    typename Sigmoid<T, Backend>::Context sigmoid;
    typename VolumeRenderer<T, Backend>::Context render;
    Index rays = 0, samples = 0;
    RowMatrix<T> features;  // (R*S, channels): sampled features, then the MLP's output
    RowMatrix<T> grad;      // (R*S, .): the gradient on its way back to the grid
  };
  RenderContext rc_;
  RowMatrix<T> weights_;
  Sigmoid<T, Backend> sigmoid_;

  void render_depth(const RowMatrix<T>& grid, const lidar::RayBatch<T>& rays,
                    const RowMatrix<T>& h, RenderContext& rc, RowMatrix<T>& weights,
                    Vector<T>& depth) const {
    const Index R = rays.size(), S = h.cols();
    rc.rays = R;
    rc.samples = S;
    lidar::DepthSamples<T> ds;
    ds.depth = h;
    const RowMatrix<T> pts = lidar::sample_points<T>(rays, ds);
    IndexVector bidx(R * S);
    for (Index r = 0; r < R; ++r) bidx.segment(r * S, S).setConstant(rays.batch[r]);
    RowMatrix<T>& f = rc.features;
    rc.sample = sampler.forward(grid, pts, bidx, f, /*point_grad=*/false);
    alpha_mlp.forward(f, f, rc.mlp);
    sigmoid_.forward(f, f, rc.sigmoid);  // (R*S, 1)
    const Eigen::Map<const RowMatrix<T>> alpha(f.data(), R, S);
    rc.render = renderer.forward(alpha, h, weights, depth);
  }

  void render_backward(RenderContext& rc, const RowMatrix<T>& dw, const RowMatrix<T>& dD,
                       RowMatrix<T>& dgrid) {
    const Index R = rc.rays, S = rc.samples;
    RowMatrix<T> da;
    const Eigen::Map<const Vector<T>> dDv(dD.data(), dD.size());
    renderer.backward(rc.render, dw, dDv, &da, nullptr);
    RowMatrix<T>& g = rc.grad;
    g = Eigen::Map<const RowMatrix<T>>(da.data(), R * S, 1);
    sigmoid_.backward(rc.sigmoid, g, &g);
    alpha_mlp.backward(rc.mlp, g, &g);
    sampler.backward(rc.sample, g, &dgrid, nullptr);
  }

};

}  // namespace vqkit
