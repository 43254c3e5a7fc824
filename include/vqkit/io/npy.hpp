// vqkit/io/npy.hpp - read and write numpy's .npy format.
//
// A .npy file is: the magic "\x93NUMPY", a major and a minor version byte, the
// header length H (little-endian u16 in version 1.0, u32 in 2.0), H bytes of
// header - a Python dict literal such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
// padded with spaces and ended by '\n' - then the raw data.
//
// Guarantees:
//  - parse()/load() accept versions 1.0 and 2.0, C order, and the
//    little-endian element types float32 ('<f4'), float16 ('<f2'), int32
//    ('<i4'), int64 ('<i8') and uint8 ('|u1'). Anything else throws
//    vqkit::error naming the file and the bad value: another version, a
//    Fortran-ordered array, a big-endian, structured, object or other dtype
//    (named, with how to convert it in numpy), a header that is not exactly
//    the three keys with values of the right kind, negative or overflowing
//    shapes, and a data size other than product(shape) * element size
//    (truncated or trailing bytes). Memory stays proportional to the input.
//  - serialize()/save() write what numpy 1.24's np.save writes for the same
//    array, byte for byte (version 1.0 unless the header needs 2.0; keys in
//    sorted order; the header padded so the data starts at a multiple of 64
//    bytes). save() is atomic (io/atomic_file.hpp).
//  - Typed access requires the stored dtype to match exactly, except
//    to_float_matrix, which also widens float16 and uint8 to float (exact).
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/half.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/io/atomic_file.hpp"

namespace vqkit::npy {

static_assert(std::endian::native == std::endian::little, "vqkit/io/npy.hpp assumes a little-endian host");

/// The element types vqkit reads and writes.
enum class DType { F32, F16, I32, I64, U8 };

/// Per dtype, in enum order: bytes per element, numpy's name, the header's descr.
struct DTypeInfo {
  DType dtype;
  std::size_t size;
  const char* name;
  const char* descr;
};
inline constexpr DTypeInfo dtype_table[] = {{DType::F32, 4, "float32", "<f4"},
                                            {DType::F16, 2, "float16", "<f2"},
                                            {DType::I32, 4, "int32", "<i4"},
                                            {DType::I64, 8, "int64", "<i8"},
                                            {DType::U8, 1, "uint8", "|u1"}};

constexpr std::size_t dtype_size(DType d) { return dtype_table[static_cast<int>(d)].size; }
/// numpy's name of the dtype ("float32", ...).
constexpr const char* dtype_name(DType d) { return dtype_table[static_cast<int>(d)].name; }
/// The header's descr of the dtype ("<f4", ...).
constexpr const char* dtype_descr(DType d) { return dtype_table[static_cast<int>(d)].descr; }

/// The dtype that stores C++ type T (float, int32, int64, uint8).
template <class T>
constexpr DType dtype_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) {
    return DType::F32;
  } else if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool> && std::is_signed_v<U> &&
                       (sizeof(U) == 4 || sizeof(U) == 8)) {
    return sizeof(U) == 8 ? DType::I64 : DType::I32;
  } else if constexpr (std::is_same_v<U, std::uint8_t>) {
    return DType::U8;
  } else {
    static_assert(sizeof(U) == 0, "npy: unsupported element type");
  }
}

/// One array: dtype, shape (empty for a scalar) and raw little-endian bytes
/// in C order.
struct Array {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;

  /// Product of shape (1 for a scalar).
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (const auto d : shape) n *= d;
    return n;
  }
};

/// Largest accepted header, in bytes (numpy's own reader stops at 10000 by
/// default; a header of any real array is far below this).
inline constexpr std::uint64_t max_header_bytes = 1 << 20;

namespace detail {

inline std::string shape_repr(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

/// The data size of shape x dtype, or throws (negative dim, overflow).
inline std::uint64_t checked_nbytes(const std::vector<std::int64_t>& shape, DType dtype,
                                    const char* where) {
  std::uint64_t n = dtype_size(dtype);
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const std::int64_t d = shape[i];
    VQKIT_REQUIRE(d >= 0, where, "shape[", i, "] = ", d, " is negative");
    VQKIT_REQUIRE(d == 0 || n <= std::uint64_t(std::numeric_limits<std::int64_t>::max()) / std::uint64_t(d),
                  where, "the byte size of shape ", shape_repr(shape), " overflows");
    n *= std::uint64_t(d);
  }
  return n;
}

/// Why a descr vqkit does not read is not read, and what to do instead.
inline std::string unsupported_descr(std::string_view d) {
  std::string s = "dtype '" + std::string(d.substr(0, 40)) + "' is not supported";
  if (!d.empty() && d[0] == '>')
    s += " (big-endian: save arr.astype(arr.dtype.newbyteorder('<')))";
  else if (d == "<f8")
    s += " (float64: save arr.astype(np.float32))";
  else if (d == "<i2" || d == "<u2" || d == "<u4" || d == "<u8" || d == "|i1" || d == "|b1")
    s += " (save arr.astype(np.int32) or np.int64)";
  return s + "; vqkit reads float32 '<f4', float16 '<f2', int32 '<i4', int64 '<i8' and uint8 '|u1'";
}

/// A strict reader of the header dict numpy writes.
class HeaderParser {
 public:
  HeaderParser(std::string_view text, const char* where) : s_(text), where_(where) {}

  /// Parses the dict into a (dtype, shape) array with no bytes.
  Array parse() {
    Array a;
    bool have_descr = false, have_order = false, have_shape = false;
    space();
    expect('{');
    for (;;) {
      space();
      if (peek() == '}') break;
      const std::string key = string_literal("a key");
      space();
      expect(':');
      space();
      if (key == "descr") {
        VQKIT_REQUIRE(!have_descr, where_, "the header repeats the key 'descr'");
        have_descr = true;
        VQKIT_REQUIRE(peek() == '\'' || peek() == '"', where_,
                      "'descr' is not a string (a structured dtype?): ", unsupported_descr(rest(20)));
        const std::string d = string_literal("the descr");
        bool found = false;
        for (const DTypeInfo& t : dtype_table) {
          if (d == t.descr || (t.dtype == DType::U8 && d == "<u1")) {
            a.dtype = t.dtype;
            found = true;
          }
        }
        VQKIT_REQUIRE(found, where_, unsupported_descr(d));
      } else if (key == "fortran_order") {
        VQKIT_REQUIRE(!have_order, where_, "the header repeats the key 'fortran_order'");
        have_order = true;
        if (take("False")) {
        } else if (take("True")) {
          ::vqkit::detail::throw_error(where_, "the array is in Fortran order; save np.ascontiguousarray(arr)");
        } else {
          ::vqkit::detail::throw_error(where_, "'fortran_order' is not True or False: '", rest(20), "'");
        }
      } else if (key == "shape") {
        VQKIT_REQUIRE(!have_shape, where_, "the header repeats the key 'shape'");
        have_shape = true;
        a.shape = tuple();
      } else {
        ::vqkit::detail::throw_error(where_, "unknown header key '", key.substr(0, 40), "'");
      }
      space();
      if (!take(",")) {
        space();
        VQKIT_REQUIRE(peek() == '}', where_, "expected ',' or '}' in the header at '", rest(20), "'");
      }
    }
    expect('}');
    VQKIT_REQUIRE(have_descr && have_order && have_shape, where_, "the header lacks the key '",
                  !have_descr ? "descr" : !have_order ? "fortran_order" : "shape", "'");
    space();
    VQKIT_REQUIRE(pos_ == s_.size(), where_, "unexpected text after the header dict: '", rest(20), "'");
    return a;
  }

 private:
  char peek() const { return pos_ < s_.size() ? s_[pos_] : '\0'; }
  std::string rest(std::size_t n) const { return std::string(s_.substr(pos_, n)); }
  void space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n')) ++pos_;
  }
  bool take(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }
  void expect(char c) {
    VQKIT_REQUIRE(peek() == c, where_, "expected '", c, "' in the header at '", rest(20), "'");
    ++pos_;
  }
  std::string string_literal(const char* what) {
    const char q = peek();
    VQKIT_REQUIRE(q == '\'' || q == '"', where_, "expected ", what, " (a quoted string) in the header at '",
                  rest(20), "'");
    const std::size_t end = s_.find(q, pos_ + 1);
    VQKIT_REQUIRE(end != std::string_view::npos, where_, "unterminated string in the header");
    std::string v(s_.substr(pos_ + 1, end - pos_ - 1));
    VQKIT_REQUIRE(v.find('\\') == std::string::npos, where_, "escape sequences in header strings are not supported");
    pos_ = end + 1;
    return v;
  }
  std::vector<std::int64_t> tuple() {
    std::vector<std::int64_t> dims;
    expect('(');
    for (;;) {
      space();
      if (peek() == ')') break;
      VQKIT_REQUIRE(peek() >= '0' && peek() <= '9', where_, "'shape' holds '", rest(20),
                    "', expected non-negative integers");
      VQKIT_REQUIRE(dims.size() < 64, where_, "'shape' has more than 64 dimensions");
      std::int64_t v = 0;
      while (peek() >= '0' && peek() <= '9') {
        const int digit = peek() - '0';
        VQKIT_REQUIRE(v <= (std::numeric_limits<std::int64_t>::max() - digit) / 10, where_,
                      "a dimension of 'shape' overflows int64");
        v = v * 10 + digit;
        ++pos_;
      }
      dims.push_back(v);
      space();
      if (!take(",")) {
        space();
        VQKIT_REQUIRE(peek() == ')', where_, "expected ',' or ')' in 'shape' at '", rest(20), "'");
        // Python writes a 1-tuple as (n,): (n) is an int, not a tuple.
        VQKIT_REQUIRE(dims.size() != 1, where_, "'shape' is (n) without a comma, not a tuple");
      }
    }
    expect(')');
    return dims;
  }

  std::string_view s_;
  const char* where_;
  std::size_t pos_ = 0;
};

/// Where the header lies in a file of `size` bytes whose first min(size, 12)
/// bytes are at p: checks the magic, the version and the header length
/// (within max_header_bytes and the file), and returns the prefix length (10
/// or 12) and the header length.
struct HeaderExtent {
  std::uint64_t prefix = 0, length = 0;
};
inline HeaderExtent header_extent(const std::uint8_t* p, std::uint64_t size, const char* where) {
  static constexpr std::uint8_t magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  VQKIT_REQUIRE(size >= 10 && std::memcmp(p, magic, 6) == 0, where,
                "not a .npy file (it does not start with \\x93NUMPY)");
  const int major = p[6], minor = p[7];
  VQKIT_REQUIRE((major == 1 || major == 2) && minor == 0, where, "format version ", major, ".", minor,
                " is not supported (vqkit reads 1.0 and 2.0)");
  HeaderExtent e;
  e.prefix = major == 1 ? 10 : 12;
  VQKIT_REQUIRE(size >= e.prefix, where, "file of ", size, " bytes is too short for the header length");
  for (std::uint64_t i = 0; i < e.prefix - 8; ++i) e.length |= std::uint64_t(p[8 + i]) << (8 * i);
  VQKIT_REQUIRE(e.length <= max_header_bytes, where, "header length ", e.length, " exceeds the ",
                max_header_bytes, "-byte limit");
  VQKIT_REQUIRE(e.length <= size - e.prefix, where, "header length ", e.length, " runs past the end of the ",
                size, "-byte file");
  return e;
}

/// Parses the prefix and header of a file of `size` bytes whose first
/// `avail` bytes (at least the prefix and the header) are at p. Returns the
/// array (bytes empty) and sets data_offset.
inline Array parse_prefix(const std::uint8_t* p, std::uint64_t avail, std::uint64_t size,
                          std::uint64_t& data_offset, const char* where) {
  const HeaderExtent e = header_extent(p, size, where);
  const std::uint64_t prefix = e.prefix, hlen = e.length;
  VQKIT_REQUIRE(prefix + hlen <= avail, where, "internal: header not in the buffer");
  const std::string_view text(reinterpret_cast<const char*>(p + prefix), std::size_t(hlen));
  VQKIT_REQUIRE(!text.empty() && text.back() == '\n', where, "the header does not end with a newline");
  for (const char c : text)
    VQKIT_REQUIRE(static_cast<unsigned char>(c) < 0x80, where, "the header is not ASCII");
  Array a = HeaderParser(text, where).parse();
  data_offset = prefix + hlen;
  const std::uint64_t need = checked_nbytes(a.shape, a.dtype, where);
  VQKIT_REQUIRE(size - data_offset == need, where, "the data holds ", size - data_offset,
                " bytes, but shape ", shape_repr(a.shape), " of ", dtype_name(a.dtype), " needs ", need,
                size - data_offset < need ? " (truncated file)" : " (trailing bytes)");
  return a;
}

inline void check_array(const Array& a, const char* where) {
  const std::uint64_t need = checked_nbytes(a.shape, a.dtype, where);
  VQKIT_REQUIRE(a.bytes.size() == need, where, "the array holds ", a.bytes.size(), " bytes, but shape ",
                shape_repr(a.shape), " of ", dtype_name(a.dtype), " needs ", need);
}

template <class T>
void check_typed(const Array& a, std::size_t rank, const char* where, const std::string& name) {
  VQKIT_REQUIRE(a.dtype == dtype_of<T>(), where, name, " has dtype ", dtype_name(a.dtype), ", but ",
                dtype_name(dtype_of<T>()), " was requested");
  VQKIT_REQUIRE(a.shape.size() == rank, where, name, " has shape ", shape_repr(a.shape), ", expected rank ",
                rank);
  check_array(a, where);
}

}  // namespace detail

// ---- in memory ----------------------------------------------------------------

/// Parses .npy bytes; `name` labels the error messages.
inline Array parse(const std::uint8_t* data, std::size_t size, const std::string& name = "<memory>") {
  const std::string where_s = "npy::parse('" + name + "')";
  std::uint64_t offset = 0;
  Array a = detail::parse_prefix(data, size, size, offset, where_s.c_str());
  a.bytes.assign(data + offset, data + size);
  return a;
}

inline Array parse(const std::vector<std::uint8_t>& bytes, const std::string& name = "<memory>") {
  return parse(bytes.data(), bytes.size(), name);
}

/// The bytes np.save writes for this array (numpy 1.24).
inline std::vector<std::uint8_t> serialize(const Array& a) {
  const char* where = "npy::serialize";
  detail::check_array(a, where);
  std::string header = std::string("{'descr': '") + dtype_descr(a.dtype) +
                       "', 'fortran_order': False, 'shape': " + detail::shape_repr(a.shape) + ", }";
  // numpy leaves room to grow the first axis in place.
  if (!a.shape.empty()) header.append(21 - std::to_string(a.shape[0]).size(), ' ');
  // Pad with spaces and a final newline so that the data starts at a multiple
  // of 64 (numpy pads a full 64 when it is already aligned).
  int major = 1;
  std::size_t hlen = header.size() + 1;
  std::size_t pad = 64 - (10 + hlen) % 64;
  if (hlen + pad > 65535) {
    major = 2;
    pad = 64 - (12 + hlen) % 64;
  }
  header.append(pad, ' ');
  header += '\n';
  std::vector<std::uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', std::uint8_t(major), 0};
  const std::uint64_t n = header.size();
  for (int i = 0; i < (major == 1 ? 2 : 4); ++i) out.push_back(std::uint8_t(n >> (8 * i)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), a.bytes.begin(), a.bytes.end());
  return out;
}

// ---- files ------------------------------------------------------------------------

/// Reads and validates the file at path (see parse); the data is read
/// straight into the array, so memory is about the file size.
inline Array load(const std::string& path) {
  const std::string where_s = "npy::load('" + path + "')";
  const char* where = where_s.c_str();
  std::ifstream in(path, std::ios::binary);
  VQKIT_REQUIRE(in.is_open(), where, "cannot open the file: ", std::strerror(errno));
  in.seekg(0, std::ios::end);
  const std::streamoff end_pos = in.tellg();
  VQKIT_REQUIRE(in.good() && end_pos >= 0, where, "cannot determine the file size");
  in.seekg(0, std::ios::beg);
  const auto size = static_cast<std::uint64_t>(end_pos);
  auto read_exact = [&](void* dst, std::uint64_t n) {
    if (n == 0) return;
    in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
    VQKIT_REQUIRE(in.good() && static_cast<std::uint64_t>(in.gcount()) == n, where,
                  "read failed (the file is truncated or unreadable)");
  };
  // The fixed prefix says how long the header is; read exactly prefix + header.
  std::vector<std::uint8_t> head(std::size_t(std::min<std::uint64_t>(size, 12)));
  read_exact(head.data(), head.size());
  const detail::HeaderExtent e = detail::header_extent(head.data(), size, where);
  const std::size_t had = head.size();
  head.resize(std::max(had, std::size_t(e.prefix + e.length)));
  read_exact(head.data() + had, head.size() - had);
  std::uint64_t offset = 0;
  Array a = detail::parse_prefix(head.data(), head.size(), size, offset, where);
  // Bytes read past the header (a header shorter than 2 bytes) are data.
  a.bytes.resize(std::size_t(size - offset));
  const std::uint64_t have = head.size() > offset ? head.size() - offset : 0;
  if (have > 0) std::memcpy(a.bytes.data(), head.data() + offset, std::size_t(have));
  read_exact(a.bytes.data() + have, a.bytes.size() - have);
  return a;
}

/// Writes a to path as np.save would, atomically (io/atomic_file.hpp).
inline void save(const std::string& path, const Array& a) {
  const std::string where = "npy::save('" + path + "')";
  std::vector<std::uint8_t> bytes;
  try {
    bytes = serialize(a);
  } catch (const error& e) {
    ::vqkit::detail::throw_error(where.c_str(), e.what());
  }
  io::detail::write_file_atomic(path, bytes, where.c_str());
}

// ---- typed construction and access ------------------------------------------

/// A rank-2 array [rows, cols] from a matrix of float, int32, int64 or uint8.
template <class Derived>
Array from_matrix(const Eigen::MatrixBase<Derived>& m) {
  using T = typename Derived::Scalar;
  const RowMatrix<T> rm = m;
  Array a;
  a.dtype = dtype_of<T>();
  a.shape = {std::int64_t(rm.rows()), std::int64_t(rm.cols())};
  a.bytes.resize(std::size_t(rm.size()) * sizeof(T));
  if (!a.bytes.empty()) std::memcpy(a.bytes.data(), rm.data(), a.bytes.size());
  return a;
}

/// A rank-1 array [n] from an Eigen vector (row or column).
template <class Derived>
Array from_vector(const Eigen::MatrixBase<Derived>& v) {
  using T = typename Derived::Scalar;
  VQKIT_REQUIRE(v.rows() == 1 || v.cols() == 1, "npy::from_vector", "expected a row or column vector, got ",
                v.rows(), " x ", v.cols());
  const Vector<T> cv = v.reshaped();
  Array a;
  a.dtype = dtype_of<T>();
  a.shape = {std::int64_t(cv.size())};
  a.bytes.resize(std::size_t(cv.size()) * sizeof(T));
  if (!a.bytes.empty()) std::memcpy(a.bytes.data(), cv.data(), a.bytes.size());
  return a;
}

/// Copies a rank-2 array into a row-major matrix; the dtype must be exactly
/// dtype_of<T>(). `name` labels the error messages.
template <class T>
RowMatrix<T> to_matrix(const Array& a, const std::string& name = "the array") {
  detail::check_typed<T>(a, 2, "npy::to_matrix", name);
  RowMatrix<T> m(Index(a.shape[0]), Index(a.shape[1]));
  if (!a.bytes.empty()) std::memcpy(m.data(), a.bytes.data(), a.bytes.size());
  return m;
}

/// Copies a rank-1 array into a column vector (same checks as to_matrix).
template <class T>
Vector<T> to_vector(const Array& a, const std::string& name = "the array") {
  detail::check_typed<T>(a, 1, "npy::to_vector", name);
  Vector<T> v(Index(a.shape[0]));
  if (!a.bytes.empty()) std::memcpy(v.data(), a.bytes.data(), a.bytes.size());
  return v;
}

/// A rank-2 float32, float16 or uint8 array as a float matrix (float16 and
/// uint8 widened exactly); other dtypes throw.
inline RowMatrix<float> to_float_matrix(const Array& a, const std::string& name = "the array") {
  const char* where = "npy::to_float_matrix";
  VQKIT_REQUIRE(a.dtype == DType::F32 || a.dtype == DType::F16 || a.dtype == DType::U8, where, name,
                " has dtype ", dtype_name(a.dtype), "; expected float32, float16 or uint8");
  VQKIT_REQUIRE(a.shape.size() == 2, where, name, " has shape ", detail::shape_repr(a.shape),
                ", expected rank 2 (rows, dim)");
  detail::check_array(a, where);
  RowMatrix<float> m(Index(a.shape[0]), Index(a.shape[1]));
  const std::size_t n = std::size_t(m.size());
  if (a.dtype == DType::F32) {
    if (n > 0) std::memcpy(m.data(), a.bytes.data(), n * 4);
  } else if (a.dtype == DType::F16) {
    widen_16bit(a.bytes.data(), n, false, m.data());
  } else {
    for (std::size_t i = 0; i < n; ++i) m.data()[i] = float(a.bytes[i]);
  }
  return m;
}

}  // namespace vqkit::npy
