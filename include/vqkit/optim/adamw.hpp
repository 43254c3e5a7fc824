// vqkit/optim/adamw.hpp - AdamW over a ParameterList (PyTorch's
// torch.optim.AdamW, amsgrad=False, maximize=False).
//
// For every parameter p with gradient g, at step t = 1, 2, ... (one step()
// call updates every parameter; the step count is shared):
//   p   <- p * (1 - lr * weight_decay)        only where ParameterRef::weight_decay
//   m   <- beta1 * m + (1 - beta1) * g        exp_avg,    zero before step 1
//   v   <- beta2 * v + (1 - beta2) * g^2      exp_avg_sq, zero before step 1
//   bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t     (bias corrections, in double)
//   p   <- p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// The weight decay is decoupled (applied to the weights, not added to the
// gradient) and uses the current lr, exactly as PyTorch does; a parameter
// whose weight_decay flag is false (biases, norms, embeddings) is not decayed.
// Gradients are read, never cleared: call zero_grad() (or the layers') before
// the next backward. Non-finite gradients are not checked here (clip_grad_norm
// returns the norm, so the caller can skip such a step).
//
// Options (AdamWOptions, PyTorch's defaults): lr 1e-3, beta1 0.9, beta2 0.999,
// eps 1e-8, weight_decay 1e-2. Checked: lr >= 0, beta1 and beta2 in [0, 1),
// eps >= 0, weight_decay >= 0, all finite. set_lr() (e.g. from a schedule)
// changes lr for the following steps.
//
// State (for checkpoints): the step count and, per parameter name N, the
// tensors "N.exp_avg" and "N.exp_avg_sq", each shaped like the parameter's
// RowMatrix. state() returns a copy; set_state() checks every tensor (present,
// shape, finite, exp_avg_sq >= 0, no unknown names, step >= 0) before it
// replaces anything. PyTorch keeps one step count per parameter; here they
// are always equal, so one is kept.
//
// Every check happens before the first write: a call that throws vqkit::error
// leaves the parameters and the optimiser state untouched. The update is
// elementwise, so results do not depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/error.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/core/parameter.hpp"

namespace vqkit {

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;

  void validate(const char* where) const {
    VQKIT_REQUIRE(std::isfinite(lr) && lr >= 0.0, where, "lr must be finite and >= 0, got lr=",
                  lr);
    VQKIT_REQUIRE(beta1 >= 0.0 && beta1 < 1.0, where, "beta1 must be in [0, 1), got beta1=",
                  beta1);
    VQKIT_REQUIRE(beta2 >= 0.0 && beta2 < 1.0, where, "beta2 must be in [0, 1), got beta2=",
                  beta2);
    VQKIT_REQUIRE(std::isfinite(eps) && eps >= 0.0, where, "eps must be finite and >= 0, got eps=",
                  eps);
    VQKIT_REQUIRE(std::isfinite(weight_decay) && weight_decay >= 0.0, where,
                  "weight_decay must be finite and >= 0, got weight_decay=", weight_decay);
  }
};

template <class T, class Backend = cpu>
class AdamW {
  static_assert(std::is_floating_point_v<T>, "AdamW<T>: T must be float or double");

 public:
  /// The checkpointable state: step count and "N.exp_avg" / "N.exp_avg_sq".
  struct State {
    std::int64_t step = 0;
    std::map<std::string, RowMatrix<T>> tensors;
  };

  AdamW(ParameterList<T> params, const AdamWOptions& options = {}, Backend backend = {})
      : backend_(std::move(backend)), opt_(options), params_(std::move(params)) {
    const char* where = "AdamW";
    opt_.validate(where);
    std::set<std::string> names;
    for (const auto& p : params_) {
      VQKIT_REQUIRE(!p.name.empty(), where, "a parameter has an empty name");
      VQKIT_REQUIRE(names.insert(p.name).second, where, "duplicate parameter name '", p.name, "'");
      VQKIT_REQUIRE(p.value != nullptr && p.grad != nullptr, where, "parameter '", p.name,
                    "' has a null value or gradient");
      VQKIT_REQUIRE(p.grad->rows() == p.value->rows() && p.grad->cols() == p.value->cols(), where,
                    "parameter '", p.name, "': gradient is ", p.grad->rows(), "x",
                    p.grad->cols(), ", value is ", p.value->rows(), "x", p.value->cols());
    }
    for (const auto& p : params_) {
      exp_avg_.push_back(RowMatrix<T>::Zero(p.value->rows(), p.value->cols()));
      exp_avg_sq_.push_back(RowMatrix<T>::Zero(p.value->rows(), p.value->cols()));
    }
  }

  /// One AdamW update of every parameter from its current gradient.
  void step() {
    const char* where = "AdamW::step";
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      VQKIT_REQUIRE(p.value->rows() == exp_avg_[i].rows() && p.value->cols() == exp_avg_[i].cols(),
                    where, "parameter '", p.name, "' is ", p.value->rows(), "x", p.value->cols(),
                    ", its optimiser state is ", exp_avg_[i].rows(), "x", exp_avg_[i].cols());
      VQKIT_REQUIRE(p.grad->rows() == p.value->rows() && p.grad->cols() == p.value->cols(), where,
                    "parameter '", p.name, "': gradient is ", p.grad->rows(), "x",
                    p.grad->cols(), ", value is ", p.value->rows(), "x", p.value->cols());
    }
    const std::int64_t t = step_ + 1;
    const double bc1 = 1.0 - std::pow(opt_.beta1, static_cast<double>(t));
    const double bc2 = 1.0 - std::pow(opt_.beta2, static_cast<double>(t));
    const T step_size = static_cast<T>(opt_.lr / bc1);
    const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
    const T b1 = static_cast<T>(opt_.beta1), b2 = static_cast<T>(opt_.beta2);
    const T one_m_b1 = static_cast<T>(1.0 - opt_.beta1), one_m_b2 = static_cast<T>(1.0 - opt_.beta2);
    const T eps = static_cast<T>(opt_.eps);
    const T decay = static_cast<T>(1.0 - opt_.lr * opt_.weight_decay);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      T* w = p.value->data();
      const T* g = p.grad->data();
      T* m = exp_avg_[i].data();
      T* v = exp_avg_sq_[i].data();
      const bool wd = p.weight_decay && opt_.weight_decay != 0.0;
      const Index n = p.value->size();
#pragma omp parallel for schedule(static) num_threads(backend_.num_threads()) if (n > 32768)
      for (Index k = 0; k < n; ++k) {
        if (wd) w[k] *= decay;
        m[k] = b1 * m[k] + one_m_b1 * g[k];
        v[k] = b2 * v[k] + one_m_b2 * g[k] * g[k];
        const T denom = std::sqrt(v[k]) / bc2_sqrt + eps;
        w[k] -= step_size * (m[k] / denom);
      }
    }
    step_ = t;
  }

  /// Sets every parameter's gradient to zero.
  void zero_grad() {
    for_each_parameter(backend_, params_, [](const ParameterRef<T>& p) { p.grad->setZero(); });
  }

  void set_lr(double lr) {
    VQKIT_REQUIRE(std::isfinite(lr) && lr >= 0.0, "AdamW::set_lr",
                  "lr must be finite and >= 0, got lr=", lr);
    opt_.lr = lr;
  }
  double lr() const { return opt_.lr; }
  std::int64_t step_count() const { return step_; }
  const AdamWOptions& options() const { return opt_; }
  const ParameterList<T>& parameters() const { return params_; }
  const Backend& backend() const { return backend_; }

  /// The moment estimates of the parameter called name.
  const RowMatrix<T>& exp_avg(const std::string& name) const { return exp_avg_[find(name)]; }
  const RowMatrix<T>& exp_avg_sq(const std::string& name) const {
    return exp_avg_sq_[find(name)];
  }

  /// The names state() uses, in parameter order: N.exp_avg, N.exp_avg_sq, ...
  std::vector<std::string> state_names() const {
    std::vector<std::string> out;
    for (const auto& p : params_) {
      out.push_back(p.name + ".exp_avg");
      out.push_back(p.name + ".exp_avg_sq");
    }
    return out;
  }

  State state() const {
    State s;
    s.step = step_;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      s.tensors[params_[i].name + ".exp_avg"] = exp_avg_[i];
      s.tensors[params_[i].name + ".exp_avg_sq"] = exp_avg_sq_[i];
    }
    return s;
  }

  /// Replaces the step count and the moments; checks everything first.
  void set_state(const State& s) {
    const char* where = "AdamW::set_state";
    VQKIT_REQUIRE(s.step >= 0, where, "step must be >= 0, got step=", s.step);
    VQKIT_REQUIRE(s.tensors.size() == 2 * params_.size(), where, "state holds ", s.tensors.size(),
                  " tensors, expected 2 per parameter (", 2 * params_.size(), ")");
    std::vector<const RowMatrix<T>*> found;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const auto& p = params_[i];
      for (const char* suffix : {".exp_avg", ".exp_avg_sq"}) {
        const std::string key = p.name + suffix;
        const auto it = s.tensors.find(key);
        VQKIT_REQUIRE(it != s.tensors.end(), where, "state has no tensor '", key, "'");
        const RowMatrix<T>& m = it->second;
        VQKIT_REQUIRE(m.rows() == p.value->rows() && m.cols() == p.value->cols(), where, "'", key,
                      "' is ", m.rows(), "x", m.cols(), ", expected ", p.value->rows(), "x",
                      p.value->cols());
        VQKIT_REQUIRE(m.allFinite(), where, "'", key, "' holds a non-finite value");
        if (std::string(suffix) == ".exp_avg_sq")
          VQKIT_REQUIRE(m.size() == 0 || m.minCoeff() >= T(0), where, "'", key,
                        "' holds a negative value (", m.minCoeff(), ")");
        found.push_back(&m);
      }
    }
    for (std::size_t i = 0; i < params_.size(); ++i) {
      exp_avg_[i] = *found[2 * i];
      exp_avg_sq_[i] = *found[2 * i + 1];
    }
    step_ = s.step;
  }

 private:
  Backend backend_;
  AdamWOptions opt_;
  ParameterList<T> params_;
  std::vector<RowMatrix<T>> exp_avg_;
  std::vector<RowMatrix<T>> exp_avg_sq_;
  std::int64_t step_ = 0;

  std::size_t find(const std::string& name) const {
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (params_[i].name == name) return i;
    ::vqkit::detail::throw_error("AdamW", "no parameter named '", name, "'");
  }
};

}  // namespace vqkit
