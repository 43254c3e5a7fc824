// vqkit/layers/quantizer_surface.hpp - the forward overloads every quantizer
// of the family offers, written once.
//
// A quantizer Q derives from QuantizerSurface<Q, T> and provides
//   Index dim() const;  static constexpr const char* name;  struct Context;
//   void run(ConstMatrixRef<T> x, const RowMask* mask, RowMatrix<T>& out, Context& ctx);
// and gets forward(x, out, ctx), forward(x, mask, out, ctx) (the mask's
// length checked against the batch, by name, before run) and
// forward(x, out) -> Context.
// GridQuantizer<Q, T> adds what the fixed-grid quantizers (FSQ, LFQ) share:
// their ImplicitCodebook (usage, step, training flag) and its accessors.
#pragma once

#include "vqkit/core/check.hpp"
#include "vqkit/core/row_mask.hpp"
#include "vqkit/core/types.hpp"
#include "vqkit/quantizer/implicit_codebook.hpp"

namespace vqkit::detail {

template <class Q, class T>
class QuantizerSurface {
 public:
  template <class Context>
  void forward(ConstMatrixRef<T> x, RowMatrix<T>& out, Context& ctx) {
    self().run(x, nullptr, out, ctx);
  }
  template <class Context>
  void forward(ConstMatrixRef<T> x, const RowMask& mask, RowMatrix<T>& out, Context& ctx) {
    require_batch(x, self().dim(), Q::name, "x");
    require_mask(mask, x.rows(), Q::name);
    self().run(x, &mask, out, ctx);
  }
  auto forward(ConstMatrixRef<T> x, RowMatrix<T>& out) {
    typename Q::Context ctx;
    self().run(x, nullptr, out, ctx);
    return ctx;
  }

 private:
  Q& self() { return static_cast<Q&>(*this); }
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

 protected:
  GridQuantizer(Index K, std::int64_t usage_window) : book_(K, usage_window) {}
  ImplicitCodebook book_;
};

}  // namespace vqkit::detail
