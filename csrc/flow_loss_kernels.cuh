// flow_interpolate / flow_matching_loss: CUDA kernels.
//
// The loss is two launches: one warp per token row writes that row's squared error and velocity
// cosine; one block then reduces each sample's rows and the samples, in a fixed order (no atomics).
//
// The device code and its launchers. Included by flow_loss_cuda.cu (nvcc) and by csrc/simt/flow_loss_simt.cpp
// (the host compiler, against the SIMT emulator): the tests run these same kernels on the CPU.
#pragma once

#include "cuda_utils.cuh"
#include "flow_loss.h"
#include "flow_loss_math.h"

namespace blip3o_fast {
namespace flow {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 1024;

template <typename scalar_t>
__global__ void interpolate_kernel(const InterpArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  const int64_t n = a.B * a.per_sample;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc t = a.t[i / a.per_sample];
    a.out[i] = static_cast<scalar_t>(interpolate<acc>(static_cast<acc>(a.a[i]), static_cast<acc>(a.x0[i]), t));
  }
}

template <typename scalar_t>
__global__ void interpolate_bwd_kernel(const InterpArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  const int64_t n = a.B * a.per_sample;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc t = a.t[i / a.per_sample], g = static_cast<acc>(a.a[i]);
    if (a.out) a.out[i] = static_cast<scalar_t>(t * g);
    if (a.out0) a.out0[i] = static_cast<scalar_t>((acc(1) - t) * g);
  }
}

template <typename scalar_t>
__global__ void loss_rows_kernel(const LossArgs<scalar_t> a, acc_t<scalar_t>* row_sq, acc_t<scalar_t>* row_cos) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / cuda::kWarp;
  if (row >= a.B * a.S) return;  // whole warps leave together
  RowSums<acc> sums;
  for (int64_t c = lane; c < a.C; c += cuda::kWarp) {
    const int64_t i = row * a.C + c;
    sums.add(static_cast<acc>(a.v[i]), target_velocity<acc>(static_cast<acc>(a.x1[i]), static_cast<acc>(a.x0[i])));
  }
  sums.sq_err = cuda::warp_sum(sums.sq_err);
  sums.dot = cuda::warp_sum(sums.dot);
  sums.vv = cuda::warp_sum(sums.vv);
  sums.uu = cuda::warp_sum(sums.uu);
  if (lane == 0) {
    row_sq[row] = sums.sq_err;
    row_cos[row] = token_cosine<acc>(sums.dot, sums.vv, sums.uu);
  }
}

// one block: warp w reduces samples w, w + warps, ...; then warp 0 reduces the weighted samples
template <typename scalar_t>
__global__ void loss_finalize_kernel(const LossArgs<scalar_t> a, const acc_t<scalar_t>* row_sq,
                                     const acc_t<scalar_t>* row_cos) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp, warps = blockDim.x / cuda::kWarp;
  for (int64_t b = warp; b < a.B; b += warps) {
    acc sq = 0, cs = 0;
    for (int64_t s = lane; s < a.S; s += cuda::kWarp) {
      sq += row_sq[b * a.S + s];
      cs += row_cos[b * a.S + s];
    }
    sq = cuda::warp_sum(sq);
    cs = cuda::warp_sum(cs);
    if (lane == 0) {
      a.mse[b] = sq / static_cast<acc>(a.S * a.C);
      a.cos[b] = cs / static_cast<acc>(a.S);
    }
  }
  __syncthreads();
  if (warp == 0) {
    acc total = 0;
    for (int64_t b = lane; b < a.B; b += cuda::kWarp) total += (a.weight ? a.weight[b] : acc(1)) * a.mse[b];
    total = cuda::warp_sum(total);
    if (lane == 0) *a.loss = total / static_cast<acc>(a.B);
  }
}

template <typename scalar_t>
__global__ void loss_bwd_kernel(const LossArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  const int64_t per_sample = a.S * a.C, n = a.B * per_sample;
  const acc inv_count = acc(1) / static_cast<acc>(per_sample);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc u = target_velocity<acc>(static_cast<acc>(a.x1[i]), static_cast<acc>(a.x0[i]));
    a.grad_v[i] = static_cast<scalar_t>(
        velocity_grad<acc>(static_cast<acc>(a.v[i]), u, a.grad_per_sample[i / per_sample], inv_count));
  }
}

// enough blocks to fill the GPU, grid-striding over the rest
int elementwise_blocks(int64_t n) {
  const int64_t max_blocks = static_cast<int64_t>(cuda::sm_count()) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(cuda::ceil_div(n, kThreads), max_blocks)));
}

struct CudaInterpolate {
  template <typename scalar_t>
  void operator()(const InterpArgs<scalar_t>& a) const {
    cuda::launch("flow interpolate_kernel", interpolate_kernel<scalar_t>, elementwise_blocks(a.B * a.per_sample),
                 kThreads, 0, a);
  }
};

struct CudaInterpolateBwd {
  template <typename scalar_t>
  void operator()(const InterpArgs<scalar_t>& a) const {
    cuda::launch("flow interpolate_bwd_kernel", interpolate_bwd_kernel<scalar_t>,
                 elementwise_blocks(a.B * a.per_sample), kThreads, 0, a);
  }
};

struct CudaLoss {
  template <typename scalar_t>
  void operator()(const LossArgs<scalar_t>& a) const {
    using acc = acc_t<scalar_t>;
    const int64_t rows = a.B * a.S;
    const at::ScalarType acc_type = std::is_same<acc, double>::value ? at::kDouble : at::kFloat;
    auto work = at::empty({2 * rows}, cuda::device_options(acc_type));
    acc* row_sq = work.data_ptr<acc>();
    acc* row_cos = row_sq + rows;
    const int64_t rows_per_block = kThreads / cuda::kWarp;
    cuda::launch("flow loss_rows_kernel", loss_rows_kernel<scalar_t>, cuda::ceil_div(rows, rows_per_block), kThreads, 0,
                 a, row_sq, row_cos);
    cuda::launch("flow loss_finalize_kernel", loss_finalize_kernel<scalar_t>, 1, kFinalizeThreads, 0, a, row_sq,
                 static_cast<const acc*>(row_cos));
  }
};

struct CudaLossBwd {
  template <typename scalar_t>
  void operator()(const LossArgs<scalar_t>& a) const {
    cuda::launch("flow loss_bwd_kernel", loss_bwd_kernel<scalar_t>, elementwise_blocks(a.B * a.S * a.C), kThreads, 0,
                 a);
  }
};

}  // namespace
}  // namespace flow
}  // namespace blip3o_fast
