// libFuzzer harness for the quantizer checkpoint loader's in-memory entry
// point, vqkit::from_safetensors (include/vqkit/io/checkpoint.hpp), and for
// config_from_metadata, the first step of load_quantizer.
//
// For every input that safetensors::parse accepts:
//  - from_safetensors into a float and a double quantizer of the harness's
//    config either throws vqkit::error and leaves the quantizer exactly as it
//    was (all-or-nothing), or restores a state that saves back to the same
//    file content, and on which a training and an eval step either work
//    (indices in range) or throw vqkit::error - never a sanitizer report;
//  - config_from_metadata either throws vqkit::error or returns a config
//    that validates and round-trips through config_to_metadata.
#include <cstdint>
#include <cstring>
#include <string>

#include <vqkit/io/checkpoint.hpp>

#include "fuzz_common.hpp"

namespace st = vqkit::safetensors;
using vqkit::Index;

namespace {

template <class M>
bool same_bits(const M& a, const M& b) {
  using S = typename M::Scalar;
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), sizeof(S) * static_cast<std::size_t>(a.size())) == 0);
}

template <class T>
bool same_state(const typename vqkit::VectorQuantizer<T>::State& a,
                const typename vqkit::VectorQuantizer<T>::State& b) {
  return same_bits(a.codes, b.codes) && same_bits(a.grad, b.grad) &&
         same_bits(a.ema.cluster_size, b.ema.cluster_size) &&
         same_bits(a.ema.embed_sum, b.ema.embed_sum) &&
         same_bits(a.steps_since_used, b.steps_since_used) &&
         same_bits(a.used_since_reset, b.used_since_reset) && same_bits(a.bank, b.bank) &&
         a.bank_size == b.bank_size && a.bank_head == b.bank_head &&
         a.bank_overflow == b.bank_overflow && a.rng == b.rng && a.step == b.step &&
         a.reinits == b.reinits && a.replaced == b.replaced && a.skipped == b.skipped &&
         a.data_initialized == b.data_initialized && a.init_refined == b.init_refined &&
         a.training == b.training;
}

void check_message(const vqkit::error& e, const char* where) {
  VQKIT_FUZZ_CHECK(std::strlen(e.what()) <= vqkit::fuzz::max_message_bytes,
                   std::string(where) + ": long error message");
}

template <class T>
void try_restore(const st::File& f) {
  const auto cfg = vqkit::fuzz::checkpoint_config();
  vqkit::VectorQuantizer<T> vq(cfg, vqkit::cpu{1});
  const auto before = vq.state();
  try {
    vqkit::from_safetensors(f, vq);
  } catch (const vqkit::error& e) {
    check_message(e, "from_safetensors");
    VQKIT_FUZZ_CHECK(same_state<T>(before, vq.state()),
                     "a rejected checkpoint changed the quantizer");
    return;
  }
  // Accepted: the state saves back to the same tensors, and restores again.
  const st::File again = vqkit::to_safetensors(vq);
  vqkit::VectorQuantizer<T> other(cfg, vqkit::cpu{1});
  try {
    vqkit::from_safetensors(again, other);
  } catch (const vqkit::error& e) {
    vqkit::fuzz::fail(std::string("a re-saved checkpoint was refused: ") + e.what());
  }
  VQKIT_FUZZ_CHECK(same_state<T>(vq.state(), other.state()), "save/load changed the state");
  // A restored quantizer keeps working: one training step and one eval step
  // on a fixed batch either succeed with finite results or throw vqkit::error.
  vqkit::RowMatrix<T> x(6, cfg.dim), q;
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = T(0.25) * T(i % 7) - T(0.5);
  for (bool training : {true, false}) {
    vq.train(training);
    try {
      const auto ctx = vq.forward(x, q);
      VQKIT_FUZZ_CHECK(ctx.indices.size() == x.rows(), "forward: indices");
      for (Index i = 0; i < ctx.indices.size(); ++i)
        VQKIT_FUZZ_CHECK(ctx.indices[i] >= 0 && ctx.indices[i] < cfg.codebook_size,
                         "forward: index out of range");
    } catch (const vqkit::error& e) {
      check_message(e, "forward after load");
    }
  }
}

void try_config(const st::File& f, std::size_t input_size) {
  vqkit::VectorQuantizerConfig cfg;
  try {
    cfg = vqkit::config_from_metadata(f.metadata);
  } catch (const vqkit::error& e) {
    check_message(e, "config_from_metadata");
    return;
  }
  try {
    cfg.validate();
  } catch (const vqkit::error& e) {
    vqkit::fuzz::fail(std::string("config_from_metadata returned an invalid config: ") + e.what());
  }
  const auto meta = vqkit::config_to_metadata(cfg);
  vqkit::VectorQuantizerConfig again;
  try {
    again = vqkit::config_from_metadata(meta);
  } catch (const vqkit::error& e) {
    vqkit::fuzz::fail(std::string("config metadata does not read back: ") + e.what());
  }
  VQKIT_FUZZ_CHECK(vqkit::config_to_metadata(again) == meta, "config round trip");
  // load_quantizer would now build a quantizer of this config, allocating
  // K x D codes (4 matrices of them) and a bank_rows() x D bank before it
  // reads a tensor, however small the file. Do that here only when the input
  // is large enough to hold those tensors, so memory stays bounded by the
  // input (see docs/reliability.md).
  const double elems = double(cfg.codebook_size) * double(cfg.dim) * 4 +
                       double(cfg.bank_rows()) * double(cfg.dim);
  if (elems * sizeof(float) > double(input_size)) return;
  vqkit::VectorQuantizer<float> vq(cfg, vqkit::cpu{1});
  try {
    vqkit::from_safetensors(f, vq);
  } catch (const vqkit::error& e) {
    check_message(e, "from_safetensors (file's own config)");
  }
}

}  // namespace

// Starts the OpenMP runtime once, before fuzzing: its one-time set-up
// allocates 1 MiB, which -malloc_limit_mb=1 would otherwise report.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  vqkit::VectorQuantizer<float> vq(vqkit::fuzz::checkpoint_config(), vqkit::cpu{1});
  vqkit::RowMatrix<float> x = vqkit::RowMatrix<float>::Ones(2, vq.dim()), q;
  vq.forward(x, q);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  st::File f;
  try {
    f = st::parse(data, size);
  } catch (const vqkit::error&) {
    return 0;  // fuzz_safetensors covers parse() itself
  }
  try_restore<float>(f);
  try_restore<double>(f);
  try_config(f, size);
  return 0;
}
