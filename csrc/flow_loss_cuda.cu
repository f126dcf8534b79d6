// flow_loss: the CUDA entry points and their registration; the kernels are in flow_loss_kernels.cuh.
#include <torch/library.h>

#include "flow_loss_kernels.cuh"

namespace blip3o_fast {
namespace flow {
namespace {

void check_cuda(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel");
}

at::Tensor flow_interpolate_cuda(const at::Tensor& x1, const at::Tensor& x0, const at::Tensor& t) {
  check_cuda(x1, "x1");
  const c10::cuda::CUDAGuard guard(x1.device());
  return interpolate(x1, x0, t, CudaInterpolate{});
}

std::tuple<at::Tensor, at::Tensor> flow_interpolate_bwd_cuda(const at::Tensor& grad, const at::Tensor& t, bool need_x1,
                                                             bool need_x0) {
  check_cuda(grad, "grad_x_t");
  const c10::cuda::CUDAGuard guard(grad.device());
  return interpolate_bwd(grad, t, need_x1, need_x0, CudaInterpolateBwd{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_matching_loss_cuda(const at::Tensor& v, const at::Tensor& x1,
                                                                       const at::Tensor& x0, const at::Tensor& t,
                                                                       const c10::optional<at::Tensor>& weight) {
  check_cuda(v, "v");
  const c10::cuda::CUDAGuard guard(v.device());
  return loss(v, x1, x0, t, weight, CudaLoss{});
}

at::Tensor flow_matching_loss_bwd_cuda(const at::Tensor& grad_per_sample, const at::Tensor& v, const at::Tensor& x1,
                                       const at::Tensor& x0) {
  check_cuda(v, "v");
  const c10::cuda::CUDAGuard guard(v.device());
  return loss_bwd(grad_per_sample, v, x1, x0, CudaLossBwd{});
}

}  // namespace
}  // namespace flow

TORCH_LIBRARY_IMPL(blip3o_fast, CUDA, m) {
  m.impl("flow_interpolate", &flow::flow_interpolate_cuda);
  m.impl("flow_interpolate_bwd", &flow::flow_interpolate_bwd_cuda);
  m.impl("flow_matching_loss", &flow::flow_matching_loss_cuda);
  m.impl("flow_matching_loss_bwd", &flow::flow_matching_loss_bwd_cuda);
}

}  // namespace blip3o_fast
