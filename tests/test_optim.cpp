// Tests for the optimiser pieces: AdamW (vqkit/optim/adamw.hpp), the warm-up
// + cosine schedule (vqkit/optim/schedule.hpp) and global-norm clipping
// (vqkit/optim/clip.hpp). References: PyTorch tensors in
// tests/fixtures/optim.safetensors (gen_optim.py: torch.optim.AdamW,
// torch.nn.utils.clip_grad_norm_, the schedule's closed form).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include <vqkit/io/safetensors.hpp>
#include <vqkit/optim/adamw.hpp>
#include <vqkit/optim/clip.hpp>
#include <vqkit/optim/schedule.hpp>

#include "gradcheck.hpp"

using namespace vqkit;
using vqkit::test::fixture_file;
using vqkit::test::randn;
using vqkit::test::rel_err;

namespace {

const safetensors::File& fixture() {
  static const safetensors::File f = safetensors::load(fixture_file("optim.safetensors"));
  return f;
}

RowMatrix<double> fx(const std::string& name) { return fixture().matrix<double>(name); }
Vector<double> fv(const std::string& name) { return fixture().vector<double>(name); }

const std::vector<std::string> kNames = {"weight", "bias", "norm.weight"};

// The three fixture parameters as a little model: values and gradients.
template <class T>
struct Model {
  std::map<std::string, RowMatrix<T>> value, grad;
  Model() {
    for (const auto& n : kNames) {
      value[n] = fx("adamw.init." + n).cast<T>();
      grad[n] = RowMatrix<T>::Zero(value[n].rows(), value[n].cols());
    }
  }
  ParameterList<T> params() {
    ParameterList<T> list;
    for (const auto& n : kNames)
      list.push_back({n, &value[n], &grad[n], {value[n].cols()}, n != "bias"});
    return list;
  }
  void set_grads(int t) {
    for (const auto& n : kNames) {
      const RowMatrix<double> all = fx("adamw.grads." + n);
      grad[n] = Eigen::Map<const RowMatrix<double>>(all.row(t).data(), value[n].rows(),
                                                    value[n].cols())
                    .cast<T>();
    }
  }
};

AdamWOptions fixture_options() {
  const Vector<double> c = fv("adamw.config");  // lr, lr2, beta1, beta2, eps, wd
  AdamWOptions o;
  o.lr = c[0];
  o.beta1 = c[2];
  o.beta2 = c[3];
  o.eps = c[4];
  o.weight_decay = c[5];
  return o;
}

template <class T>
void run_fixture_steps(Model<T>& m, AdamW<T>& opt, int from, int to) {
  const Vector<double> c = fv("adamw.config");
  for (int t = from; t < to; ++t) {
    if (t == 3) opt.set_lr(c[1]);
    m.set_grads(t);
    opt.step();
  }
}

}  // namespace

// ---- AdamW ---------------------------------------------------------------------

TEST_CASE("adamw: several steps match torch.optim.AdamW (decay and no-decay parameters)",
          "[adamw]") {
  Model<double> m;
  AdamW<double> opt(m.params(), fixture_options());
  run_fixture_steps(m, opt, 0, 1);
  for (const auto& n : kNames) {
    INFO(n);
    CHECK(rel_err(m.value[n], fx("adamw.step1." + n)) < 1e-13);
  }
  run_fixture_steps(m, opt, 1, 6);
  CHECK(opt.step_count() == 6);
  CHECK(opt.lr() == fv("adamw.config")[1]);
  for (const auto& n : kNames) {
    INFO(n);
    CHECK(rel_err(m.value[n], fx("adamw.final." + n)) < 1e-13);
    CHECK(rel_err(opt.exp_avg(n), fx("adamw.exp_avg." + n)) < 1e-13);
    CHECK(rel_err(opt.exp_avg_sq(n), fx("adamw.exp_avg_sq." + n)) < 1e-13);
  }
  // The decay matters: without it "weight" ends elsewhere (the test can fail).
  Model<double> nd;
  AdamWOptions o = fixture_options();
  o.weight_decay = 0.0;
  AdamW<double> opt2(nd.params(), o);
  run_fixture_steps(nd, opt2, 0, 6);
  CHECK(rel_err(nd.value["weight"], fx("adamw.final.weight")) > 1e-6);
  CHECK(rel_err(nd.value["bias"], fx("adamw.final.bias")) < 1e-13);  // bias is never decayed

  // float follows to float precision
  Model<float> mf;
  AdamW<float> optf(mf.params(), fixture_options());
  run_fixture_steps(mf, optf, 0, 6);
  for (const auto& n : kNames) CHECK(rel_err(mf.value[n].cast<double>(), fx("adamw.final." + n)) < 1e-5);
}

TEST_CASE("adamw: state saved by name and restored continues bit-identically", "[adamw]") {
  Model<double> a;
  AdamW<double> opt_a(a.params(), fixture_options());
  run_fixture_steps(a, opt_a, 0, 3);

  // Save parameters and optimiser state through a safetensors file image.
  safetensors::File file;
  for (const auto& n : kNames) file.tensors[n] = safetensors::from_matrix(a.value[n]);
  const auto state = opt_a.state();
  CHECK(state.step == 3);
  CHECK(state.tensors.size() == 2 * kNames.size());
  for (const auto& name : opt_a.state_names())
    file.tensors["optim." + name] = safetensors::from_matrix(state.tensors.at(name));
  file.tensors["optim.step"] = safetensors::from_scalar<std::int64_t>(state.step);
  CHECK(file.contains("optim.weight.exp_avg"));
  CHECK(file.contains("optim.norm.weight.exp_avg_sq"));
  const safetensors::File back = safetensors::parse(safetensors::serialize(file));

  Model<double> b;
  for (const auto& n : kNames) b.value[n] = back.matrix<double>(n);
  AdamW<double> opt_b(b.params(), fixture_options());
  AdamW<double>::State s;
  s.step = back.scalar<std::int64_t>("optim.step");
  for (const auto& name : opt_b.state_names()) s.tensors[name] = back.matrix<double>("optim." + name);
  opt_b.set_state(s);
  CHECK(opt_b.step_count() == 3);

  run_fixture_steps(a, opt_a, 3, 6);
  run_fixture_steps(b, opt_b, 3, 6);
  for (const auto& n : kNames) {
    CHECK(a.value[n] == b.value[n]);
    CHECK(opt_a.exp_avg(n) == opt_b.exp_avg(n));
    CHECK(opt_a.exp_avg_sq(n) == opt_b.exp_avg_sq(n));
  }
}

TEST_CASE("adamw: bad settings and inputs throw and leave everything unchanged", "[adamw]") {
  Model<double> m;
  auto bad_opt = [&](auto edit) {
    AdamWOptions o;
    edit(o);
    CHECK_THROWS_AS(AdamW<double>(m.params(), o), vqkit::error);
  };
  bad_opt([](AdamWOptions& o) { o.lr = -1e-3; });
  bad_opt([](AdamWOptions& o) { o.lr = std::numeric_limits<double>::quiet_NaN(); });
  bad_opt([](AdamWOptions& o) { o.beta1 = 1.0; });
  bad_opt([](AdamWOptions& o) { o.beta1 = -0.1; });
  bad_opt([](AdamWOptions& o) { o.beta2 = 1.0; });
  bad_opt([](AdamWOptions& o) { o.beta2 = std::numeric_limits<double>::quiet_NaN(); });
  bad_opt([](AdamWOptions& o) { o.eps = -1e-8; });
  bad_opt([](AdamWOptions& o) { o.weight_decay = -0.01; });

  {
    auto dup = m.params();
    dup[2].name = "weight";
    CHECK_THROWS_AS(AdamW<double>(dup, {}), vqkit::error);
    auto null_grad = m.params();
    null_grad[1].grad = nullptr;
    CHECK_THROWS_AS(AdamW<double>(null_grad, {}), vqkit::error);
    auto unnamed = m.params();
    unnamed[0].name = "";
    CHECK_THROWS_AS(AdamW<double>(unnamed, {}), vqkit::error);
    RowMatrix<double> wrong = RowMatrix<double>::Zero(2, 2);
    auto shape = m.params();
    shape[0].grad = &wrong;
    CHECK_THROWS_AS(AdamW<double>(shape, {}), vqkit::error);
  }

  AdamW<double> opt(m.params(), fixture_options());
  run_fixture_steps(m, opt, 0, 2);
  const auto before = m.value;
  const auto state = opt.state();
  CHECK_THROWS_AS(opt.set_lr(-1.0), vqkit::error);
  CHECK(opt.lr() == fixture_options().lr);

  // a gradient of the wrong shape (after the parameters were set up): no
  // parameter moves, not even those listed before it
  m.set_grads(2);
  m.grad["norm.weight"] = RowMatrix<double>::Zero(1, 4);
  CHECK_THROWS_AS(opt.step(), vqkit::error);
  CHECK(m.value == before);
  CHECK(opt.step_count() == 2);
  for (const auto& n : kNames) CHECK(opt.exp_avg(n) == state.tensors.at(n + ".exp_avg"));

  // bad states are refused whole
  auto refused = [&](auto edit) {
    auto s = state;
    edit(s);
    CHECK_THROWS_AS(opt.set_state(s), vqkit::error);
    CHECK(opt.step_count() == 2);
    for (const auto& n : kNames) {
      CHECK(opt.exp_avg(n) == state.tensors.at(n + ".exp_avg"));
      CHECK(opt.exp_avg_sq(n) == state.tensors.at(n + ".exp_avg_sq"));
    }
  };
  using S = AdamW<double>::State;
  refused([](S& s) { s.step = -1; });
  refused([](S& s) { s.tensors.erase("bias.exp_avg_sq"); });
  refused([](S& s) { s.tensors["extra.exp_avg"] = RowMatrix<double>::Zero(1, 1); });
  refused([](S& s) {  // right count, one unknown name
    s.tensors.erase("bias.exp_avg");
    s.tensors["bias.exp_avgx"] = RowMatrix<double>::Zero(1, 4);
  });
  refused([](S& s) { s.tensors["weight.exp_avg"] = RowMatrix<double>::Zero(4, 3); });
  refused([](S& s) { s.tensors["norm.weight.exp_avg_sq"](0, 2) = -1e-9; });
  refused([](S& s) { s.tensors["weight.exp_avg"](1, 1) = std::numeric_limits<double>::infinity(); });
  // the earlier entries of a refused state were not half-applied
  auto s = state;
  s.tensors["weight.exp_avg"].setConstant(123.0);
  s.tensors["norm.weight.exp_avg_sq"](0, 0) = -1.0;
  CHECK_THROWS_AS(opt.set_state(s), vqkit::error);
  CHECK(opt.exp_avg("weight") == state.tensors.at("weight.exp_avg"));
  CHECK_THROWS_AS(opt.exp_avg("nope"), vqkit::error);
}

TEST_CASE("adamw: bit-identical for 1 and 2 threads", "[adamw]") {
  Rng rng(5);
  RowMatrix<float> w0 = randn(300, 200, rng).cast<float>();  // above the parallel threshold
  RowMatrix<float> b0 = randn(1, 200, rng).cast<float>();
  std::vector<RowMatrix<float>> gw, gb;
  for (int t = 0; t < 3; ++t) {
    gw.push_back(randn(300, 200, rng).cast<float>());
    gb.push_back(randn(1, 200, rng).cast<float>());
  }
  RowMatrix<float> w[2], b[2];
  for (int th = 0; th < 2; ++th) {
    w[th] = w0;
    b[th] = b0;
    RowMatrix<float> dw = gw[0], db = gb[0];
    ParameterList<float> list = {{"w", &w[th], &dw, {300, 200}, true},
                                 {"b", &b[th], &db, {200}, false}};
    AdamW<float> opt(list, {}, cpu{th + 1});
    for (int t = 0; t < 3; ++t) {
      dw = gw[t];
      db = gb[t];
      opt.step();
    }
  }
  CHECK(w[0] == w[1]);
  CHECK(b[0] == b[1]);
}

// ---- schedule --------------------------------------------------------------------

TEST_CASE("schedule: linear warm-up then cosine decay to the floor matches the formula",
          "[schedule]") {
  const Vector<double> c = fv("sched.config");  // peak, floor, warmup, total
  const Vector<double> ref = fv("sched.lr");
  const WarmupCosine sched(c[0], static_cast<std::int64_t>(c[2]), static_cast<std::int64_t>(c[3]),
                           c[1]);
  for (Index s = 0; s < ref.size(); ++s) {
    INFO("step " << s);
    CHECK(sched(s) == Approx(ref[s]).epsilon(1e-14));
  }
  CHECK(sched(3) == c[0]);         // the end of the warm-up is the peak
  CHECK(sched(4) == c[0]);         // so is the start of the decay
  CHECK(sched(13) == c[1]);        // the floor from total_steps on
  CHECK(sched(1000000) == c[1]);

  const WarmupCosine no_warm(1.0, 0, 10);
  CHECK(no_warm(0) == 1.0);
  CHECK(no_warm(5) == Approx(0.5));
  CHECK(no_warm(10) == 0.0);
  const WarmupCosine no_decay(2.0, 4, 4, 0.5);
  CHECK(no_decay(0) == 0.5);
  CHECK(no_decay(3) == 2.0);
  CHECK(no_decay(4) == 0.5);

  CHECK_THROWS_AS(WarmupCosine(-1.0, 0, 10), vqkit::error);
  CHECK_THROWS_AS(WarmupCosine(1.0, -1, 10), vqkit::error);
  CHECK_THROWS_AS(WarmupCosine(1.0, 5, 4), vqkit::error);
  CHECK_THROWS_AS(WarmupCosine(1.0, 0, 10, 2.0), vqkit::error);
  CHECK_THROWS_AS(WarmupCosine(1.0, 0, 10, -0.1), vqkit::error);
  CHECK_THROWS_AS(WarmupCosine(std::numeric_limits<double>::infinity(), 0, 10), vqkit::error);
  CHECK_THROWS_AS(sched(-1), vqkit::error);
}

// ---- clipping --------------------------------------------------------------------

TEST_CASE("clip: global-norm clipping matches torch.nn.utils.clip_grad_norm_", "[clip]") {
  for (const std::string tag : {"clip", "noclip"}) {
    INFO(tag);
    std::vector<RowMatrix<double>> values, grads;
    for (int i = 0; i < 3; ++i) {
      grads.push_back(fx("clip.grad." + std::to_string(i)));
      values.push_back(RowMatrix<double>::Zero(grads.back().rows(), grads.back().cols()));
    }
    ParameterList<double> list;
    for (int i = 0; i < 3; ++i)
      list.push_back({"p" + std::to_string(i), &values[i], &grads[i], {}, true});
    const double max_norm = fixture().scalar<double>(tag + ".max_norm");
    const double total = clip_grad_norm(list, max_norm);
    CHECK(total == Approx(fixture().scalar<double>(tag + ".total")).epsilon(1e-14));
    double after = 0.0;
    for (int i = 0; i < 3; ++i) {
      CHECK(rel_err(grads[i], fx(tag + ".clipped." + std::to_string(i))) < 1e-14);
      after += grads[i].squaredNorm();
    }
    CHECK(std::sqrt(after) <= max_norm + 1e-12);
  }
}

TEST_CASE("clip: bit-identical for 1 and 2 threads, bad inputs and non-finite norms", "[clip]") {
  Rng rng(9);
  const RowMatrix<float> g0 = randn(500, 70, rng).cast<float>();  // several 8192-entry blocks
  const RowMatrix<float> g1 = randn(1, 33, rng).cast<float>();
  RowMatrix<float> v0(500, 70), v1(1, 33);
  RowMatrix<float> a[2][2];
  double norms[2];
  for (int th = 0; th < 2; ++th) {
    a[th][0] = g0;
    a[th][1] = g1;
    ParameterList<float> list = {{"a", &v0, &a[th][0], {}, true}, {"b", &v1, &a[th][1], {}, false}};
    norms[th] = clip_grad_norm(cpu{th + 1}, list, 0.1);
  }
  CHECK(norms[0] == norms[1]);
  CHECK(a[0][0] == a[1][0]);
  CHECK(a[0][1] == a[1][1]);
  CHECK(norms[0] == Approx(std::sqrt(g0.cast<double>().squaredNorm() +
                                     g1.cast<double>().squaredNorm())).epsilon(1e-12));

  RowMatrix<float> g = g1;
  ParameterList<float> list = {{"b", &v1, &g, {}, false}};
  CHECK_THROWS_AS(clip_grad_norm(list, -1.0), vqkit::error);
  CHECK_THROWS_AS(clip_grad_norm(list, std::numeric_limits<double>::quiet_NaN()), vqkit::error);
  ParameterList<float> with_null = {{"b", &v1, &g, {}, false}, {"c", &v1, nullptr, {}, false}};
  CHECK_THROWS_AS(clip_grad_norm(with_null, 1.0), vqkit::error);
  CHECK(g == g1);
  g(0, 3) = std::numeric_limits<float>::infinity();
  const RowMatrix<float> before = g;
  CHECK(std::isinf(clip_grad_norm(list, 1.0)));
  CHECK(g.cwiseEqual(before).all());  // left unchanged (inf == inf)
  g(0, 3) = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(clip_grad_norm(list, 1.0)));
  // clipping to zero is allowed
  g = g1;
  clip_grad_norm(list, 0.0);
  CHECK(g.isZero(0.0));
}
