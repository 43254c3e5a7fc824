// vqkit/models/tokenizer_net.hpp - the CoPilot4D tokenizer network: sparse
// voxels -> BEV map -> Swin encoder -> vector quantizer -> Swin decoder ->
// neural feature grid + spatial-skip logits (docs/tokenizer.md).
//
// This header is the network only (parameters, forward, backward). Rays,
// rendering and the losses are in tokenizer.hpp, which drives it.
//
// Shapes for a batch of B frames (TokenizerConfig names; small preset in
// brackets, tokenizer/config.hpp):
//   points in voxels   offsets (Pk, 3) to their voxel centre, point -> voxel ids
//   PointNet           Linear(3->pointnet_dim) -> LN -> ReLU -> Linear
//                      sum per voxel -> LN                          (V, 16)
//   BEV pooling        + z-embedding(voxel z) -> MLP(-> bev_dim -> bev_dim, ReLU)
//                      sum per BEV pillar (dense map) -> LN         (B*128*128, 64)
//   encoder            PatchEmbed(patch_size) -> + position embedding
//                      -> Swin x stage1_depth                        (B*32*32, 128)
//                      -> PatchMerging -> Swin x stage2_depth        (B*16*16, 256)
//   pre-VQ             LN -> GELU -> Linear(merged_dim -> code_dim) tokens (B*16*16, 64)
//   VQ                 vqkit::VectorQuantizer (EMA codebook, straight-through)
//   post-VQ            Linear(code_dim -> merged_dim)
//   decoder            Swin x stage2_depth -> PatchUpsample(-> embed_dim)
//                      -> Swin x stage1_depth                        (B*32*32, 128)
//   grid head          LN -> Linear(embed_dim -> u*u*feature_grid_z*feature_channels)
//                      -> depth-to-space u, u = feature_grid_xy / patch grid
//                      feature grid (B*F*F, feature_grid_z*feature_channels), rows
//                      (b, y, x), columns (z, c)                    (B*128*128, 16*16)
//   skip head          LN -> Linear -> occupancy logits of the coarse grid
//                      (B*occ_y*occ_x, voxels_z), columns z; when occupancy_pool
//                      differs from patch_size the head changes resolution by
//                      space-to-depth (before its Linear) or depth-to-space (after)
//                                                                   (B*32*32, 16)
// Every sub-layer follows docs/layers.md; parameters are listed with dotted
// names ("encoder.stage1.blocks.0.attn.qkv.weight", "vq" has none under EMA).
#pragma once

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/simd.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/activations.hpp"
#include "vqkit/layers/embedding.hpp"
#include "vqkit/layers/gelu.hpp"
#include "vqkit/layers/layer_norm.hpp"
#include "vqkit/layers/linear.hpp"
#include "vqkit/core/map_shape.hpp"
#include "vqkit/layers/mlp.hpp"
#include "vqkit/core/parameter.hpp"
#include "vqkit/layers/patch.hpp"
#include "vqkit/layers/segment_sum.hpp"
#include "vqkit/layers/swin_block.hpp"
#include "vqkit/layers/vector_quantizer.hpp"
#include "vqkit/tokenizer/config.hpp"

namespace vqkit {

template <class T, class Backend = cpu>
class TokenizerNet {
 public:
  /// The sparse input of one batch (from lidar::voxelize).
  struct Input {
    RowMatrix<T> point_offset;  ///< (Pk, 3) offset of each point to its voxel centre
    IndexVector point_voxel;    ///< (Pk) voxel of each point, in [0, V)
    IndexVector voxel_z;        ///< (V) z level of each voxel
    IndexVector voxel_bev_row;  ///< (V) BEV cell row, MapShape order
    Index voxels = 0;           ///< V
    Index batch = 1;            ///< B
  };

  /// Everything backward needs.
  struct Context {
    Input input;
    // Where padding is exact (padding_is_exact), the point- and voxel-level
    // layers run on Pc >= P rows and Vc > V rows (padded_rows): padding
    // points have zero offsets and belong to voxel V, a padding voxel;
    // padding voxels have z level 0 and are left out of the BEV sum, and
    // their gradient is zero, so they change no result. Elsewhere Pc = P and
    // Vc = V.
    IndexVector padded_point_voxel;  // (Pc) point_voxel, then V
    Index voxel_rows = 0;            // Vc
    typename Linear<T, Backend>::Context pn_fc1;
    typename LayerNorm<T, Backend>::Context pn_ln1;
    typename Relu<T, Backend>::Context pn_relu;
    typename Linear<T, Backend>::Context pn_fc2;
    typename LayerNorm<T, Backend>::Context pn_norm;
    typename Embedding<T, Backend>::Context z_embed;
    typename Mlp<T, Backend>::Context bev_mlp;
    typename LayerNorm<T, Backend>::Context bev_norm;
    typename PatchEmbed<T, Backend>::Context patch_embed;
    typename PositionEmbedding<T, Backend>::Context pos_embed;
    typename SwinStage<T, Backend>::Context enc1;
    typename PatchMerging<T, Backend>::Context merge;
    typename SwinStage<T, Backend>::Context enc2;
    typename LayerNorm<T, Backend>::Context pre_ln;
    typename Gelu<T, Backend>::Context pre_act;
    typename Linear<T, Backend>::Context pre_fc;
    typename VectorQuantizer<T, Backend>::Context vq;
    typename Linear<T, Backend>::Context post_fc;
    typename SwinStage<T, Backend>::Context dec2;
    typename PatchUpsample<T, Backend>::Context up;
    typename SwinStage<T, Backend>::Context dec1;
    typename LayerNorm<T, Backend>::Context grid_ln;
    typename Linear<T, Backend>::Context grid_fc;
    typename LayerNorm<T, Backend>::Context skip_ln;
    typename Linear<T, Backend>::Context skip_fc;
  };

  /// The output shape of one module, for inspection and tests.
  struct ModuleShape {
    std::string name;
    Index rows = 0, cols = 0;
  };

  /// What forward produces.
  struct Output {
    std::vector<ModuleShape> trace;  ///< every module's output shape, in order
    RowMatrix<T> grid;    ///< (B*NY*NX, NZ*Cf) feature grid, MapShape{B, NY, NX}, cols (z, c)
    RowMatrix<T> logits;  ///< (B*occupancy_y*occupancy_x, voxels_z) spatial-skip logits
    RowMatrix<T> tokens;  ///< (B*t*t, code_dim) pre-quantization tokens
  };

  TokenizerNet(const TokenizerConfig& cfg, Rng& rng, Backend backend = {})
      : config((checked(cfg), cfg)),
        pn_fc1(3, cfg.pointnet_dim, rng, true, backend),
        pn_ln1(cfg.pointnet_dim, T(1e-5), backend),
        pn_fc2(cfg.pointnet_dim, cfg.pointnet_dim, rng, true, backend),
        pn_norm(cfg.pointnet_dim, T(1e-5), backend),
        z_embed(cfg.voxels_z, cfg.pointnet_dim, rng, backend),
        bev_mlp(cfg.pointnet_dim, cfg.bev_dim, cfg.bev_dim, rng, Activation::relu, backend),
        bev_norm(cfg.bev_dim, T(1e-5), backend),
        patch_embed(cfg.bev_dim, cfg.embed_dim, cfg.patch_size, rng, backend),
        pos_embed(cfg.patch_grid_y(), cfg.patch_grid_x(), cfg.embed_dim, rng, backend),
        enc1(cfg.embed_dim, cfg.stage1_depth, cfg.num_heads, cfg.window_size, rng, 4, backend),
        merge(cfg.embed_dim, rng, backend),
        enc2(cfg.merged_dim, cfg.stage2_depth, cfg.num_heads, cfg.window_size, rng, 4, backend),
        pre_ln(cfg.merged_dim, T(1e-5), backend),
        pre_fc(cfg.merged_dim, cfg.code_dim, rng, true, backend),
        vq(cfg.quantizer_config(), backend),
        post_fc(cfg.code_dim, cfg.merged_dim, rng, true, backend),
        dec2(cfg.merged_dim, cfg.stage2_depth, cfg.num_heads, cfg.window_size, rng, 4, backend),
        up(cfg.merged_dim, cfg.embed_dim, rng, backend),
        dec1(cfg.embed_dim, cfg.stage1_depth, cfg.num_heads, cfg.window_size, rng, 4, backend),
        grid_ln(cfg.embed_dim, T(1e-5), backend),
        grid_fc(cfg.embed_dim,
                cfg.feature_upsample() * cfg.feature_upsample() * cfg.feature_grid_z *
                    cfg.feature_channels,
                rng, true, backend),
        skip_ln(cfg.embed_dim, T(1e-5), backend),
        skip_fc(cfg.embed_dim * skip_down(cfg) * skip_down(cfg),
                cfg.voxels_z * skip_up(cfg) * skip_up(cfg), rng, true, backend),
        backend_(backend) {
    // The z-embedding starts small next to the PointNet features it is added to.
    z_embed.weight *= T(0.02);
  }

  MapShape bev_shape(Index batch) const { return {batch, config.voxels_y, config.voxels_x}; }
  MapShape dec_shape(Index batch) const {
    return {batch, config.patch_grid_y(), config.patch_grid_x()};
  }
  MapShape token_shape(Index batch) const {
    return {batch, config.token_grid_y(), config.token_grid_x()};
  }
  MapShape grid_shape(Index batch) const {
    return {batch, config.feature_grid_xy, config.feature_grid_xy};
  }
  MapShape occupancy_shape(Index batch) const {
    return {batch, config.occupancy_y(), config.occupancy_x()};
  }

  /// Runs the network. The quantizer updates its codebook when training.
  Context forward(const Input& in, Output& out) {
    Context c;
    forward(in, out, c);
    return c;
  }

  /// The same into a context whose buffers are reused from step to step (a
  /// training loop that keeps `c` and `out` maps no fresh pages for them once
  /// a batch of the same size has run). c is overwritten whole.
  void forward(const Input& in, Output& out, Context& c) {
    const char* where = "TokenizerNet::forward";
    check_input(in, where);
    const Index P = in.point_offset.rows(), V = in.voxels;
    require_ids_in_range(in.point_voxel, V, where, "point_voxel", "voxels");
    c.input = in;
    out.trace.clear();
    const Index B = in.batch;
    // Where one layer feeds the next, it writes straight into the next one's
    // context (its input copy), which then copies nothing.
    // PointNet over points, summed per voxel; padded (see Context).
    const bool pad = padding_is_exact();
    const Index Pc = pad ? padded_rows(P, point_rows_) : P;
    const Index Vc = pad ? padded_rows(V + 1, voxel_rows_) : V;
    RowMatrix<T>& pts = s_.pts;
    pts.resize(Pc, 3);
    pts.topRows(P) = in.point_offset;
    pts.bottomRows(Pc - P).setZero();
    c.padded_point_voxel.resize(Pc);
    c.padded_point_voxel.head(P) = in.point_voxel;
    c.padded_point_voxel.tail(Pc - P).setConstant(V);
    c.voxel_rows = Vc;
    IndexVector& vz = s_.voxel_z;
    vz.resize(Vc);
    vz.head(V) = in.voxel_z;
    vz.tail(Vc - V).setZero();
    RowMatrix<T>& h = s_.h;
    pn_fc1.forward(pts, c.pn_ln1.input, c.pn_fc1);
    pn_ln1.forward(c.pn_ln1.input, c.pn_relu.input, c.pn_ln1);
    pn_relu.forward(c.pn_relu.input, c.pn_fc2.input, c.pn_relu);
    pn_fc2.forward(c.pn_fc2.input, h, c.pn_fc2);
    record(out, "pointnet.points", P, h.cols());
    RowMatrix<T>& v = s_.v;
    segment_sum<T>(backend_, h, c.padded_point_voxel, Vc, v);
    pn_norm.forward(v, v, c.pn_norm);
    record(out, "pointnet.voxels", V, v.cols());
    // BEV pooling: + z-embedding, MLP, sum over z into the dense BEV map.
    RowMatrix<T>& z = s_.z;
    z_embed.forward(vz, z, c.z_embed);
    v += z;
    bev_mlp.forward(v, v, c.bev_mlp);
    record(out, "bev.mlp", V, v.cols());
    RowMatrix<T>& bev = s_.bev;
    segment_sum<T>(backend_, v.topRows(V), in.voxel_bev_row, bev_shape(B).rows(), bev);
    bev_norm.forward(bev, bev, c.bev_norm);
    record(out, "bev.map", bev);
    // Encoder.
    RowMatrix<T>& x = s_.x;
    patch_embed.forward(bev, x, bev_shape(B), c.patch_embed);
    c.pos_embed = pos_embed.forward(x, x, dec_shape(B));
    record(out, "encoder.patch_embed", x);
    enc1.forward(x, x, dec_shape(B), c.enc1);
    record(out, "encoder.stage1", x);
    merge.forward(x, x, dec_shape(B), c.merge);
    record(out, "encoder.merge", x);
    enc2.forward(x, x, token_shape(B), c.enc2);
    record(out, "encoder.stage2", x);
    // Quantization.
    pre_ln.forward(x, c.pre_act.input, c.pre_ln);
    pre_act.forward(c.pre_act.input, c.pre_fc.input, c.pre_act);
    pre_fc.forward(c.pre_fc.input, out.tokens, c.pre_fc);
    record(out, "pre_vq", out.tokens);
    RowMatrix<T>& q = s_.q;
    vq.forward(out.tokens, q, c.vq);
    VQKIT_REQUIRE(!c.vq.skipped, where, "the quantizer skipped a non-finite batch of tokens");
    record(out, "vq", q);
    post_fc.forward(q, x, c.post_fc);
    record(out, "post_vq", x);
    // Decoder.
    dec2.forward(x, x, token_shape(B), c.dec2);
    record(out, "decoder.stage2", x);
    up.forward(x, x, token_shape(B), c.up);
    record(out, "decoder.upsample", x);
    dec1.forward(x, x, dec_shape(B), c.dec1);
    record(out, "decoder.stage1", x);
    // Heads.
    // The grid head's tensors are the step's largest (B * feature_grid_xy^2 *
    // feature_grid_z * feature_channels values, 33 MB at the small config):
    // they go to buffers reused from step to step (grid_scratch_, and
    // out.grid when the caller keeps `out`), not to fresh allocations.
    grid_ln.forward(x, c.grid_fc.input, c.grid_ln);
    grid_fc.forward(c.grid_fc.input, grid_scratch_, c.grid_fc);
    depth_to_space<T>(grid_scratch_, grid_shape(B), config.feature_upsample(),
                      SubpixelOrder::row_major, out.grid, grid_fc.backend());
    record(out, "grid_head", out.grid);
    if (skip_down(config) > 1) {
      skip_ln.forward(x, s_.g, c.skip_ln);
      space_to_depth<T>(s_.g, dec_shape(B), skip_down(config), SubpixelOrder::row_major,
                        c.skip_fc.input, backend_);
    } else {
      skip_ln.forward(x, c.skip_fc.input, c.skip_ln);
    }
    skip_fc.forward(c.skip_fc.input, out.logits, c.skip_fc);
    if (skip_up(config) > 1) {
      depth_to_space<T>(out.logits, occupancy_shape(B), skip_up(config), SubpixelOrder::row_major,
                        s_.g2, backend_);
      out.logits.swap(s_.g2);
    }
    record(out, "skip_head", out.logits);
  }

  /// dgrid (B*F*F, feature_grid_z*feature_channels) and dlogits like
  /// Output::logits; accumulates every parameter gradient (the quantizer adds
  /// its commitment gradient). Both shapes are checked before any gradient
  /// is touched.
  void backward(const Context& c, ConstMatrixRef<T> dgrid, ConstMatrixRef<T> dlogits) {
    const char* where = "TokenizerNet::backward";
    const Index B = c.input.batch;
    VQKIT_REQUIRE(dgrid.rows() == grid_shape(B).rows() &&
                      dgrid.cols() == config.feature_grid_z * config.feature_channels,
                  where, "dgrid is ", dgrid.rows(), "x", dgrid.cols(), ", expected ",
                  grid_shape(B).rows(), "x", config.feature_grid_z * config.feature_channels);
    VQKIT_REQUIRE(dlogits.rows() == occupancy_shape(B).rows() && dlogits.cols() == config.voxels_z,
                  where, "dlogits is ", dlogits.rows(), "x", dlogits.cols(), ", expected ",
                  occupancy_shape(B).rows(), "x", config.voxels_z);
    space_to_depth<T>(dgrid, grid_shape(B), config.feature_upsample(), SubpixelOrder::row_major,
                      grid_scratch_, grid_fc.backend());
    // Scratch kept from step to step (s_): no fresh pages once a batch of
    // the same size has run.
    RowMatrix<T>& dx = s_.dx;
    RowMatrix<T>& d2 = s_.d2;
    grid_fc.backward(c.grid_fc, grid_scratch_, &dx);
    grid_ln.backward(c.grid_ln, dx, &dx);
    if (skip_up(config) > 1) {
      space_to_depth<T>(dlogits, occupancy_shape(B), skip_up(config), SubpixelOrder::row_major,
                        s_.g2, backend_);
      skip_fc.backward(c.skip_fc, s_.g2, &d2);
    } else {
      skip_fc.backward(c.skip_fc, dlogits, &d2);
    }
    if (skip_down(config) > 1) {
      depth_to_space<T>(d2, dec_shape(B), skip_down(config), SubpixelOrder::row_major, s_.g2,
                        backend_);
      d2.swap(s_.g2);
    }
    skip_ln.backward(c.skip_ln, d2, &d2);
    dx += d2;
    dec1.backward(c.dec1, dx, &dx);
    up.backward(c.up, dx, &dx);
    dec2.backward(c.dec2, dx, &dx);
    post_fc.backward(c.post_fc, dx, &dx);
    vq.backward(c.vq, dx, &dx);  // straight-through + commitment gradient
    pre_fc.backward(c.pre_fc, dx, &dx);
    pre_act.backward(c.pre_act, dx, &dx);
    pre_ln.backward(c.pre_ln, dx, &dx);
    enc2.backward(c.enc2, dx, &dx);
    merge.backward(c.merge, dx, &dx);
    enc1.backward(c.enc1, dx, &dx);
    pos_embed.backward(c.pos_embed, dx, &dx);
    patch_embed.backward(c.patch_embed, dx, &dx);
    bev_norm.backward(c.bev_norm, dx, &dx);
    // Sum over pillars: its backward gathers each voxel's pillar gradient
    // (zero for the padding voxels).
    RowMatrix<T>& dv = s_.dv;
    const Index V = c.input.voxels;
    require_ids_in_range(c.input.voxel_bev_row, dx.rows(), where, "voxel_bev_row", "BEV cells");
    dv.resize(c.voxel_rows, dx.cols());
    detail::parallel_rows(backend_, c.voxel_rows, dx.cols(), [&](Index i) {
      if (i < V)
        dv.row(i) = dx.row(c.input.voxel_bev_row[i]);
      else
        dv.row(i).setZero();
    });
    bev_mlp.backward(c.bev_mlp, dv, &dv);
    z_embed.backward(c.z_embed, dv);
    pn_norm.backward(c.pn_norm, dv, &dv);
    RowMatrix<T>& dp = s_.dp;
    gather_rows<T>(backend_, dv, c.padded_point_voxel, dp);
    pn_fc2.backward(c.pn_fc2, dp, &dp);
    pn_relu.backward(c.pn_relu, dp, &dp);
    pn_ln1.backward(c.pn_ln1, dp, &dp);
    pn_fc1.backward(c.pn_fc1, dp, nullptr);
  }

  ParameterList<T> parameters() {
    ParameterList<T> all;
    append_parameters(all, pn_fc1.parameters(), "pointnet.fc1.");
    append_parameters(all, pn_ln1.parameters(), "pointnet.norm1.");
    append_parameters(all, pn_fc2.parameters(), "pointnet.fc2.");
    append_parameters(all, pn_norm.parameters(), "pointnet.norm.");
    append_parameters(all, z_embed.parameters(), "bev.z_embed.");
    append_parameters(all, bev_mlp.parameters(), "bev.mlp.");
    append_parameters(all, bev_norm.parameters(), "bev.norm.");
    append_parameters(all, patch_embed.parameters(), "encoder.patch_embed.");
    append_parameters(all, pos_embed.parameters(), "encoder.pos_embed.");
    append_parameters(all, enc1.parameters(), "encoder.stage1.");
    append_parameters(all, merge.parameters(), "encoder.merge.");
    append_parameters(all, enc2.parameters(), "encoder.stage2.");
    append_parameters(all, pre_ln.parameters(), "pre_vq.norm.");
    append_parameters(all, pre_fc.parameters(), "pre_vq.proj.");
    append_parameters(all, vq.parameters(), "vq.");
    append_parameters(all, post_fc.parameters(), "post_vq.proj.");
    append_parameters(all, dec2.parameters(), "decoder.stage2.");
    append_parameters(all, up.parameters(), "decoder.upsample.");
    append_parameters(all, dec1.parameters(), "decoder.stage1.");
    append_parameters(all, grid_ln.parameters(), "grid_head.norm.");
    append_parameters(all, grid_fc.parameters(), "grid_head.proj.");
    append_parameters(all, skip_ln.parameters(), "skip_head.norm.");
    append_parameters(all, skip_fc.parameters(), "skip_head.proj.");
    return all;
  }

  void zero_grad() {
    for_each_parameter(grid_fc.backend(), parameters(),
                       [](const ParameterRef<T>& p) { p.grad->setZero(); });
    vq.zero_grad();
  }

  /// Frees the scratch kept from step to step (forward's and backward's
  /// intermediate maps, the grid head's buffer); the next forward allocates
  /// them afresh. The padded row counts are kept. Changes no parameter.
  void release_buffers() {
    s_ = Scratch{};
    grid_scratch_ = RowMatrix<T>();
  }

  void train(bool on = true) { vq.train(on); }
  void eval() { vq.eval(); }

  const TokenizerConfig config;

  Linear<T, Backend> pn_fc1;
  LayerNorm<T, Backend> pn_ln1;
  Relu<T, Backend> pn_relu;
  Linear<T, Backend> pn_fc2;
  LayerNorm<T, Backend> pn_norm;
  Embedding<T, Backend> z_embed;
  Mlp<T, Backend> bev_mlp;
  LayerNorm<T, Backend> bev_norm;
  PatchEmbed<T, Backend> patch_embed;
  PositionEmbedding<T, Backend> pos_embed;
  SwinStage<T, Backend> enc1;
  PatchMerging<T, Backend> merge;
  SwinStage<T, Backend> enc2;
  LayerNorm<T, Backend> pre_ln;
  Gelu<T, Backend> pre_act;
  Linear<T, Backend> pre_fc;
  VectorQuantizer<T, Backend> vq;
  Linear<T, Backend> post_fc;
  SwinStage<T, Backend> dec2;
  PatchUpsample<T, Backend> up;
  SwinStage<T, Backend> dec1;
  LayerNorm<T, Backend> grid_ln;
  Linear<T, Backend> grid_fc;
  LayerNorm<T, Backend> skip_ln;
  Linear<T, Backend> skip_fc;

 private:
  Backend backend_;
  RowMatrix<T> grid_scratch_;  // the grid head's output / gradient, reused across steps
  // forward's and backward's intermediate maps, kept from step to step.
  struct Scratch {
    RowMatrix<T> pts, h, v, z, bev, x, q, g, g2;  // forward
    IndexVector voxel_z;                          // forward: padded voxel_z
    RowMatrix<T> dx, d2, dv, dp;                  // backward
  };
  Scratch s_;
  Index point_rows_ = 0, voxel_rows_ = 0;  // padded_rows' capacities

  /// The skip head's resolution change: the coarse occupancy grid is
  /// occupancy_pool voxels per cell, a decoder token patch_size voxels.
  static void record(Output& out, const char* name, const RowMatrix<T>& m) {
    out.trace.push_back({name, m.rows(), m.cols()});
  }
  static void record(Output& out, const char* name, Index rows, Index cols) {
    out.trace.push_back({name, rows, cols});
  }
  // Rows for n real ones: the capacity so far, grown by 1/8 (and to a
  // multiple of 256) when n exceeds it. The point and voxel counts change
  // from batch to batch; buffers of a size that only grows are reused by
  // malloc instead of being returned to the system and faulted in afresh.
  static Index padded_rows(Index n, Index& capacity) {
    if (n > capacity) capacity = (n + n / 8 + 255) / 256 * 256;
    return capacity;
  }
  // Padding rows change no bit where the GEMM is the AVX-512 kernel: it sums
  // over rows (the weight gradients) in fixed blocks of 128 from row 0, so
  // zero rows at the end add exact zeros, and every other use of the rows
  // is per row or a sum in row order. Eigen's products (double, or a CPU
  // without AVX-512F) choose their blocking from the row count, so there a
  // history-dependent padding would change the rounding (and an exact
  // resume): no padding.
  static bool padding_is_exact() {
    if constexpr (std::is_same_v<T, float> && std::is_same_v<Backend, cpu>)
      return detail::cpu_has_avx512f();
    else
      return false;
  }
  static Index skip_down(const TokenizerConfig& c) {
    return c.occupancy_pool > c.patch_size ? c.occupancy_pool / c.patch_size : 1;
  }
  static Index skip_up(const TokenizerConfig& c) {
    return c.patch_size > c.occupancy_pool ? c.patch_size / c.occupancy_pool : 1;
  }
  static void checked(const TokenizerConfig& c) {
    c.validate();
    const char* where = "TokenizerNet";
    VQKIT_REQUIRE(c.merged_dim == 2 * c.embed_dim, where, "merged_dim=", c.merged_dim,
                  " must be 2 * embed_dim=", 2 * c.embed_dim, " (Swin patch merging doubles it)");
    VQKIT_REQUIRE(c.occupancy_pool % c.patch_size == 0 || c.patch_size % c.occupancy_pool == 0,
                  where, "occupancy_pool=", c.occupancy_pool, " and patch_size=", c.patch_size,
                  " must divide one another");
    VQKIT_REQUIRE(c.voxels_x == c.voxels_y, where, "the voxel grid must be square, got ",
                  c.voxels_x, "x", c.voxels_y);
  }

  void check_input(const Input& in, const char* where) const {
    VQKIT_REQUIRE(in.batch >= 1, where, "batch must be >= 1, got ", in.batch);
    VQKIT_REQUIRE(in.point_offset.cols() == 3, where, "point offsets have ",
                  in.point_offset.cols(), " columns, expected 3");
    VQKIT_REQUIRE(in.point_voxel.size() == in.point_offset.rows(), where, "point_voxel has ",
                  in.point_voxel.size(), " entries for ", in.point_offset.rows(), " points");
    VQKIT_REQUIRE(in.voxel_z.size() == in.voxels && in.voxel_bev_row.size() == in.voxels, where,
                  "voxel_z / voxel_bev_row have ", in.voxel_z.size(), " / ",
                  in.voxel_bev_row.size(), " entries for ", in.voxels, " voxels");
  }
};

}  // namespace vqkit
