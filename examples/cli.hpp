// examples/cli.hpp - the command line of vqkit's example programs.
//
// Every program takes GNU-style long options, "--flag value" or
// "--flag=value", and --help (or -h), and exits with
//   0  success (--help included),
//   1  a run-time error: a vqkit::error (bad file, bad data) or an I/O error,
//   2  a bad command line (unknown option, missing or malformed value),
// printing "<program>: <message>" (run-time errors: "<program>: error:
// <message>") on stderr. Not part of the library.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdio>
#include <exception>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>

namespace vqkit::cli {

/// A bad command line: exit status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void bad_value(std::string_view flag, std::string_view value, std::string_view want) {
  throw UsageError(std::string(flag) + ": bad value '" + std::string(value) + "': expected " +
                   std::string(want));
}

/// text as an integer >= lo, or UsageError naming flag, text and `want`.
template <class Int>
Int parse_int(std::string_view flag, std::string_view text, Int lo, std::string_view want) {
  Int v{};
  const char* end = text.data() + text.size();
  const auto [p, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || p != end || v < lo) bad_value(flag, text, want);
  return v;
}

/// text as a finite number accepted by ok, or UsageError.
inline double parse_double(std::string_view flag, std::string_view text, bool (*ok)(double),
                           std::string_view want) {
  double v = 0;
  const char* end = text.data() + text.size();
  const auto [p, ec] = std::from_chars(text.data(), end, v);
  if (text.empty() || ec != std::errc() || p != end || !std::isfinite(v) || !ok(v))
    bad_value(flag, text, want);
  return v;
}

/// Whether s ends with suffix (a file flag's extension).
inline bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

/// Walks argv option by option:
///   cli::Args args(argc, argv);
///   while (args.next()) {
///     if (args.flag() == "--out") o.out = args.path();
///     else if (args.flag() == "--steps") o.steps = parse_int<int>(args.flag(), args.value(), 1, "...");
///     else args.unknown();
///   }
///   o.help = args.help();
class Args {
 public:
  Args(int argc, char** argv) : argc_(argc), argv_(argv) {}

  /// Moves to the next option (--help and -h are noted, not returned);
  /// false after the last one. A non-option argument is a UsageError.
  bool next() {
    for (;;) {
      if (++i_ >= argc_) return false;
      const std::string_view arg = argv_[i_];
      if (arg == "--help" || arg == "-h") {
        help_ = true;
        continue;
      }
      if (arg.substr(0, 2) != "--") throw UsageError("unexpected argument '" + std::string(arg) + "'");
      flag_ = arg;
      has_inline_ = false;
      if (const auto eq = arg.find('='); eq != std::string_view::npos) {
        flag_ = arg.substr(0, eq);
        inline_ = arg.substr(eq + 1);
        has_inline_ = true;
      }
      return true;
    }
  }

  std::string_view flag() const { return flag_; }

  /// The option's value: after '=', else the next argument (consumed).
  std::string_view value() {
    if (has_inline_) return inline_;
    if (i_ + 1 >= argc_) throw UsageError(std::string(flag_) + ": missing value");
    return argv_[++i_];
  }

  /// A value that names a file or folder (not empty).
  std::string path() {
    std::string v(value());
    if (v.empty()) bad_value(flag_, v, "a path");
    return v;
  }

  [[noreturn]] void unknown() const {
    throw UsageError("unknown option '" + std::string(flag_) + "' (see --help)");
  }

  bool help() const { return help_; }

 private:
  int argc_;
  char** argv_;
  int i_ = 0;
  std::string_view flag_, inline_;
  bool has_inline_ = false;
  bool help_ = false;
};

/// A program's main: parse() builds the options (with a `help` member),
/// usage() prints --help, run(options) does the work and returns the exit
/// status. Maps errors to the exit statuses above.
template <class Parse, class Usage, class Run>
int run_main(const char* program, Parse parse, Usage usage, Run run) {
  try {
    const auto options = parse();
    if (options.help) {
      usage();
      return 0;
    }
    return run(options);
  } catch (const UsageError& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 1;
  }
}

}  // namespace vqkit::cli
