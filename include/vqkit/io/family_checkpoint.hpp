// vqkit/io/family_checkpoint.hpp - checkpoints of ResidualVQ, GroupedVQ,
// FSQ and LFQ as safetensors files, beside io/checkpoint.hpp's
// VectorQuantizer format (the same function names, overloaded).
//
// ResidualVQ ("format": "vqkit.residual_vq") and GroupedVQ
// ("vqkit.grouped_vq") hold each codebook's quantizer (a shared one once, as
// level 0 / head 0) as a complete VectorQuantizer checkpoint with the prefix
// "level.<l>." / "head.<g>." on its tensors and metadata, plus their own
// config keys (levels, quantize_dropout, dropout_min_levels, seed, shared /
// groups, shared) and, for ResidualVQ, its "rng.state" [4] U64 and
// "training" [] I64. A ResidualVQ file without "shared" (written before it
// existed) has separate codebooks. GroupedResidualVQ
// ("vqkit.grouped_residual_vq") nests each head's complete ResidualVQ
// checkpoint under "head.<g>." (so a level's tensors read
// "head.<g>.level.<l>.codes").
// FSQ ("vqkit.fsq") and LFQ ("vqkit.lfq") hold their config as metadata and
// "usage.steps_since_used", "usage.used_since_reset" [K] I64, "step",
// "training" [] I64.
// Loading checks the format, version and every config key against the
// layer's (naming the first that differs), then builds the complete state
// and sets it once: on any failure a vqkit::error, the layer unchanged.
#pragma once

#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "vqkit/io/checkpoint.hpp"
#include "vqkit/io/safetensors.hpp"
#include "vqkit/layers/fsq.hpp"
#include "vqkit/layers/grouped_vq.hpp"
#include "vqkit/layers/lfq.hpp"
#include "vqkit/layers/residual_vq.hpp"
#include "vqkit/quantizer/implicit_codebook.hpp"

namespace vqkit {
namespace detail::family_ckpt {

inline constexpr const char* version = "1";

using Meta = std::vector<std::pair<std::string, std::string>>;

inline void put_meta(safetensors::File& f, const char* format, const Meta& meta) {
  f.metadata["format"] = format;
  f.metadata["version"] = version;
  for (const auto& [k, v] : meta) f.metadata[k] = v;
}

/// Format, version and config keys of f against the layer's; throws naming
/// the first difference. A key in `older` that the file lacks (it predates
/// the key) reads as the value given there.
inline void check(const safetensors::File& f, const char* format, const Meta& meta,
                  const std::string& where, const Meta& older = {}) {
  const std::string got = ckpt::meta_or(f, "format", "");
  VQKIT_REQUIRE(got == format, where.c_str(), "not a ", format, " checkpoint (metadata 'format' is '",
                safetensors::detail::clip(got), "')");
  const std::string v = ckpt::meta_or(f, "version", "");
  VQKIT_REQUIRE(v == version, where.c_str(), "unsupported checkpoint version '",
                safetensors::detail::clip(v), "'; this vqkit reads version ", version);
  for (const auto& [k, mine] : meta) {
    std::string absent = "(missing)";
    for (const auto& [ok, ov] : older)
      if (ok == k) absent = ov;
    const std::string theirs = ckpt::meta_or(f, k, absent);
    VQKIT_REQUIRE(theirs == mine, where.c_str(), k, " is ", safetensors::detail::clip(theirs),
                  " in the checkpoint but ", mine, " in this layer");
  }
}

/// Adds every tensor and metadata key of part to f under prefix.
inline void nest(safetensors::File& f, const std::string& prefix, const safetensors::File& part) {
  for (const auto& [name, t] : part.tensors) f.tensors.emplace(prefix + name, t);
  for (const auto& [key, value] : part.metadata) f.metadata.emplace(prefix + key, value);
}

/// The part of f under prefix, unprefixed.
inline safetensors::File part(const safetensors::File& f, const std::string& prefix) {
  safetensors::File out;
  for (const auto& [name, t] : f.tensors)
    if (name.rfind(prefix, 0) == 0) out.tensors.emplace(name.substr(prefix.size()), t);
  for (const auto& [key, value] : f.metadata)
    if (key.rfind(prefix, 0) == 0) out.metadata.emplace(key.substr(prefix.size()), value);
  return out;
}

template <class T, class B>
void restore_part(const safetensors::File& f, VectorQuantizer<T, B>& q, const std::string& where) {
  ckpt::restore(f, q, where);
}
template <class T, class B>
void restore_part(const safetensors::File& f, ResidualVQ<T, B>& q, const std::string& where);

/// Each quantizer's state read from its nested checkpoint (through a scratch
/// quantizer with its config, which checks everything).
template <class Q>
std::vector<typename Q::State> nested_states(const safetensors::File& f, const char* prefix,
                                             const std::vector<const Q*>& qs, const std::string& where) {
  std::vector<typename Q::State> out;
  for (std::size_t i = 0; i < qs.size(); ++i) {
    Q scratch(qs[i]->config(), qs[i]->backend());
    restore_part(part(f, prefix + std::to_string(i) + "."), scratch,
                 where + " " + prefix + std::to_string(i));
    out.push_back(scratch.state());
  }
  return out;
}

template <class Layer>
void put_usage(safetensors::File& f, const Layer& q) {
  const auto s = q.state();
  f.tensors["usage.steps_since_used"] = safetensors::from_vector(s.steps_since_used);
  f.tensors["usage.used_since_reset"] = safetensors::from_vector(s.used_since_reset);
  f.tensors["step"] = safetensors::from_scalar<std::int64_t>(s.step);
  f.tensors["training"] = safetensors::from_scalar<std::int64_t>(s.training ? 1 : 0);
}

template <class Layer>
void get_usage(const safetensors::File& f, Layer& q, const std::string& where) {
  typename Layer::State s;
  const Index K = q.codebook_size();
  s.steps_since_used = ckpt::read_vector<std::int64_t>(f, "usage.steps_since_used", K, where);
  s.used_since_reset = ckpt::read_vector<std::int64_t>(f, "usage.used_since_reset", K, where);
  s.step = ckpt::read_i64(f, "step", where);
  s.training = ckpt::read_flag(f, "training", where);
  VQKIT_REQUIRE((s.steps_since_used.array() >= 0).all(), where.c_str(),
                "usage.steps_since_used holds a negative count");
  q.set_state(std::move(s));
}

/// A config value as metadata text (FSQ's levels as "8,5,5,5").
template <class V>
std::string meta_value(const V& v) {
  if constexpr (std::is_same_v<V, std::vector<int>>) {
    std::string out;
    for (int L : v) {
      if (!out.empty()) out += ',';
      out += std::to_string(L);
    }
    return out;
  } else {
    return ckpt::format_value(v);
  }
}

/// The config keys of a family layer, from its config's field list (a
/// composite's own fields; its levels / heads store theirs).
template <class Config>
Meta meta(const Config& c) {
  Meta m;
  Config::visit_fields(c, [&](const FieldKey& key, const auto& v) { m.emplace_back(key.str(), meta_value(v)); });
  return m;
}

template <class T, class B>
constexpr const char* format_of(const ResidualVQ<T, B>*) { return "vqkit.residual_vq"; }
template <class T, class B>
constexpr const char* format_of(const GroupedVQ<T, B>*) { return "vqkit.grouped_vq"; }
template <class T, class B>
constexpr const char* format_of(const GroupedResidualVQ<T, B>*) { return "vqkit.grouped_residual_vq"; }
template <class T>
constexpr const char* format_of(const FSQ<T>*) { return "vqkit.fsq"; }
template <class T>
constexpr const char* format_of(const LFQ<T>*) { return "vqkit.lfq"; }

/// The quantizers this header stores.
template <class Q>
concept family_layer = requires(const Q* q) { format_of(q); };
/// Those of them on a fixed grid (their state is ImplicitCodebook's).
template <class Q>
concept grid_layer = family_layer<Q> && std::is_same_v<typename Q::State, ImplicitCodebook::State>;

}  // namespace detail::family_ckpt

// ---- ResidualVQ -------------------------------------------------------------------------

template <class T, class B>
safetensors::File to_safetensors(const ResidualVQ<T, B>& q) {
  namespace fc = detail::family_ckpt;
  safetensors::File f;
  fc::put_meta(f, "vqkit.residual_vq", fc::meta(q.config()));
  const auto s = q.state();
  f.tensors["rng.state"] = safetensors::from_vector(std::vector<std::uint64_t>(s.rng.begin(), s.rng.end()));
  f.tensors["training"] = safetensors::from_scalar<std::int64_t>(s.training ? 1 : 0);
  for (Index l = 0; l < q.codebooks(); ++l)  // (shared: the one quantizer, as level.0)
    fc::nest(f, "level." + std::to_string(l) + ".", to_safetensors(q.level(l)));
  return f;
}

template <class T, class B>
void from_safetensors(const safetensors::File& f, ResidualVQ<T, B>& q,
                      const std::string& where = "from_safetensors(ResidualVQ)") {
  namespace fc = detail::family_ckpt;
  // (files written before the shared codebook existed have separate ones)
  fc::check(f, "vqkit.residual_vq", fc::meta(q.config()), where, {{"shared", "false"}});
  typename ResidualVQ<T, B>::State s;
  const Vector<std::uint64_t> rng = detail::ckpt::read_vector<std::uint64_t>(f, "rng.state", 4, where);
  VQKIT_REQUIRE(rng.any(), where.c_str(), "tensor 'rng.state' is all zeros (not a valid xoshiro256** state)");
  std::vector<const VectorQuantizer<T, B>*> levels;
  for (Index l = 0; l < q.codebooks(); ++l) levels.push_back(&q.level(l));
  s.levels = fc::nested_states(f, "level.", levels, where);
  for (Index i = 0; i < 4; ++i) s.rng[static_cast<std::size_t>(i)] = rng[i];
  s.training = detail::ckpt::read_flag(f, "training", where);
  q.set_state(std::move(s));
}

namespace detail::family_ckpt {
template <class T, class B>
void restore_part(const safetensors::File& f, ResidualVQ<T, B>& q, const std::string& where) {
  from_safetensors(f, q, where);
}
}  // namespace detail::family_ckpt

// ---- GroupedVQ, GroupedResidualVQ -------------------------------------------------------

template <class T, class B, class H>
safetensors::File to_safetensors(const GroupedVQ<T, B, H>& q) {
  namespace fc = detail::family_ckpt;
  safetensors::File f;
  fc::put_meta(f, fc::format_of(&q), fc::meta(q.config()));
  const Index heads = q.config().shared ? 1 : q.groups();
  for (Index g = 0; g < heads; ++g) fc::nest(f, "head." + std::to_string(g) + ".", to_safetensors(q.head(g)));
  return f;
}

template <class T, class B, class H>
void from_safetensors(const safetensors::File& f, GroupedVQ<T, B, H>& q,
                      const std::string& where = "from_safetensors(GroupedVQ)") {
  namespace fc = detail::family_ckpt;
  fc::check(f, fc::format_of(&q), fc::meta(q.config()), where);
  std::vector<const H*> heads;
  for (Index g = 0; g < (q.config().shared ? 1 : q.groups()); ++g) heads.push_back(&q.head(g));
  typename GroupedVQ<T, B, H>::State s;
  s.heads = fc::nested_states(f, "head.", heads, where);
  q.set_state(std::move(s));
}

// ---- FSQ and LFQ ------------------------------------------------------------------------

template <detail::family_ckpt::grid_layer Q>
safetensors::File to_safetensors(const Q& q) {
  namespace fc = detail::family_ckpt;
  safetensors::File f;
  fc::put_meta(f, fc::format_of(&q), fc::meta(q.config()));
  fc::put_usage(f, q);
  return f;
}
template <detail::family_ckpt::grid_layer Q>
void from_safetensors(const safetensors::File& f, Q& q, const std::string& where = "from_safetensors") {
  namespace fc = detail::family_ckpt;
  fc::check(f, fc::format_of(&q), fc::meta(q.config()), where);
  fc::get_usage(f, q, where);
}

// ---- files ------------------------------------------------------------------------------

/// Writes q's checkpoint to path, atomically (safetensors::save).
template <detail::family_ckpt::family_layer Q>
void save_checkpoint(const std::string& path, const Q& q) {
  safetensors::save(path, to_safetensors(q));
}
/// Restores q from path; all or nothing.
template <detail::family_ckpt::family_layer Q>
void load_checkpoint(const std::string& path, Q& q) {
  from_safetensors(safetensors::load(path), q, "load_checkpoint('" + path + "')");
}

}  // namespace vqkit
