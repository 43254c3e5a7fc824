// vqkit/io/config_json.hpp - VectorQuantizerConfig as JSON, from its field
// list (VectorQuantizerConfig::visit_fields), so a new field needs no code
// here.
//
// One flat object keyed like the checkpoint metadata:
//   {"codebook_size": 1024, "dim": 64, "metric": "l2", ..., "ema.decay": 0.99,
//    "dead.policy": "kmeans_reinit", ..., "gradient_estimator": "straight_through"}
// Numbers are JSON numbers (integer fields take JSON integers only), flags
// JSON booleans, enums their names as in checkpoints.
//
// config_to_json writes every field. config_from_json(j, base) sets the keys
// j holds on a copy of base (so a file may name only what it changes), then
// validates; it throws vqkit::error naming the key and the value for an
// unknown key (listing the known ones), a value of the wrong JSON type or
// out of its field's range, an unknown enum name (listing the known ones),
// and any config validate() refuses. base is never changed.
#pragma once

#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "vqkit/core/config_fields.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/io/checkpoint.hpp"
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

/// Reads JSON value v into field (key names it in errors).
template <class Json, class V>
void field_from_json(const char* where, const std::string& key, const Json& v, V& field) {
  const auto shown = [&] { return safetensors::detail::clip(v.dump()); };
  if constexpr (std::is_same_v<V, bool>) {
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

/// Every field of c, in declaration order.
inline nlohmann::ordered_json config_to_json(const VectorQuantizerConfig& c) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  visit_config(c, [&](const FieldKey& key, const auto& v) {
    using V = std::remove_cvref_t<decltype(v)>;
    if constexpr (std::is_enum_v<V>) {
      j[key.str()] = detail::ckpt::enum_name(v);
    } else {
      j[key.str()] = v;
    }
  });
  return j;
}

/// base with the keys of j set (see the top of this file); `where` starts
/// every error message.
template <class Json>
VectorQuantizerConfig config_from_json(const Json& j, const VectorQuantizerConfig& base = {},
                                       const char* where = "VectorQuantizerConfig") {
  VQKIT_REQUIRE(j.is_object(), where, "expected a JSON object, got ",
                safetensors::detail::clip(j.dump()));
  VectorQuantizerConfig c = base;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    bool found = false;
    visit_config(c, [&](const FieldKey& k, auto& field) {
      if (found || !(k == key)) return;
      found = true;
      detail::field_from_json(where, key, it.value(), field);
    });
    if (!found) {
      std::string known;
      visit_config(c, [&](const FieldKey& k, const auto&) {
        if (!known.empty()) known += ", ";
        known += k.str();
      });
      detail::throw_error(where, "unknown key '", safetensors::detail::clip(key), "' (value ",
                          safetensors::detail::clip(it.value().dump()), "); known keys: ", known);
    }
  }
  try {
    c.validate();
  } catch (const error& e) {
    if (std::string_view(where) == "VectorQuantizerConfig") throw;
    detail::throw_error(where, e.what());
  }
  return c;
}

/// config_from_json over a file's text (errors name the file).
inline VectorQuantizerConfig load_config_json(const std::string& path,
                                              const VectorQuantizerConfig& base = {}) {
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
