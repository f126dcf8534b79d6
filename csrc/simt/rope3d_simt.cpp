// rope3d: the CUDA launcher and kernel on the SIMT emulator, registered as the CPU kernels of the
// blip3o_fast ops in the simt test process.
#include <torch/library.h>

#include "../rope3d_kernels.cuh"
#include "simt_ops.h"

namespace blip3o_fast {
namespace rope {
namespace {

std::tuple<at::Tensor, at::Tensor> rope3d_simt(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_q,
                                               const at::Tensor& sin_q, const at::Tensor& cos_k,
                                               const at::Tensor& sin_k) {
  return simt_ops::under_schedules(
      "rope3d", [&] { return rotate(q, k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/false, "q", "k", CudaRotate{}); });
}

std::tuple<at::Tensor, at::Tensor> rope3d_bwd_simt(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                   const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                   const at::Tensor& cos_k, const at::Tensor& sin_k) {
  return simt_ops::under_schedules("rope3d_bwd", [&] {
    return rotate(grad_q, grad_k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/true, "grad_q", "grad_k", CudaRotate{});
  });
}

}  // namespace
}  // namespace rope

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("rope3d", &rope::rope3d_simt);
  m.impl("rope3d_bwd", &rope::rope3d_bwd_simt);
}

}  // namespace blip3o_fast
