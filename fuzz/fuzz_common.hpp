// fuzz/fuzz_common.hpp - shared by the libFuzzer harnesses and the seed-corpus
// generator (make_corpus.cpp).
//
// A harness must never crash, hang or allocate out of proportion to its input:
// it accepts or throws vqkit::error; anything else (another exception type, a
// sanitizer report, a broken invariant below) aborts, which libFuzzer reports
// as a crash and .ci/run turns into a CI failure.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include <vqkit/layers/vector_quantizer.hpp>

namespace vqkit::fuzz {

/// Stops the run with a message: libFuzzer saves the input as a crash artifact.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "vqkit fuzz invariant broken: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

#define VQKIT_FUZZ_CHECK(cond, what) \
  do {                               \
    if (!(cond)) ::vqkit::fuzz::fail(what); \
  } while (0)

/// Error messages must stay short whatever the input: hostile names and
/// values are clipped.
inline constexpr std::size_t max_message_bytes = 2048;

/// The quantizer config of the checkpoint harness (and of its seed files):
/// small, so each execution is cheap, with every kind of state non-trivial.
inline VectorQuantizerConfig checkpoint_config() {
  VectorQuantizerConfig c;
  c.codebook_size = 4;
  c.dim = 3;
  c.memory_bank_size = 8;
  c.seed = 7;
  c.dead.policy = DeadCodePolicy::kmeans_reinit;
  c.dead.dead_after = 2;
  c.dead.check_every = 2;
  c.dead.min_steps = 2;
  return c;
}

}  // namespace vqkit::fuzz
