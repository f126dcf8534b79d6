// adaln: the CUDA launchers and kernels on the SIMT emulator, registered as the CPU kernels of the
// blip3o_fast ops in the process that loads this library (the simt test run).
#include <torch/library.h>

#include "../adaln_kernels.cuh"
#include "simt_ops.h"

namespace blip3o_fast {
namespace adaln {
namespace {

using simt_ops::under_schedules;

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_simt(const at::Tensor& x, const at::Tensor& shift,
                                                                   const at::Tensor& scale, double eps,
                                                                   c10::string_view norm) {
  return under_schedules("adaln_modulate", [&] {
    auto [x_new, y, mean, rstd] = forward(x, nullptr, nullptr, shift, scale, eps, std::string(norm), CudaForward{});
    return std::make_tuple(y, mean, rstd);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd_simt(const at::Tensor& grad_y, const at::Tensor& x,
                                                                       const at::Tensor& scale, const at::Tensor& mean,
                                                                       const at::Tensor& rstd, c10::string_view norm) {
  return under_schedules("adaln_modulate_bwd", [&] {
    auto g = backward(grad_y, nullptr, x, nullptr, nullptr, scale, mean, rstd, std::string(norm), CudaBackward{});
    return std::make_tuple(g[0], g[1], g[2]);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_adaln_simt(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale,
    double eps, c10::string_view norm) {
  return under_schedules("gated_residual_adaln",
                         [&] { return forward(x, &y, &gate, shift, scale, eps, std::string(norm), CudaForward{}); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_adaln_bwd_simt(
    const at::Tensor& grad_x_new, const at::Tensor& grad_h, const at::Tensor& x_new, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view norm) {
  return under_schedules("gated_residual_adaln_bwd", [&] {
    auto g = backward(grad_h, &grad_x_new, x_new, &y, &gate, scale, mean, rstd, std::string(norm), CudaBackward{});
    return std::make_tuple(g[0], g[1], g[2], g[3], g[4]);
  });
}

}  // namespace
}  // namespace adaln

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("adaln_modulate", &adaln::adaln_modulate_simt);
  m.impl("adaln_modulate_bwd", &adaln::adaln_modulate_bwd_simt);
  m.impl("gated_residual_adaln", &adaln::gated_residual_adaln_simt);
  m.impl("gated_residual_adaln_bwd", &adaln::gated_residual_adaln_bwd_simt);
}

}  // namespace blip3o_fast
