// vqkit/io/config_json.hpp - a quantizer's config as JSON, from its field
// list (Config::visit_fields, core/config_fields.hpp), so a new field needs
// no code here. Every config of the family: VectorQuantizerConfig,
// ResidualVQConfig, GroupedVQConfig, GroupedResidualVQConfig, FsqConfig,
// LfqConfig.
//
// One object per config, keyed like the checkpoint metadata:
//   {"codebook_size": 1024, "dim": 64, "metric": "l2", ..., "ema.decay": 0.99,
//    "dead.policy": "kmeans_reinit", ..., "gradient_estimator": "straight_through"}
// a nested config (visit_parts) as a nested object:
//   {"levels": 8, "quantize_dropout": false, ..., "level": {"codebook_size": 256, ...}}
// Numbers are JSON numbers (integer fields take JSON integers only), flags
// JSON booleans, enums their names as in checkpoints, FSQ's levels an array
// of integers.
//
// config_to_json writes every field. config_from_json(j, base) sets the keys
// j holds on a copy of base (so a file may name only what it changes, at
// any depth), then validates; it throws vqkit::error naming the key and the
// value for an unknown key (listing the known ones), a value of the wrong
// JSON type or out of its field's range, an unknown enum name (listing the
// known ones), and any config validate() refuses. base is never changed.
#pragma once

#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/io/checkpoint.hpp"
#include "vqkit/layers/fsq.hpp"
#include "vqkit/layers/grouped_vq.hpp"
#include "vqkit/layers/lfq.hpp"
#include "vqkit/layers/residual_vq.hpp"
#include "vqkit/layers/vector_quantizer.hpp"

namespace vqkit {

namespace detail {

template <class E>
std::string enum_names() {
  std::string out;
  for (E e : ckpt::enum_values<E>()) {
    if (!out.empty()) out += ", ";
    out += ckpt::enum_name(e);
  }
  return out;
}

template <class V>
struct is_std_vector : std::false_type {};
template <class V>
struct is_std_vector<std::vector<V>> : std::true_type {};

/// The name errors start with, by default.
template <class Config>
constexpr const char* config_name() {
  if constexpr (std::is_same_v<Config, VectorQuantizerConfig>)
    return "VectorQuantizerConfig";
  else if constexpr (std::is_same_v<Config, ResidualVQConfig>)
    return "ResidualVQConfig";
  else if constexpr (std::is_same_v<Config, GroupedVQConfig>)
    return "GroupedVQConfig";
  else if constexpr (std::is_same_v<Config, GroupedResidualVQConfig>)
    return "GroupedResidualVQConfig";
  else if constexpr (std::is_same_v<Config, FsqConfig>)
    return "FsqConfig";
  else if constexpr (std::is_same_v<Config, LfqConfig>)
    return "LfqConfig";
  else
    return "config";
}

template <class Config>
constexpr bool has_parts = requires(Config& c) { Config::visit_parts(c, [](const char*, auto&) {}); };

/// Reads JSON value v into field (key names it in errors).
template <class Json, class V>
void field_from_json(const char* where, const std::string& key, const Json& v, V& field) {
  const auto shown = [&] { return safetensors::detail::clip(v.dump()); };
  if constexpr (is_std_vector<V>::value) {
    VQKIT_REQUIRE(v.is_array(), where, key, "=", shown(), " must be an array");
    V values(v.size());
    for (std::size_t i = 0; i < v.size(); ++i)
      field_from_json(where, key + "[" + std::to_string(i) + "]", v[i], values[i]);
    field = std::move(values);
  } else if constexpr (std::is_same_v<V, bool>) {
    VQKIT_REQUIRE(v.is_boolean(), where, key, "=", shown(), " must be true or false");
    field = v.template get<bool>();
  } else if constexpr (std::is_enum_v<V>) {
    V e{};
    VQKIT_REQUIRE(v.is_string() && ckpt::parse_value(v.template get<std::string>(), e), where, key,
                  "=", shown(), " must be one of ", enum_names<V>());
    field = e;
  } else if constexpr (std::is_floating_point_v<V>) {
    VQKIT_REQUIRE(v.is_number(), where, key, "=", shown(), " must be a number");
    field = v.template get<V>();
  } else {
    static_assert(std::is_integral_v<V>, "config_from_json: unknown field type");
    using L = std::numeric_limits<V>;
    bool fits = false;
    if (v.is_number_unsigned()) {
      fits = v.template get<std::uint64_t>() <= static_cast<std::uint64_t>(L::max());
    } else if (v.is_number_integer()) {
      const auto x = v.template get<std::int64_t>();
      if constexpr (L::is_signed) {
        fits = x >= static_cast<std::int64_t>(L::min()) && x <= static_cast<std::int64_t>(L::max());
      } else {
        fits = x >= 0;
      }
    }
    VQKIT_REQUIRE(fits, where, key, "=", shown(), " must be an integer in [", +L::min(), ", ",
                  +L::max(), "]");
    field = v.is_number_unsigned() ? static_cast<V>(v.template get<std::uint64_t>())
                                   : static_cast<V>(v.template get<std::int64_t>());
  }
}

}  // namespace detail

/// Every field of c, in declaration order; a nested config as an object.
template <class Config>
nlohmann::ordered_json config_to_json(const Config& c) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  Config::visit_fields(c, [&](const FieldKey& key, const auto& v) {
    using V = std::remove_cvref_t<decltype(v)>;
    if constexpr (std::is_enum_v<V>) {
      j[key.str()] = detail::ckpt::enum_name(v);
    } else {
      j[key.str()] = v;
    }
  });
  if constexpr (detail::has_parts<Config>)
    Config::visit_parts(c, [&](const char* name, const auto& part) { j[name] = config_to_json(part); });
  return j;
}

/// base with the keys of j set (see the top of this file); `where` starts
/// every error message (a nested object's: "<where>: <name>").
template <class Json, class Config = VectorQuantizerConfig>
Config config_from_json(const Json& j, const Config& base = {},
                        const char* where = detail::config_name<Config>()) {
  VQKIT_REQUIRE(j.is_object(), where, "expected a JSON object, got ",
                safetensors::detail::clip(j.dump()));
  Config c = base;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    bool found = false;
    Config::visit_fields(c, [&](const FieldKey& k, auto& field) {
      if (found || !(k == key)) return;
      found = true;
      detail::field_from_json(where, key, it.value(), field);
    });
    if constexpr (detail::has_parts<Config>) {
      Config::visit_parts(c, [&](const char* name, auto& part) {
        if (found || key != name) return;
        found = true;
        const std::string inner = std::string(where) + ": " + name;
        part = config_from_json(it.value(), part, inner.c_str());
      });
    }
    if (!found) {
      std::string known;
      const auto add = [&](std::string_view k) {
        if (!known.empty()) known += ", ";
        known += k;
      };
      Config::visit_fields(c, [&](const FieldKey& k, const auto&) { add(k.str()); });
      if constexpr (detail::has_parts<Config>)
        Config::visit_parts(c, [&](const char* name, const auto&) { add(name); });
      detail::throw_error(where, "unknown key '", safetensors::detail::clip(key), "' (value ",
                          safetensors::detail::clip(it.value().dump()), "); known keys: ", known);
    }
  }
  try {
    c.validate();
  } catch (const error& e) {
    // (validate() names its own struct; prefix it when the caller named another place)
    if (std::string_view(where) == detail::config_name<Config>()) throw;
    detail::throw_error(where, e.what());
  }
  return c;
}

/// config_from_json over a file's text (errors name the file).
template <class Config = VectorQuantizerConfig>
Config load_config_json(const std::string& path, const Config& base = {}) {
  constexpr const char* where = "load_config_json";
  std::ifstream in(path);
  VQKIT_REQUIRE(in.good(), where, "cannot open '", path, "'");
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(ss.str());
  } catch (const nlohmann::json::exception& e) {
    detail::throw_error(where, "invalid JSON in '", path, "': ", e.what());
  }
  try {
    return config_from_json(j, base);
  } catch (const error& e) {
    detail::throw_error(where, "'", path, "': ", e.what());
  }
}

}  // namespace vqkit
