// tests/field_ranges.hpp - checks a config's field list (Config::visit_fields,
// core/config_fields.hpp) against its validate(): a value just outside each
// finite end of a bounded field's range, and NaN for a float field, must be
// refused with "<where>: <key> must ..., got <key>=...".
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>
#include <vqkit/core/config_fields.hpp>
#include <vqkit/core/error.hpp>

namespace vqkit::test {

/// Runs the checks above on copies of `valid` (which must validate); returns
/// the number of bounded fields, for the caller to compare with its own count.
template <class Config>
int check_field_ranges(const Config& valid, const std::string& where) {
  const auto message = [](const Config& c) -> std::string {
    try {
      c.validate();
    } catch (const vqkit::error& e) {
      return e.what();
    }
    return "no exception";
  };
  REQUIRE(message(valid) == "no exception");
  int bounded = 0;
  Config::visit_fields(valid, [&](const FieldKey& key, const auto& v, const FieldRange& range) {
    using V = std::remove_cvref_t<decltype(v)>;
    if constexpr (std::is_arithmetic_v<V> && !std::is_same_v<V, bool>) {
      if (range.any) return;
      ++bounded;
      std::vector<double> outside;
      if (std::isfinite(range.lo)) outside.push_back(range.lo_open ? range.lo : range.lo - 1);
      if (std::isfinite(range.hi)) outside.push_back(range.hi_open ? range.hi : range.hi + 1);
      if constexpr (std::is_floating_point_v<V>) outside.push_back(std::nan(""));
      for (const double x : outside) {
        Config c = valid;
        Config::visit_fields(c, [&](const FieldKey& k, auto& field) {
          if constexpr (std::is_same_v<std::remove_cvref_t<decltype(field)>, V>)
            if (k == key.str()) field = static_cast<V>(x);
        });
        INFO(key << " = " << x);
        CHECK_THAT(message(c), Catch::Contains(where + ": " + key.str() + " must") &&
                                   Catch::Contains("got " + key.str() + "="));
      }
    }
  });
  return bounded;
}

}  // namespace vqkit::test
