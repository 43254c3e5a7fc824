// vqkit/io/vecs.hpp - the .fvecs / .ivecs / .bvecs formats of the ANN
// benchmarks (TEXMEX, ann-benchmarks).
//
// Each file is a sequence of records, one per row: a little-endian int32 d,
// then d values: float32 (.fvecs), int32 (.ivecs) or uint8 (.bvecs). Every
// row of a file has the same d.
//
// Guarantees:
//  - The readers throw vqkit::error, naming the file (or "<memory>"), the row
//    and the bad value, for: an empty file, d <= 0 or d > 2^20, a row whose d
//    differs from the first row's, and a file size that is not a multiple of
//    the record size (4 + d * value size), i.e. a truncated final row. The
//    size check covers the whole file even when max_rows reads only a prefix;
//    the per-row d check covers the rows read.
//  - Memory is the result matrix plus one row (so at most 4x the file size
//    for .bvecs read as float); the file is streamed.
//  - max_rows < 0 reads every row; otherwise at most max_rows rows.
//  - Values are not checked (a .fvecs may hold NaN); .bvecs values are
//    converted exactly to float by read_bvecs, or kept by read_bvecs_u8.
//  - The writers refuse what the readers would refuse (no rows, d outside
//    [1, 2^20]) and throw vqkit::error on I/O failure. They write in place
//    (not atomically).
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit::io {

static_assert(std::endian::native == std::endian::little,
              "vqkit/io/vecs.hpp assumes a little-endian host");

/// Largest accepted dimension d.
inline constexpr std::int32_t vecs_max_dim = 1 << 20;

namespace detail {

/// Reads from memory.
struct MemorySource {
  const std::uint8_t* p;
  std::uint64_t left;
  bool read(void* dst, std::uint64_t n) {
    if (n > left) return false;
    if (n > 0) std::memcpy(dst, p, static_cast<std::size_t>(n));
    p += n;
    left -= n;
    return true;
  }
};

/// Reads from a stream.
struct StreamSource {
  std::istream& in;
  bool read(void* dst, std::uint64_t n) {
    if (n == 0) return true;
    in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    return in.good() && static_cast<std::uint64_t>(in.gcount()) == n;
  }
};

/// Parses `size` bytes of records with values of type In into a matrix of
/// Out (In converted with static_cast). `name` labels the messages.
template <class In, class Out, class Source>
RowMatrix<Out> read_records(Source& src, std::uint64_t size, Index max_rows, const char* where,
                            const std::string& name) {
  VQKIT_REQUIRE(size > 0, where, "'", name, "' is empty");
  VQKIT_REQUIRE(size >= 4, where, "'", name, "': row 0 is truncated (the file has only ", size,
                " bytes)");
  std::int32_t d0 = 0;
  VQKIT_REQUIRE(src.read(&d0, 4), where, "'", name, "': read failed at row 0");
  VQKIT_REQUIRE(d0 > 0 && d0 <= vecs_max_dim, where, "'", name, "': row 0 has d = ", d0,
                ", expected 1 <= d <= ", vecs_max_dim);
  const std::uint64_t d = static_cast<std::uint64_t>(d0);
  const std::uint64_t record = 4 + d * sizeof(In);
  const std::uint64_t rows = size / record;
  const std::uint64_t n =
      max_rows < 0 ? rows : std::min(rows, static_cast<std::uint64_t>(max_rows));

  RowMatrix<Out> m(static_cast<Index>(n), static_cast<Index>(d));
  // Only when a whole row is present: a tiny file claiming d = 2^20 must not
  // cost a 4 MB buffer (memory stays proportional to the input).
  std::vector<In> row(n > 0 ? static_cast<std::size_t>(d) : 0);
  for (std::uint64_t i = 0; i < n; ++i) {
    if (i > 0) {
      std::int32_t di = 0;
      VQKIT_REQUIRE(src.read(&di, 4), where, "'", name, "': read failed at row ", i);
      VQKIT_REQUIRE(di == d0, where, "'", name, "': row ", i, " has d = ", di,
                    ", but row 0 has d = ", d0);
    }
    VQKIT_REQUIRE(src.read(row.data(), d * sizeof(In)), where, "'", name, "': read failed at row ",
                  i);
    for (std::uint64_t j = 0; j < d; ++j)
      m(static_cast<Index>(i), static_cast<Index>(j)) = static_cast<Out>(row[j]);
  }
  // Checked after the rows, so that a row with a different d is reported as
  // such rather than as a size mismatch.
  VQKIT_REQUIRE(size % record == 0, where, "'", name, "': row ", rows, " is truncated (",
                size % record, " trailing bytes): the file size ", size,
                " is not a multiple of the record size ", record, " for d = ", d);
  return m;
}

template <class In, class Out>
RowMatrix<Out> parse_records(const std::uint8_t* data, std::size_t size, Index max_rows,
                             const char* where, const std::string& name) {
  VQKIT_REQUIRE(data != nullptr || size == 0, where, "'", name, "': null data");
  MemorySource src{data, size};
  return read_records<In, Out>(src, size, max_rows, where, name);
}

template <class In, class Out>
RowMatrix<Out> read_file(const std::string& path, Index max_rows, const char* where) {
  std::ifstream in(path, std::ios::binary);
  VQKIT_REQUIRE(in.is_open(), where, "cannot open '", path, "': ", std::strerror(errno));
  in.seekg(0, std::ios::end);
  const std::streamoff end_pos = in.tellg();
  VQKIT_REQUIRE(in.good() && end_pos >= 0, where, "cannot determine the size of '", path, "'");
  in.seekg(0, std::ios::beg);
  StreamSource src{in};
  return read_records<In, Out>(src, static_cast<std::uint64_t>(end_pos), max_rows, where, path);
}

template <class V>
std::vector<std::uint8_t> serialize_records(const ConstMatrixRef<V>& m, const char* where) {
  VQKIT_REQUIRE(m.rows() > 0, where, "cannot write 0 rows (an empty file is not valid)");
  VQKIT_REQUIRE(m.cols() > 0 && m.cols() <= vecs_max_dim, where, "d = ", m.cols(),
                " is outside [1, ", vecs_max_dim, "]");
  const auto d = static_cast<std::int32_t>(m.cols());
  const std::size_t record = 4 + static_cast<std::size_t>(d) * sizeof(V);
  std::vector<std::uint8_t> out(static_cast<std::size_t>(m.rows()) * record);
  std::uint8_t* p = out.data();
  for (Index i = 0; i < m.rows(); ++i) {
    std::memcpy(p, &d, 4);
    p += 4;
    for (Index j = 0; j < m.cols(); ++j) {
      const V v = m(i, j);
      std::memcpy(p, &v, sizeof(V));
      p += sizeof(V);
    }
  }
  return out;
}

inline void write_bytes(const std::string& path, const std::vector<std::uint8_t>& bytes,
                        const char* where) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  VQKIT_REQUIRE(out.is_open(), where, "cannot create '", path, "': ", std::strerror(errno));
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  out.close();
  VQKIT_REQUIRE(!out.fail(), where, "writing '", path, "' failed");
}

}  // namespace detail

// ---- in memory (for tests and fuzzing) -----------------------------------------

/// Parses .fvecs bytes; `name` labels the error messages.
inline RowMatrix<float> parse_fvecs(const std::uint8_t* data, std::size_t size, Index max_rows = -1,
                                    const std::string& name = "<memory>") {
  return detail::parse_records<float, float>(data, size, max_rows, "parse_fvecs", name);
}
/// Parses .ivecs bytes.
inline RowMatrix<std::int32_t> parse_ivecs(const std::uint8_t* data, std::size_t size,
                                           Index max_rows = -1,
                                           const std::string& name = "<memory>") {
  return detail::parse_records<std::int32_t, std::int32_t>(data, size, max_rows, "parse_ivecs",
                                                           name);
}
/// Parses .bvecs bytes, converting the values to float.
inline RowMatrix<float> parse_bvecs(const std::uint8_t* data, std::size_t size, Index max_rows = -1,
                                    const std::string& name = "<memory>") {
  return detail::parse_records<std::uint8_t, float>(data, size, max_rows, "parse_bvecs", name);
}
/// Parses .bvecs bytes, keeping the values as uint8.
inline RowMatrix<std::uint8_t> parse_bvecs_u8(const std::uint8_t* data, std::size_t size,
                                              Index max_rows = -1,
                                              const std::string& name = "<memory>") {
  return detail::parse_records<std::uint8_t, std::uint8_t>(data, size, max_rows, "parse_bvecs_u8",
                                                           name);
}

/// The bytes of a .fvecs / .ivecs / .bvecs file holding m's rows.
inline std::vector<std::uint8_t> serialize_fvecs(const ConstMatrixRef<float>& m) {
  return detail::serialize_records<float>(m, "serialize_fvecs");
}
inline std::vector<std::uint8_t> serialize_ivecs(const ConstMatrixRef<std::int32_t>& m) {
  return detail::serialize_records<std::int32_t>(m, "serialize_ivecs");
}
inline std::vector<std::uint8_t> serialize_bvecs(const ConstMatrixRef<std::uint8_t>& m) {
  return detail::serialize_records<std::uint8_t>(m, "serialize_bvecs");
}

// ---- files -------------------------------------------------------------------------

/// Reads a .fvecs file (at most max_rows rows when max_rows >= 0).
inline RowMatrix<float> read_fvecs(const std::string& path, Index max_rows = -1) {
  return detail::read_file<float, float>(path, max_rows, "read_fvecs");
}
/// Reads a .ivecs file (e.g. ground-truth neighbour ids).
inline RowMatrix<std::int32_t> read_ivecs(const std::string& path, Index max_rows = -1) {
  return detail::read_file<std::int32_t, std::int32_t>(path, max_rows, "read_ivecs");
}
/// Reads a .bvecs file, converting the values (0..255) to float.
inline RowMatrix<float> read_bvecs(const std::string& path, Index max_rows = -1) {
  return detail::read_file<std::uint8_t, float>(path, max_rows, "read_bvecs");
}
/// Reads a .bvecs file, keeping the values as uint8.
inline RowMatrix<std::uint8_t> read_bvecs_u8(const std::string& path, Index max_rows = -1) {
  return detail::read_file<std::uint8_t, std::uint8_t>(path, max_rows, "read_bvecs_u8");
}

/// Writes m's rows as .fvecs / .ivecs / .bvecs (in place, not atomically).
inline void write_fvecs(const std::string& path, const ConstMatrixRef<float>& m) {
  const std::string where = "write_fvecs('" + path + "')";
  detail::write_bytes(path, detail::serialize_records<float>(m, where.c_str()), where.c_str());
}
inline void write_ivecs(const std::string& path, const ConstMatrixRef<std::int32_t>& m) {
  const std::string where = "write_ivecs('" + path + "')";
  detail::write_bytes(path, detail::serialize_records<std::int32_t>(m, where.c_str()),
                      where.c_str());
}
inline void write_bvecs(const std::string& path, const ConstMatrixRef<std::uint8_t>& m) {
  const std::string where = "write_bvecs('" + path + "')";
  detail::write_bytes(path, detail::serialize_records<std::uint8_t>(m, where.c_str()),
                      where.c_str());
}

}  // namespace vqkit::io
