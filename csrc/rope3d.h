// Host-side contract of rope3d shared by the CPU and CUDA entry points: argument checks and the
// view of one rotated tensor that the kernels take.
#pragma once

#include <tuple>

#include "common.h"

namespace blip3o_fast {
namespace rope {

// One [B, S, H, D] input (any strides in B, S, H; dense in D) and its contiguous output.
template <typename scalar_t, typename table_t>
struct RopeView {
  const scalar_t* x;
  scalar_t* out;
  const table_t* cos;
  const table_t* sin;
  int64_t S, H, half;
  int64_t stride_b, stride_s, stride_h;
};

inline void check_table(const at::Tensor& x, const char* xn, const at::Tensor& t, const char* n) {
  check_same_device(x, xn, t, n);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == x.size(1) && 2 * t.size(1) == x.size(3), n, " must have shape [S, D/2] = [",
              x.size(1), ", ", x.size(3) / 2, "] to match ", xn, " of shape ", x.sizes(), ", got ", t.sizes());
  const auto want = acc_dtype(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, n, " must be ", want, " (float64 only when ", xn, " is float64), got ",
              t.scalar_type());
}

inline void check_rope3d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_q, const at::Tensor& sin_q,
                         const at::Tensor& cos_k, const at::Tensor& sin_k, const char* qn, const char* kn) {
  check_dim(q, 4, qn, "[B, S, H, D]");
  check_dim(k, 4, kn, "[B, S, H, D]");
  check_floating(q, qn);
  check_same_dtype(q, qn, k, kn);
  check_same_device(q, qn, k, kn);
  TORCH_CHECK(q.size(3) % 2 == 0, qn, " head dim D must be even (RoPE rotates pairs), got D=", q.size(3));
  TORCH_CHECK(k.size(3) % 2 == 0, kn, " head dim D must be even (RoPE rotates pairs), got D=", k.size(3));
  check_table(q, qn, cos_q, "cos_q");
  check_table(q, qn, sin_q, "sin_q");
  check_table(k, kn, cos_k, "cos_k");
  check_table(k, kn, sin_k, "sin_k");
}

template <typename scalar_t, typename table_t>
RopeView<scalar_t, table_t> make_view(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos,
                                      const at::Tensor& sin) {
  RopeView<scalar_t, table_t> v;
  v.x = x.data_ptr<scalar_t>();
  v.out = out.data_ptr<scalar_t>();
  v.cos = cos.data_ptr<table_t>();
  v.sin = sin.data_ptr<table_t>();
  v.S = x.size(1);
  v.H = x.size(2);
  v.half = x.size(3) / 2;
  v.stride_b = x.stride(0);
  v.stride_s = x.stride(1);
  v.stride_h = x.stride(2);
  return v;
}

// The driver of the device kernels: checks, layouts, outputs and dtype dispatch. `launch` gets the
// views of q and k, their pair counts and the rotation's sign (-1: the inverse, for the backward).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> rotate(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos_q,
                                          const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k,
                                          bool inverse, const char* qn, const char* kn, Launch&& launch) {
  check_rope3d(q_in, k_in, cos_q, sin_q, cos_k, sin_k, qn, kn);
  const auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  const int64_t q_pairs = q.numel() / 2, k_pairs = k.numel() / 2;
  if (q_pairs + k_pairs == 0) return {q_out, k_out};
  const auto cq = cos_q.contiguous(), sq = sin_q.contiguous(), ck = cos_k.contiguous(), sk = sin_k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope3d", [&] {
    using table_t = acc_t<scalar_t>;
    const table_t sign = inverse ? table_t(-1) : table_t(1);
    launch(make_view<scalar_t, table_t>(q, q_out, cq, sq), make_view<scalar_t, table_t>(k, k_out, ck, sk), q_pairs,
           k_pairs, sign);
  });
  return {q_out, k_out};
}

}  // namespace rope
}  // namespace blip3o_fast
