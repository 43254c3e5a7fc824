// vqkit/optim/schedule.hpp - learning-rate schedule: linear warm-up, then
// cosine decay to a floor.
//
// WarmupCosine(peak_lr, warmup_steps W, total_steps N, min_lr) gives the lr
// for step s = 0, 1, 2, ... (s = number of optimiser steps already taken,
// i.e. the lr to use for the (s+1)-th step):
//   s < W:        lr = peak_lr * (s + 1) / W                  (reaches peak_lr at s = W-1)
//   W <= s < N:   lr = min_lr + (peak_lr - min_lr) * (1 + cos(pi * (s - W) / (N - W))) / 2
//   s >= N:       lr = min_lr
// so the decay starts at peak_lr (s = W) and approaches min_lr as s -> N.
// W = 0 means no warm-up; N = W means no decay phase (min_lr right after the
// warm-up). Checked (vqkit::error): peak_lr finite and >= 0, 0 <= min_lr <=
// peak_lr, W >= 0, N >= W, and s >= 0 in lr().
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "vqkit/core/error.hpp"

namespace vqkit {

class WarmupCosine {
 public:
  WarmupCosine(double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps,
               double min_lr = 0.0)
      : peak_(peak_lr), min_(min_lr), warmup_(warmup_steps), total_(total_steps) {
    const char* where = "WarmupCosine";
    VQKIT_REQUIRE(std::isfinite(peak_lr) && peak_lr >= 0.0, where,
                  "peak_lr must be finite and >= 0, got peak_lr=", peak_lr);
    VQKIT_REQUIRE(std::isfinite(min_lr) && min_lr >= 0.0 && min_lr <= peak_lr, where,
                  "min_lr must be in [0, peak_lr=", peak_lr, "], got min_lr=", min_lr);
    VQKIT_REQUIRE(warmup_steps >= 0, where, "warmup_steps must be >= 0, got warmup_steps=",
                  warmup_steps);
    VQKIT_REQUIRE(total_steps >= warmup_steps, where, "total_steps must be >= warmup_steps=",
                  warmup_steps, ", got total_steps=", total_steps);
  }

  /// The learning rate for step s (s optimiser steps already taken).
  double lr(std::int64_t s) const {
    VQKIT_REQUIRE(s >= 0, "WarmupCosine::lr", "step must be >= 0, got step=", s);
    if (s < warmup_)
      return peak_ * static_cast<double>(s + 1) / static_cast<double>(warmup_);
    if (s >= total_) return min_;
    const double progress =
        static_cast<double>(s - warmup_) / static_cast<double>(total_ - warmup_);
    return min_ + (peak_ - min_) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  }
  double operator()(std::int64_t s) const { return lr(s); }

  double peak_lr() const { return peak_; }
  double min_lr() const { return min_; }
  std::int64_t warmup_steps() const { return warmup_; }
  std::int64_t total_steps() const { return total_; }

 private:
  double peak_;
  double min_;
  std::int64_t warmup_;
  std::int64_t total_;
};

}  // namespace vqkit
