// swiglu: the CUDA entry points and their registration; the kernels are in swiglu_kernels.cuh.
#include <torch/library.h>

#include "swiglu_kernels.cuh"

namespace blip3o_fast {
namespace swiglu {
namespace {

at::Tensor swiglu_cuda(const at::Tensor& ab) {
  TORCH_CHECK(ab.is_cuda(), "ab must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(ab.device());
  return forward(ab, CudaForward{});
}

at::Tensor swiglu_bwd_cuda(const at::Tensor& grad, const at::Tensor& ab) {
  TORCH_CHECK(ab.is_cuda(), "ab must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(ab.device());
  return backward(grad, ab, CudaBackward{});
}

}  // namespace
}  // namespace swiglu

TORCH_LIBRARY_IMPL(blip3o_fast, CUDA, m) {
  m.impl("swiglu", &swiglu::swiglu_cuda);
  m.impl("swiglu_bwd", &swiglu::swiglu_bwd_cuda);
}

}  // namespace blip3o_fast
