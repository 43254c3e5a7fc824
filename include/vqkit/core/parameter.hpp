// vqkit/core/parameter.hpp - how a layer exposes its parameters.
//
// Every layer stores its parameters and their gradients as RowMatrix<T>
// (a bias is a 1 x n row) and lists them with parameters(prefix): one
// ParameterRef per tensor, named as PyTorch would name it ("weight", "bias",
// prefixed by the owner, e.g. "proj_in.weight"), so optimizers can walk them
// and checkpoints can name them. Backward passes accumulate (+=) into grad;
// zero_grad() clears them.
#pragma once

#include <string>
#include <vector>

#include "vqkit/core/backend.hpp"
#include "vqkit/core/types.hpp"

namespace vqkit {

template <class T>
struct ParameterRef {
  std::string name;
  RowMatrix<T>* value = nullptr;
  RowMatrix<T>* grad = nullptr;
  /// PyTorch-style shape: {out, in} for a weight, {n} for a bias or a norm.
  std::vector<Index> shape;
  /// false for biases, norm scales/shifts and embeddings (AdamW excludes them).
  bool weight_decay = true;
};

template <class T>
using ParameterList = std::vector<ParameterRef<T>>;

/// Appends `from` to `to`, prefixing each name with `prefix`.
template <class T>
void append_parameters(ParameterList<T>& to, ParameterList<T> from, const std::string& prefix) {
  for (auto& p : from) {
    p.name = prefix + p.name;
    to.push_back(std::move(p));
  }
}

/// f(p) for every parameter p of the list, the parameters spread over be's
/// threads (each one whole on one thread): for elementwise work on the
/// gradients (zeroing, scaling), whose bits do not depend on the split.
template <class T, class F>
void for_each_parameter(const cpu& be, const ParameterList<T>& params, F&& f) {
  parallel_for_dynamic(be, Index(params.size()), 1, [&](Index i) { f(params[std::size_t(i)]); });
}

}  // namespace vqkit
