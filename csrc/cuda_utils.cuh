// CUDA helpers shared by the kernels: vector packs, deterministic warp/block sums, launch plumbing.
//
// The kernels (<op>_kernels.cuh) compile two ways: with nvcc for a GPU, and with the host compiler
// against the SIMT emulator (BLIP3O_FAST_SIMT, csrc/simt/) for the tests. What differs between the
// two is here and only here: dynamic shared memory, the launch, and what the device reports.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#if defined(BLIP3O_FAST_SIMT)
#include "simt/simt.h"
// a pointer to the block's dynamic shared memory (one exactly-sized heap allocation per block)
#define B3F_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::simt::detail::dynamic_smem())
// a static shared array, e.g. B3F_STATIC_SMEM(float, part, [4][32]); the emulator counts its bytes
// against the launch's shared-memory limit, as the GPU does
#define B3F_STATIC_SMEM(type, name, dims) \
  static type name dims;                  \
  ::simt::detail::note_static_smem(name, sizeof(name))
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define B3F_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#define B3F_STATIC_SMEM(type, name, dims) __shared__ type name dims
#endif

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

// the dynamic shared memory any kernel may take without opting in
constexpr int64_t kDefaultSmemBytes = 48 * 1024;

// kernel<<<grid, block, smem, current stream>>>(args...) and its launch check. name: for the
// emulator's error messages.
template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, int64_t smem, Args&&... args) {
#if defined(BLIP3O_FAST_SIMT)
  ::simt::launch(name, kernel, grid, block, smem, kDefaultSmemBytes, std::forward<Args>(args)...);
#else
  (void)name;
  // clang-format off: a .cuh is formatted as C++, which splits the launch chevrons
  kernel<<<grid, block, smem, at::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// the most shared memory (static + dynamic) a block may opt in to on the current device
inline int64_t smem_optin_max() {
#if defined(BLIP3O_FAST_SIMT)
  return ::simt::device().max_dynamic_smem_optin;
#else
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
#endif
}

// the static shared memory of a kernel: the compiled truth on a GPU, `declared` (what its arrays
// take, which the emulator checks as it runs them) on the emulator
template <typename... KArgs>
int64_t static_smem_bytes(void (*kernel)(KArgs...), int64_t declared) {
#if defined(BLIP3O_FAST_SIMT)
  (void)kernel;
  return declared;
#else
  (void)declared;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  return static_cast<int64_t>(attr.sharedSizeBytes);
#endif
}

// launch() for a kernel whose static + dynamic shared memory may pass 48 KiB: opts the kernel in to
// `smem` bytes of dynamic shared memory first (the caller checked it fits the device)
template <typename... KArgs, typename... Args>
void launch_opted_in(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, int64_t smem, Args&&... args) {
#if defined(BLIP3O_FAST_SIMT)
  ::simt::launch(name, kernel, grid, block, smem, smem_optin_max(), std::forward<Args>(args)...);
#else
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  launch(name, kernel, grid, block, smem, std::forward<Args>(args)...);
#endif
}

// streaming multiprocessors of the current device: grid-stride kernels size their grids from it
inline int sm_count() {
#if defined(BLIP3O_FAST_SIMT)
  return ::simt::device().sm_count;
#else
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
}

// options for a scratch tensor on the device the kernels run on
inline at::TensorOptions device_options(at::ScalarType dtype) {
#if defined(BLIP3O_FAST_SIMT)
  return at::TensorOptions().dtype(dtype);
#else
  return at::TensorOptions().device(at::kCUDA, at::cuda::current_device()).dtype(dtype);
#endif
}

}  // namespace cuda
}  // namespace blip3o_fast
