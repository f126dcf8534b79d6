// flow_interpolate / flow_matching_loss: the CUDA launchers and kernels on the SIMT emulator,
// registered as the CPU kernels of the blip3o_fast ops in the simt test process.
#include <torch/library.h>

#include "../flow_loss_kernels.cuh"
#include "simt_ops.h"

namespace blip3o_fast {
namespace flow {
namespace {

using simt_ops::under_schedules;

at::Tensor flow_interpolate_simt(const at::Tensor& x1, const at::Tensor& x0, const at::Tensor& t) {
  return under_schedules("flow_interpolate", [&] { return interpolate(x1, x0, t, CudaInterpolate{}); });
}

std::tuple<at::Tensor, at::Tensor> flow_interpolate_bwd_simt(const at::Tensor& grad, const at::Tensor& t, bool need_x1,
                                                             bool need_x0) {
  return under_schedules("flow_interpolate_bwd",
                         [&] { return interpolate_bwd(grad, t, need_x1, need_x0, CudaInterpolateBwd{}); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_matching_loss_simt(const at::Tensor& v, const at::Tensor& x1,
                                                                       const at::Tensor& x0, const at::Tensor& t,
                                                                       const c10::optional<at::Tensor>& weight) {
  return under_schedules("flow_matching_loss", [&] { return loss(v, x1, x0, t, weight, CudaLoss{}); });
}

at::Tensor flow_matching_loss_bwd_simt(const at::Tensor& grad_per_sample, const at::Tensor& v, const at::Tensor& x1,
                                       const at::Tensor& x0) {
  return under_schedules("flow_matching_loss_bwd", [&] { return loss_bwd(grad_per_sample, v, x1, x0, CudaLossBwd{}); });
}

}  // namespace
}  // namespace flow

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("flow_interpolate", &flow::flow_interpolate_simt);
  m.impl("flow_interpolate_bwd", &flow::flow_interpolate_bwd_simt);
  m.impl("flow_matching_loss", &flow::flow_matching_loss_simt);
  m.impl("flow_matching_loss_bwd", &flow::flow_matching_loss_bwd_simt);
}

}  // namespace blip3o_fast
