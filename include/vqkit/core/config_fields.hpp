// vqkit/core/config_fields.hpp - the vocabulary of a config struct's field
// list: each config struct lists its fields once, in a static member
//
//   template <class Self, class F>
//   static void visit_fields(Self& self, F&& f, const char* prefix = "");
//
// which calls detail::visit_field(f, {prefix, "name"}, self.name, range) per
// field, in declaration order (nested option structs by their own list, with
// a prefix such as "ema."). That one list drives the struct's validation
// messages (detail::field_checker), the quantizer's checkpoint keys
// (io/checkpoint.hpp), its data-parallel fingerprint
// (distributed/data_parallel.hpp) and its JSON (io/config_json.hpp).
// Checks that tie two fields together stay in the struct's validate().
// A config that holds another whole config (ResidualVQConfig's `level`,
// GroupedConfig's `head`) also has
//   static void visit_parts(Self& self, F&& f);   // f("level", self.level)
// which its JSON (a nested object) and nothing else uses: the nested
// config validates, checkpoints and fingerprints itself.
#pragma once

#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>

#include "vqkit/core/error.hpp"

namespace vqkit {

/// A field's key: prefix + name ("ema." + "decay"); no allocation until str().
struct FieldKey {
  const char* prefix = "";
  const char* name = "";

  std::string str() const { return std::string(prefix) + name; }
  bool operator==(std::string_view key) const {
    const std::string_view p(prefix);
    return key.size() >= p.size() && key.substr(0, p.size()) == p && key.substr(p.size()) == name;
  }
  friend std::ostream& operator<<(std::ostream& os, const FieldKey& k) {
    return os << k.prefix << k.name;
  }
};

/// The values a numeric field admits: an interval, each end open or closed
/// (an infinite end is always open, so a float field is finite), or any
/// value (enums, bools, seeds). `wording` replaces the generated description
/// where the interval alone would mislead (e.g. a -1 sentinel).
struct FieldRange {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool lo_open = true;
  bool hi_open = true;
  bool any = true;
  const char* wording = nullptr;

  static constexpr FieldRange unrestricted() { return {}; }
  static constexpr FieldRange at_least(double a, const char* wording = nullptr) {
    return {a, std::numeric_limits<double>::infinity(), false, true, false, wording};
  }
  static constexpr FieldRange above(double a) {
    return {a, std::numeric_limits<double>::infinity(), true, true, false, nullptr};
  }
  static constexpr FieldRange closed(double a, double b) { return {a, b, false, false, false, nullptr}; }
  static constexpr FieldRange open(double a, double b) { return {a, b, true, true, false, nullptr}; }
  static constexpr FieldRange closed_open(double a, double b) { return {a, b, false, true, false, nullptr}; }

  template <class V>
  bool admits(const V& v) const {
    if constexpr (std::is_arithmetic_v<V> && !std::is_same_v<V, bool>) {
      if (any) return true;
      const double x = static_cast<double>(v);  // NaN fails every comparison below
      return (lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi);
    } else {
      return true;
    }
  }

  friend std::ostream& operator<<(std::ostream& os, const FieldRange& r) {
    if (r.wording != nullptr) return os << r.wording;
    if (r.any) return os << "be anything";
    const bool finite_hi = r.hi < std::numeric_limits<double>::infinity();
    if (!finite_hi) return os << "be " << (r.lo_open ? "> " : ">= ") << r.lo;
    return os << "lie in " << (r.lo_open ? "(" : "[") << r.lo << ", " << r.hi
              << (r.hi_open ? ")" : "]");
  }
};

namespace detail {

/// Calls a field-list visitor: f(key, field, range), or f(key, field) for a
/// visitor that ignores the ranges.
template <class F, class V>
void visit_field(F& f, const FieldKey& key, V& field, const FieldRange& range) {
  if constexpr (std::is_invocable_v<F&, const FieldKey&, V&, const FieldRange&>) {
    f(key, field, range);
  } else {
    f(key, field);
  }
}

/// A visitor that throws vqkit::error("<where>: <key> must <range>, got
/// <key>=<value>", or "must be finite" for a NaN or infinite float) at the
/// first field outside its range.
inline auto field_checker(const char* where) {
  return [where](const FieldKey& key, const auto& v, const FieldRange& range) {
    using V = std::remove_cvref_t<decltype(v)>;
    if constexpr (std::is_floating_point_v<V>) {
      VQKIT_REQUIRE(range.any || std::isfinite(v), where, key, " must be finite, got ", key, "=", v);
    }
    if constexpr (std::is_arithmetic_v<V>) {
      VQKIT_REQUIRE(range.admits(v), where, key, " must ", range, ", got ", key, "=", v);
    }
  };
}

}  // namespace detail
}  // namespace vqkit
