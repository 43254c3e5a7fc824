// vqkit/models/tokenizer_checkpoint.hpp - save and resume a tokenizer
// training run: model, optimiser, quantizer, step and data Rng in one
// safetensors file.
//
//   save_training_checkpoint(path, tk, adamw, step, data_rng [, extra_metadata])
//       writes the file atomically (safetensors::save: temp file, fsync, rename)
//   load_training_checkpoint(path, tk, adamw, data_rng) -> TrainingCheckpoint
//       restores all of it into a Tokenizer / AdamW built from the same config
//   load_tokenizer_weights(path, tk) -> TrainingCheckpoint
//       restores the model parameters and the quantizer only (evaluation)
//   read_tokenizer_config(path) -> TokenizerConfig   the config the file was saved with
//   to_training_safetensors(...) / from_training_safetensors(...)   in memory
//
// A run that saves at step s, loads into a fresh Tokenizer + AdamW (built
// from the same config) and continues makes bit-identically the same steps
// as the run that never stopped: every input of a training step is in the
// file (parameters, AdamW moments and step count, the quantizer's complete
// state including its Rng, memory bank and usage counters, and the state of
// the Rng the caller draws its batches from). The learning rate is not
// stored as state: the caller sets it from its schedule before every
// adamw.step(). (Bit-identical also needs the same thread count: Eigen's
// multithreaded matrix products round differently for different counts.)
//
// Tensors (T = float -> F32, double -> F64; N a parameter name as
// Tokenizer::parameters() lists it, e.g. "encoder.stage1.blocks.0.attn.qkv.weight"):
//   "model.N"             shape of N     the parameter (PyTorch shape: ParameterRef::shape
//                                        when its product is the size, else [rows, cols];
//                                        row-major bytes, PyTorch's layout)
//   "optim.N.exp_avg"     same           AdamW first moment
//   "optim.N.exp_avg_sq"  same           AdamW second moment
//   "optim.step"          []   I64       AdamW's step count
//   "vq.<name>"                          every tensor of io/checkpoint.hpp's quantizer
//                                        format (codebook, ema.*, usage.*, memory_bank.*,
//                                        rng.state, step, ...), prefixed
//   "train.step"          []   I64       the caller's training step (steps completed)
//   "train.data_rng"      [4]  U64       the caller's data Rng (xoshiro256** words)
// "__metadata__":
//   "format": "vqkit.tokenizer_training", "version": "1",
//   "scalar": "float32" | "float64",
//   "tokenizer_config": TokenizerConfig::to_json() as compact JSON text,
//   "optim.lr", "optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay":
//       AdamW's options at save time (shortest round-trip decimals),
//   "vq.<key>": every metadata key of the quantizer format (its config, ...),
//   plus the caller's extra_metadata, whose keys may not be "format",
//   "version", "scalar", "tokenizer_config", nor start with "model.",
//   "optim.", "vq." or "train.".
//
// Loading checks everything before it changes anything, in this order:
// format, version and scalar type; the TokenizerConfig (every key, compared
// as JSON values; the error names the first key that differs, or that is
// missing or unknown); the AdamW options beta1, beta2, eps, weight_decay
// (lr is the schedule's, not checked); that adamw was built over exactly
// tk.parameters() (same names, same tensors, same order); every "model.*"
// and "optim.*" tensor's presence, dtype, shape and finiteness (exp_avg_sq
// >= 0) and that no unknown "model.*" / "optim.*" tensor is present;
// train.step and optim.step >= 0; a non-zero data Rng state; then the
// quantizer part, with io/checkpoint.hpp's own checks. On any failure a
// vqkit::error naming the file is thrown and the tokenizer, the optimiser and
// the Rng are left exactly as they were (the quantizer restores itself
// all-or-nothing first; should anything after it fail, its previous state is
// put back).
#pragma once

#include <charconv>
#include <cstring>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/random.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/io/checkpoint.hpp"
#include "vqkit/io/safetensors.hpp"
#include "vqkit/models/tokenizer.hpp"
#include "vqkit/optim/adamw.hpp"
#include "vqkit/tokenizer/config.hpp"

namespace vqkit {

inline constexpr const char* training_checkpoint_format = "vqkit.tokenizer_training";
inline constexpr const char* training_checkpoint_version = "1";

/// What a load returns besides the restored objects.
struct TrainingCheckpoint {
  std::int64_t step = 0;                        ///< "train.step"
  TokenizerConfig config;                       ///< the config in the file
  std::map<std::string, std::string> metadata;  ///< the caller's extra_metadata
};

namespace detail::tkckpt {

inline bool starts_with(const std::string& s, const char* prefix) {
  return s.rfind(prefix, 0) == 0;
}

inline bool reserved_key(const std::string& key) {
  return key == "format" || key == "version" || key == "scalar" || key == "tokenizer_config" ||
         starts_with(key, "model.") || starts_with(key, "optim.") || starts_with(key, "vq.") ||
         starts_with(key, "train.");
}

inline std::string number(double v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

/// The stored shape of a parameter (see the file comment).
template <class T>
std::vector<std::int64_t> stored_shape(const ParameterRef<T>& p) {
  std::int64_t n = 1;
  for (Index d : p.shape) n *= static_cast<std::int64_t>(d);
  if (!p.shape.empty() && n == static_cast<std::int64_t>(p.value->size())) {
    std::vector<std::int64_t> s;
    for (Index d : p.shape) s.push_back(static_cast<std::int64_t>(d));
    return s;
  }
  return {static_cast<std::int64_t>(p.value->rows()), static_cast<std::int64_t>(p.value->cols())};
}

template <class T>
safetensors::Tensor tensor_of(const RowMatrix<T>& m, std::vector<std::int64_t> shape) {
  return safetensors::detail::make_tensor<T>(std::move(shape), m.data(),
                                             static_cast<std::size_t>(m.size()));
}

/// The tensor called name as a rows x cols matrix, checked for dtype T,
/// the stored shape and finite values.
template <class T>
RowMatrix<T> read_param_like(const safetensors::File& f, const std::string& name,
                             const std::vector<std::int64_t>& shape, Index rows, Index cols,
                             const std::string& where) {
  const auto it = f.tensors.find(name);
  VQKIT_REQUIRE(it != f.tensors.end(), where.c_str(), "the checkpoint has no tensor '", name,
                "'");
  const safetensors::Tensor& t = it->second;
  constexpr auto want = safetensors::dtype_of<T>();
  VQKIT_REQUIRE(t.dtype == want, where.c_str(), "tensor '", name, "' has dtype ",
                safetensors::dtype_name(t.dtype), ", expected ", safetensors::dtype_name(want));
  VQKIT_REQUIRE(t.shape == shape, where.c_str(), "tensor '", name, "' has shape ",
                detail::ckpt::shape_string(t.shape), ", expected ",
                detail::ckpt::shape_string(shape));
  VQKIT_REQUIRE(t.bytes.size() == static_cast<std::size_t>(rows * cols) * sizeof(T),
                where.c_str(), "tensor '", name, "' holds ", t.bytes.size(),
                " bytes, expected ", static_cast<std::size_t>(rows * cols) * sizeof(T));
  RowMatrix<T> m(rows, cols);
  if (!t.bytes.empty()) std::memcpy(m.data(), t.bytes.data(), t.bytes.size());
  VQKIT_REQUIRE(m.allFinite(), where.c_str(), "tensor '", name, "' holds a non-finite value");
  return m;
}

inline std::int64_t read_i64(const safetensors::File& f, const std::string& name,
                             const std::string& where) {
  return detail::ckpt::read_i64(f, name, where);
}

/// The quantizer's part of f: "vq."-prefixed tensors and metadata, unprefixed.
inline safetensors::File vq_part(const safetensors::File& f) {
  safetensors::File out;
  for (const auto& [name, t] : f.tensors)
    if (starts_with(name, "vq.")) out.tensors.emplace(name.substr(3), t);
  for (const auto& [key, value] : f.metadata)
    if (starts_with(key, "vq.")) out.metadata.emplace(key.substr(3), value);
  return out;
}

inline void check_header(const safetensors::File& f, const char* scalar,
                         const std::string& where) {
  const std::string format = detail::ckpt::meta_or(f, "format", "");
  VQKIT_REQUIRE(format == training_checkpoint_format, where.c_str(),
                "not a vqkit tokenizer training checkpoint (metadata 'format' is ",
                format.empty() ? std::string("missing")
                               : "'" + safetensors::detail::clip(format) + "'",
                ", expected '", training_checkpoint_format, "')");
  const std::string version = detail::ckpt::meta_or(f, "version", "");
  VQKIT_REQUIRE(version == training_checkpoint_version, where.c_str(),
                "unsupported checkpoint version ",
                version.empty() ? std::string("(missing)")
                                : "'" + safetensors::detail::clip(version) + "'",
                "; this vqkit reads version ", training_checkpoint_version);
  const std::string s = detail::ckpt::meta_or(f, "scalar", "");
  VQKIT_REQUIRE(s == scalar, where.c_str(), "the checkpoint holds ",
                s.empty() ? std::string("(missing scalar type)") : safetensors::detail::clip(s),
                " tensors, but this tokenizer uses ", scalar);
}

/// The TokenizerConfig stored in f (validated).
inline TokenizerConfig stored_config(const safetensors::File& f, const std::string& where) {
  const auto it = f.metadata.find("tokenizer_config");
  VQKIT_REQUIRE(it != f.metadata.end(), where.c_str(),
                "the checkpoint's metadata lacks 'tokenizer_config'");
  try {
    return TokenizerConfig::parse(it->second, "the checkpoint's tokenizer_config");
  } catch (const error& e) {
    ::vqkit::detail::throw_error(where.c_str(), e.what());
  }
}

/// Throws naming the first key whose value differs between the file's
/// config and mine (or that one of them lacks).
inline void check_config(const safetensors::File& f, const TokenizerConfig& mine,
                         const std::string& where) {
  const auto it = f.metadata.find("tokenizer_config");
  VQKIT_REQUIRE(it != f.metadata.end(), where.c_str(),
                "the checkpoint's metadata lacks 'tokenizer_config'");
  nlohmann::json theirs;
  try {
    theirs = nlohmann::json::parse(it->second);
  } catch (const nlohmann::json::exception& e) {
    ::vqkit::detail::throw_error(where.c_str(), "the checkpoint's tokenizer_config is not JSON: ",
                                 e.what());
  }
  VQKIT_REQUIRE(theirs.is_object(), where.c_str(),
                "the checkpoint's tokenizer_config is not a JSON object");
  const nlohmann::ordered_json my = mine.to_json();
  for (auto m = my.begin(); m != my.end(); ++m) {
    const auto t = theirs.find(m.key());
    VQKIT_REQUIRE(t != theirs.end(), where.c_str(), "config key '", m.key(),
                  "' is missing from the checkpoint (this tokenizer has ", m.value().dump(), ")");
    VQKIT_REQUIRE(*t == nlohmann::json::parse(m.value().dump()), where.c_str(), "config mismatch: ", m.key(), " is ",
                  safetensors::detail::clip(t->dump()), " in the checkpoint but ",
                  m.value().dump(), " in this tokenizer");
  }
  for (auto t = theirs.begin(); t != theirs.end(); ++t)
    VQKIT_REQUIRE(my.contains(t.key()), where.c_str(), "the checkpoint's config has the key '",
                  safetensors::detail::clip(t.key()), "' that this tokenizer does not know");
}

template <class T>
const char* scalar_name() {
  return detail::ckpt::scalar_name<T>();
}

/// Everything a load needs, read and checked, nothing applied yet.
template <class T>
struct Parsed {
  std::vector<RowMatrix<T>> params;
  std::int64_t optim_step = 0;
  std::map<std::string, RowMatrix<T>> optim;  ///< "N.exp_avg", "N.exp_avg_sq"
  bool has_optim = false;
  Rng::State data_rng{};
  TrainingCheckpoint info;
};

/// Reads and checks the model part (and, when opt is given, the optimiser
/// part and the data Rng) of f against tk / opt. Changes nothing.
template <class T, class B>
Parsed<T> parse(const safetensors::File& f, Tokenizer<T, B>& tk, const AdamW<T, B>* opt,
                const std::string& where) {
  check_header(f, scalar_name<T>(), where);
  check_config(f, tk.config(), where);
  Parsed<T> out;
  out.info.config = stored_config(f, where);
  for (const auto& [key, value] : f.metadata)
    if (!reserved_key(key)) out.info.metadata.emplace(key, value);

  const ParameterList<T> params = tk.parameters();
  std::map<std::string, bool> known;
  for (const auto& p : params) {
    known["model." + p.name] = true;
    known["optim." + p.name + ".exp_avg"] = true;
    known["optim." + p.name + ".exp_avg_sq"] = true;
  }
  known["optim.step"] = true;
  for (const auto& [name, t] : f.tensors) {
    (void)t;
    if (starts_with(name, "model.") || starts_with(name, "optim."))
      VQKIT_REQUIRE(known.count(name) != 0, where.c_str(), "the checkpoint holds the tensor '",
                    safetensors::detail::clip(name),
                    "' that this tokenizer has no parameter for");
  }
  for (const auto& p : params)
    out.params.push_back(read_param_like<T>(f, "model." + p.name, stored_shape(p),
                                            p.value->rows(), p.value->cols(), where));
  out.info.step = read_i64(f, "train.step", where);
  VQKIT_REQUIRE(out.info.step >= 0, where.c_str(), "train.step is negative (", out.info.step,
                ")");
  if (opt == nullptr) return out;

  // The optimiser must have been built over exactly this tokenizer's tensors.
  const ParameterList<T>& op = opt->parameters();
  VQKIT_REQUIRE(op.size() == params.size(), where.c_str(), "the optimiser holds ", op.size(),
                " parameters, the tokenizer ", params.size(),
                ": build AdamW from tk.parameters()");
  for (std::size_t i = 0; i < op.size(); ++i)
    VQKIT_REQUIRE(op[i].name == params[i].name && op[i].value == params[i].value, where.c_str(),
                  "the optimiser's parameter ", i, " ('", op[i].name,
                  "') is not the tokenizer's ('", params[i].name,
                  "'): build AdamW from tk.parameters()");
  const AdamWOptions& o = opt->options();
  const std::pair<const char*, double> opts[] = {{"optim.beta1", o.beta1},
                                                 {"optim.beta2", o.beta2},
                                                 {"optim.eps", o.eps},
                                                 {"optim.weight_decay", o.weight_decay}};
  for (const auto& [key, mine] : opts) {
    const std::string raw = detail::ckpt::meta_or(f, key, "");
    double theirs = 0;
    VQKIT_REQUIRE(detail::ckpt::parse_value(raw, theirs), where.c_str(), "metadata '", key,
                  "' is ", raw.empty() ? std::string("missing") : "'" + safetensors::detail::clip(raw) + "'",
                  ", expected a number");
    VQKIT_REQUIRE(theirs == mine, where.c_str(), "optimiser mismatch: ", key, " is ", raw,
                  " in the checkpoint but ", number(mine), " in this AdamW");
  }
  for (const auto& p : params) {
    const auto shape = stored_shape(p);
    for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
      const std::string name = "optim." + p.name + suffix;
      RowMatrix<T> m = read_param_like<T>(f, name, shape, p.value->rows(), p.value->cols(), where);
      if (std::string(suffix) == ".exp_avg_sq")
        VQKIT_REQUIRE(m.size() == 0 || m.minCoeff() >= T(0), where.c_str(), "tensor '", name,
                      "' holds a negative value");
      out.optim.emplace(p.name + suffix, std::move(m));
    }
  }
  out.optim_step = read_i64(f, "optim.step", where);
  VQKIT_REQUIRE(out.optim_step >= 0, where.c_str(), "optim.step is negative (", out.optim_step,
                ")");
  out.has_optim = true;
  const Vector<std::uint64_t> rng = detail::ckpt::read_vector<std::uint64_t>(
      f, "train.data_rng", 4, where);
  VQKIT_REQUIRE(rng.any(), where.c_str(),
                "tensor 'train.data_rng' is all zeros (not a valid xoshiro256** state)");
  for (Index i = 0; i < 4; ++i) out.data_rng[static_cast<std::size_t>(i)] = rng[i];
  return out;
}

/// Applies parsed (already checked) state; the quantizer part is restored
/// first (all-or-nothing by itself) and put back if anything after it fails.
template <class T, class B>
void apply(const safetensors::File& f, Parsed<T>& parsed, Tokenizer<T, B>& tk, AdamW<T, B>* opt,
           Rng* data_rng, const std::string& where) {
  auto& vq = tk.net.vq;
  auto before = vq.state();
  detail::ckpt::restore(vq_part(f), vq, where + " (quantizer part)");  // all-or-nothing
  try {
    if (opt != nullptr && parsed.has_optim) {
      typename AdamW<T, B>::State s;
      s.step = parsed.optim_step;
      s.tensors = std::move(parsed.optim);
      opt->set_state(s);
    }
  } catch (const error& e) {
    vq.set_state(std::move(before));
    ::vqkit::detail::throw_error(where.c_str(), e.what());
  }
  const ParameterList<T> params = tk.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) *params[i].value = parsed.params[i];
  if (data_rng != nullptr && parsed.has_optim) data_rng->set_state(parsed.data_rng);
}

}  // namespace detail::tkckpt

/// The complete training state as an in-memory safetensors file.
template <class T, class B>
safetensors::File to_training_safetensors(const Tokenizer<T, B>& tk, const AdamW<T, B>& opt,
                                          std::int64_t step, const Rng& data_rng,
                                          const std::map<std::string, std::string>& extra = {}) {
  using namespace detail::tkckpt;
  constexpr const char* where = "to_training_safetensors";
  VQKIT_REQUIRE(step >= 0, where, "step must be >= 0, got ", step);
  for (const auto& [key, value] : extra) {
    (void)value;
    VQKIT_REQUIRE(!reserved_key(key), where, "extra_metadata key '",
                  safetensors::detail::clip(key), "' is reserved for the checkpoint format");
  }
  // parameters() only lists pointers; nothing is modified.
  const ParameterList<T> params = const_cast<Tokenizer<T, B>&>(tk).parameters();
  const ParameterList<T>& op = opt.parameters();
  VQKIT_REQUIRE(op.size() == params.size(), where, "the optimiser holds ", op.size(),
                " parameters, the tokenizer ", params.size(), ": build AdamW from tk.parameters()");
  for (std::size_t i = 0; i < op.size(); ++i)
    VQKIT_REQUIRE(op[i].name == params[i].name && op[i].value == params[i].value, where,
                  "the optimiser's parameter ", i, " ('", op[i].name, "') is not the tokenizer's ('",
                  params[i].name, "'): build AdamW from tk.parameters()");

  safetensors::File f;
  const safetensors::File q = to_safetensors(tk.net.vq);
  for (const auto& [name, t] : q.tensors) f.tensors.emplace("vq." + name, t);
  for (const auto& [key, value] : q.metadata) f.metadata.emplace("vq." + key, value);
  for (const auto& p : params) {
    const auto shape = stored_shape(p);
    f.tensors["model." + p.name] = tensor_of(*p.value, shape);
    f.tensors["optim." + p.name + ".exp_avg"] = tensor_of(opt.exp_avg(p.name), shape);
    f.tensors["optim." + p.name + ".exp_avg_sq"] = tensor_of(opt.exp_avg_sq(p.name), shape);
  }
  f.tensors["optim.step"] = safetensors::from_scalar<std::int64_t>(opt.step_count());
  f.tensors["train.step"] = safetensors::from_scalar<std::int64_t>(step);
  const Rng::State& rs = data_rng.state();
  f.tensors["train.data_rng"] =
      safetensors::from_vector(std::vector<std::uint64_t>(rs.begin(), rs.end()));

  for (const auto& [key, value] : extra) f.metadata[key] = value;
  f.metadata["format"] = training_checkpoint_format;
  f.metadata["version"] = training_checkpoint_version;
  f.metadata["scalar"] = scalar_name<T>();
  f.metadata["tokenizer_config"] = tk.config().to_json().dump();
  const AdamWOptions& o = opt.options();
  f.metadata["optim.lr"] = number(o.lr);
  f.metadata["optim.beta1"] = number(o.beta1);
  f.metadata["optim.beta2"] = number(o.beta2);
  f.metadata["optim.eps"] = number(o.eps);
  f.metadata["optim.weight_decay"] = number(o.weight_decay);
  return f;
}

/// Restores tk, opt and data_rng from an in-memory file; all-or-nothing.
template <class T, class B>
TrainingCheckpoint from_training_safetensors(const safetensors::File& f, Tokenizer<T, B>& tk,
                                             AdamW<T, B>& opt, Rng& data_rng,
                                             const std::string& where = "from_training_safetensors") {
  auto parsed = detail::tkckpt::parse(f, tk, &opt, where);
  detail::tkckpt::apply(f, parsed, tk, &opt, &data_rng, where);
  return parsed.info;
}

/// Writes the complete training state to path, atomically. Throws vqkit::error.
template <class T, class B>
void save_training_checkpoint(const std::string& path, const Tokenizer<T, B>& tk,
                              const AdamW<T, B>& opt, std::int64_t step, const Rng& data_rng,
                              const std::map<std::string, std::string>& extra_metadata = {}) {
  safetensors::save(path, to_training_safetensors(tk, opt, step, data_rng, extra_metadata));
}

/// Restores tk, opt and data_rng from path (see the file comment for the
/// checks); all-or-nothing. Returns the step, config and extra metadata.
template <class T, class B>
TrainingCheckpoint load_training_checkpoint(const std::string& path, Tokenizer<T, B>& tk,
                                            AdamW<T, B>& opt, Rng& data_rng) {
  const std::string where = "load_training_checkpoint('" + path + "')";
  safetensors::File f;
  try {
    f = safetensors::load(path);
  } catch (const error& e) {
    detail::throw_error(where.c_str(), e.what());
  }
  return from_training_safetensors(f, tk, opt, data_rng, where);
}

/// Restores only the model parameters and the quantizer of tk (for
/// evaluation); the optimiser part and data Rng in the file are ignored.
/// All-or-nothing.
template <class T, class B>
TrainingCheckpoint load_tokenizer_weights(const std::string& path, Tokenizer<T, B>& tk) {
  const std::string where = "load_tokenizer_weights('" + path + "')";
  safetensors::File f;
  try {
    f = safetensors::load(path);
  } catch (const error& e) {
    detail::throw_error(where.c_str(), e.what());
  }
  auto parsed = detail::tkckpt::parse<T, B>(f, tk, nullptr, where);
  detail::tkckpt::apply<T, B>(f, parsed, tk, nullptr, nullptr, where);
  return parsed.info;
}

/// The TokenizerConfig a checkpoint was saved with (to build a matching
/// Tokenizer before loading). Checks the format header only.
inline TokenizerConfig read_tokenizer_config(const std::string& path) {
  const std::string where = "read_tokenizer_config('" + path + "')";
  safetensors::File f;
  try {
    f = safetensors::load(path);
  } catch (const error& e) {
    detail::throw_error(where.c_str(), e.what());
  }
  const std::string format = detail::ckpt::meta_or(f, "format", "");
  VQKIT_REQUIRE(format == training_checkpoint_format, where.c_str(),
                "not a vqkit tokenizer training checkpoint (metadata 'format' is ",
                format.empty() ? std::string("missing") : "'" + safetensors::detail::clip(format) + "'",
                ")");
  return detail::tkckpt::stored_config(f, where);
}

}  // namespace vqkit
