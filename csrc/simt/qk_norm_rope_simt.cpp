// qk_norm_rope3d: the CUDA launchers and kernels on the SIMT emulator, registered as the CPU
// kernels of the blip3o_fast ops in the simt test process.
#include <torch/library.h>

#include "../qk_norm_rope_kernels.cuh"
#include "simt_ops.h"

namespace blip3o_fast {
namespace qk_norm_rope {
namespace {

using simt_ops::under_schedules;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_simt(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight_q, const at::Tensor& weight_k, double eps,
    const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k) {
  return under_schedules("qk_norm_rope3d", [&] {
    return forward(q, k, weight_q, weight_k, eps, cos_q, sin_q, cos_k, sin_k, CudaForward{});
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_bwd_simt(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& weight_q, const at::Tensor& weight_k, const at::Tensor& rstd_q, const at::Tensor& rstd_k,
    const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k) {
  return under_schedules("qk_norm_rope3d_bwd", [&] {
    return backward(grad_q, grad_k, q, k, weight_q, weight_k, rstd_q, rstd_k, cos_q, sin_q, cos_k, sin_k,
                    CudaBackward{});
  });
}

}  // namespace
}  // namespace qk_norm_rope

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("qk_norm_rope3d", &qk_norm_rope::qk_norm_rope3d_simt);
  m.impl("qk_norm_rope3d_bwd", &qk_norm_rope::qk_norm_rope3d_bwd_simt);
}

}  // namespace blip3o_fast
