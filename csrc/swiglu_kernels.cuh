// swiglu: CUDA kernel, one thread per output element (grid-stride), reading a and b of its row.
//
// The device code and its launchers. Included by swiglu_cuda.cu (nvcc) and by csrc/simt/swiglu_simt.cpp
// (the host compiler, against the SIMT emulator): the tests run these same kernels on the CPU.
#pragma once

#include "cuda_utils.cuh"
#include "swiglu.h"
#include "swiglu_math.h"

namespace blip3o_fast {
namespace swiglu {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void forward_kernel(const Args<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  const int64_t n = p.rows * p.F;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.F, c = i - row * p.F;
    const scalar_t* a = p.ab + row * 2 * p.F;
    p.out[i] = static_cast<scalar_t>(swiglu::forward<acc>(static_cast<acc>(a[c]), static_cast<acc>(a[p.F + c])));
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const Args<scalar_t> p) {
  using acc = acc_t<scalar_t>;
  const int64_t n = p.rows * p.F;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.F, c = i - row * p.F;
    const scalar_t* a = p.ab + row * 2 * p.F;
    scalar_t* d = p.out + row * 2 * p.F;
    acc ga, gb;
    swiglu::backward<acc>(static_cast<acc>(p.grad[i]), static_cast<acc>(a[c]), static_cast<acc>(a[p.F + c]), &ga, &gb);
    d[c] = static_cast<scalar_t>(ga);
    d[p.F + c] = static_cast<scalar_t>(gb);
  }
}

int blocks(int64_t n) {
  const int64_t most = static_cast<int64_t>(cuda::sm_count()) * 32;
  return static_cast<int>(std::max<int64_t>(1, std::min(cuda::ceil_div(n, kThreads), most)));
}

struct CudaForward {
  template <typename scalar_t>
  void operator()(const Args<scalar_t>& p) const {
    cuda::launch("swiglu forward_kernel", forward_kernel<scalar_t>, blocks(p.rows * p.F), kThreads, 0, p);
  }
};

struct CudaBackward {
  template <typename scalar_t>
  void operator()(const Args<scalar_t>& p) const {
    cuda::launch("swiglu backward_kernel", backward_kernel<scalar_t>, blocks(p.rows * p.F), kThreads, 0, p);
  }
};

}  // namespace
}  // namespace swiglu
}  // namespace blip3o_fast
