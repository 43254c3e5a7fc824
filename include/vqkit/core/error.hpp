// vqkit/core/error.hpp - the one exception type vqkit throws, and the macro
// that builds its message.
//
// Every rejected call throws vqkit::error with a message that names the
// function and the bad value, and leaves all state as it was (validation
// always happens before the first write).
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace vqkit {

/// Thrown on invalid arguments, bad files and inconsistent state.
class error : public std::invalid_argument {
 public:
  explicit error(const std::string& what) : std::invalid_argument(what) {}
};

namespace detail {
template <class... Parts>
[[noreturn]] inline void throw_error(const char* where, const Parts&... parts) {
  std::ostringstream os;
  os << where << ": ";
  (os << ... << parts);
  throw error(os.str());
}
}  // namespace detail

}  // namespace vqkit

/// VQKIT_REQUIRE(cond, "where", parts...) throws vqkit::error("where: parts...")
/// when cond is false. The parts are streamed, so values can be named inline:
///   VQKIT_REQUIRE(k >= 1, "kmeans", "k must be >= 1, got k=", k);
#define VQKIT_REQUIRE(cond, where, ...)                          \
  do {                                                           \
    if (!(cond)) ::vqkit::detail::throw_error(where, __VA_ARGS__); \
  } while (0)
