// vqkit/layers/quantizer_surface.hpp - the forward overloads every quantizer
// of the family offers, written once.
//
// A quantizer Q derives from QuantizerSurface<Q, T> and provides
//   Index dim() const;  static constexpr const char* name;  struct Context;
//   void run(ConstMatrixRef<T> x, const RowMask* mask, RowMatrix<T>& out, Context& ctx);
// and gets forward(x, out, ctx), forward(x, mask, out, ctx) (the mask's
// length checked against the batch, by name, before run) and
// forward(x, out) -> Context.
// and the data-parallel parts every quantizer shares (docs/distributed.md):
// reducer(), collective() (a reducer is attached and the quantizer trains),
// step_reducer() and check_input(), which every run() calls first: it checks
// the batch and mask, on every rank together in a collective step.
// GridQuantizer<Q, T> adds what the fixed-grid quantizers (FSQ, LFQ) share:
// their ImplicitCodebook (usage, step, training flag), its accessors and
// set_reducer. CompositeQuantizer<Q, T> adds what the quantizers built of
// VectorQuantizers (ResidualVQ, GroupedVQ) share: set_reducer attaching
// every part to the same Reducer, sync_memory_bank.
#pragma once

#include <cstdint>
#include <type_traits>

#include "vqkit/core/check.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/distributed/data_parallel.hpp"
#include "vqkit/distributed/reducer.hpp"
#include "vqkit/quantizer/implicit_codebook.hpp"

namespace vqkit::detail {

template <class Q, class T>
class QuantizerSurface {
 public:
  template <class Context>
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& out, Context& ctx) {
    self().run(x, nullptr, out, ctx);
  }
  /// (run() checks the batch and the mask's length: check_input)
  template <class Context>
  void forward(ConstMatrixRef<T> x, const RowMask& mask, RowMatrix<T>& out, Context& ctx) {
    self().run(x, &mask, out, ctx);
  }
  auto forward(ConstMatrixRef<T> x, RowMatrix<T>& out) {
    typename Q::Context ctx;
    self().run(x, nullptr, out, ctx);
    return ctx;
  }

  Reducer* reducer() const { return reducer_; }
  /// Whether a training step is a collective (a reducer of size > 1 is
  /// attached and the quantizer trains); eval-mode calls stay local.
  bool collective() const { return reducer_ != nullptr && self().is_training(); }
  /// The reducer of a collective step, else nullptr (a local step).
  Reducer* step_reducer() const { return collective() ? reducer_ : nullptr; }

 protected:
  /// The batch's shape, the mask's length and (finite_rows) the real rows'
  /// finiteness, named `what`; when collective(), on every rank together
  /// (if one rank's check throws, every rank throws). Returns the real rows
  /// of the whole batch (over every rank when collective()).
  Index check_input(ConstMatrixRef<T> x, const RowMask* mask, bool finite_rows,
                    const char* what = "x") const {
    auto check = [&] {
      require_batch(x, self().dim(), Q::name, what);
      if (mask) require_mask(*mask, x.rows(), Q::name);
      if (finite_rows) require_finite_rows<T>(x, mask, Q::name, what);
      return SliceCheck{mask ? Index(mask->count()) : x.rows(), true};
    };
    return collective() ? check_every_slice(*reducer_, check, Q::name).rows : check().rows;
  }

  /// Adds every field of the config (Q::config()) to f: the part of a
  /// fingerprint that set_reducer compares across ranks.
  void fingerprint_config(Fingerprint& f) const {
    using Config = std::remove_cvref_t<decltype(self().config())>;
    Config::visit_fields(self().config(), [&](const FieldKey&, const auto& v) {
      using V = std::remove_cvref_t<decltype(v)>;
      if constexpr (requires { v.data(); v.size(); })
        f.bytes(v.data(), v.size() * sizeof(typename V::value_type));  // (the values, not the vector)
      else
        f.values(v);
    });
  }

  Reducer* reducer_ = nullptr;  ///< attached by the quantizer's set_reducer (size > 1 only)

 private:
  Q& self() { return static_cast<Q&>(*this); }
  const Q& self() const { return static_cast<const Q&>(*this); }
};

template <class Q, class T>
class GridQuantizer : public QuantizerSurface<Q, T> {
 public:
  using State = ImplicitCodebook::State;

  void train(bool on = true) { book_.set_training(on); }
  void eval() { book_.set_training(false); }
  bool is_training() const { return book_.training(); }
  std::int64_t step() const { return book_.step(); }
  const UsageTracker& usage() const { return book_.usage(); }
  State state() const { return book_.state(); }
  void set_state(State s) { book_.set_state(std::move(s), Q::state_name); }

  /// Data-parallel training (docs/distributed.md), as
  /// VectorQuantizer::set_reducer: collective; throws on every rank, with
  /// nothing attached, unless every rank's config and usage state equal
  /// rank 0's. A training step then checks every rank's slice together and
  /// sums the batch's code counts (usage, perplexity and the usage state are
  /// the whole batch's); LFQ's codebook entropy is the whole batch's too.
  /// nullptr (or a reducer of size 1) returns to the single-process path.
  void set_reducer(Reducer* reducer) {
    this->reducer_ = nullptr;
    if (reducer == nullptr || reducer->size() == 1) return;
    require_same_on_every_rank(*reducer, fingerprint(), Q::set_reducer_name);
    this->reducer_ = reducer;
  }
  /// What set_reducer compares across ranks: the config and the usage state.
  std::uint64_t fingerprint() const {
    Fingerprint f;
    this->fingerprint_config(f);
    const State s = book_.state();
    f.matrix(s.steps_since_used);
    f.matrix(s.used_since_reset);
    f.values(s.step, s.training);
    return f.value();
  }

 protected:
  GridQuantizer(Index K, std::int64_t usage_window) : book_(K, usage_window) {}
  ImplicitCodebook book_;
};

template <class Q, class T>
class CompositeQuantizer : public QuantizerSurface<Q, T> {
 public:
  /// Data-parallel training (docs/distributed.md), as
  /// VectorQuantizer::set_reducer: collective; throws on every rank, with
  /// no part attached, unless every rank's quantizer (its config, its own
  /// state and every part's) equals rank 0's. Then every part is attached
  /// and a training step checks each rank's slice together (if one is
  /// rejected every rank throws) before the parts run their collectives.
  /// nullptr (or a reducer of size 1) returns to the single-process path.
  void set_reducer(Reducer* reducer) {
    for (auto& p : self().parts()) p.set_reducer(nullptr);  // leave the old group first
    this->reducer_ = nullptr;
    if (reducer == nullptr || reducer->size() == 1) return;
    require_same_on_every_rank(*reducer, self().fingerprint(), Q::set_reducer_name);
    for (auto& p : self().parts()) p.set_reducer(reducer);
    this->reducer_ = reducer;
  }
  /// Collective under a reducer: every part's memory bank gathers the rows
  /// other ranks pushed (state() and checkpoints need it).
  void sync_memory_bank() {
    for (auto& p : self().parts()) p.sync_memory_bank();
  }

 protected:
  /// The config's own fields, `extra` and every part's fingerprint: what
  /// set_reducer compares across ranks.
  template <class... Extra>
  std::uint64_t fingerprint_with(const Extra&... extra) const {
    Fingerprint f;
    this->fingerprint_config(f);
    f.values(extra...);
    for (const auto& p : self().parts()) f.values(fingerprint_of(p));
    return f.value();
  }

 private:
  Q& self() { return static_cast<Q&>(*this); }
  const Q& self() const { return static_cast<const Q&>(*this); }
};

}  // namespace vqkit::detail
