// vqkit/layers/quantizer_block.hpp - the seed's full quantizer block:
//
//   x (N x dim) -> LayerNorm(dim) -> GELU -> Linear(dim -> codebook_dim)
//     -> VectorQuantizer(codebook_size, codebook_dim) -> Linear(codebook_dim -> dim) -> y (N x dim)
//
// The CoPilot4D tokenizer's pre-VQ projection, quantizer and post-VQ
// projection in one layer (design §3 step 5). A (B, T, dim) tensor is passed
// as B*T rows; indices come back as B*T entries in the same order.
// forward() returns a Context holding each sub-layer's context, and with it
// the indices, loss terms and metrics of the quantizer:
//   auto ctx = block.forward(x, y);  ctx.vq.indices, ctx.vq.loss, ctx.vq.metrics
// backward(ctx, dy, &dx) runs the chain back: straight-through across the
// quantizer plus its commitment gradient, accumulating every parameter's
// gradient (+=).
#pragma once

#include "vqkit/core/backend.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/layers/gelu.hpp"
#include "vqkit/layers/layer_norm.hpp"
#include "vqkit/layers/linear.hpp"
#include "vqkit/core/parameter.hpp"
#include "vqkit/layers/vector_quantizer.hpp"

namespace vqkit {

struct QuantizerBlockConfig {
  Index dim = 256;                ///< model width in and out
  VectorQuantizerConfig quantizer;  ///< quantizer.dim is the codebook dimension
  std::uint64_t seed = 0;         ///< for the Linear layers' initialisation
};

template <class T, class Backend = cpu>
class QuantizerBlock {
 public:
  struct Context {
    typename LayerNorm<T, Backend>::Context norm;
    typename Gelu<T, Backend>::Context act;
    typename Linear<T, Backend>::Context proj_in;
    typename VectorQuantizer<T, Backend>::Context vq;
    typename Linear<T, Backend>::Context proj_out;
  };

  explicit QuantizerBlock(const QuantizerBlockConfig& cfg, Backend backend = {})
      : QuantizerBlock(cfg, backend, Rng(cfg.seed)) {}

  Context forward(ConstMatrixRef<T> x, RowMatrix<T>& y) {
    Context c;
    forward(x, y, c);
    return c;
  }

  /// The same into a context whose buffers are reused, with the block's
  /// own intermediate buffers: after a step of the same size, only the
  /// Linear layers' GEMMs (Eigen's packing buffers) allocate.
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& y, Context& c) {
    norm.forward(x, wide_[0], c.norm);
    act.forward(wide_[0], wide_[1], c.act);
    proj_in.forward(wide_[1], code_[0], c.proj_in);
    quantizer.forward(code_[0], code_[1], c.vq);
    proj_out.forward(code_[1], y, c.proj_out);
  }

  /// dy: N x dim. Overwrites *dx (N x dim) when non-null.
  void backward(const Context& c, ConstMatrixRef<T> dy, RowMatrix<T>* dx) {
    proj_out.backward(c.proj_out, dy, &code_[0]);
    quantizer.backward(c.vq, code_[0], &code_[1]);
    proj_in.backward(c.proj_in, code_[1], &wide_[0]);
    act.backward(c.act, wide_[0], &wide_[1]);
    norm.backward(c.norm, wide_[1], dx);
  }

  void train(bool on = true) { quantizer.train(on); }
  void eval() { quantizer.eval(); }

  ParameterList<T> parameters() {
    ParameterList<T> all;
    append_parameters(all, norm.parameters(), "norm.");
    append_parameters(all, proj_in.parameters(), "proj_in.");
    append_parameters(all, quantizer.parameters(), "quantizer.");
    append_parameters(all, proj_out.parameters(), "proj_out.");
    return all;
  }
  void zero_grad() {
    norm.zero_grad();
    proj_in.zero_grad();
    quantizer.zero_grad();
    proj_out.zero_grad();
  }

  LayerNorm<T, Backend> norm;
  Gelu<T, Backend> act;
  Linear<T, Backend> proj_in;
  VectorQuantizer<T, Backend> quantizer;
  Linear<T, Backend> proj_out;

 private:
  // Intermediate activations and gradients, reused between steps: N x dim
  // and N x codebook dim (one shape each, so a steady step never resizes).
  RowMatrix<T> wide_[2], code_[2];

  QuantizerBlock(const QuantizerBlockConfig& cfg, Backend backend, Rng rng)
      : norm(cfg.dim, T(1e-5), backend),
        act(backend),
        proj_in(cfg.dim, cfg.quantizer.dim, rng, true, backend),
        quantizer(cfg.quantizer, backend),
        proj_out(cfg.quantizer.dim, cfg.dim, rng, true, backend) {}
};

}  // namespace vqkit
