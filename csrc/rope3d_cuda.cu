// rope3d: the CUDA entry points and their registration; the kernels are in rope3d_kernels.cuh.
#include <torch/library.h>

#include "rope3d_kernels.cuh"

namespace blip3o_fast {
namespace rope {
namespace {

std::tuple<at::Tensor, at::Tensor> rope3d_rotate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_q,
                                                 const at::Tensor& sin_q, const at::Tensor& cos_k,
                                                 const at::Tensor& sin_k, bool inverse, const char* qn,
                                                 const char* kn) {
  check_rope3d(q, k, cos_q, sin_q, cos_k, sin_k, qn, kn);
  TORCH_CHECK(q.is_cuda(), qn, " must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(q.device());
  return rotate(q, k, cos_q, sin_q, cos_k, sin_k, inverse, qn, kn, CudaRotate{});
}

std::tuple<at::Tensor, at::Tensor> rope3d_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_q,
                                               const at::Tensor& sin_q, const at::Tensor& cos_k,
                                               const at::Tensor& sin_k) {
  return rope3d_rotate(q, k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/false, "q", "k");
}

std::tuple<at::Tensor, at::Tensor> rope3d_bwd_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                   const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                   const at::Tensor& cos_k, const at::Tensor& sin_k) {
  return rope3d_rotate(grad_q, grad_k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/true, "grad_q", "grad_k");
}

}  // namespace
}  // namespace rope

TORCH_LIBRARY_IMPL(blip3o_fast, CUDA, m) {
  m.impl("rope3d", &rope::rope3d_cuda);
  m.impl("rope3d_bwd", &rope::rope3d_bwd_cuda);
}

}  // namespace blip3o_fast
