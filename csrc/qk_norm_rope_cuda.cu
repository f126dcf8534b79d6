// qk_norm_rope: the CUDA entry points and their registration; the kernels are in qk_norm_rope_kernels.cuh.
#include <torch/library.h>

#include "qk_norm_rope_kernels.cuh"

namespace blip3o_fast {
namespace qk_norm_rope {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight_q, const at::Tensor& weight_k, double eps,
    const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k) {
  check_inputs(q, k, weight_q, weight_k, cos_q, sin_q, cos_k,
               sin_k);  // mixed devices: named before the kernel's device
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(q.device());
  return forward(q, k, weight_q, weight_k, eps, cos_q, sin_q, cos_k, sin_k, CudaForward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_bwd_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& weight_q, const at::Tensor& weight_k, const at::Tensor& rstd_q, const at::Tensor& rstd_k,
    const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k) {
  check_inputs(q, k, weight_q, weight_k, cos_q, sin_q, cos_k,
               sin_k);  // mixed devices: named before the kernel's device
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(q.device());
  return backward(grad_q, grad_k, q, k, weight_q, weight_k, rstd_q, rstd_k, cos_q, sin_q, cos_k, sin_k, CudaBackward{});
}

}  // namespace
}  // namespace qk_norm_rope

TORCH_LIBRARY_IMPL(blip3o_fast, CUDA, m) {
  m.impl("qk_norm_rope3d", &qk_norm_rope::qk_norm_rope3d_cuda);
  m.impl("qk_norm_rope3d_bwd", &qk_norm_rope::qk_norm_rope3d_bwd_cuda);
}

}  // namespace blip3o_fast
