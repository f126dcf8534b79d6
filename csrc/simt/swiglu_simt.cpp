// swiglu: the CUDA launchers and kernels on the SIMT emulator, registered as the CPU kernels of the
// blip3o_fast ops in the simt test process.
#include <torch/library.h>

#include "../swiglu_kernels.cuh"
#include "simt_ops.h"

namespace blip3o_fast {
namespace swiglu {
namespace {

at::Tensor swiglu_simt(const at::Tensor& ab) {
  return simt_ops::under_schedules("swiglu", [&] { return forward(ab, CudaForward{}); });
}

at::Tensor swiglu_bwd_simt(const at::Tensor& grad, const at::Tensor& ab) {
  return simt_ops::under_schedules("swiglu_bwd", [&] { return backward(grad, ab, CudaBackward{}); });
}

}  // namespace
}  // namespace swiglu

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("swiglu", &swiglu::swiglu_simt);
  m.impl("swiglu_bwd", &swiglu::swiglu_bwd_simt);
}

}  // namespace blip3o_fast
