// The io component: a codebook saved as .npy and as a safetensors tensor,
// loaded back with io::load_codebook, served by Codebook. Exits non-zero on
// any mismatch.
#include <vqkit/core/random.hpp>
#include <vqkit/io/codebook.hpp>
#include <vqkit/io/npy.hpp>
#include <vqkit/io/safetensors.hpp>
#include <vqkit/quantizer/codebook.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>

int main() {
  vqkit::Rng rng(3);
  vqkit::RowMatrix<float> codes(8, 5);
  for (vqkit::Index i = 0; i < codes.size(); ++i) codes.data()[i] = float(rng.normal());
  const auto dir = std::filesystem::temp_directory_path();
  const std::string npy = (dir / "vqkit_consumer_io.npy").string();
  const std::string st = (dir / "vqkit_consumer_io.safetensors").string();
  vqkit::npy::save(npy, vqkit::npy::from_matrix(codes));
  vqkit::safetensors::File f;
  f.tensors["vq.embed"] = vqkit::safetensors::from_matrix(codes);
  vqkit::safetensors::save(st, f);
  vqkit::Codebook<float> a(vqkit::io::load_codebook(npy)), b(vqkit::io::load_codebook(st, "vq.embed"));
  std::remove(npy.c_str());
  std::remove(st.c_str());
  const vqkit::IndexVector idx = a.encode(codes);
  const bool ok = a.codes() == codes && b.codes() == codes && b.decode(idx) == codes;
  std::cout << "consumer_io: " << (ok ? "ok" : "MISMATCH") << "\n";
  return ok ? 0 : 1;
}
