// The CPU kernels, called through the dispatcher exactly as Python calls them, against naive loops
// written from docs/architecture.md §3.2-§3.6 (forward), and the backward ops against central
// finite differences of the forward ops in float64. No test framework: each check prints and counts;
// the exit code is the number of failures.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("  %s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

void check_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const bool same_shape = got.sizes() == want.sizes();
  const double err = same_shape ? (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>() : INFINITY;
  char buf[64];
  std::snprintf(buf, sizeof(buf), " (max error %.2e, tolerance %.0e)", err, tol);
  check(same_shape && err <= tol, what + buf);
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using T = at::Tensor;
using RopeFn = std::tuple<T, T>(const T&, const T&, const T&, const T&, const T&, const T&);
using ModFn = std::tuple<T, T, T>(const T&, const T&, const T&, double, c10::string_view);
using ModBwdFn = std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const T&, c10::string_view);
using GatedFn = std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const T&, double, c10::string_view);
using GatedBwdFn = std::tuple<T, T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                                             const T&, c10::string_view);
using InterpFn = T(const T&, const T&, const T&);
using LossFn = std::tuple<T, T, T>(const T&, const T&, const T&, const T&, const c10::optional<T>&);
using LossBwdFn = T(const T&, const T&, const T&, const T&);
using SwigluFn = T(const T&);
using SwigluBwdFn = T(const T&, const T&);
using QkNormRopeFn = std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, double, const T&, const T&,
                                            const T&, const T&);
using QkNormRopeBwdFn = std::tuple<T, T, T, T>(const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                                               const T&, const T&, const T&, const T&, const T&);

// ---- naive loops ------------------------------------------------------------------------------

at::Tensor naive_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  auto out = at::empty_like(x, at::kDouble);
  const auto xd = x.to(at::kDouble), cd = cos.to(at::kDouble), sd = sin.to(at::kDouble);
  auto xa = xd.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  auto ca = cd.accessor<double, 2>();
  auto sa = sd.accessor<double, 2>();
  for (int64_t b = 0; b < x.size(0); ++b)
    for (int64_t s = 0; s < x.size(1); ++s)
      for (int64_t h = 0; h < x.size(2); ++h)
        for (int64_t j = 0; j < x.size(3) / 2; ++j) {
          const double x0 = xa[b][s][h][2 * j], x1 = xa[b][s][h][2 * j + 1], c = ca[s][j], sn = sa[s][j];
          oa[b][s][h][2 * j] = x0 * c - x1 * sn;
          oa[b][s][h][2 * j + 1] = x0 * sn + x1 * c;
        }
  return out;
}

at::Tensor naive_modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps,
                          bool layer) {
  auto out = at::empty_like(x, at::kDouble);
  const auto xd = x.to(at::kDouble), shd = shift.to(at::kDouble), scd = scale.to(at::kDouble);
  auto xa = xd.accessor<double, 3>();
  auto oa = out.accessor<double, 3>();
  auto sha = shd.accessor<double, 2>();
  auto sca = scd.accessor<double, 2>();
  const int64_t C = x.size(2);
  for (int64_t b = 0; b < x.size(0); ++b)
    for (int64_t s = 0; s < x.size(1); ++s) {
      double mean = 0, var = 0;
      if (layer) {
        for (int64_t c = 0; c < C; ++c) mean += xa[b][s][c];
        mean /= C;
      }
      for (int64_t c = 0; c < C; ++c) var += (xa[b][s][c] - mean) * (xa[b][s][c] - mean);
      const double rstd = 1.0 / std::sqrt(var / C + eps);
      for (int64_t c = 0; c < C; ++c) oa[b][s][c] = (xa[b][s][c] - mean) * rstd * (1.0 + sca[b][c]) + sha[b][c];
    }
  return out;
}

std::tuple<double, std::vector<double>> naive_loss(const at::Tensor& v, const at::Tensor& x1, const at::Tensor& x0,
                                                   const at::Tensor& w) {
  const auto vd = v.to(at::kDouble), x1d = x1.to(at::kDouble), x0d = x0.to(at::kDouble), wd = w.to(at::kDouble);
  auto va = vd.accessor<double, 3>();
  auto a1 = x1d.accessor<double, 3>();
  auto a0 = x0d.accessor<double, 3>();
  auto wa = wd.accessor<double, 1>();
  const int64_t B = v.size(0), S = v.size(1), C = v.size(2);
  std::vector<double> mse(B, 0.0);
  double loss = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < C; ++c) {
        const double d = va[b][s][c] - (a1[b][s][c] - a0[b][s][c]);
        mse[b] += d * d;
      }
    mse[b] /= static_cast<double>(S * C);
    loss += wa[b] * mse[b];
  }
  return {loss / B, mse};
}

// ---- finite differences -----------------------------------------------------------------------

// d<f(inputs), cotangent>/d input, by central differences, for one input tensor (float64)
at::Tensor numeric_grad(const std::function<at::Tensor()>& f, at::Tensor& input, const at::Tensor& cotangent) {
  auto grad = at::zeros_like(input);
  auto flat = input.view(-1);
  auto gflat = grad.view(-1);
  const double h = 1e-6;
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const double orig = flat[i].item<double>();
    flat[i] = orig + h;
    const double up = (f() * cotangent).sum().item<double>();
    flat[i] = orig - h;
    const double down = (f() * cotangent).sum().item<double>();
    flat[i] = orig;
    gflat[i] = (up - down) / (2 * h);
  }
  return grad;
}

// ---- tests ------------------------------------------------------------------------------------

void test_rope() {
  std::printf("rope3d\n");
  auto rope = op<RopeFn>("blip3o_fast::rope3d");
  auto rope_bwd = op<RopeFn>("blip3o_fast::rope3d_bwd");
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    const auto tab = dtype == at::kDouble ? at::kDouble : at::kFloat;
    auto q = at::randn({2, 7, 3, 10}).to(dtype), k = at::randn({2, 5, 1, 10}).to(dtype);
    auto cq = at::rand({7, 5}).to(tab), sq = at::rand({7, 5}).to(tab);
    auto ck = at::rand({5, 5}).to(tab), sk = at::rand({5, 5}).to(tab);
    auto [rq, rk] = rope.call(q, k, cq, sq, ck, sk);
    const double tol = dtype == at::kBFloat16 ? 3e-2 : (dtype == at::kFloat ? 1e-5 : 1e-12);
    check_close(rq, naive_rope(q, cq, sq), tol, std::string("q vs naive loop, ") + c10::toString(dtype));
    check_close(rk, naive_rope(k, ck, sk), tol, std::string("k vs naive loop, ") + c10::toString(dtype));
  }
  auto q = at::randn({2, 4, 2, 6}, at::kDouble), k = at::randn({2, 3, 2, 6}, at::kDouble);
  auto cq = at::rand({4, 3}, at::kDouble), sq = at::rand({4, 3}, at::kDouble);
  auto ck = at::rand({3, 3}, at::kDouble), sk = at::rand({3, 3}, at::kDouble);
  auto gq = at::randn_like(q), gk = at::randn_like(k);
  auto [dq, dk] = rope_bwd.call(gq, gk, cq, sq, ck, sk);
  check_close(dq, numeric_grad([&] { return std::get<0>(rope.call(q, k, cq, sq, ck, sk)); }, q, gq), 1e-6,
              "rope3d_bwd dq vs finite differences");
  check_close(dk, numeric_grad([&] { return std::get<1>(rope.call(q, k, cq, sq, ck, sk)); }, k, gk), 1e-6,
              "rope3d_bwd dk vs finite differences");
}

void test_adaln() {
  std::printf("adaln\n");
  auto mod = op<ModFn>("blip3o_fast::adaln_modulate");
  auto mod_bwd = op<ModBwdFn>("blip3o_fast::adaln_modulate_bwd");
  auto gated = op<GatedFn>("blip3o_fast::gated_residual_adaln");
  auto gated_bwd = op<GatedBwdFn>("blip3o_fast::gated_residual_adaln_bwd");
  for (const char* norm : {"layer", "rms"}) {
    const bool layer = std::string(norm) == "layer";
    for (auto dtype : {at::kFloat, at::kDouble}) {
      auto x = (at::randn({3, 19, 77}) * 2 + 1).to(dtype), y = at::randn({3, 19, 77}).to(dtype);
      auto shift = at::randn({3, 77}).to(dtype), scale = at::randn({3, 77}).to(dtype),
           gate = at::randn({3, 77}).to(dtype);
      const double tol = dtype == at::kFloat ? 5e-5 : 1e-12;
      auto out = std::get<0>(mod.call(x, shift, scale, 1e-6, norm));
      check_close(out, naive_modulate(x, shift, scale, 1e-6, layer), tol,
                  std::string("adaln_modulate ") + norm + " vs naive loop, " + c10::toString(dtype));
      auto [x_new, h, mean, rstd] = gated.call(x, y, gate, shift, scale, 1e-6, norm);
      auto x_new_naive = x.to(at::kDouble) + gate.to(at::kDouble).unsqueeze(1) * y.to(at::kDouble);
      check_close(x_new, x_new_naive, tol, std::string("gated x_new ") + norm + ", " + c10::toString(dtype));
      check_close(h, naive_modulate(x_new, shift, scale, 1e-6, layer), tol,
                  std::string("gated h ") + norm + " vs naive loop, " + c10::toString(dtype));
    }
    // backward ops vs finite differences of the forward ops, float64
    auto x = at::randn({2, 5, 6}, at::kDouble), y = at::randn({2, 5, 6}, at::kDouble);
    auto shift = at::randn({2, 6}, at::kDouble), scale = at::randn({2, 6}, at::kDouble);
    auto gate = at::randn({2, 6}, at::kDouble);
    auto g = at::randn({2, 5, 6}, at::kDouble), g_new = at::randn({2, 5, 6}, at::kDouble);
    auto [out, mean, rstd] = mod.call(x, shift, scale, 1e-6, norm);
    auto [dx, dshift, dscale] = mod_bwd.call(g, x, scale, mean, rstd, norm);
    auto f = [&] { return std::get<0>(mod.call(x, shift, scale, 1e-6, norm)); };
    check_close(dx, numeric_grad(f, x, g), 1e-6, std::string("adaln_modulate_bwd dx ") + norm);
    check_close(dshift, numeric_grad(f, shift, g), 1e-6, std::string("adaln_modulate_bwd dshift ") + norm);
    check_close(dscale, numeric_grad(f, scale, g), 1e-6, std::string("adaln_modulate_bwd dscale ") + norm);
    auto [x_new, h, gmean, grstd] = gated.call(x, y, gate, shift, scale, 1e-6, norm);
    auto grads = gated_bwd.call(g_new, g, x_new, y, gate, scale, gmean, grstd, norm);
    // d<x_new, g_new> + <h, g>: both outputs' cotangents at once
    auto fg = [&] {
      auto [xn, hh, m, r] = gated.call(x, y, gate, shift, scale, 1e-6, norm);
      return at::cat({xn, hh}, 1);
    };
    auto cot = at::cat({g_new, g}, 1);
    const char* names[] = {"dx", "dy", "dgate", "dshift", "dscale"};
    at::Tensor* inputs[] = {&x, &y, &gate, &shift, &scale};
    auto got = std::vector<at::Tensor>{std::get<0>(grads), std::get<1>(grads), std::get<2>(grads), std::get<3>(grads),
                                       std::get<4>(grads)};
    for (int i = 0; i < 5; ++i)
      check_close(got[i], numeric_grad(fg, *inputs[i], cot), 1e-6,
                  std::string("gated_residual_adaln_bwd ") + names[i] + " " + norm);
  }
}

void test_flow() {
  std::printf("flow\n");
  auto interp = op<InterpFn>("blip3o_fast::flow_interpolate");
  auto loss_op = op<LossFn>("blip3o_fast::flow_matching_loss");
  auto loss_bwd = op<LossBwdFn>("blip3o_fast::flow_matching_loss_bwd");
  for (auto dtype : {at::kFloat, at::kDouble}) {
    auto x1 = at::randn({4, 9, 33}).to(dtype), x0 = at::randn({4, 9, 33}).to(dtype),
         v = at::randn({4, 9, 33}).to(dtype);
    auto t = at::rand({4}), w = at::rand({4});
    const double tol = dtype == at::kFloat ? 1e-5 : 1e-12;
    auto td = t.to(at::kDouble).view({4, 1, 1});
    check_close(interp.call(x1, x0, t), (1 - td) * x0.to(at::kDouble) + td * x1.to(at::kDouble), tol,
                std::string("flow_interpolate vs formula, ") + c10::toString(dtype));
    auto [loss, mse, cos] = loss_op.call(v, x1, x0, t, w);
    auto [naive, naive_mse] = naive_loss(v, x1, x0, w);
    check(std::abs(loss.item<double>() - naive) <= tol * std::max(1.0, naive),
          std::string("flow_matching_loss vs naive loop, ") + c10::toString(dtype));
    bool mse_ok = true;
    for (int64_t b = 0; b < 4; ++b) mse_ok &= std::abs(mse[b].item<double>() - naive_mse[b]) <= tol * 10;
    check(mse_ok, std::string("per_sample_mse vs naive loop, ") + c10::toString(dtype));
  }
  auto x1 = at::randn({2, 3, 4}, at::kDouble), x0 = at::randn({2, 3, 4}, at::kDouble),
       v = at::randn({2, 3, 4}, at::kDouble);
  auto t = at::rand({2}, at::kDouble), w = at::rand({2}, at::kDouble) + 0.5;
  // with grad_per_sample = w/B the backward is the loss gradient
  auto dv = loss_bwd.call(w / 2, v, x1, x0);
  auto one = at::ones({}, at::kDouble);
  auto f = [&] { return std::get<0>(loss_op.call(v, x1, x0, t, w)); };
  check_close(dv, numeric_grad(f, v, one), 1e-7, "flow_matching_loss_bwd dv vs finite differences");
}

void test_swiglu() {
  std::printf("swiglu\n");
  auto swiglu = op<SwigluFn>("blip3o_fast::swiglu");
  auto swiglu_bwd = op<SwigluBwdFn>("blip3o_fast::swiglu_bwd");
  for (auto dtype : {at::kFloat, at::kDouble}) {
    auto ab = (at::randn({5, 7, 2 * 43}) * 4).to(dtype);
    const auto abd = ab.to(at::kDouble);
    auto naive = at::empty({5, 7, 43}, at::kDouble);
    auto in = abd.accessor<double, 3>();
    auto out = naive.accessor<double, 3>();
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t j = 0; j < 7; ++j)
        for (int64_t c = 0; c < 43; ++c) {
          const double a = in[i][j][c], b = in[i][j][43 + c];
          out[i][j][c] = a / (1.0 + std::exp(-a)) * b;
        }
    check_close(swiglu.call(ab), naive, dtype == at::kFloat ? 1e-5 : 1e-12,
                std::string("swiglu vs naive loop, ") + c10::toString(dtype));
  }
  auto ab = at::randn({3, 2 * 5}, at::kDouble);
  auto g = at::randn({3, 5}, at::kDouble);
  check_close(swiglu_bwd.call(g, ab), numeric_grad([&] { return swiglu.call(ab); }, ab, g), 1e-6,
              "swiglu_bwd vs finite differences");
}

void test_qk_norm_rope() {
  std::printf("qk_norm_rope3d\n");
  auto fwd = op<QkNormRopeFn>("blip3o_fast::qk_norm_rope3d");
  auto bwd = op<QkNormRopeBwdFn>("blip3o_fast::qk_norm_rope3d_bwd");
  const double eps = 1e-6;
  // naive: x·w / sqrt(mean(x²) + eps) per head vector, a loop, then the naive rotation
  auto naive_norm = [&](const at::Tensor& x, const at::Tensor& w) {
    auto y = at::empty_like(x, at::kDouble);
    const auto xd = x.to(at::kDouble), wd = w.to(at::kDouble);
    auto xa = xd.accessor<double, 4>();
    auto ya = y.accessor<double, 4>();
    auto wa = wd.accessor<double, 1>();
    const int64_t D = x.size(3);
    for (int64_t b = 0; b < x.size(0); ++b)
      for (int64_t s = 0; s < x.size(1); ++s)
        for (int64_t h = 0; h < x.size(2); ++h) {
          double sq = 0;
          for (int64_t d = 0; d < D; ++d) sq += xa[b][s][h][d] * xa[b][s][h][d];
          const double rstd = 1.0 / std::sqrt(sq / D + eps);
          for (int64_t d = 0; d < D; ++d) ya[b][s][h][d] = xa[b][s][h][d] * rstd * wa[d];
        }
    return y;
  };
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    const auto tab = dtype == at::kDouble ? at::kDouble : at::kFloat;
    auto q = (at::randn({2, 7, 3, 10}) * 3).to(dtype), k = at::randn({2, 5, 1, 10}).to(dtype);
    auto wq = at::randn({10}).to(dtype), wk = at::randn({10}).to(dtype);
    auto cq = at::rand({7, 5}).to(tab), sq = at::rand({7, 5}).to(tab);
    auto ck = at::rand({5, 5}).to(tab), sk = at::rand({5, 5}).to(tab);
    auto [oq, ok, rq, rk] = fwd.call(q, k, wq, wk, eps, cq, sq, ck, sk);
    const double tol = dtype == at::kBFloat16 ? 1e-1 : (dtype == at::kFloat ? 1e-5 : 1e-12);
    check_close(oq, naive_rope(naive_norm(q, wq), cq, sq), tol,
                std::string("q vs naive loop, ") + c10::toString(dtype));
    check_close(ok, naive_rope(naive_norm(k, wk), ck, sk), tol,
                std::string("k vs naive loop, ") + c10::toString(dtype));
  }
  auto q = at::randn({2, 4, 2, 6}, at::kDouble), k = at::randn({2, 3, 2, 6}, at::kDouble);
  auto wq = at::randn({6}, at::kDouble), wk = at::randn({6}, at::kDouble);
  auto cq = at::rand({4, 3}, at::kDouble), sq = at::rand({4, 3}, at::kDouble);
  auto ck = at::rand({3, 3}, at::kDouble), sk = at::rand({3, 3}, at::kDouble);
  auto gq = at::randn_like(q), gk = at::randn_like(k);
  auto [oq, ok, rq, rk] = fwd.call(q, k, wq, wk, eps, cq, sq, ck, sk);
  auto [dq, dk, dwq, dwk] = bwd.call(gq, gk, q, k, wq, wk, rq, rk, cq, sq, ck, sk);
  auto f_q = [&] { return std::get<0>(fwd.call(q, k, wq, wk, eps, cq, sq, ck, sk)); };
  auto f_k = [&] { return std::get<1>(fwd.call(q, k, wq, wk, eps, cq, sq, ck, sk)); };
  check_close(dq, numeric_grad(f_q, q, gq), 1e-6, "qk_norm_rope3d_bwd dq vs finite differences");
  check_close(dk, numeric_grad(f_k, k, gk), 1e-6, "qk_norm_rope3d_bwd dk vs finite differences");
  check_close(dwq, numeric_grad(f_q, wq, gq), 1e-6, "qk_norm_rope3d_bwd dweight_q vs finite differences");
  check_close(dwk, numeric_grad(f_k, wk, gk), 1e-6, "qk_norm_rope3d_bwd dweight_k vs finite differences");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_rope();
  test_adaln();
  test_flow();
  test_swiglu();
  test_qk_norm_rope();
  std::printf("%d failure(s)\n", failures);
  return failures;
}
