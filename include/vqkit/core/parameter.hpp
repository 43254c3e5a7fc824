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

}  // namespace vqkit
