// adaln: the CUDA entry points and their registration; the kernels are in adaln_kernels.cuh.
#include <torch/library.h>

#include "adaln_kernels.cuh"

namespace blip3o_fast {
namespace adaln {
namespace {

void check_cuda(const at::Tensor& x) { TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cuda(const at::Tensor& x, const at::Tensor& shift,
                                                                   const at::Tensor& scale, double eps,
                                                                   c10::string_view norm) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [x_new, y, mean, rstd] = forward(x, nullptr, nullptr, shift, scale, eps, std::string(norm), CudaForward{});
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                       const at::Tensor& scale, const at::Tensor& mean,
                                                                       const at::Tensor& rstd, c10::string_view norm) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto g = backward(grad_y, nullptr, x, nullptr, nullptr, scale, mean, rstd, std::string(norm), CudaBackward{});
  return {g[0], g[1], g[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_adaln_cuda(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale,
    double eps, c10::string_view norm) {
  check_cuda(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return forward(x, &y, &gate, shift, scale, eps, std::string(norm), CudaForward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_adaln_bwd_cuda(
    const at::Tensor& grad_x_new, const at::Tensor& grad_h, const at::Tensor& x_new, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view norm) {
  check_cuda(x_new);
  const c10::cuda::CUDAGuard guard(x_new.device());
  auto g = backward(grad_h, &grad_x_new, x_new, &y, &gate, scale, mean, rstd, std::string(norm), CudaBackward{});
  return {g[0], g[1], g[2], g[3], g[4]};
}

}  // namespace
}  // namespace adaln

TORCH_LIBRARY_IMPL(blip3o_fast, CUDA, m) {
  m.impl("adaln_modulate", &adaln::adaln_modulate_cuda);
  m.impl("adaln_modulate_bwd", &adaln::adaln_modulate_bwd_cuda);
  m.impl("gated_residual_adaln", &adaln::gated_residual_adaln_cuda);
  m.impl("gated_residual_adaln_bwd", &adaln::gated_residual_adaln_bwd_cuda);
}

}  // namespace blip3o_fast
