// Host-side contract of qk_norm_rope3d shared by the CPU and CUDA entry points: checks and the view
// of one normalized-and-rotated tensor (q or k) that the kernels take.
//
// Per head vector x (a row of D values of [B, S, H, D]): rstd = 1/sqrt(mean(x²) + eps),
// y = x·rstd·w (RMSNorm with weight w [D]), out = RoPE(y) with the [S, D/2] tables of rope3d.
// Backward, with dy = RoPE⁻¹(grad_out) (the rotation by the negative angle) and x̂ = x·rstd:
//   grad_x = rstd·(dy·w − x̂·mean(dy·w·x̂)),   grad_w = Σ_rows dy·x̂ (a deterministic two-stage sum).
#pragma once

#include "common.h"
#include "rope3d.h"

namespace blip3o_fast {
namespace qk_norm_rope {

template <typename scalar_t>
struct View {
  using acc = acc_t<scalar_t>;
  const scalar_t* x;       // [B, S, H, D], any strides in B, S, H; dense in D
  const scalar_t* weight;  // [D]
  const acc* cos;          // [S, D/2]
  const acc* sin;
  const scalar_t* grad = nullptr;  // backward: dL/dout, contiguous [B, S, H, D]
  scalar_t* out;                   // forward: the output; backward: grad_x (both contiguous)
  acc* rstd;                       // [B·S·H]: written by the forward, read by the backward
  int64_t rows, S, H, half;
  int64_t stride_b, stride_s, stride_h;
  acc eps;
};

// CUDA backward: a warp per row takes at most 8 pairs per lane
constexpr int64_t kMaxHeadDim = 512;

inline void check_weight(const at::Tensor& x, const char* xn, const at::Tensor& w, const char* wn) {
  check_same_device(x, xn, w, wn);
  check_same_dtype(x, xn, w, wn);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(3), wn, " must have shape [D] = [", x.size(3), "] to match ", xn,
              " of shape ", x.sizes(), ", got ", w.sizes());
}

inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight_q,
                         const at::Tensor& weight_k, const at::Tensor& cos_q, const at::Tensor& sin_q,
                         const at::Tensor& cos_k, const at::Tensor& sin_k) {
  rope::check_rope3d(q, k, cos_q, sin_q, cos_k, sin_k, "q", "k");
  TORCH_CHECK(q.size(3) > 0 && k.size(3) > 0,
              "qk_norm_rope3d needs a head dim D > 0 (an empty head vector has no norm)");
  TORCH_CHECK(q.size(3) <= kMaxHeadDim && k.size(3) <= kMaxHeadDim, "qk_norm_rope3d supports head dims up to ",
              kMaxHeadDim, ", got D=", std::max(q.size(3), k.size(3)));
  check_weight(q, "q", weight_q, "weight_q");
  check_weight(k, "k", weight_k, "weight_k");
}

inline void check_rstd(const at::Tensor& x, const char* xn, const at::Tensor& rstd, const char* rn) {
  check_same_device(x, xn, rstd, rn);
  TORCH_CHECK(rstd.scalar_type() == acc_dtype(x.scalar_type()), rn, " must be ", acc_dtype(x.scalar_type()), ", got ",
              rstd.scalar_type());
  TORCH_CHECK(rstd.dim() == 3 && rstd.size(0) == x.size(0) && rstd.size(1) == x.size(1) && rstd.size(2) == x.size(2),
              rn, " must have shape [B, S, H] of ", xn, " ", x.sizes(), ", got ", rstd.sizes());
}

inline void check_grad(const at::Tensor& x, const char* xn, const at::Tensor& g, const char* gn) {
  check_same_device(x, xn, g, gn);
  check_same_dtype(x, xn, g, gn);
  TORCH_CHECK(g.sizes() == x.sizes(), gn, " must have the shape of ", xn, " ", x.sizes(), ", got ", g.sizes());
}

// x with a dense head dim: the kernels index B, S and H by stride
inline at::Tensor dense_rows(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

template <typename scalar_t>
View<scalar_t> make_view(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& out, at::Tensor& rstd, double eps) {
  View<scalar_t> v;
  v.x = x.data_ptr<scalar_t>();
  v.weight = weight.data_ptr<scalar_t>();
  v.cos = cos.data_ptr<acc_t<scalar_t>>();
  v.sin = sin.data_ptr<acc_t<scalar_t>>();
  v.out = out.data_ptr<scalar_t>();
  v.rstd = rstd.data_ptr<acc_t<scalar_t>>();
  v.rows = x.size(0) * x.size(1) * x.size(2);
  v.S = x.size(1);
  v.H = x.size(2);
  v.half = x.size(3) / 2;
  v.stride_b = x.stride(0);
  v.stride_s = x.stride(1);
  v.stride_h = x.stride(2);
  v.eps = static_cast<acc_t<scalar_t>>(eps);
  return v;
}

// The two passes of one op call, run by a device's kernels: forward(view) or backward(view, grad_weight_partials)
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                   const at::Tensor& weight_q,
                                                                   const at::Tensor& weight_k, double eps,
                                                                   const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                                   const at::Tensor& cos_k, const at::Tensor& sin_k,
                                                                   Launch&& launch) {
  check_inputs(q_in, k_in, weight_q, weight_k, cos_q, sin_q, cos_k, sin_k);
  const auto q = dense_rows(q_in), k = dense_rows(k_in);
  const auto acc_opts = q.options().dtype(acc_dtype(q.scalar_type()));
  auto q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  auto rstd_q = at::empty({q.size(0), q.size(1), q.size(2)}, acc_opts);
  auto rstd_k = at::empty({k.size(0), k.size(1), k.size(2)}, acc_opts);
  const auto wq = weight_q.contiguous(), wk = weight_k.contiguous();
  const auto cq = cos_q.contiguous(), sq = sin_q.contiguous(), ck = cos_k.contiguous(), sk = sin_k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_norm_rope3d", [&] {
    if (q.numel() > 0) launch(make_view<scalar_t>(q, wq, cq, sq, q_out, rstd_q, eps));
    if (k.numel() > 0) launch(make_view<scalar_t>(k, wk, ck, sk, k_out, rstd_k, eps));
  });
  return {q_out, k_out, rstd_q, rstd_k};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_q_in, const at::Tensor& grad_k_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& weight_q, const at::Tensor& weight_k, const at::Tensor& rstd_q_in, const at::Tensor& rstd_k_in,
    const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k,
    Launch&& launch) {
  check_inputs(q_in, k_in, weight_q, weight_k, cos_q, sin_q, cos_k, sin_k);
  check_grad(q_in, "q", grad_q_in, "grad_q");
  check_grad(k_in, "k", grad_k_in, "grad_k");
  check_rstd(q_in, "q", rstd_q_in, "rstd_q");
  check_rstd(k_in, "k", rstd_k_in, "rstd_k");
  const auto q = dense_rows(q_in), k = dense_rows(k_in);
  const auto grad_q = grad_q_in.contiguous(), grad_k = grad_k_in.contiguous();
  auto rstd_q = rstd_q_in.contiguous(), rstd_k = rstd_k_in.contiguous();
  auto dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options());
  auto dwq = at::zeros_like(weight_q), dwk = at::zeros_like(weight_k);
  const auto wq = weight_q.contiguous(), wk = weight_k.contiguous();
  const auto cq = cos_q.contiguous(), sq = sin_q.contiguous(), ck = cos_k.contiguous(), sk = sin_k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_norm_rope3d_bwd", [&] {
    if (q.numel() > 0) {
      auto v = make_view<scalar_t>(q, wq, cq, sq, dq, rstd_q, 0.0);
      v.grad = grad_q.data_ptr<scalar_t>();
      launch(v, dwq);
    }
    if (k.numel() > 0) {
      auto v = make_view<scalar_t>(k, wk, ck, sk, dk, rstd_k, 0.0);
      v.grad = grad_k.data_ptr<scalar_t>();
      launch(v, dwk);
    }
  });
  return {dq, dk, dwq, dwk};
}

}  // namespace qk_norm_rope
}  // namespace blip3o_fast
