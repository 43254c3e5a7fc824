// vq_encode - encodes vectors with a fixed codebook: the index of each
// vector's nearest code.
//
//   vq_encode --codebook model.safetensors --tensor vq._codebook.embed
//             --input vectors.npy --output codes.npy   (one command line)
//
// The codebook is a .npy (float32/float16, K x D) or a tensor of a
// safetensors file (F32/F16/BF16, K x D or 1 x K x D), e.g. one saved from a
// PyTorch model (vqkit::io::load_codebook). The vectors are a .fvecs, .bvecs
// or .npy file (float32, float16 or uint8, N x D); the indices go to a .npy
// (int64, shape (N,)) or an .ivecs file (one int32 per row), chosen by the
// output's extension. Rows are encoded in batches of --batch rows, with a
// progress line on stderr when the input has at least 100000 rows. Ends
// with a summary: rows, time, codes used, mean distance. Run with --help.
//
// Exit status (examples/cli.hpp): 0 on success, 1 on a vqkit::error or an
// I/O error (bad file, dimension mismatch), 2 on a bad command line.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include <vqkit/io/codebook.hpp>
#include <vqkit/io/npy.hpp>
#include <vqkit/io/vecs.hpp>
#include <vqkit/quantizer/codebook.hpp>

#include "cli.hpp"

namespace {

namespace cli = vqkit::cli;
using cli::ends_with;
using vqkit::Index;
using Clock = std::chrono::steady_clock;

constexpr Index kProgressRows = 100000;  // inputs this large get a progress line

struct Options {
  std::string codebook, tensor, input, output;
  vqkit::Metric metric = vqkit::Metric::l2;
  vqkit::Precision precision = vqkit::Precision::fp32;
  int threads = 0;
  Index batch = 65536;
  bool quiet = false;
  bool help = false;
};

void print_usage() {
  std::printf(
      "usage: vq_encode --codebook FILE --input FILE --output FILE [options]\n"
      "\n"
      "Writes the index of each input vector's nearest code.\n"
      "\n"
      "  --codebook FILE        .npy (float32/float16, K x D) or .safetensors (F32/F16/BF16,\n"
      "                         K x D or 1 x K x D); the kind is read from the file's bytes\n"
      "  --tensor NAME          the codebook's tensor in a safetensors file (default: the\n"
      "                         file's only tensor), e.g. vq._codebook.embed\n"
      "  --input FILE           vectors: .fvecs, .bvecs or .npy (float32/float16/uint8, N x D)\n"
      "  --output FILE          indices: .npy (int64, shape (N,)) or .ivecs (int32 per row)\n"
      "  --metric l2|cosine     distance (default l2)\n"
      "  --precision fp32|bf16_rerank\n"
      "                         float search arithmetic; bf16_rerank gives the same indices,\n"
      "                         faster at large D on CPUs with AVX512-BF16 (default fp32)\n"
      "  --threads N            threads (default 0: OpenMP's default)\n"
      "  --batch ROWS           rows per search call (default 65536)\n"
      "  --quiet                no progress line and no summary\n"
      "  --help                 this text\n"
      "\n"
      "Exit status: 0 on success, 1 on a bad file or other run-time error, 2 on a bad\n"
      "command line.\n");
}

Options parse_args(int argc, char** argv) {
  Options o;
  cli::Args args(argc, argv);
  while (args.next()) {
    const std::string_view flag = args.flag();
    if (flag == "--codebook") {
      o.codebook = args.path();
    } else if (flag == "--tensor") {
      o.tensor = args.value();
    } else if (flag == "--input") {
      o.input = args.path();
      if (!ends_with(o.input, ".fvecs") && !ends_with(o.input, ".bvecs") && !ends_with(o.input, ".npy"))
        cli::bad_value(flag, o.input, "a .fvecs, .bvecs or .npy file");
    } else if (flag == "--output") {
      o.output = args.path();
      if (!ends_with(o.output, ".npy") && !ends_with(o.output, ".ivecs"))
        cli::bad_value(flag, o.output, "a .npy or .ivecs file");
    } else if (flag == "--metric") {
      const std::string_view v = args.value();
      if (v == "l2") o.metric = vqkit::Metric::l2;
      else if (v == "cosine") o.metric = vqkit::Metric::cosine;
      else cli::bad_value(flag, v, "l2 or cosine");
    } else if (flag == "--precision") {
      const std::string_view v = args.value();
      if (v == "fp32") o.precision = vqkit::Precision::fp32;
      else if (v == "bf16_rerank") o.precision = vqkit::Precision::bf16_rerank;
      else cli::bad_value(flag, v, "fp32 or bf16_rerank");
    } else if (flag == "--threads") {
      o.threads = cli::parse_int<int>(flag, args.value(), 0, "an integer >= 0");
    } else if (flag == "--batch") {
      o.batch = cli::parse_int<Index>(flag, args.value(), 1, "an integer >= 1");
    } else if (flag == "--quiet") {
      o.quiet = true;
    } else {
      args.unknown();
    }
  }
  o.help = args.help();
  if (!o.help) {
    for (const auto& [name, value] : {std::pair{"--codebook", &o.codebook}, std::pair{"--input", &o.input},
                                      std::pair{"--output", &o.output}})
      if (value->empty()) throw cli::UsageError(std::string(name) + " FILE is required (see --help)");
  }
  return o;
}

vqkit::RowMatrix<float> read_vectors(const std::string& path) {
  if (ends_with(path, ".fvecs")) return vqkit::io::read_fvecs(path);
  if (ends_with(path, ".bvecs")) return vqkit::io::read_bvecs(path);
  return vqkit::npy::to_float_matrix(vqkit::npy::load(path), "'" + path + "'");
}

int run(const Options& o) {
  const auto t0 = Clock::now();
  vqkit::Codebook<float> cb(vqkit::io::load_codebook(o.codebook, o.tensor), o.metric, o.precision,
                            vqkit::cpu{o.threads});
  const vqkit::RowMatrix<float> x = read_vectors(o.input);
  const Index N = x.rows(), D = x.cols(), K = cb.size();
  VQKIT_REQUIRE(D == cb.dim(), "vq_encode", "the vectors in '", o.input, "' have D=", D, ", but the codebook in '",
                o.codebook, "' has D=", cb.dim());

  vqkit::IndexVector idx(N);
  vqkit::Vector<float> dist;
  double dist_sum = 0;
  const bool progress = !o.quiet && N >= kProgressRows;
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  auto last_report = Clock::now();
  const auto t_search = Clock::now();
  for (Index r0 = 0; r0 < N; r0 += o.batch) {
    const Index n = std::min(o.batch, N - r0);
    cb.encode(x.middleRows(r0, n), idx.segment(r0, n), &dist);
    dist_sum += dist.cast<double>().sum();
    const auto now = Clock::now();
    if (progress && (r0 + n == N || now - last_report > std::chrono::seconds(tty ? 1 : 10))) {
      last_report = now;
      std::fprintf(stderr, "%svq_encode: %lld / %lld rows (%.0f%%)%s", tty ? "\r" : "",
                   static_cast<long long>(r0 + n), static_cast<long long>(N), 100.0 * double(r0 + n) / double(N),
                   tty && r0 + n < N ? "" : "\n");
    }
  }
  const double search_s = std::chrono::duration<double>(Clock::now() - t_search).count();

  if (ends_with(o.output, ".npy")) {
    vqkit::npy::save(o.output, vqkit::npy::from_vector(idx));
  } else {
    const vqkit::RowMatrix<std::int32_t> rows = idx.cast<std::int32_t>();  // K < 2^31: exact
    vqkit::io::write_ivecs(o.output, rows);
  }
  if (!o.quiet) {
    std::vector<char> used(std::size_t(K), 0);
    for (Index i = 0; i < N; ++i) used[std::size_t(idx[i])] = 1;
    const auto n_used = std::count(used.begin(), used.end(), 1);
    std::printf("vq_encode: %lld vectors (D=%lld) -> %lld codes (K=%lld): %lld of %lld codes used, "
                "mean %s %.6g; search %.3f s (%.3g rows/s), total %.3f s; wrote %s\n",
                static_cast<long long>(N), static_cast<long long>(D), static_cast<long long>(N),
                static_cast<long long>(K), static_cast<long long>(n_used), static_cast<long long>(K),
                o.metric == vqkit::Metric::l2 ? "squared distance" : "cosine distance",
                N > 0 ? dist_sum / double(N) : 0.0, search_s, search_s > 0 ? double(N) / search_s : 0.0,
                std::chrono::duration<double>(Clock::now() - t0).count(), o.output.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return cli::run_main("vq_encode", [&] { return parse_args(argc, argv); }, print_usage, run);
}
