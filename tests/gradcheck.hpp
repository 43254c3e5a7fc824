// Shared gradient-checking helpers for vqkit's tests: central finite
// differences in double precision and a relative-error measure.
//
// numeric_grad(loss, target) perturbs every entry of `target` in place and
// evaluates the scalar `loss()` (which must read `target`), so it works for
// layer inputs, parameters, or any tensor a forward pass depends on.
// check_gradients(layer, x, rng) runs the standard layer contract
// (forward(x, y) -> ctx, backward(ctx, dy, &dx), parameters(), zero_grad())
// against it, with L = sum(G * y) for a random G.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include <vqkit/core/random.hpp>
#include <vqkit/core/types.hpp>

namespace vqkit::test {

inline RowMatrix<double> randn(Index rows, Index cols, Rng& rng, double scale = 1.0) {
  RowMatrix<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = scale * rng.normal();
  return m;
}

inline double max_abs(const RowMatrix<double>& m) {
  return m.size() ? m.cwiseAbs().maxCoeff() : 0.0;
}

/// max |a - b| / max(max |a|, max |b|); 0 when both are exactly zero.
inline double rel_err(const RowMatrix<double>& a, const RowMatrix<double>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  const double scale = std::max(max_abs(a), max_abs(b));
  if (scale == 0.0) return 0.0;
  return max_abs(a - b) / scale;
}

/// Fourth-order central differences of loss() with respect to every entry of
/// `target`:  dL/dt ~ (-L(t+2h) + 8 L(t+h) - 8 L(t-h) + L(t-2h)) / (12 h).
/// The wide stencil (truncation O(h^4)) keeps rounding noise small next to
/// small gradients. `target` is restored exactly.
inline RowMatrix<double> numeric_grad(const std::function<double()>& loss,
                                      RowMatrix<double>& target, double h = 1e-3) {
  RowMatrix<double> out(target.rows(), target.cols());
  for (Index i = 0; i < target.size(); ++i) {
    const double orig = target.data()[i];
    double l[4];
    const double steps[4] = {2 * h, h, -h, -2 * h};
    for (int s = 0; s < 4; ++s) {
      target.data()[i] = orig + steps[s];
      l[s] = loss();
    }
    target.data()[i] = orig;
    out.data()[i] = (8 * (l[1] - l[2]) - (l[0] - l[3])) / (12 * h);
  }
  return out;
}

/// sum(G * y) for y = layer.forward(x).
template <class Layer>
double weighted_output(const Layer& layer, const RowMatrix<double>& x,
                       const RowMatrix<double>& g) {
  RowMatrix<double> y;
  layer.forward(x, y);
  return (g.array() * y.array()).sum();
}

/// Analytic backward against finite differences, for the input and every
/// parameter of a layer with the standard contract.
template <class Layer>
void check_gradients(Layer& layer, const RowMatrix<double>& x, Rng& rng, double tol = 1e-6) {
  RowMatrix<double> y;
  const auto ctx = layer.forward(x, y);
  const RowMatrix<double> g = randn(y.rows(), y.cols(), rng);
  layer.zero_grad();
  RowMatrix<double> dx;
  layer.backward(ctx, g, &dx);

  {
    RowMatrix<double> xp = x;
    const RowMatrix<double> fdx =
        numeric_grad([&] { return weighted_output(layer, xp, g); }, xp);
    INFO("input gradient, x is " << x.rows() << "x" << x.cols());
    CHECK(rel_err(dx, fdx) < tol);
  }
  for (auto& p : layer.parameters()) {
    INFO("parameter " << p.name);
    const RowMatrix<double> fd = numeric_grad([&] { return weighted_output(layer, x, g); },
                                              *p.value);
    CHECK(rel_err(*p.grad, fd) < tol);
  }
}

/// Every parameter value and gradient of a layer, to show that a throwing
/// call changed nothing.
template <class Layer>
std::vector<RowMatrix<double>> snapshot(Layer& layer) {
  std::vector<RowMatrix<double>> s;
  for (auto& p : layer.parameters()) {
    s.push_back(*p.value);
    s.push_back(*p.grad);
  }
  return s;
}

/// Same shapes and bit-identical values.
inline bool same(const std::vector<RowMatrix<double>>& a, const std::vector<RowMatrix<double>>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].rows() != b[i].rows() || a[i].cols() != b[i].cols() || a[i] != b[i]) return false;
  return true;
}

/// |f - d| <= tol * max(1, |d|) entrywise.
inline bool close_float(const RowMatrix<float>& f, const RowMatrix<double>& d, double tol = 1e-5) {
  if (f.rows() != d.rows() || f.cols() != d.cols()) return false;
  for (Index i = 0; i < d.size(); ++i)
    if (!(std::abs(static_cast<double>(f.data()[i]) - d.data()[i]) <=
          tol * std::max(1.0, std::abs(d.data()[i]))))
      return false;
  return true;
}

/// Path of a committed PyTorch fixture under tests/fixtures.
inline std::string fixture_file(const std::string& rel) {
#ifdef VQKIT_FIXTURE_DIR
  return std::string(VQKIT_FIXTURE_DIR) + "/" + rel;
#else
  return rel;
#endif
}

}  // namespace vqkit::test
