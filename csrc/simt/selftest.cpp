// Kernels that break the CUDA execution model on purpose, one per check of the emulator, so the
// tests can show each check fires (blip3o_fast_simt::selftest(name)). A kernel that is correct on
// a GPU must not fail here: "ok" is the control.
#include <torch/library.h>

#include "../cuda_utils.cuh"
#include "simt_ops.h"

namespace blip3o_fast {
namespace simt_ops {
namespace {

using cuda::kWarp;

// block b sums x[b·n, (b+1)·n) (a block reduction as the AdaLN kernels do it) into out[b]
__global__ void block_sum_kernel(const float* x, int64_t n, float* out, int64_t variant) {
  __shared__ float scratch[kWarp];
  float v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = v;
  if (variant != 1) __syncthreads();  // 1: the barrier is missing
  v = lane < static_cast<int>(blockDim.x / kWarp) ? scratch[lane] : 0.f;
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

__global__ void divergent_kernel(int64_t variant, float* out) {
  float v = 1.f;
  if (variant == 0 && threadIdx.x % kWarp == 7) return;  // a lane leaves before the warp's shuffle
  if (variant == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  if (variant == 1 && threadIdx.x >= 40) return;  // part of the block leaves before the barrier
  if (variant == 1) __syncthreads();
  if (variant == 2 && threadIdx.x % kWarp < 16) __syncthreads();  // half a warp waits at a barrier
  if (variant == 2) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

double selftest(c10::string_view name_view) {
  const std::string name(name_view);
  auto x = at::arange(2000, at::kFloat);
  auto out = at::zeros({256}, at::kFloat);
  if (name == "ok" || name == "missing_barrier") {
    const int64_t variant = name == "ok" ? 0 : 1;
    auto r = under_schedules(name.c_str(), [&] {
      auto o = at::zeros({2}, at::kFloat);
      cuda::launch("block_sum_kernel", block_sum_kernel, 2, 256, 0, x.const_data_ptr<float>(), int64_t(1000),
                   o.data_ptr<float>(), variant);
      return o;
    });
    return r[1].item<double>();
  }
  if (name == "divergent_shuffle" || name == "partial_barrier" || name == "mixed") {
    const int64_t variant = name == "divergent_shuffle" ? 0 : name == "partial_barrier" ? 1 : 2;
    cuda::launch("divergent_kernel", divergent_kernel, 1, 64, 0, variant, out.data_ptr<float>());
    return 0;
  }
  if (name == "grid_y") {
    cuda::launch("block_sum_kernel", block_sum_kernel, dim3(1, 65536), 32, 0, x.const_data_ptr<float>(), int64_t(1000),
                 out.data_ptr<float>(), int64_t(0));
    return 0;
  }
  if (name == "smem_limit") {
    cuda::launch("block_sum_kernel", block_sum_kernel, 1, 32, cuda::kDefaultSmemBytes + 1, x.const_data_ptr<float>(),
                 int64_t(1000), out.data_ptr<float>(), int64_t(0));
    return 0;
  }
  TORCH_CHECK(false, "no selftest named ", name);
  return 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(blip3o_fast_simt, m) { m.def("selftest(str name) -> float", &selftest); }

}  // namespace simt_ops
}  // namespace blip3o_fast
