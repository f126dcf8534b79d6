// Host-side contract of the flow ops shared by the CPU and CUDA entry points.
#pragma once

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace blip3o_fast {
namespace flow {

inline void check_tokens(const at::Tensor& t, const char* name) {
  check_dim(t, 3, name, "[B, S, C]");
  check_floating(t, name);
}

inline void check_pair(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  check_same_device(a, an, b, bn);
  check_same_dtype(a, an, b, bn);
  TORCH_CHECK(a.sizes() == b.sizes(), bn, " must have the shape of ", an, " ", a.sizes(), ", got ", b.sizes());
}

// a per-sample vector [B] (t, weight, grad_per_sample) on x's device
inline void check_per_sample(const at::Tensor& x, const at::Tensor& p, const char* name) {
  check_same_device(x, "the token tensors", p, name);
  check_floating(p, name);
  TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(0), name, " must have shape [B] = [", x.size(0), "], got ",
              p.sizes());
}

// per-sample vectors are read in the accumulation dtype
inline at::Tensor per_sample_acc(const at::Tensor& x, const at::Tensor& p) {
  return p.to(acc_dtype(x.scalar_type())).contiguous();
}

inline void check_loss_inputs(const at::Tensor& v, const at::Tensor& x1, const at::Tensor& x0) {
  check_tokens(v, "v");
  check_pair(v, "v", x1, "x1");
  check_pair(v, "v", x0, "x0");
  TORCH_CHECK(v.size(0) > 0, "v must hold at least one sample (B >= 1) to define a mean loss");
}

template <typename scalar_t>
struct InterpArgs {
  const scalar_t* a;  // x1, or grad_x_t in the backward
  const scalar_t* x0 = nullptr;
  const acc_t<scalar_t>* t;
  scalar_t* out;             // x_t, or grad_x1 in the backward (nullptr when not requested)
  scalar_t* out0 = nullptr;  // grad_x0 in the backward (nullptr when not requested)
  int64_t B, per_sample;     // per_sample = S·C
};

template <typename scalar_t>
struct LossArgs {
  using acc = acc_t<scalar_t>;
  const scalar_t* v;
  const scalar_t* x1;
  const scalar_t* x0;
  const acc* weight = nullptr;           // forward only; nullptr = all ones
  const acc* grad_per_sample = nullptr;  // backward only
  acc* loss = nullptr;
  acc* mse = nullptr;
  acc* cos = nullptr;
  scalar_t* grad_v = nullptr;
  int64_t B, S, C;
};

// The drivers: checks, layouts, outputs and dtype dispatch shared by both devices; `launch` runs the
// device kernel on the args struct.

template <typename Launch>
at::Tensor interpolate(const at::Tensor& x1_in, const at::Tensor& x0_in, const at::Tensor& t_in, Launch&& launch) {
  check_tokens(x1_in, "x1");
  check_pair(x1_in, "x1", x0_in, "x0");
  check_per_sample(x1_in, t_in, "t");
  const auto x1 = x1_in.contiguous(), x0 = x0_in.contiguous(), t = per_sample_acc(x1_in, t_in);
  auto out = at::empty(x1.sizes(), x1.options());
  if (x1.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x1.scalar_type(), "flow_interpolate", [&] {
    InterpArgs<scalar_t> a{x1.data_ptr<scalar_t>(),
                           x0.data_ptr<scalar_t>(),
                           t.data_ptr<acc_t<scalar_t>>(),
                           out.data_ptr<scalar_t>(),
                           nullptr,
                           x1.size(0),
                           x1.size(1) * x1.size(2)};
    launch(a);
  });
  return out;
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor> interpolate_bwd(const at::Tensor& grad_in, const at::Tensor& t_in, bool need_x1,
                                                   bool need_x0, Launch&& launch) {
  check_tokens(grad_in, "grad_x_t");
  check_per_sample(grad_in, t_in, "t");
  const auto grad = grad_in.contiguous(), t = per_sample_acc(grad_in, t_in);
  const std::vector<int64_t> empty_shape{0};
  at::Tensor grad_x1 = at::empty(need_x1 ? grad.sizes() : at::IntArrayRef(empty_shape), grad.options());
  at::Tensor grad_x0 = at::empty(need_x0 ? grad.sizes() : at::IntArrayRef(empty_shape), grad.options());
  if (grad.numel() == 0 || !(need_x1 || need_x0)) return {grad_x1, grad_x0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "flow_interpolate_bwd", [&] {
    InterpArgs<scalar_t> a{grad.data_ptr<scalar_t>(),
                           nullptr,
                           t.data_ptr<acc_t<scalar_t>>(),
                           need_x1 ? grad_x1.data_ptr<scalar_t>() : nullptr,
                           need_x0 ? grad_x0.data_ptr<scalar_t>() : nullptr,
                           grad.size(0),
                           grad.size(1) * grad.size(2)};
    launch(a);
  });
  return {grad_x1, grad_x0};
}

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss(const at::Tensor& v_in, const at::Tensor& x1_in,
                                                    const at::Tensor& x0_in, const at::Tensor& t_in,
                                                    const c10::optional<at::Tensor>& weight_in, Launch&& launch) {
  check_loss_inputs(v_in, x1_in, x0_in);
  check_per_sample(v_in, t_in, "t");  // the loss itself depends on time only through weight
  if (weight_in.has_value()) check_per_sample(v_in, *weight_in, "weight");
  const auto v = v_in.contiguous(), x1 = x1_in.contiguous(), x0 = x0_in.contiguous();
  const auto weight = weight_in.has_value() ? per_sample_acc(v_in, *weight_in) : at::Tensor();
  auto opts = v.options().dtype(acc_dtype(v.scalar_type()));
  auto loss_out = at::empty({}, opts), mse = at::empty({v.size(0)}, opts), cos = at::empty({v.size(0)}, opts);
  if (v.numel() == 0) {  // S or C is 0: an empty mean is undefined
    loss_out.fill_(NAN);
    mse.fill_(NAN);
    cos.fill_(NAN);
    return {loss_out, mse, cos};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "flow_matching_loss", [&] {
    using acc = acc_t<scalar_t>;
    LossArgs<scalar_t> a;
    a.v = v.data_ptr<scalar_t>();
    a.x1 = x1.data_ptr<scalar_t>();
    a.x0 = x0.data_ptr<scalar_t>();
    a.weight = weight.defined() ? weight.data_ptr<acc>() : nullptr;
    a.loss = loss_out.data_ptr<acc>();
    a.mse = mse.data_ptr<acc>();
    a.cos = cos.data_ptr<acc>();
    a.B = v.size(0);
    a.S = v.size(1);
    a.C = v.size(2);
    launch(a);
  });
  return {loss_out, mse, cos};
}

template <typename Launch>
at::Tensor loss_bwd(const at::Tensor& grad_per_sample_in, const at::Tensor& v_in, const at::Tensor& x1_in,
                    const at::Tensor& x0_in, Launch&& launch) {
  check_loss_inputs(v_in, x1_in, x0_in);
  check_per_sample(v_in, grad_per_sample_in, "grad_per_sample");
  const auto v = v_in.contiguous(), x1 = x1_in.contiguous(), x0 = x0_in.contiguous();
  const auto gps = per_sample_acc(v_in, grad_per_sample_in);
  auto grad_v = at::empty(v.sizes(), v.options());
  if (v.numel() == 0) return grad_v;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "flow_matching_loss_bwd", [&] {
    LossArgs<scalar_t> a;
    a.v = v.data_ptr<scalar_t>();
    a.x1 = x1.data_ptr<scalar_t>();
    a.x0 = x0.data_ptr<scalar_t>();
    a.grad_per_sample = gps.data_ptr<acc_t<scalar_t>>();
    a.grad_v = grad_v.data_ptr<scalar_t>();
    a.B = v.size(0);
    a.S = v.size(1);
    a.C = v.size(2);
    launch(a);
  });
  return grad_v;
}

}  // namespace flow
}  // namespace blip3o_fast
