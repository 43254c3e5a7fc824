// vqkit/util/progress.hpp - training-loop tooling: a progress line, a CSV
// logger, and PNG curves through gnuplot when it is installed.
//
// ProgressBar(total, os, width): update(step, metrics) redraws one line
//   [=========>          ]  120/4000   3.2 it/s  ETA 20m13s  loss 0.1234  ppl 312.5
// step counts completed steps (1..total); it/s = steps done since the bar
// was made / elapsed seconds; ETA = (total - step) / (it/s). On a terminal
// the line is redrawn in place ('\r'); otherwise (a log file) a full line is
// written at most every `min_interval` seconds and always at the last step.
// format_line() builds the text from given numbers (testable, no clock).
//
// CsvLogger(path, columns): writes the header line "c1,c2,..." (truncating
// the file), then row(values) appends one line per call and flushes it, so a
// crashed run keeps every logged row. Column names must be non-empty without
// ',', '"' or line breaks; each row needs exactly one value per column.
// Values print with up to 10 significant digits; NaN and Inf as nan, inf, -inf.
//
// plot_csv(csv, png, x_column, y_columns, title, log_y): writes the gnuplot
// script `png + ".gp"` (pngcairo if gnuplot has it, else png; one curve per y
// column) and runs `gnuplot <script>` when a gnuplot is on PATH. Returns true
// when the PNG was made; otherwise prints why to `log` (default std::cerr),
// keeps the script for later, and returns false. Paths with quote or
// newline characters are rejected (they would break the script).
#pragma once

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

using Metrics = std::vector<std::pair<std::string, double>>;

/// "1h02m03s", "4m05s", "7s"; "--" when unknown (not finite or negative).
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--";
  const auto s = static_cast<long long>(std::llround(seconds));
  std::ostringstream os;
  if (s >= 3600) os << s / 3600 << "h" << std::setw(2) << std::setfill('0') << (s % 3600) / 60 << "m"
                    << std::setw(2) << (s % 60) << "s";
  else if (s >= 60) os << s / 60 << "m" << std::setw(2) << std::setfill('0') << s % 60 << "s";
  else os << s << "s";
  return os.str();
}

inline std::string format_number(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  std::ostringstream os;
  os << std::setprecision(10) << v;
  return os.str();
}

class ProgressBar {
 public:
  explicit ProgressBar(Index total, std::ostream& os = std::cerr, int width = 30,
                       double min_interval = 5.0)
      : total_(total), os_(&os), width_(width), min_interval_(min_interval),
        start_(std::chrono::steady_clock::now()) {
    VQKIT_REQUIRE(total >= 1, "ProgressBar", "total must be >= 1, got ", total);
    VQKIT_REQUIRE(width >= 1, "ProgressBar", "width must be >= 1, got ", width);
    tty_ = (&os == &std::cerr && isatty(2)) || (&os == &std::cout && isatty(1));
  }

  static std::string format_line(Index step, Index total, double elapsed_s, const Metrics& metrics,
                                 int width = 30) {
    std::ostringstream os;
    const double frac = total > 0 ? std::min(1.0, static_cast<double>(step) / static_cast<double>(total)) : 0.0;
    const int filled = static_cast<int>(frac * width);
    os << '[';
    for (int i = 0; i < width; ++i) os << (i < filled ? '=' : (i == filled ? '>' : ' '));
    os << "] " << std::setw(static_cast<int>(std::to_string(total).size())) << step << '/' << total;
    const double rate = elapsed_s > 0 ? static_cast<double>(step) / elapsed_s : 0.0;
    os << "  " << std::fixed << std::setprecision(rate >= 100 ? 0 : (rate >= 10 ? 1 : 2)) << rate
       << " it/s  ETA "
       << format_duration(rate > 0 ? static_cast<double>(total - step) / rate : -1.0);
    os.unsetf(std::ios::fixed);
    for (const auto& [name, v] : metrics) os << "  " << name << ' ' << std::setprecision(4) << v;
    return os.str();
  }

  void update(Index step, const Metrics& metrics = {}) {
    const double el = elapsed();
    const bool last = step >= total_;
    if (!tty_ && !last && last_print_ >= 0 && el - last_print_ < min_interval_) return;
    last_print_ = el;
    const std::string line = format_line(step, total_, el, metrics, width_);
    if (tty_) {
      *os_ << '\r' << line;
      if (line.size() < last_len_) *os_ << std::string(last_len_ - line.size(), ' ');
      last_len_ = line.size();
      if (last) *os_ << '\n';
    } else {
      *os_ << line << '\n';
    }
    os_->flush();
  }

  double elapsed() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  Index total_;
  std::ostream* os_;
  int width_;
  double min_interval_;
  std::chrono::steady_clock::time_point start_;
  bool tty_ = false;
  double last_print_ = -1;
  std::size_t last_len_ = 0;
};

class CsvLogger {
 public:
  CsvLogger(const std::string& path, std::vector<std::string> columns)
      : path_(path), columns_(std::move(columns)) {
    constexpr const char* w = "CsvLogger";
    VQKIT_REQUIRE(!columns_.empty(), w, "no columns for '", path, "'");
    for (const auto& c : columns_)
      VQKIT_REQUIRE(!c.empty() && c.find_first_of(",\"\r\n") == std::string::npos, w,
                    "bad column name '", c, "' (empty, or holds a comma, quote or line break)");
    out_.open(path, std::ios::trunc);
    VQKIT_REQUIRE(out_.good(), w, "cannot open '", path, "' for writing");
    for (std::size_t i = 0; i < columns_.size(); ++i) out_ << (i ? "," : "") << columns_[i];
    out_ << '\n';
    out_.flush();
  }

  void row(const std::vector<double>& values) {
    VQKIT_REQUIRE(values.size() == columns_.size(), "CsvLogger::row", "got ", values.size(),
                  " values for ", columns_.size(), " columns of '", path_, "'");
    for (std::size_t i = 0; i < values.size(); ++i) out_ << (i ? "," : "") << format_number(values[i]);
    out_ << '\n';
    out_.flush();
    VQKIT_REQUIRE(out_.good(), "CsvLogger::row", "write to '", path_, "' failed");
  }

  const std::vector<std::string>& columns() const { return columns_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<std::string> columns_;
  std::ofstream out_;
};

/// True when a program named `name` is on PATH (POSIX `command -v`).
inline bool program_available(const std::string& name) {
  VQKIT_REQUIRE(name.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.") ==
                    std::string::npos,
                "program_available", "bad program name '", name, "'");
  const std::string cmd = "command -v " + name + " >/dev/null 2>&1";
  return std::system(cmd.c_str()) == 0;
}

/// The gnuplot script plot_csv writes (exposed for tests).
inline std::string gnuplot_script(const std::string& csv, const std::string& png,
                                  const std::string& x_column,
                                  const std::vector<std::string>& y_columns,
                                  const std::string& title, bool log_y) {
  constexpr const char* w = "plot_csv";
  for (const std::string* s : {&csv, &png, &x_column, &title})
    VQKIT_REQUIRE(s->find_first_of("'\"\r\n\\") == std::string::npos, w, "'", *s,
                  "' holds a quote, backslash or line break");
  VQKIT_REQUIRE(!y_columns.empty(), w, "no y columns to plot");
  for (const auto& y : y_columns)
    VQKIT_REQUIRE(!y.empty() && y.find_first_of("'\"\r\n\\,") == std::string::npos, w,
                  "bad column name '", y, "'");
  std::ostringstream s;
  s << "# written by vqkit::plot_csv\n"
    << "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 1000,600 } "
       "else { set terminal png size 1000,600 }\n"
       "set termoption noenhanced\n"
    << "set output '" << png << "'\n"
    << "set datafile separator ','\n"
    << "set key autotitle columnhead\n"
    << "set title '" << title << "'\n"
    << "set xlabel '" << x_column << "'\n"
    << "set grid\n";
  if (log_y) s << "set logscale y\n";
  s << "plot ";
  for (std::size_t i = 0; i < y_columns.size(); ++i)
    s << (i ? ", \\\n     " : "") << "'" << csv << "' using (column('" << x_column
      << "')):(column('" << y_columns[i] << "')) with lines lw 2 title '" << y_columns[i] << "'";
  s << "\n";
  return s.str();
}

inline bool plot_csv(const std::string& csv, const std::string& png, const std::string& x_column,
                     const std::vector<std::string>& y_columns, const std::string& title = "",
                     bool log_y = false, std::ostream& log = std::cerr) {
  const std::string script = gnuplot_script(csv, png, x_column, y_columns, title, log_y);
  const std::string gp = png + ".gp";
  {
    std::ofstream out(gp, std::ios::trunc);
    VQKIT_REQUIRE(out.good(), "plot_csv", "cannot write '", gp, "'");
    out << script;
  }
  if (!program_available("gnuplot")) {
    log << "plot_csv: gnuplot not found; wrote " << gp << " (run `gnuplot " << gp
        << "` to make " << png << ")\n";
    return false;
  }
  const std::string cmd = "gnuplot '" + gp + "'";
  if (std::system(cmd.c_str()) != 0) {
    log << "plot_csv: gnuplot failed on " << gp << "\n";
    return false;
  }
  return true;
}

}  // namespace vqkit
