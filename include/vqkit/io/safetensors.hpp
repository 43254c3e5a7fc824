// vqkit/io/safetensors.hpp - read and write the safetensors format.
//
// A safetensors file is: an 8-byte little-endian u64 header length H, then H
// bytes of UTF-8 JSON, then the raw little-endian data buffer. The JSON is
//   {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
//    ..., "__metadata__": {"key": "value", ...}}        (metadata optional)
// with offsets relative to the start of the data buffer.
//
// Guarantees:
//  - parse()/load() accept only well-formed files and throw vqkit::error,
//    naming the bad tensor or value, for anything else: a header length past
//    the end of the file or above 100 MB, invalid JSON or UTF-8, duplicate
//    keys (at any level), a non-object entry, missing or unknown fields, an
//    unknown dtype, negative or non-integer dims, a shape whose element count
//    overflows, offsets that are not [begin, end] with begin <= end <= buffer
//    size, a byte size other than product(shape) * dtype size, tensors that
//    overlap or leave gaps, trailing bytes after the last tensor, and
//    non-string metadata. No other exception escapes (short of
//    std::bad_alloc), and memory stays proportional to the input size.
//  - serialize()/save() write the keys in std::map order (deterministic
//    bytes), a compact JSON header padded with spaces so that the data starts
//    at an 8-byte aligned offset, and the tensors back to back in key order.
//    Every tensor is validated before anything is written.
//  - save() is atomic: it writes "<path>.tmp.<pid>" in the same directory,
//    flushes and fsyncs it, renames it over path and fsyncs the directory. On
//    any failure the previous file at path is left intact and the temporary
//    file is removed. (POSIX only.)
//  - Typed access (to_matrix<T> and friends) requires the stored dtype to
//    match T exactly; there are no silent conversions.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/io/atomic_file.hpp"

namespace vqkit::safetensors {

static_assert(std::endian::native == std::endian::little,
              "vqkit/io/safetensors.hpp assumes a little-endian host");

/// Every element type of the format. All of them parse (a PyTorch state dict
/// holds bool flags and half-precision tensors beside the one a program
/// wants); typed access (to_matrix<T> and friends) exists for those with a
/// C++ type: F32, F64 and the integers. F16 and BF16 are read through
/// io/codebook.hpp's exact widening to float; BOOL and the two 8-bit float
/// formats are carried as bytes only (a bool read from a byte other than 0
/// or 1 would be undefined behaviour).
enum class DType { F32, F64, I64, I32, U64, U8, F16, BF16, BOOL, I8, I16, U16, U32, F8_E5M2, F8_E4M3 };

/// All dtypes, in enum order.
inline constexpr DType all_dtypes[] = {DType::F32,  DType::F64, DType::I64,     DType::I32,
                                       DType::U64,  DType::U8,  DType::F16,     DType::BF16,
                                       DType::BOOL, DType::I8,  DType::I16,     DType::U16,
                                       DType::U32,  DType::F8_E5M2, DType::F8_E4M3};

/// Largest accepted JSON header, in bytes (the limit the reference
/// implementation uses).
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

/// Bytes per element.
constexpr std::size_t dtype_size(DType d) {
  switch (d) {
    case DType::F32:
      return 4;
    case DType::F64:
      return 8;
    case DType::I64:
      return 8;
    case DType::I32:
      return 4;
    case DType::U64:
      return 8;
    case DType::U8:
    case DType::BOOL:
    case DType::I8:
    case DType::F8_E5M2:
    case DType::F8_E4M3:
      return 1;
    case DType::F16:
    case DType::BF16:
    case DType::I16:
    case DType::U16:
      return 2;
    case DType::U32:
      return 4;
  }
  return 0;
}

/// The dtype's name in the file ("F32", ...).
inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::F32:
      return "F32";
    case DType::F64:
      return "F64";
    case DType::I64:
      return "I64";
    case DType::I32:
      return "I32";
    case DType::U64:
      return "U64";
    case DType::U8:
      return "U8";
    case DType::F16:
      return "F16";
    case DType::BF16:
      return "BF16";
    case DType::BOOL:
      return "BOOL";
    case DType::I8:
      return "I8";
    case DType::I16:
      return "I16";
    case DType::U16:
      return "U16";
    case DType::U32:
      return "U32";
    case DType::F8_E5M2:
      return "F8_E5M2";
    case DType::F8_E4M3:
      return "F8_E4M3";
  }
  return "?";
}

/// The dtype called name ("F32", ...); false for other names.
inline bool dtype_from_name(const std::string& name, DType& out) {
  for (DType d : all_dtypes) {
    if (name == dtype_name(d)) {
      out = d;
      return true;
    }
  }
  return false;
}

/// The dtype that stores C++ type T (float, double, and 8- to 64-bit
/// integers, whatever their spelling; not bool, see DType).
template <class T>
constexpr DType dtype_of() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) {
    return DType::F32;
  } else if constexpr (std::is_same_v<U, double>) {
    return DType::F64;
  } else if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool> && std::is_signed_v<U>) {
    static_assert(sizeof(U) == 1 || sizeof(U) == 2 || sizeof(U) == 4 || sizeof(U) == 8);
    return sizeof(U) == 8 ? DType::I64 : sizeof(U) == 4 ? DType::I32 : sizeof(U) == 2 ? DType::I16 : DType::I8;
  } else if constexpr (std::is_integral_v<U> && !std::is_same_v<U, bool> && std::is_unsigned_v<U>) {
    static_assert(sizeof(U) == 1 || sizeof(U) == 2 || sizeof(U) == 4 || sizeof(U) == 8);
    return sizeof(U) == 8 ? DType::U64 : sizeof(U) == 4 ? DType::U32 : sizeof(U) == 2 ? DType::U16 : DType::U8;
  } else {
    static_assert(sizeof(U) == 0, "safetensors: unsupported element type");
  }
}

/// One tensor: dtype, shape (empty for a scalar) and raw little-endian bytes,
/// row-major.
struct Tensor {
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;

  /// Number of elements: the product of shape (1 for a scalar). Throws if a
  /// dim is negative or the product overflows.
  std::int64_t numel() const;
};

/// A whole file: tensors and string metadata, each keyed in sorted order.
struct File {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;

  /// The tensor called name; throws vqkit::error naming it when absent.
  const Tensor& at(const std::string& name) const;
  bool contains(const std::string& name) const { return tensors.count(name) != 0; }

  /// Typed copies of the tensor called name (see to_matrix and friends).
  template <class T>
  RowMatrix<T> matrix(const std::string& name) const;
  template <class T>
  Vector<T> vector(const std::string& name) const;
  template <class T>
  T scalar(const std::string& name) const;
};

namespace detail {

/// Element count of shape, or throws naming `what` if a dim is negative or
/// the product exceeds int64.
inline std::int64_t checked_numel(const std::vector<std::int64_t>& shape, const char* where,
                                  const std::string& what) {
  std::int64_t n = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    const std::int64_t d = shape[i];
    VQKIT_REQUIRE(d >= 0, where, what, ": shape[", i, "] = ", d, " is negative");
    if (d != 0 && n > std::numeric_limits<std::int64_t>::max() / d)
      ::vqkit::detail::throw_error(where, what, ": the element count of the shape overflows");
    n *= d;
  }
  return n;
}

/// Byte size of a tensor of this shape and dtype, or throws on overflow.
inline std::uint64_t checked_nbytes(const std::vector<std::int64_t>& shape, DType dtype,
                                    const char* where, const std::string& what) {
  const auto n = static_cast<std::uint64_t>(checked_numel(shape, where, what));
  const std::uint64_t es = dtype_size(dtype);
  VQKIT_REQUIRE(n <= std::numeric_limits<std::uint64_t>::max() / es, where, what,
                ": the byte size of the shape overflows");
  return n * es;
}

/// s, cut to at most n bytes (hostile names and values stay short in messages).
inline std::string clip(std::string s, std::size_t n = 100) {
  if (s.size() > n) s = s.substr(0, n) + "...";
  return s;
}

/// A shape as "[2, 3]" (messages).
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

inline std::string tensor_label(const std::string& name) {
  return name.empty() ? std::string("tensor") : "tensor '" + clip(name) + "'";
}

/// Checks that t's bytes match its shape and that its dtype is T.
template <class T>
void check_typed(const Tensor& t, std::size_t rank, const char* where, const std::string& name) {
  const std::string what = tensor_label(name);
  VQKIT_REQUIRE(t.dtype == dtype_of<T>(), where, what, " has dtype ", dtype_name(t.dtype), ", but ",
                dtype_name(dtype_of<T>()), " was requested");
  VQKIT_REQUIRE(t.shape.size() == rank, where, what, " has rank ", t.shape.size(),
                ", expected rank ", rank);
  const std::uint64_t nbytes = checked_nbytes(t.shape, t.dtype, where, what);
  VQKIT_REQUIRE(t.bytes.size() == nbytes, where, what, " holds ", t.bytes.size(),
                " bytes, but its shape needs ", nbytes);
}

template <class T>
Tensor make_tensor(std::vector<std::int64_t> shape, const T* data, std::size_t count) {
  Tensor t;
  t.dtype = dtype_of<T>();
  t.shape = std::move(shape);
  t.bytes.resize(count * sizeof(T));
  if (count > 0) std::memcpy(t.bytes.data(), data, count * sizeof(T));
  return t;
}

}  // namespace detail

inline std::int64_t Tensor::numel() const {
  return detail::checked_numel(shape, "safetensors::Tensor::numel", "tensor");
}

// ---- typed construction and access ------------------------------------------

/// A rank-2 tensor [rows, cols] from any Eigen matrix expression (evaluated
/// row-major).
template <class Derived>
Tensor from_matrix(const Eigen::MatrixBase<Derived>& m) {
  using T = typename Derived::Scalar;
  const RowMatrix<T> rm = m;
  return detail::make_tensor<T>(
      {static_cast<std::int64_t>(rm.rows()), static_cast<std::int64_t>(rm.cols())}, rm.data(),
      static_cast<std::size_t>(rm.size()));
}

/// A rank-1 tensor [n] from an Eigen row or column vector.
template <class Derived>
Tensor from_vector(const Eigen::MatrixBase<Derived>& v) {
  using T = typename Derived::Scalar;
  VQKIT_REQUIRE(v.rows() == 1 || v.cols() == 1, "safetensors::from_vector",
                "expected a row or column vector, got ", v.rows(), " x ", v.cols());
  const Vector<T> cv = v.reshaped();
  return detail::make_tensor<T>({static_cast<std::int64_t>(cv.size())}, cv.data(),
                                static_cast<std::size_t>(cv.size()));
}

/// A rank-1 tensor [n] from a std::vector.
template <class T>
Tensor from_vector(const std::vector<T>& v) {
  return detail::make_tensor<T>({static_cast<std::int64_t>(v.size())}, v.data(), v.size());
}

/// A rank-0 tensor (shape []) holding one value.
template <class T>
Tensor from_scalar(T value) {
  return detail::make_tensor<T>({}, &value, 1);
}

/// Copies a rank-2 tensor into a row-major matrix; throws vqkit::error unless
/// the dtype is exactly dtype_of<T>() and the rank is 2. `name` only labels
/// the error messages.
template <class T>
RowMatrix<T> to_matrix(const Tensor& t, const std::string& name = "") {
  detail::check_typed<T>(t, 2, "safetensors::to_matrix", name);
  RowMatrix<T> m(static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1]));
  if (!t.bytes.empty()) std::memcpy(m.data(), t.bytes.data(), t.bytes.size());
  return m;
}

/// Copies a rank-1 tensor into a column vector (same checks as to_matrix).
template <class T>
Vector<T> to_vector(const Tensor& t, const std::string& name = "") {
  detail::check_typed<T>(t, 1, "safetensors::to_vector", name);
  Vector<T> v(static_cast<Index>(t.shape[0]));
  if (!t.bytes.empty()) std::memcpy(v.data(), t.bytes.data(), t.bytes.size());
  return v;
}

/// Reads a rank-0 tensor (shape []) (same checks as to_matrix).
template <class T>
T to_scalar(const Tensor& t, const std::string& name = "") {
  detail::check_typed<T>(t, 0, "safetensors::to_scalar", name);
  T value;
  std::memcpy(&value, t.bytes.data(), sizeof(T));
  return value;
}

inline const Tensor& File::at(const std::string& name) const {
  const auto it = tensors.find(name);
  VQKIT_REQUIRE(it != tensors.end(), "safetensors::File::at", "no tensor named '", name, "'");
  return it->second;
}
template <class T>
RowMatrix<T> File::matrix(const std::string& name) const {
  return to_matrix<T>(at(name), name);
}
template <class T>
Vector<T> File::vector(const std::string& name) const {
  return to_vector<T>(at(name), name);
}
template <class T>
T File::scalar(const std::string& name) const {
  return to_scalar<T>(at(name), name);
}

// ---- header parsing -----------------------------------------------------------

namespace detail {

/// A validated header: tensors (bytes not yet filled) with their data
/// offsets, sorted by offset.
struct Header {
  struct Entry {
    std::string name;
    std::uint64_t begin = 0, end = 0;
  };
  File file;                   // tensors have dtype and shape, empty bytes
  std::vector<Entry> entries;  // sorted by (begin, end); contiguous from 0
};

inline std::uint64_t read_u64_le(const std::uint8_t* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

/// Parses JSON, rejecting duplicate keys at any level, nesting deeper than
/// the format needs and arrays longer than any shape could be.
inline nlohmann::json parse_json_strict(const std::uint8_t* data, std::size_t size,
                                        const char* where) {
  constexpr std::size_t max_depth = 3;       // root -> entry -> shape/offsets
  constexpr std::size_t max_array_len = 64;  // longest accepted shape
  struct Frame {
    bool is_object;
    std::set<std::string> keys;
    std::size_t count = 0;
  };
  std::vector<Frame> stack;
  auto count_element = [&]() {
    if (!stack.empty() && !stack.back().is_object)
      VQKIT_REQUIRE(++stack.back().count <= max_array_len, where,
                    "header has an array with more than ", max_array_len, " elements");
  };
  auto enter = [&](bool is_object) {
    count_element();
    VQKIT_REQUIRE(stack.size() < max_depth, where, "header JSON is nested deeper than ", max_depth,
                  " levels");
    stack.push_back(Frame{is_object, {}, 0});
  };
  nlohmann::json::parser_callback_t cb = [&](int, nlohmann::json::parse_event_t ev,
                                             nlohmann::json& parsed) -> bool {
    using E = nlohmann::json::parse_event_t;
    switch (ev) {
      case E::object_start:
        enter(true);
        break;
      case E::array_start:
        enter(false);
        break;
      case E::object_end:
      case E::array_end:
        if (!stack.empty()) stack.pop_back();
        break;
      case E::key: {
        const auto& k = parsed.get_ref<const std::string&>();
        VQKIT_REQUIRE(!stack.empty() && stack.back().keys.insert(k).second, where,
                      "header has the key \"", clip(k), "\" twice in one object");
        break;
      }
      case E::value:
        count_element();
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(data, data + size, cb, /*allow_exceptions=*/true,
                                 /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    // nlohmann quotes the whole token it last read ("last read: '...'"),
    // which a hostile header can make as long as itself: keep the position
    // and reason at the start and the expectation at the end.
    std::string msg = e.what();
    if (msg.size() > 400) msg = msg.substr(0, 300) + " ... " + msg.substr(msg.size() - 80);
    ::vqkit::detail::throw_error(where, "header is not valid JSON: ", msg);
  }
}

/// A non-negative integer from a JSON number (no floats, no booleans).
inline std::uint64_t json_uint(const nlohmann::json& v, const char* where,
                               const std::string& what) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer()) {
    const auto s = v.get<std::int64_t>();
    VQKIT_REQUIRE(s >= 0, where, what, " = ", s, " is negative");
    return static_cast<std::uint64_t>(s);
  }
  ::vqkit::detail::throw_error(where, what, " must be a non-negative integer, got ",
                               clip(v.dump()));
}

/// Validates the JSON header against a data buffer of buffer_size bytes.
inline Header parse_header(const std::uint8_t* json_data, std::size_t json_size,
                           std::uint64_t buffer_size, const char* where) {
  const nlohmann::json j = parse_json_strict(json_data, json_size, where);
  VQKIT_REQUIRE(j.is_object(), where, "header must be a JSON object, got ", j.type_name());

  Header h;
  for (const auto& [name, entry] : j.items()) {
    if (name == "__metadata__") {
      VQKIT_REQUIRE(entry.is_object(), where, "__metadata__ must be an object, got ",
                    entry.type_name());
      for (const auto& [k, v] : entry.items()) {
        VQKIT_REQUIRE(v.is_string(), where, "__metadata__[\"", clip(k),
                      "\"] must be a string, got ", clip(v.dump()));
        h.file.metadata.emplace(k, v.get<std::string>());
      }
      continue;
    }
    const std::string what = tensor_label(name);
    VQKIT_REQUIRE(entry.is_object(), where, what, " must be an object, got ", clip(entry.dump()));
    for (const auto& [k, v] : entry.items()) {
      (void)v;
      VQKIT_REQUIRE(k == "dtype" || k == "shape" || k == "data_offsets", where, what,
                    " has the unknown field \"", clip(k), "\"");
    }
    VQKIT_REQUIRE(
        entry.contains("dtype") && entry.contains("shape") && entry.contains("data_offsets"), where,
        what, " needs the fields dtype, shape and data_offsets");

    Tensor t;
    const auto& dt = entry["dtype"];
    VQKIT_REQUIRE(dt.is_string(), where, what, ": dtype must be a string, got ", clip(dt.dump()));
    VQKIT_REQUIRE(dtype_from_name(dt.get<std::string>(), t.dtype), where, what,
                  ": unsupported dtype ", clip(dt.dump()),
                  " (supported: F32, F64, I64, I32, U64, U8)");

    const auto& sh = entry["shape"];
    VQKIT_REQUIRE(sh.is_array(), where, what, ": shape must be an array, got ", clip(sh.dump()));
    for (std::size_t i = 0; i < sh.size(); ++i) {
      const std::string dim = what + ": shape[" + std::to_string(i) + "]";
      const std::uint64_t d = json_uint(sh[i], where, dim);
      VQKIT_REQUIRE(d <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                    where, dim, " = ", d, " is too large");
      t.shape.push_back(static_cast<std::int64_t>(d));
    }
    const std::uint64_t nbytes = checked_nbytes(t.shape, t.dtype, where, what);

    const auto& off = entry["data_offsets"];
    VQKIT_REQUIRE(off.is_array() && off.size() == 2, where, what,
                  ": data_offsets must be [begin, end], got ", clip(off.dump()));
    const std::uint64_t begin = json_uint(off[0], where, what + ": data_offsets[0]");
    const std::uint64_t end = json_uint(off[1], where, what + ": data_offsets[1]");
    VQKIT_REQUIRE(begin <= end && end <= buffer_size, where, what, ": data_offsets [", begin, ", ",
                  end, "] must satisfy begin <= end <= ", buffer_size, " (the data buffer size)");
    VQKIT_REQUIRE(end - begin == nbytes, where, what, ": data_offsets [", begin, ", ", end,
                  "] span ", end - begin, " bytes, but dtype ", dtype_name(t.dtype),
                  " and its shape need ", nbytes);

    h.file.tensors.emplace(name, std::move(t));
    h.entries.push_back({name, begin, end});
  }

  std::sort(h.entries.begin(), h.entries.end(), [](const auto& a, const auto& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t pos = 0;
  const std::string* prev = nullptr;
  for (const auto& e : h.entries) {
    VQKIT_REQUIRE(e.begin >= pos, where, tensor_label(e.name), " overlaps ",
                  tensor_label(prev ? *prev : std::string()), " (data_offsets start at ", e.begin,
                  ", before ", pos, ")");
    VQKIT_REQUIRE(e.begin == pos, where, "the data buffer has a gap of ", e.begin - pos,
                  " bytes before ", tensor_label(e.name));
    pos = e.end;
    prev = &e.name;
  }
  VQKIT_REQUIRE(pos == buffer_size, where, "the data buffer has ", buffer_size - pos,
                " bytes after the last tensor");
  return h;
}

}  // namespace detail

// ---- in-memory format -----------------------------------------------------------

/// The bytes of a safetensors file holding f. Throws vqkit::error (before
/// producing anything) if a tensor's bytes do not match its shape and dtype,
/// a dim is negative, a name is "__metadata__", or a name or metadata string
/// is not valid UTF-8.
inline std::vector<std::uint8_t> serialize(const File& f) {
  const char* where = "safetensors::serialize";
  nlohmann::json header = nlohmann::json::object();
  std::uint64_t pos = 0;
  for (const auto& [name, t] : f.tensors) {
    const std::string what = detail::tensor_label(name);
    VQKIT_REQUIRE(name != "__metadata__", where,
                  "\"__metadata__\" is reserved and cannot name a tensor");
    const std::uint64_t nbytes = detail::checked_nbytes(t.shape, t.dtype, where, what);
    VQKIT_REQUIRE(t.bytes.size() == nbytes, where, what, " holds ", t.bytes.size(),
                  " bytes, but dtype ", dtype_name(t.dtype), " and its shape need ", nbytes);
    header[name] = {
        {"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {pos, pos + nbytes}}};
    pos += nbytes;
  }
  if (!f.metadata.empty()) header["__metadata__"] = f.metadata;

  std::string text;
  try {
    text = header.dump();  // compact; throws on invalid UTF-8
  } catch (const nlohmann::json::exception& e) {
    ::vqkit::detail::throw_error(where, "a tensor name or metadata string is not valid UTF-8 (",
                                 e.what(), ")");
  }
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  VQKIT_REQUIRE(text.size() <= max_header_bytes, where, "header of ", text.size(),
                " bytes exceeds the ", max_header_bytes, "-byte limit");

  std::vector<std::uint8_t> out(8 + text.size() + pos);
  const std::uint64_t hlen = text.size();
  std::memcpy(out.data(), &hlen, 8);
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::uint8_t* p = out.data() + 8 + text.size();
  for (const auto& [name, t] : f.tensors) {
    if (!t.bytes.empty()) std::memcpy(p, t.bytes.data(), t.bytes.size());
    p += t.bytes.size();
  }
  return out;
}

/// Parses a whole safetensors file held in memory; throws vqkit::error for
/// anything malformed (see the top of this file). Safe on hostile input.
inline File parse(const std::uint8_t* data, std::size_t size) {
  const char* where = "safetensors::parse";
  VQKIT_REQUIRE(data != nullptr || size == 0, where, "null data");
  VQKIT_REQUIRE(size >= 8, where, "input of ", size, " bytes is too short for the header length");
  const std::uint64_t hlen = detail::read_u64_le(data);
  VQKIT_REQUIRE(hlen <= max_header_bytes, where, "header length ", hlen, " exceeds the ",
                max_header_bytes, "-byte limit");
  VQKIT_REQUIRE(hlen <= size - 8, where, "header length ", hlen, " runs past the end of the ", size,
                "-byte input");
  const std::uint64_t buffer_size = size - 8 - hlen;
  detail::Header h =
      detail::parse_header(data + 8, static_cast<std::size_t>(hlen), buffer_size, where);
  const std::uint8_t* buf = data + 8 + hlen;
  for (const auto& e : h.entries) {
    auto& bytes = h.file.tensors.at(e.name).bytes;
    bytes.assign(buf + e.begin, buf + e.end);
  }
  return std::move(h.file);
}

inline File parse(const std::vector<std::uint8_t>& bytes) {
  return parse(bytes.data(), bytes.size());
}

// ---- files ------------------------------------------------------------------------

/// Reads and validates the file at path (see parse). Reads tensors straight
/// into their buffers, so memory is about the file size.
inline File load(const std::string& path) {
  const std::string where_s = "safetensors::load('" + path + "')";
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

  VQKIT_REQUIRE(size >= 8, where, "file of ", size, " bytes is too short for the header length");
  std::uint8_t len_bytes[8];
  read_exact(len_bytes, 8);
  const std::uint64_t hlen = detail::read_u64_le(len_bytes);
  VQKIT_REQUIRE(hlen <= max_header_bytes, where, "header length ", hlen, " exceeds the ",
                max_header_bytes, "-byte limit");
  VQKIT_REQUIRE(hlen <= size - 8, where, "header length ", hlen, " runs past the end of the ", size,
                "-byte file");
  std::vector<std::uint8_t> json(static_cast<std::size_t>(hlen));
  read_exact(json.data(), hlen);
  detail::Header h = detail::parse_header(json.data(), json.size(), size - 8 - hlen, where);
  json = {};
  // Entries are contiguous from offset 0, so the data is read in one pass.
  for (const auto& e : h.entries) {
    auto& bytes = h.file.tensors.at(e.name).bytes;
    bytes.resize(static_cast<std::size_t>(e.end - e.begin));
    read_exact(bytes.data(), bytes.size());
  }
  return std::move(h.file);
}

namespace detail {
using ::vqkit::io::detail::write_file_atomic;
}  // namespace detail

/// Writes f to path atomically: validate and serialize in memory, write
/// "<path>.tmp.<pid>", fsync, rename over path, fsync the directory. Throws
/// vqkit::error on any failure, leaving an existing file at path intact and
/// no temporary file behind.
inline void save(const std::string& path, const File& f) {
  const std::string where = "safetensors::save('" + path + "')";
  std::vector<std::uint8_t> bytes;
  try {
    bytes = serialize(f);
  } catch (const error& e) {
    ::vqkit::detail::throw_error(where.c_str(), e.what());
  }
  detail::write_file_atomic(path, bytes, where.c_str());
}

}  // namespace vqkit::safetensors
