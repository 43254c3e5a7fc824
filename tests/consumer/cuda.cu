// The cuda component: the quantizer on the CUDA backend compiles and links
// with nvcc (no GPU is needed to build; running is docs/cuda.md's business).
#include <vqkit/cuda/device_quantizer.cuh>
#include <vqkit/cuda/vector_quantizer.cuh>

#include <cstdio>

int main(int argc, char**) {
  if (argc > 1) {  // never taken by the test: compile and link check only
    vqkit::VectorQuantizerConfig cfg;
    vqkit::VectorQuantizer<float, vqkit::cuda> vq(cfg, vqkit::cuda{});
    vqkit::RowMatrix<float> x(4, cfg.dim), q;
    x.setZero();
    vq.forward(x, q);
    vqkit::gpu::DeviceVectorQuantizer dvq(cfg);  // the device-resident layer
    vqkit::gpu::DeviceContext ctx;
    dvq.forward(nullptr, 0, nullptr, ctx);
  }
  std::printf("consumer_cuda: built\n");
  return 0;
}
