// libFuzzer harness for vqkit::io::parse_fvecs / parse_ivecs / parse_bvecs /
// parse_bvecs_u8 (include/vqkit/io/vecs.hpp).
//
// Every input goes through all four parsers, reading all rows and (again)
// at most one row. Each either throws vqkit::error with a short message or
// returns rows whose bytes are exactly the input's records.
#include <cstdint>
#include <cstring>
#include <string>

#include <vqkit/io/vecs.hpp>

#include "fuzz_common.hpp"

namespace io = vqkit::io;

namespace {

template <class In, class Parse>
void check(const char* what, const std::uint8_t* data, std::size_t size, vqkit::Index max_rows,
           Parse&& parse) {
  try {
    const auto m = parse(data, size, max_rows);
    const std::size_t d = static_cast<std::size_t>(m.cols());
    const std::size_t record = 4 + d * sizeof(In);
    VQKIT_FUZZ_CHECK(d >= 1 && d <= std::size_t(io::vecs_max_dim), std::string(what) + ": d");
    VQKIT_FUZZ_CHECK(size % record == 0, std::string(what) + ": accepted a truncated row");
    const std::size_t rows = size / record;
    VQKIT_FUZZ_CHECK(static_cast<std::size_t>(m.rows()) ==
                         (max_rows < 0 ? rows : std::min<std::size_t>(rows, max_rows)),
                     std::string(what) + ": row count");
    for (vqkit::Index i = 0; i < m.rows(); ++i) {
      const std::uint8_t* rec = data + static_cast<std::size_t>(i) * record;
      std::int32_t di;
      std::memcpy(&di, rec, 4);
      VQKIT_FUZZ_CHECK(static_cast<std::size_t>(di) == d, std::string(what) + ": row d");
      for (std::size_t j = 0; j < d; ++j) {
        In v;
        std::memcpy(&v, rec + 4 + j * sizeof(In), sizeof(In));
        const auto got = m(i, static_cast<vqkit::Index>(j));
        // Bitwise for floats, so a NaN payload must come through unchanged too.
        using Out = std::remove_cv_t<decltype(got)>;
        const Out want = static_cast<Out>(v);
        VQKIT_FUZZ_CHECK(std::memcmp(&want, &got, sizeof(Out)) == 0,
                         std::string(what) + ": value differs from the input");
      }
    }
  } catch (const vqkit::error& e) {
    VQKIT_FUZZ_CHECK(std::strlen(e.what()) <= vqkit::fuzz::max_message_bytes,
                     std::string(what) + ": long error message");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  for (vqkit::Index max_rows : {vqkit::Index(-1), vqkit::Index(1)}) {
    check<float>("parse_fvecs", data, size, max_rows, [](auto... a) { return io::parse_fvecs(a...); });
    check<std::int32_t>("parse_ivecs", data, size, max_rows,
                        [](auto... a) { return io::parse_ivecs(a...); });
    check<std::uint8_t>("parse_bvecs", data, size, max_rows,
                        [](auto... a) { return io::parse_bvecs(a...); });
    check<std::uint8_t>("parse_bvecs_u8", data, size, max_rows,
                        [](auto... a) { return io::parse_bvecs_u8(a...); });
  }
  return 0;
}
