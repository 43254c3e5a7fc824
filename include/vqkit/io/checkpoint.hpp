// vqkit/io/checkpoint.hpp - save and load the complete state of a
// VectorQuantizer as a safetensors file.
//
// A checkpoint holds everything VectorQuantizer::state() returns, so a run
// resumed from it continues bit-identically (same codes, same EMA sums, same
// dead-code decisions, same random draws), and it is a plain safetensors
// file: PyTorch (safetensors.torch.load_file), numpy (safetensors.numpy) and
// any other reader see the codebook as an ordinary [K, D] tensor.
//
//   save_checkpoint(path, vq [, extra_metadata])   atomic (safetensors::save)
//   load_checkpoint(path, vq)                      into a quantizer of the same config
//   load_quantizer<T>(path [, backend])            a new quantizer built from the file's config
//   to_safetensors(vq [, extra_metadata]) / from_safetensors(file, vq)   in memory
//   config_to_metadata(cfg) / config_from_metadata(metadata)
//
// Tensors (T = float -> F32, T = double -> F64; K = codebook_size, D = dim,
// C = config.bank_rows(), the memory-bank capacity; [] is a scalar):
//   "codebook"                [K, D]  T    the codes e_k, row-major
//   "codebook_grad"           [K, D]  T    accumulated codebook gradient (zeros under EMA)
//   "ema.cluster_size"        [K]     T    EMA cluster sizes N_k
//   "ema.embed_sum"           [K, D]  T    EMA sums M_k
//   "usage.steps_since_used"  [K]     I64  steps since each code was last picked
//   "usage.used_since_reset"  [K]     I64  1 if picked since its last (re)initialisation, else 0
//   "memory_bank.rows"        [C, D]  T    the ring buffer's storage; rows at and past
//                                          memory_bank.size are unused, written as zeros
//   "memory_bank.size"        []      I64  rows held
//   "memory_bank.head"        []      I64  next row to write
//   "memory_bank.overflow"    []      I64  rows dropped because a batch exceeded the bank
//   "rng.state"               [4]     U64  xoshiro256** state words
//   "step", "reinits", "replaced", "skipped"
//                             []      I64  training steps, k-means re-inits, replaced codes,
//                                          skipped non-finite batches
//   "data_initialized", "init_refined", "training"   []  I64  flags, 0 or 1
//   "last_init_step"          []      I64  step count at the last k-means (re)init
//                                          (absent in older files: read as 0)
//
// "__metadata__" (all values are strings):
//   "format": "vqkit.quantizer", "version": "1", "scalar": "float32" | "float64",
//   and every field of VectorQuantizerConfig, nested ones with a dotted prefix:
//   codebook_size, dim, metric, update, ema.decay, ema.eps, ema.warmup_decay,
//   ema.warmup_steps, loss.codebook_weight, loss.commitment_weight,
//   loss.reduction, dead.policy, dead.dead_after, dead.check_every,
//   dead.min_steps, dead.max_dead_fraction, dead.replace_threshold,
//   dead.reinit_below_usage, dead.replace_after, dead.replace_from_steps, init,
//   kmeans_iterations, kmeans_min_cluster_fraction, memory_bank_size, init_min_rows,
//   refine_init, usage_window, non_finite, seed, search.metric,
//   search.row_block, search.code_block, search_precision ("fp32" or
//   "bf16_rerank"; a checkpoint written before this key existed loads as
//   "fp32", and one written before issue 16's ema.warmup_*,
//   dead.reinit_below_usage, dead.replace_after and dead.replace_from_steps
//   with those features off, see legacy_default()), gradient_estimator
//   ("straight_through" or "rotation"; absent in older files: straight_through).
//   Integers are decimal, booleans "true"/"false", enums their to_string()
//   names ("l2", "ema", "kmeans_reinit", "reject", ...), doubles the shortest decimal
//   that reads back to the same double (std::to_chars; at most max_digits10
//   significant digits, so "0.25" and "0.99" stay as written). Fields keep
//   their raw values: memory_bank_size "0" means the default 20 * K.
//   Caller-supplied extra_metadata is stored alongside; it may not reuse any
//   of these keys.
//
// Loading checks, in order: format and version; that the checkpoint's config
// equals the quantizer's (every key above; values are compared after parsing,
// so "0.250" equals "0.25"), naming the first key that differs; that the
// scalar type is T; then every tensor's presence, dtype and shape, and the
// values (finite floats, counters >= 0, flags 0 or 1, bank size/head within
// the capacity, a non-zero RNG state). The whole State is built first and
// handed to set_state() once, so on any failure a vqkit::error is thrown and
// the quantizer is left exactly as it was. Extra tensors and extra metadata
// keys in the file are ignored.
#pragma once

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/io/safetensors.hpp"
#include "vqkit/layers/vector_quantizer.hpp"

namespace vqkit {

/// The checkpoint format's "format" and "version" metadata values.
inline constexpr const char* checkpoint_format = "vqkit.quantizer";
inline constexpr const char* checkpoint_version = "1";

namespace detail::ckpt {

// ---- completeness guards --------------------------------------------------------

/// Converts to anything; only used unevaluated, to count an aggregate's fields.
struct any_field {
  template <class U>
  operator U() const;
};

/// The number of direct members of aggregate A (the largest N for which
/// A{x1, ..., xN} is well-formed).
template <class A, class... Fields>
constexpr std::size_t field_count() {
  if constexpr (requires { A{Fields{}..., any_field{}}; }) {
    return field_count<A, Fields..., any_field>();
  } else {
    return sizeof...(Fields);
  }
}

// A checkpoint must hold the complete config and state: a new field fails
// these until visit_config(), build() and restore() below (and the list at
// the top of this file) cover it.
static_assert(field_count<VectorQuantizerConfig>() == 19 && field_count<EmaOptions>() == 4 &&
                  field_count<LossOptions>() == 3 && field_count<DeadCodeOptions>() == 9 &&
                  field_count<SearchOptions>() == 3,
              "VectorQuantizerConfig changed: update visit_config() in vqkit/layers/vector_quantizer.hpp");
template <class State>
constexpr bool state_covered = field_count<State>() == 18;

// ---- config <-> strings -------------------------------------------------------

// visit_config (vector_quantizer.hpp) lists the config's fields once for
// the checkpoint keys here, the validation messages, the data-parallel
// fingerprint and the JSON form (io/config_json.hpp).
using ::vqkit::visit_config;

/// Config keys added after version 1's first release, with the value a
/// checkpoint written before them had (it is loaded as that); nullptr for
/// the original keys, which a checkpoint must hold.
inline const char* legacy_default(const std::string& key) {
  if (key == "search_precision") return "fp32";
  if (key == "gradient_estimator") return "straight_through";
  // Issue 16's moving-encoder fields: off in a checkpoint written before them.
  if (key == "ema.warmup_decay") return "0.8";
  if (key == "ema.warmup_steps" || key == "dead.reinit_below_usage" ||
      key == "dead.replace_after" || key == "dead.replace_from_steps")
    return "0";
  return nullptr;
}

/// The stored value of a config key, or its legacy default when a
/// checkpoint written before the key lacks it; nullopt when it is missing.
inline std::optional<std::string> stored_value(const std::map<std::string, std::string>& metadata,
                                               const std::string& key) {
  const auto it = metadata.find(key);
  if (it != metadata.end()) return it->second;
  if (const char* legacy = legacy_default(key)) return std::string(legacy);
  return std::nullopt;
}

template <class E>
constexpr auto enum_values() {
  if constexpr (std::is_same_v<E, Metric>) {
    return std::array<E, 2>{Metric::l2, Metric::cosine};
  } else if constexpr (std::is_same_v<E, CodebookUpdate>) {
    return std::array<E, 2>{CodebookUpdate::ema, CodebookUpdate::gradient};
  } else if constexpr (std::is_same_v<E, Reduction>) {
    return std::array<E, 2>{Reduction::mean, Reduction::sum_over_dim};
  } else if constexpr (std::is_same_v<E, DeadCodePolicy>) {
    return std::array<E, 3>{DeadCodePolicy::none, DeadCodePolicy::kmeans_reinit,
                            DeadCodePolicy::replace};
  } else if constexpr (std::is_same_v<E, InitMethod>) {
    return std::array<E, 2>{InitMethod::kmeans, InitMethod::normalized};
  } else if constexpr (std::is_same_v<E, NonFinitePolicy>) {
    return std::array<E, 2>{NonFinitePolicy::reject, NonFinitePolicy::skip};
  } else if constexpr (std::is_same_v<E, Precision>) {
    return std::array<E, 2>{Precision::fp32, Precision::bf16_rerank};
  } else if constexpr (std::is_same_v<E, GradientEstimator>) {
    return std::array<E, 2>{GradientEstimator::straight_through, GradientEstimator::rotation};
  } else {
    static_assert(sizeof(E) == 0, "checkpoint: unknown config enum");
  }
}

/// An enum value's name in the metadata (to_string() where vqkit has one).
template <class E>
std::string enum_name(E e) {
  if constexpr (std::is_same_v<E, NonFinitePolicy>) {
    return e == NonFinitePolicy::reject ? "reject" : "skip";
  } else {
    return to_string(e);
  }
}

template <class V>
std::string format_value(const V& v) {
  if constexpr (std::is_same_v<V, bool>) {
    return v ? "true" : "false";
  } else if constexpr (std::is_enum_v<V>) {
    return enum_name(v);
  } else {
    char buf[64];
    const auto r = std::to_chars(buf, buf + sizeof buf, v);  // doubles: shortest round trip
    return std::string(buf, r.ptr);
  }
}

/// Parses s as a V (the whole string, nothing else); false if it is not one.
template <class V>
bool parse_value(const std::string& s, V& out) {
  if constexpr (std::is_same_v<V, bool>) {
    if (s != "true" && s != "false") return false;
    out = s == "true";
    return true;
  } else if constexpr (std::is_enum_v<V>) {
    for (V e : enum_values<V>()) {
      if (s == enum_name(e)) {
        out = e;
        return true;
      }
    }
    return false;
  } else {
    V v{};
    const char* end = s.data() + s.size();
    const auto r = std::from_chars(s.data(), end, v);
    if (s.empty() || r.ec != std::errc() || r.ptr != end) return false;
    out = v;
    return true;
  }
}

template <class V>
const char* value_kind() {
  if constexpr (std::is_same_v<V, bool>) {
    return "true or false";
  } else if constexpr (std::is_enum_v<V>) {
    return "a known name";
  } else if constexpr (std::is_floating_point_v<V>) {
    return "a number";
  } else {
    return "an integer";
  }
}

/// The config as (key, value) pairs in declaration order.
inline std::vector<std::pair<std::string, std::string>> config_entries(
    const VectorQuantizerConfig& c) {
  std::vector<std::pair<std::string, std::string>> out;
  visit_config(c, [&](const FieldKey& key, const auto& v) { out.emplace_back(key.str(), format_value(v)); });
  return out;
}

/// Keys that save_checkpoint writes itself.
inline bool reserved_key(const std::string& key) {
  if (key == "format" || key == "version" || key == "scalar") return true;
  bool hit = false;
  VectorQuantizerConfig c;
  visit_config(c, [&](const FieldKey& k, const auto&) { hit = hit || k == key; });
  return hit;
}

template <class T>
const char* scalar_name() {
  if constexpr (std::is_same_v<T, float>) {
    return "float32";
  } else if constexpr (std::is_same_v<T, double>) {
    return "float64";
  } else {
    static_assert(sizeof(T) == 0, "checkpoint: the quantizer's scalar must be float or double");
  }
}

// ---- building and reading the file -------------------------------------------

using safetensors::detail::shape_string;

inline std::string meta_or(const safetensors::File& f, const std::string& key,
                           const std::string& fallback) {
  const auto it = f.metadata.find(key);
  return it == f.metadata.end() ? fallback : it->second;
}

/// The tensor called name, checked for dtype V and the expected shape.
template <class V>
const safetensors::Tensor& typed_tensor(const safetensors::File& f, const std::string& name,
                                        const std::vector<std::int64_t>& shape,
                                        const std::string& where) {
  const auto it = f.tensors.find(name);
  VQKIT_REQUIRE(it != f.tensors.end(), where.c_str(), "the checkpoint has no tensor '", name,
                "'");
  const safetensors::Tensor& t = it->second;
  constexpr auto want = safetensors::dtype_of<V>();
  VQKIT_REQUIRE(t.dtype == want, where.c_str(), "tensor '", name, "' has dtype ",
                safetensors::dtype_name(t.dtype), ", expected ", safetensors::dtype_name(want));
  VQKIT_REQUIRE(t.shape == shape, where.c_str(), "tensor '", name, "' has shape ",
                shape_string(t.shape), ", expected ", shape_string(shape));
  VQKIT_REQUIRE(t.bytes.size() == static_cast<std::size_t>(t.numel()) * sizeof(V), where.c_str(),
                "tensor '", name, "' holds ", t.bytes.size(), " bytes, but its shape needs ",
                static_cast<std::size_t>(t.numel()) * sizeof(V));
  return t;
}

template <class V>
RowMatrix<V> read_matrix(const safetensors::File& f, const std::string& name, Index rows,
                         Index cols, const std::string& where) {
  const std::vector<std::int64_t> shape{static_cast<std::int64_t>(rows),
                                        static_cast<std::int64_t>(cols)};
  return safetensors::to_matrix<V>(typed_tensor<V>(f, name, shape, where), name);
}

template <class V>
Vector<V> read_vector(const safetensors::File& f, const std::string& name, Index n,
                      const std::string& where) {
  const std::vector<std::int64_t> shape{static_cast<std::int64_t>(n)};
  return safetensors::to_vector<V>(typed_tensor<V>(f, name, shape, where), name);
}

inline std::int64_t read_i64(const safetensors::File& f, const std::string& name,
                             const std::string& where) {
  return safetensors::to_scalar<std::int64_t>(typed_tensor<std::int64_t>(f, name, {}, where),
                                              name);
}

inline bool read_flag(const safetensors::File& f, const std::string& name,
                      const std::string& where) {
  const std::int64_t v = read_i64(f, name, where);
  VQKIT_REQUIRE(v == 0 || v == 1, where.c_str(), "'", name, "' must be 0 or 1, got ", v);
  return v == 1;
}

template <class Derived>
void require_finite_values(const Eigen::DenseBase<Derived>& m, const std::string& where,
                           const std::string& name) {
  VQKIT_REQUIRE(m.allFinite(), where.c_str(), "tensor '", name, "' holds a non-finite value");
}

template <class T, class B>
safetensors::File build(const VectorQuantizer<T, B>& vq,
                        const std::map<std::string, std::string>& extra_metadata,
                        const std::string& where) {
  static_assert(state_covered<typename VectorQuantizer<T, B>::State>,
                "VectorQuantizer::State changed: update build() and restore() in "
                "vqkit/io/checkpoint.hpp");
  for (const auto& [key, value] : extra_metadata) {
    (void)value;
    VQKIT_REQUIRE(!reserved_key(key), where.c_str(), "extra_metadata key '",
                  safetensors::detail::clip(key), "' is reserved for the checkpoint format");
  }
  const auto s = vq.state();
  safetensors::File f;
  auto& t = f.tensors;
  t["codebook"] = safetensors::from_matrix(s.codes);
  t["codebook_grad"] = safetensors::from_matrix(s.grad);
  t["ema.cluster_size"] = safetensors::from_vector(s.ema.cluster_size);
  t["ema.embed_sum"] = safetensors::from_matrix(s.ema.embed_sum);
  t["usage.steps_since_used"] = safetensors::from_vector(s.steps_since_used);
  t["usage.used_since_reset"] = safetensors::from_vector(s.used_since_reset);
  {
    // Rows past the bank's size are never read: store them as zeros, so the
    // file's bytes depend on the state only.
    RowMatrix<T> bank = RowMatrix<T>::Zero(s.bank.rows(), s.bank.cols());
    const Index n = std::clamp<Index>(s.bank_size, 0, s.bank.rows());
    bank.topRows(n) = s.bank.topRows(n);
    t["memory_bank.rows"] = safetensors::from_matrix(bank);
  }
  t["memory_bank.size"] = safetensors::from_scalar<std::int64_t>(s.bank_size);
  t["memory_bank.head"] = safetensors::from_scalar<std::int64_t>(s.bank_head);
  t["memory_bank.overflow"] = safetensors::from_scalar<std::int64_t>(s.bank_overflow);
  t["rng.state"] = safetensors::from_vector(std::vector<std::uint64_t>(s.rng.begin(), s.rng.end()));
  t["step"] = safetensors::from_scalar<std::int64_t>(s.step);
  t["reinits"] = safetensors::from_scalar<std::int64_t>(s.reinits);
  t["replaced"] = safetensors::from_scalar<std::int64_t>(s.replaced);
  t["skipped"] = safetensors::from_scalar<std::int64_t>(s.skipped);
  t["data_initialized"] = safetensors::from_scalar<std::int64_t>(s.data_initialized ? 1 : 0);
  t["init_refined"] = safetensors::from_scalar<std::int64_t>(s.init_refined ? 1 : 0);
  t["training"] = safetensors::from_scalar<std::int64_t>(s.training ? 1 : 0);
  t["last_init_step"] = safetensors::from_scalar<std::int64_t>(s.last_init_step);

  f.metadata = extra_metadata;
  for (auto& [key, value] : config_entries(vq.config())) f.metadata[key] = std::move(value);
  f.metadata["format"] = checkpoint_format;
  f.metadata["version"] = checkpoint_version;
  f.metadata["scalar"] = scalar_name<T>();
  return f;
}

/// Format and version; throws unless f is a vqkit quantizer checkpoint this
/// code reads.
inline void check_format(const safetensors::File& f, const std::string& where) {
  const std::string format = meta_or(f, "format", "");
  VQKIT_REQUIRE(format == checkpoint_format, where.c_str(),
                "not a vqkit quantizer checkpoint (metadata 'format' is ",
                format.empty() ? std::string("missing")
                               : "'" + safetensors::detail::clip(format) + "'",
                ", expected '", checkpoint_format, "')");
  const std::string version = meta_or(f, "version", "");
  VQKIT_REQUIRE(version == checkpoint_version, where.c_str(), "unsupported checkpoint version ",
                version.empty() ? std::string("(missing)")
                                : "'" + safetensors::detail::clip(version) + "'",
                "; this vqkit reads version ", checkpoint_version);
}

/// Throws, naming the first differing key, unless the checkpoint's config
/// equals cfg. Values compare after parsing, so equivalent spellings of a
/// number match.
inline void check_config(const safetensors::File& f, const VectorQuantizerConfig& cfg,
                         const std::string& where) {
  visit_config(cfg, [&](const FieldKey& k, const auto& mine) {
    const std::string key = k.str();
    using V = std::decay_t<decltype(mine)>;
    const std::string mine_s = format_value(mine);
    const auto stored = stored_value(f.metadata, key);
    VQKIT_REQUIRE(stored.has_value(), where.c_str(), "the checkpoint's metadata lacks the config key '",
                  key, "' (this quantizer has ", mine_s, ")");
    const std::string& raw = *stored;
    if (raw == mine_s) return;
    V theirs{};
    const bool same = parse_value(raw, theirs) && format_value(theirs) == mine_s;
    VQKIT_REQUIRE(same, where.c_str(), key, " is ", safetensors::detail::clip(raw),
                  " in the checkpoint but ", mine_s, " in this quantizer");
  });
}

/// Builds the complete State from f and hands it to vq.set_state() once.
template <class T, class B>
void restore(const safetensors::File& f, VectorQuantizer<T, B>& vq, const std::string& where) {
  static_assert(state_covered<typename VectorQuantizer<T, B>::State>,
                "VectorQuantizer::State changed: update build() and restore() in "
                "vqkit/io/checkpoint.hpp");
  check_format(f, where);
  const VectorQuantizerConfig& cfg = vq.config();
  check_config(f, cfg, where);
  const std::string scalar = meta_or(f, "scalar", "");
  VQKIT_REQUIRE(scalar == scalar_name<T>(), where.c_str(), "the checkpoint holds ",
                scalar.empty() ? std::string("(missing scalar type)")
                               : safetensors::detail::clip(scalar),
                " tensors, but this quantizer uses ", scalar_name<T>());

  const Index K = cfg.codebook_size, D = cfg.dim, C = cfg.bank_rows();
  typename VectorQuantizer<T, B>::State s;
  s.codes = read_matrix<T>(f, "codebook", K, D, where);
  s.grad = read_matrix<T>(f, "codebook_grad", K, D, where);
  s.ema.cluster_size = read_vector<T>(f, "ema.cluster_size", K, where);
  s.ema.embed_sum = read_matrix<T>(f, "ema.embed_sum", K, D, where);
  s.steps_since_used = read_vector<std::int64_t>(f, "usage.steps_since_used", K, where);
  s.used_since_reset = read_vector<std::int64_t>(f, "usage.used_since_reset", K, where);
  s.bank = read_matrix<T>(f, "memory_bank.rows", C, D, where);
  s.bank_size = read_i64(f, "memory_bank.size", where);
  s.bank_head = read_i64(f, "memory_bank.head", where);
  s.bank_overflow = read_i64(f, "memory_bank.overflow", where);
  const Vector<std::uint64_t> rng = read_vector<std::uint64_t>(f, "rng.state", 4, where);
  for (Index i = 0; i < 4; ++i) s.rng[static_cast<std::size_t>(i)] = rng[i];
  s.step = read_i64(f, "step", where);
  s.reinits = read_i64(f, "reinits", where);
  s.replaced = read_i64(f, "replaced", where);
  s.skipped = read_i64(f, "skipped", where);
  s.data_initialized = read_flag(f, "data_initialized", where);
  s.init_refined = read_flag(f, "init_refined", where);
  s.training = read_flag(f, "training", where);
  // Added with issue 16's health trigger; a checkpoint written before it
  // loads as if its last k-means init happened at step 0.
  s.last_init_step = f.tensors.count("last_init_step") ? read_i64(f, "last_init_step", where) : 0;

  // Values that set_state() does not check but a resumed run relies on.
  require_finite_values(s.codes, where, "codebook");
  require_finite_values(s.grad, where, "codebook_grad");
  require_finite_values(s.ema.cluster_size, where, "ema.cluster_size");
  require_finite_values(s.ema.embed_sum, where, "ema.embed_sum");
  VQKIT_REQUIRE((s.ema.cluster_size.array() >= T(0)).all(), where.c_str(),
                "tensor 'ema.cluster_size' holds a negative value");
  // Every code is rewritten as M_k / Nhat_k with Nhat_k proportional to the
  // total size: a total of 0 would divide by zero on the next EMA step.
  VQKIT_REQUIRE(s.ema.cluster_size.sum() > T(0), where.c_str(),
                "tensor 'ema.cluster_size' sums to 0 (every EMA cluster is empty)");
  VQKIT_REQUIRE((s.steps_since_used.array() >= 0).all(), where.c_str(),
                "tensor 'usage.steps_since_used' holds a negative value");
  VQKIT_REQUIRE((s.used_since_reset.array() == 0 || s.used_since_reset.array() == 1).all(),
                where.c_str(), "tensor 'usage.used_since_reset' holds a value other than 0 or 1");
  VQKIT_REQUIRE(s.bank_size >= 0 && s.bank_size <= C, where.c_str(), "memory_bank.size is ",
                s.bank_size, ", outside [0, ", C, "]");
  VQKIT_REQUIRE(s.bank_head >= 0 && s.bank_head < C, where.c_str(), "memory_bank.head is ",
                s.bank_head, ", outside [0, ", C, ")");
  VQKIT_REQUIRE(s.bank_overflow >= 0, where.c_str(), "memory_bank.overflow is negative (",
                s.bank_overflow, ")");
  require_finite_values(s.bank.topRows(s.bank_size), where, "memory_bank.rows");
  VQKIT_REQUIRE(rng.any(), where.c_str(),
                "tensor 'rng.state' is all zeros (not a valid xoshiro256** state)");
  VQKIT_REQUIRE(s.step >= 0 && s.reinits >= 0 && s.replaced >= 0 && s.skipped >= 0,
                where.c_str(), "negative counters: step ", s.step, ", reinits ", s.reinits,
                ", replaced ", s.replaced, ", skipped ", s.skipped);
  VQKIT_REQUIRE(s.last_init_step >= 0 && s.last_init_step <= s.step, where.c_str(),
                "last_init_step is ", s.last_init_step, ", outside [0, step=", s.step, "]");

  try {
    vq.set_state(std::move(s));
  } catch (const error& e) {
    ::vqkit::detail::throw_error(where.c_str(), e.what());
  }
}

}  // namespace detail::ckpt

// ---- public API -----------------------------------------------------------------

/// The config as checkpoint metadata: every field of VectorQuantizerConfig
/// (nested ones as "ema.decay", "loss.codebook_weight", ...) as a string.
inline std::map<std::string, std::string> config_to_metadata(const VectorQuantizerConfig& cfg) {
  std::map<std::string, std::string> out;
  for (auto& [key, value] : detail::ckpt::config_entries(cfg)) out.emplace(key, std::move(value));
  return out;
}

/// The config stored in checkpoint metadata (the inverse of
/// config_to_metadata; other keys are ignored). Throws vqkit::error naming
/// a missing or unparsable key, or if the config does not validate.
inline VectorQuantizerConfig config_from_metadata(
    const std::map<std::string, std::string>& metadata) {
  constexpr const char* where = "config_from_metadata";
  VectorQuantizerConfig cfg;
  detail::ckpt::visit_config(cfg, [&](const FieldKey& k, auto& field) {
    const std::string key = k.str();
    using V = std::decay_t<decltype(field)>;
    const auto stored = detail::ckpt::stored_value(metadata, key);
    VQKIT_REQUIRE(stored.has_value(), where, "the metadata lacks the config key '", key, "'");
    const std::string& raw = *stored;
    VQKIT_REQUIRE(detail::ckpt::parse_value(raw, field), where, "config key '", key,
                  "' has the value '", safetensors::detail::clip(raw), "', expected ",
                  detail::ckpt::value_kind<V>());
  });
  try {
    cfg.validate();
  } catch (const error& e) {
    detail::throw_error(where, e.what());
  }
  return cfg;
}

/// The complete state of vq as an in-memory safetensors file (see the top
/// of this file for its tensors and metadata). Throws vqkit::error if an
/// extra_metadata key is one the format reserves.
template <class T, class B>
safetensors::File to_safetensors(const VectorQuantizer<T, B>& vq,
                                 const std::map<std::string, std::string>& extra_metadata = {}) {
  return detail::ckpt::build(vq, extra_metadata, "to_safetensors");
}

/// Restores vq from an in-memory checkpoint; all-or-nothing (see the top of
/// this file). Throws vqkit::error and leaves vq untouched on any mismatch
/// or bad value.
template <class T, class B>
void from_safetensors(const safetensors::File& file, VectorQuantizer<T, B>& vq) {
  detail::ckpt::restore(file, vq, "from_safetensors");
}

/// Writes the complete state of vq to path, atomically: on failure the file
/// previously at path is left intact. Throws vqkit::error.
template <class T, class B>
void save_checkpoint(const std::string& path, const VectorQuantizer<T, B>& vq,
                     const std::map<std::string, std::string>& extra_metadata = {}) {
  const std::string where = "save_checkpoint('" + path + "')";
  safetensors::save(path, detail::ckpt::build(vq, extra_metadata, where));
}

/// Restores vq from the checkpoint at path, which must have been saved from
/// a quantizer with the same config and scalar type. All-or-nothing: throws
/// vqkit::error and leaves vq untouched on any failure.
template <class T, class B>
void load_checkpoint(const std::string& path, VectorQuantizer<T, B>& vq) {
  const safetensors::File f = safetensors::load(path);
  detail::ckpt::restore(f, vq, "load_checkpoint('" + path + "')");
}

/// A new quantizer with the checkpoint's own config, restored from it.
template <class T, class B = cpu>
VectorQuantizer<T, B> load_quantizer(const std::string& path, B backend = {}) {
  const std::string where = "load_quantizer('" + path + "')";
  const safetensors::File f = safetensors::load(path);
  detail::ckpt::check_format(f, where);
  VectorQuantizerConfig cfg;
  try {
    cfg = config_from_metadata(f.metadata);
  } catch (const error& e) {
    detail::throw_error(where.c_str(), e.what());
  }
  // The file's tensors must match its config before the config sizes any
  // allocation: a hostile config (say 10^6 codes) over a small file must be
  // rejected, not allocated.
  const auto shape_is = [&](const char* name, std::vector<std::int64_t> want) {
    const auto it = f.tensors.find(name);
    VQKIT_REQUIRE(it != f.tensors.end(), where.c_str(), "the checkpoint has no tensor '", name,
                  "'");
    VQKIT_REQUIRE(it->second.shape == want, where.c_str(), "tensor '", name,
                  "' does not have the shape its config implies (codebook_size=",
                  cfg.codebook_size, ", dim=", cfg.dim, ", memory bank rows=", cfg.bank_rows(),
                  ")");
  };
  shape_is("codebook", {cfg.codebook_size, cfg.dim});
  shape_is("memory_bank.rows", {cfg.bank_rows(), cfg.dim});
  VectorQuantizer<T, B> vq(cfg, backend);
  detail::ckpt::restore(f, vq, where);
  return vq;
}

}  // namespace vqkit
