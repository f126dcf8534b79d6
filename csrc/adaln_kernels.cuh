// adaln_modulate / gated_residual_adaln: CUDA kernels.
//
// Forward: one block per row (b, s); the row is read once into shared memory (in the accumulation
// type), statistics come from two deterministic block sums, the modulated row is written once.
// Backward: a row kernel (input gradients) and a column kernel that sums dshift, dscale and dgate
// over S in a fixed order per (b, 32 columns) tile: deterministic, no atomics.
//
// The device code and its launchers. Included by adaln_cuda.cu (nvcc) and by csrc/simt/adaln_simt.cpp
// (the host compiler, against the SIMT emulator): the tests run these same kernels on the CPU.
#pragma once

#include "adaln.h"
#include "adaln_math.h"
#include "cuda_utils.cuh"

namespace blip3o_fast {
namespace adaln {
namespace {

constexpr int kFwdScratch = cuda::kWarp, kBwdScratch = 2 * cuda::kWarp;  // static block-sum scratch
constexpr int kColTile = 32, kColRows = 8;  // column kernel: 32 columns x 8 row lanes per block

template <typename scalar_t>
__global__ void forward_kernel(const FwdArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  B3F_DYNAMIC_SMEM(unsigned char, smem);
  acc* v = reinterpret_cast<acc*>(smem);
  B3F_STATIC_SMEM(acc, scratch, [kFwdScratch]);
  const int64_t row = blockIdx.x, b = row / a.S, C = a.C;
  const scalar_t* x = a.x + row * C;
  // each thread keeps to its own columns, so v needs no barrier between the passes
  acc sum = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc val;
    if (a.y) {
      const scalar_t stored = static_cast<scalar_t>(gated_residual<acc>(
          static_cast<acc>(x[c]), static_cast<acc>(a.y[row * C + c]), static_cast<acc>(a.gate[b * a.gate_stride + c])));
      a.x_new[row * C + c] = stored;
      val = static_cast<acc>(stored);
    } else {
      val = static_cast<acc>(x[c]);
    }
    v[c] = val;
    sum += val;
  }
  acc mean = 0;
  if (a.layer) {
    acc t[1] = {sum};
    cuda::block_sum<acc, 1>(t, scratch);
    mean = t[0] / static_cast<acc>(C);
  }
  acc sq = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sq += (v[c] - mean) * (v[c] - mean);
  acc t[1] = {sq};
  cuda::block_sum<acc, 1>(t, scratch);
  const acc rstd = rstd_from<acc>(t[0] / static_cast<acc>(C), a.eps);
  if (threadIdx.x == 0) {
    if (a.mean) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
  const scalar_t* shift = a.shift + b * a.shift_stride;
  const scalar_t* scale = a.scale + b * a.scale_stride;
  scalar_t* out = a.out + row * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x)
    out[c] = static_cast<scalar_t>(
        modulate<acc>(normalized<acc>(v[c], mean, rstd), static_cast<acc>(shift[c]), static_cast<acc>(scale[c])));
}

template <typename scalar_t>
__global__ void backward_rows_kernel(const BwdArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  B3F_DYNAMIC_SMEM(unsigned char, smem);
  acc* xhat = reinterpret_cast<acc*>(smem);
  acc* g = xhat + a.C;
  B3F_STATIC_SMEM(acc, scratch, [kBwdScratch]);
  const int64_t row = blockIdx.x, b = row / a.S, C = a.C;
  const scalar_t* x = a.x + row * C;
  const scalar_t* dh = a.grad_h + row * C;
  const scalar_t* scale = a.scale + b * a.scale_stride;
  const acc mean = a.mean ? a.mean[row] : acc(0);
  const acc rstd = a.rstd[row];
  acc sums[2] = {0, 0};
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    xhat[c] = normalized<acc>(static_cast<acc>(x[c]), mean, rstd);
    g[c] = static_cast<acc>(dh[c]) * (acc(1) + static_cast<acc>(scale[c]));
    sums[0] += g[c];
    sums[1] += g[c] * xhat[c];
  }
  cuda::block_sum<acc, 2>(sums, scratch);
  const acc mean_g = sums[0] / static_cast<acc>(C), mean_gx = sums[1] / static_cast<acc>(C);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc total = norm_grad<acc>(g[c], xhat[c], mean_g, mean_gx, rstd, a.layer);
    if (a.y) {
      total += static_cast<acc>(a.grad_x_new[row * C + c]);
      a.grad_y[row * C + c] = static_cast<scalar_t>(static_cast<acc>(a.gate[b * a.gate_stride + c]) * total);
    }
    a.grad_x[row * C + c] = static_cast<scalar_t>(total);
  }
}

// dshift = Σ_s dh, dscale = Σ_s dh·N(x), dgate = Σ_s dx_new·y for one (b, 32-column) tile
template <typename scalar_t>
__global__ void backward_columns_kernel(const BwdArgs<scalar_t> a, int64_t tiles) {
  using acc = acc_t<scalar_t>;
  B3F_STATIC_SMEM(acc, part, [3][kColRows][kColTile]);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b = blockIdx.x / tiles, c = (blockIdx.x % tiles) * kColTile + tx, C = a.C;
  acc s_shift = 0, s_scale = 0, s_gate = 0;
  if (c < C) {
    for (int64_t s = ty; s < a.S; s += kColRows) {
      const int64_t row = b * a.S + s, i = row * C + c;
      const acc d = static_cast<acc>(a.grad_h[i]);
      const acc xh = normalized<acc>(static_cast<acc>(a.x[i]), a.mean ? a.mean[row] : acc(0), a.rstd[row]);
      s_shift += d;
      s_scale += d * xh;
      // the gated op's dx_new total is grad_x (as stored), the same value grad_y was made from
      if (a.y) s_gate += static_cast<acc>(a.grad_x[i]) * static_cast<acc>(a.y[i]);
    }
  }
  part[0][ty][tx] = s_shift;
  part[1][ty][tx] = s_scale;
  part[2][ty][tx] = s_gate;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int r = 1; r < kColRows; ++r) {
      s_shift += part[0][r][tx];
      s_scale += part[1][r][tx];
      s_gate += part[2][r][tx];
    }
    a.grad_shift[b * C + c] = static_cast<scalar_t>(s_shift);
    a.grad_scale[b * C + c] = static_cast<scalar_t>(s_scale);
    if (a.y) a.grad_gate[b * C + c] = static_cast<scalar_t>(s_gate);
  }
}

// One row per block in shared memory: `buffers` rows of C values in the accumulation type. A kernel's
// static and dynamic shared memory together pass 48 KiB only by opting in, up to the device's limit.
template <typename scalar_t, typename Kernel, typename Args>
void launch_rows(const char* name, Kernel kernel, const Args& a, int buffers, int64_t static_declared) {
  const int64_t smem = buffers * a.C * static_cast<int64_t>(sizeof(acc_t<scalar_t>));
  const int64_t static_smem = cuda::static_smem_bytes(kernel, static_declared), most = cuda::smem_optin_max();
  TORCH_CHECK(smem + static_smem <= most, "C=", a.C, " is too wide for the CUDA AdaLN kernel (at most ",
              (most - static_smem) / (buffers * static_cast<int64_t>(sizeof(acc_t<scalar_t>))),
              " channels for this dtype on this device)");
  if (smem + static_smem > cuda::kDefaultSmemBytes)
    cuda::launch_opted_in(name, kernel, a.B * a.S, cuda::row_threads(a.C), smem, a);
  else
    cuda::launch(name, kernel, a.B * a.S, cuda::row_threads(a.C), smem, a);
}

struct CudaForward {
  template <typename scalar_t>
  void operator()(const FwdArgs<scalar_t>& a) const {
    launch_rows<scalar_t>("adaln forward_kernel", forward_kernel<scalar_t>, a, 1,
                          kFwdScratch * sizeof(acc_t<scalar_t>));
  }
};

struct CudaBackward {
  template <typename scalar_t>
  void operator()(const BwdArgs<scalar_t>& a) const {
    launch_rows<scalar_t>("adaln backward_rows_kernel", backward_rows_kernel<scalar_t>, a, 2,
                          kBwdScratch * sizeof(acc_t<scalar_t>));
    // one block per (b, column tile), b-major along grid.x: grid.y would cap B at 65535
    const int64_t tiles = cuda::ceil_div(a.C, kColTile);
    TORCH_CHECK(tiles * a.B <= 0x7fffffff, "B·ceil(C/32) = ", tiles * a.B, " is too large for the CUDA AdaLN kernel");
    cuda::launch("adaln backward_columns_kernel", backward_columns_kernel<scalar_t>, dim3(tiles * a.B),
                 dim3(kColTile, kColRows), 0, a, tiles);
  }
};

}  // namespace
}  // namespace adaln
}  // namespace blip3o_fast
