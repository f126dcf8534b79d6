// Host-side contract of the AdaLN ops shared by the CPU and CUDA entry points: checks and the
// pointer bundles the kernels take.
#pragma once

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace blip3o_fast {
namespace adaln {

// Forward of adaln_modulate (y == nullptr) and gated_residual_adaln (y, gate, x_new set).
template <typename scalar_t>
struct FwdArgs {
  using acc = acc_t<scalar_t>;
  const scalar_t* x;
  const scalar_t* y = nullptr;
  const scalar_t* gate = nullptr;
  const scalar_t* shift;
  const scalar_t* scale;
  int64_t gate_stride = 0, shift_stride, scale_stride;  // row strides of the [B, C] parameters
  scalar_t* x_new = nullptr;
  scalar_t* out;
  acc* mean;  // nullptr for RMSNorm
  acc* rstd;
  int64_t B, S, C;
  acc eps;
  bool layer;
};

// Backward of both ops; the gated one sets grad_x_new, y, gate and grad_y / grad_gate.
template <typename scalar_t>
struct BwdArgs {
  using acc = acc_t<scalar_t>;
  const scalar_t* grad_h;  // dL/d(modulated output)
  const scalar_t* grad_x_new = nullptr;
  const scalar_t* x;  // the normalized input: x, or x_new for the gated op
  const scalar_t* y = nullptr;
  const scalar_t* gate = nullptr;
  const scalar_t* scale;
  int64_t gate_stride = 0, scale_stride;
  const acc* mean;  // nullptr for RMSNorm
  const acc* rstd;
  scalar_t* grad_x;
  scalar_t* grad_y = nullptr;
  scalar_t* grad_gate = nullptr;
  scalar_t* grad_shift;
  scalar_t* grad_scale;
  int64_t B, S, C;
  bool layer;
};

inline void check_param(const at::Tensor& x, const at::Tensor& p, const char* name) {
  check_same_device(x, "x", p, name);
  check_same_dtype(x, "x", p, name);
  TORCH_CHECK(p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == x.size(2), name, " must have shape [B, C] = [",
              x.size(0), ", ", x.size(2), "] to match x of shape ", x.sizes(), ", got ", p.sizes());
}

inline void check_x(const at::Tensor& x, const char* name = "x") {
  check_dim(x, 3, name, "[B, S, C]");
  check_floating(x, name);
}

inline void check_like(const at::Tensor& x, const at::Tensor& t, const char* name) {
  check_same_device(x, "x", t, name);
  check_same_dtype(x, "x", t, name);
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have the shape of x ", x.sizes(), ", got ", t.sizes());
}

inline void check_stats(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd, Norm norm) {
  const auto want = acc_dtype(x.scalar_type());
  TORCH_CHECK(rstd.dim() == 2 && rstd.size(0) == x.size(0) && rstd.size(1) == x.size(1) && rstd.scalar_type() == want,
              "rstd must be ", want, " of shape [B, S] = [", x.size(0), ", ", x.size(1), "], got ", rstd.scalar_type(),
              " ", rstd.sizes());
  if (norm == Norm::Layer) {
    TORCH_CHECK(mean.sizes() == rstd.sizes() && mean.scalar_type() == want, "mean must be ", want,
                " of shape [B, S] for norm=\"layer\", got ", mean.scalar_type(), " ", mean.sizes());
  }
  check_same_device(x, "x", rstd, "rstd");
  if (norm == Norm::Layer) check_same_device(x, "x", mean, "mean");
}

// the statistics outputs: mean [B, S] (empty for RMSNorm) and rstd [B, S] in the accumulation dtype
inline std::pair<at::Tensor, at::Tensor> empty_stats(const at::Tensor& x, Norm norm) {
  auto opts = x.options().dtype(acc_dtype(x.scalar_type()));
  auto rstd = at::empty({x.size(0), x.size(1)}, opts);
  auto mean = norm == Norm::Layer ? at::empty({x.size(0), x.size(1)}, opts) : at::empty({0}, opts);
  return {mean, rstd};
}

// The drivers: checks, layouts, output allocation and dtype dispatch, shared by both devices. `launch`
// is a generic callable taking FwdArgs<scalar_t>& / BwdArgs<scalar_t>& that runs the device kernel.

template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x_in, const at::Tensor* y_in,
                                                                   const at::Tensor* gate_in,
                                                                   const at::Tensor& shift_in,
                                                                   const at::Tensor& scale_in, double eps,
                                                                   const std::string& norm_name, Launch&& launch) {
  const Norm norm = parse_norm(norm_name);
  check_x(x_in);
  check_param(x_in, shift_in, "shift");
  check_param(x_in, scale_in, "scale");
  if (y_in) {
    check_like(x_in, *y_in, "y");
    check_param(x_in, *gate_in, "gate");
  }
  const auto x = x_in.contiguous();
  const auto y = y_in ? y_in->contiguous() : at::Tensor();
  const auto gate = gate_in ? rows_dense(*gate_in) : at::Tensor();
  const auto shift = rows_dense(shift_in), scale = rows_dense(scale_in);
  auto out = at::empty(x.sizes(), x.options());
  auto x_new = y_in ? at::empty(x.sizes(), x.options()) : at::Tensor();
  auto [mean, rstd] = empty_stats(x, norm);
  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_forward", [&] {
      FwdArgs<scalar_t> a;
      a.x = x.data_ptr<scalar_t>();
      if (y_in) {
        a.y = y.data_ptr<scalar_t>();
        a.gate = gate.data_ptr<scalar_t>();
        a.gate_stride = gate.stride(0);
        a.x_new = x_new.data_ptr<scalar_t>();
      }
      a.shift = shift.data_ptr<scalar_t>();
      a.scale = scale.data_ptr<scalar_t>();
      a.shift_stride = shift.stride(0);
      a.scale_stride = scale.stride(0);
      a.out = out.data_ptr<scalar_t>();
      a.mean = norm == Norm::Layer ? mean.data_ptr<acc_t<scalar_t>>() : nullptr;
      a.rstd = rstd.data_ptr<acc_t<scalar_t>>();
      a.B = x.size(0);
      a.S = x.size(1);
      a.C = x.size(2);
      a.eps = static_cast<acc_t<scalar_t>>(eps);
      a.layer = norm == Norm::Layer;
      launch(a);
    });
  } else if (rstd.numel() > 0) {  // C == 0: nothing to normalize, but defined statistics
    rstd.fill_(1.0 / std::sqrt(eps));
    if (norm == Norm::Layer) mean.zero_();
  }
  return {x_new, out, mean, rstd};
}

template <typename Launch>
std::vector<at::Tensor> backward(const at::Tensor& grad_h_in, const at::Tensor* grad_x_new_in, const at::Tensor& x_in,
                                 const at::Tensor* y_in, const at::Tensor* gate_in, const at::Tensor& scale_in,
                                 const at::Tensor& mean_in, const at::Tensor& rstd_in, const std::string& norm_name,
                                 Launch&& launch) {
  const Norm norm = parse_norm(norm_name);
  check_x(x_in);
  check_like(x_in, grad_h_in, y_in ? "grad_h" : "grad_y");
  check_param(x_in, scale_in, "scale");
  check_stats(x_in, mean_in, rstd_in, norm);
  if (y_in) {
    check_like(x_in, *grad_x_new_in, "grad_x_new");
    check_like(x_in, *y_in, "y");
    check_param(x_in, *gate_in, "gate");
  }
  const auto x = x_in.contiguous(), grad_h = grad_h_in.contiguous();
  const auto grad_x_new = y_in ? grad_x_new_in->contiguous() : at::Tensor();
  const auto y = y_in ? y_in->contiguous() : at::Tensor();
  const auto gate = y_in ? rows_dense(*gate_in) : at::Tensor();
  const auto scale = rows_dense(scale_in);
  const auto mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  auto grad_x = at::empty(x.sizes(), x.options());
  auto grad_y = y_in ? at::empty(x.sizes(), x.options()) : at::Tensor();
  const std::vector<int64_t> param_shape{x.size(0), x.size(2)};
  at::Tensor grad_gate = y_in ? at::empty(param_shape, x.options()) : at::Tensor();
  at::Tensor grad_shift = at::empty(param_shape, x.options());
  at::Tensor grad_scale = at::empty(param_shape, x.options());
  if (x.size(1) == 0) {  // no tokens: parameter gradients are empty sums
    grad_shift.zero_();
    grad_scale.zero_();
    if (y_in) grad_gate.zero_();
  } else if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaln_backward", [&] {
      BwdArgs<scalar_t> a;
      a.grad_h = grad_h.data_ptr<scalar_t>();
      a.x = x.data_ptr<scalar_t>();
      a.scale = scale.data_ptr<scalar_t>();
      a.scale_stride = scale.stride(0);
      a.mean = norm == Norm::Layer ? mean.data_ptr<acc_t<scalar_t>>() : nullptr;
      a.rstd = rstd.data_ptr<acc_t<scalar_t>>();
      a.grad_x = grad_x.data_ptr<scalar_t>();
      a.grad_shift = grad_shift.data_ptr<scalar_t>();
      a.grad_scale = grad_scale.data_ptr<scalar_t>();
      if (y_in) {
        a.grad_x_new = grad_x_new.data_ptr<scalar_t>();
        a.y = y.data_ptr<scalar_t>();
        a.gate = gate.data_ptr<scalar_t>();
        a.gate_stride = gate.stride(0);
        a.grad_y = grad_y.data_ptr<scalar_t>();
        a.grad_gate = grad_gate.data_ptr<scalar_t>();
      }
      a.B = x.size(0);
      a.S = x.size(1);
      a.C = x.size(2);
      a.layer = norm == Norm::Layer;
      launch(a);
    });
  }
  if (y_in) return {grad_x, grad_y, grad_gate, grad_shift, grad_scale};
  return {grad_x, grad_shift, grad_scale};
}

}  // namespace adaln
}  // namespace blip3o_fast
