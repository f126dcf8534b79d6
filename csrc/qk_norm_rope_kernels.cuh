// qk_norm_rope3d: CUDA kernels. A warp per head vector (a row of D <= 512): lane l holds the pairs
// l, l + 32, ... (at most LP of them), the mean square is a warp sum, and the normalized, rotated row
// is written from registers. q and k are two launches of the same kernel.
// Backward: a fixed grid of warps strides over the rows; each lane sums its pairs' dy·x̂ in registers,
// the block adds its warps in shared memory into one partial row, and a second kernel adds the partial
// rows in order: no atomics, the same bits on every run.
//
// The device code and its launchers. Included by qk_norm_rope_cuda.cu (nvcc) and by csrc/simt/qk_norm_rope_simt.cpp
// (the host compiler, against the SIMT emulator): the tests run these same kernels on the CPU.
#pragma once

#include "adaln_math.h"
#include "cuda_utils.cuh"
#include "qk_norm_rope.h"
#include "rope3d_math.h"

namespace blip3o_fast {
namespace qk_norm_rope {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * cuda::kWarp;
constexpr int64_t kMaxBackwardBlocks = 1024;

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_x(const View<scalar_t>& v, int64_t row, int64_t* s) {
  const int64_t h = row % v.H, bs = row / v.H;
  *s = bs % v.S;
  return v.x + (bs / v.S) * v.stride_b + *s * v.stride_s + h * v.stride_h;
}

template <typename scalar_t, int LP>
__global__ void __launch_bounds__(kThreads) forward_kernel(const View<scalar_t> v) {
  using acc = acc_t<scalar_t>;
  const int lane = threadIdx.x % cuda::kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / cuda::kWarp;
  if (row >= v.rows) return;  // row is the same for the whole warp: the warp leaves together
  int64_t s;
  const scalar_t* x = row_x(v, row, &s);
  acc x0[LP], x1[LP];
  acc sq = 0;
#pragma unroll
  for (int i = 0; i < LP; ++i) {
    const int64_t j = lane + i * cuda::kWarp;
    x0[i] = j < v.half ? static_cast<acc>(x[2 * j]) : acc(0);
    x1[i] = j < v.half ? static_cast<acc>(x[2 * j + 1]) : acc(0);
    sq += x0[i] * x0[i] + x1[i] * x1[i];
  }
  const acc rstd = adaln::rstd_from<acc>(cuda::warp_sum(sq) / (2 * v.half), v.eps);
  if (lane == 0) v.rstd[row] = rstd;
  const acc* c = v.cos + s * v.half;
  const acc* sn = v.sin + s * v.half;
  scalar_t* out = v.out + row * 2 * v.half;
#pragma unroll
  for (int i = 0; i < LP; ++i) {
    const int64_t j = lane + i * cuda::kWarp;
    if (j < v.half) {
      acc y0, y1;
      rope::rotate_pair<acc>(x0[i] * rstd * static_cast<acc>(v.weight[2 * j]),
                             x1[i] * rstd * static_cast<acc>(v.weight[2 * j + 1]), c[j], sn[j], &y0, &y1);
      out[2 * j] = static_cast<scalar_t>(y0);
      out[2 * j + 1] = static_cast<scalar_t>(y1);
    }
  }
}

template <typename scalar_t, int LP>
__global__ void __launch_bounds__(kThreads) backward_kernel(const View<scalar_t> v, acc_t<scalar_t>* partials) {
  using acc = acc_t<scalar_t>;
  B3F_STATIC_SMEM(acc, scratch, [kWarpsPerBlock][kMaxHeadDim]);
  const int lane = threadIdx.x % cuda::kWarp, warp = threadIdx.x / cuda::kWarp;
  const int64_t D = 2 * v.half;
  acc dw0[LP], dw1[LP];
#pragma unroll
  for (int i = 0; i < LP; ++i) dw0[i] = dw1[i] = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; row < v.rows; row += stride) {
    int64_t s;
    const scalar_t* x = row_x(v, row, &s);
    const scalar_t* g = v.grad + row * D;
    const acc* c = v.cos + s * v.half;
    const acc* sn = v.sin + s * v.half;
    const acc rstd = v.rstd[row];
    acc gw0[LP], gw1[LP], xh0[LP], xh1[LP];
    acc dot = 0;
#pragma unroll
    for (int i = 0; i < LP; ++i) {
      const int64_t j = lane + i * cuda::kWarp;
      acc dy0 = 0, dy1 = 0;
      xh0[i] = xh1[i] = gw0[i] = gw1[i] = 0;
      if (j < v.half) {  // the inverse rotation: the same one by the negative angle
        rope::rotate_pair<acc>(static_cast<acc>(g[2 * j]), static_cast<acc>(g[2 * j + 1]), c[j], -sn[j], &dy0, &dy1);
        xh0[i] = static_cast<acc>(x[2 * j]) * rstd;
        xh1[i] = static_cast<acc>(x[2 * j + 1]) * rstd;
        gw0[i] = dy0 * static_cast<acc>(v.weight[2 * j]);
        gw1[i] = dy1 * static_cast<acc>(v.weight[2 * j + 1]);
      }
      dot += gw0[i] * xh0[i] + gw1[i] * xh1[i];
      dw0[i] += dy0 * xh0[i];
      dw1[i] += dy1 * xh1[i];
    }
    const acc mean_dot = cuda::warp_sum(dot) / D;
    scalar_t* dx = v.out + row * D;
#pragma unroll
    for (int i = 0; i < LP; ++i) {
      const int64_t j = lane + i * cuda::kWarp;
      if (j < v.half) {
        dx[2 * j] = static_cast<scalar_t>(rstd * (gw0[i] - xh0[i] * mean_dot));
        dx[2 * j + 1] = static_cast<scalar_t>(rstd * (gw1[i] - xh1[i] * mean_dot));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < LP; ++i) {
    const int64_t j = lane + i * cuda::kWarp;
    if (j < v.half) {
      scratch[warp][2 * j] = dw0[i];
      scratch[warp][2 * j + 1] = dw1[i];
    }
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc total = 0;
#pragma unroll
    for (int w = 0; w < kWarpsPerBlock; ++w) total += scratch[w][d];
    partials[blockIdx.x * D + d] = total;
  }
}

template <typename scalar_t>
__global__ void sum_partials_kernel(const acc_t<scalar_t>* partials, int64_t blocks, int64_t D, scalar_t* out) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  acc_t<scalar_t> total = 0;
  for (int64_t b = 0; b < blocks; ++b) total += partials[b * D + d];
  out[d] = static_cast<scalar_t>(total);
}

// pairs per lane: the smallest of 1, 2, 4, 8 that covers D/2 pairs with 32 lanes
template <typename F>
void with_lane_pairs(int64_t half, F&& f) {
  if (half <= 32)
    f(std::integral_constant<int, 1>{});
  else if (half <= 64)
    f(std::integral_constant<int, 2>{});
  else if (half <= 128)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, 8>{});
}

struct CudaForward {
  template <typename scalar_t>
  void operator()(const View<scalar_t>& v) const {
    with_lane_pairs(v.half, [&](auto lp) {
      cuda::launch("qk_norm_rope3d forward_kernel", forward_kernel<scalar_t, decltype(lp)::value>,
                   cuda::ceil_div(v.rows, kWarpsPerBlock), kThreads, 0, v);
    });
  }
};

struct CudaBackward {
  template <typename scalar_t>
  void operator()(const View<scalar_t>& v, at::Tensor& grad_weight) const {
    const int64_t D = 2 * v.half;
    const int64_t blocks = std::min(kMaxBackwardBlocks, cuda::ceil_div(v.rows, kWarpsPerBlock));
    auto partials = at::empty({blocks, D}, grad_weight.options().dtype(acc_dtype(grad_weight.scalar_type())));
    auto* p = partials.data_ptr<acc_t<scalar_t>>();
    with_lane_pairs(v.half, [&](auto lp) {
      cuda::launch("qk_norm_rope3d backward_kernel", backward_kernel<scalar_t, decltype(lp)::value>, blocks, kThreads,
                   0, v, p);
    });
    cuda::launch("qk_norm_rope3d sum_partials_kernel", sum_partials_kernel<scalar_t>, cuda::ceil_div(D, 256), 256, 0,
                 static_cast<const acc_t<scalar_t>*>(p), blocks, D, grad_weight.data_ptr<scalar_t>());
  }
};

}  // namespace
}  // namespace qk_norm_rope
}  // namespace blip3o_fast
