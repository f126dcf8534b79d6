// CUDA helpers shared by the kernels: vector packs, deterministic warp/block sums, launch plumbing.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace blip3o_fast {
namespace cuda {

constexpr int kWarp = 32;

// N elements moved as one aligned vector load/store
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums NV values over the block (blockDim.x a multiple of 32, at most 1024) and gives every thread
// the totals. The tree is fixed, so the result is the same on every run. scratch: 32·NV elements.
template <typename T, int NV>
__device__ __forceinline__ void block_sum(T (&v)[NV], T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) scratch[i * kWarp + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(lane < warps ? scratch[i * kWarp + lane] : T(0));
  __syncthreads();  // scratch may be reused right after
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// threads per row-block: about 4 elements per thread, a whole number of warps, at most 512
inline int row_threads(int64_t C) {
  const int64_t want = ceil_div(ceil_div(C, 4), kWarp) * kWarp;
  return static_cast<int>(std::min<int64_t>(512, std::max<int64_t>(kWarp, want)));
}

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace cuda
}  // namespace blip3o_fast
