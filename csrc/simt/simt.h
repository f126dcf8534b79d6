// A SIMT runtime for the host compiler: runs CUDA kernel source on the CPU, one fiber per CUDA
// thread, the blocks of a grid one after another. It exists to test the kernels (indexing, barriers,
// warp shuffles, shared memory, launch geometry) without a GPU; see docs/simt.md.
//
// Checked, each an error naming the kernel, the block and the thread:
//  - a shuffle must be reached by every lane its mask names (a divergent shuffle is undefined);
//  - a __syncthreads() must be reached by the whole block (part of it waiting is a GPU deadlock);
//  - launch limits: block <= 1024 threads, grid.y/grid.z <= 65535, static + dynamic shared memory
//    <= what the launch allows (48 KiB unless the launcher opted in to more).
// Races between barriers are found by running launches under several thread schedules (Schedule)
// and comparing results (see simt_ops.h); dynamic shared memory is one heap allocation per block,
// exactly the requested size and filled with a schedule-dependent byte, so AddressSanitizer sees
// overruns and a read before a write gives schedule-dependent results.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The CUDA built-in variables. thread_local: every emulated launch runs on its calling OS thread.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

// Qualifiers: kernels become plain functions; static __shared__ arrays become function statics
// (blocks run one after another, so one copy per kernel instantiation is enough).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace simt {

// The order in which runnable threads of a block are resumed. Between two barriers a correct kernel
// gives the same result under every one.
enum class Schedule : int {
  InOrder = 0,   // lowest thread first; threads woken by a barrier or shuffle run before the others
  Reversed = 1,  // highest thread first; woken threads queue behind the others
  Shuffled = 2,  // a seeded random runnable thread at every step
};
constexpr int kSchedules = 3;
const char* schedule_name(Schedule s);

// the schedule (and the shared-memory fill byte that goes with it) of launches on this OS thread
void set_schedule(Schedule s);
Schedule schedule();

// what an emulated device reports; the launch helpers size grids from it
struct Device {
  int sm_count = 2;  // small, so that grid-stride loops take several turns on test shapes
  int64_t max_dynamic_smem_optin = 227 * 1024;
  // > 0: run only the first and the last `block_sample` blocks of each launch (the launch itself is
  // checked in full). For grids too large to emulate whole, e.g. B > 65535 rows; 0: every block.
  int64_t block_sample = 0;
};
Device& device();

// names of the kernels launched on this thread, in order (cleared by whoever reads it)
std::vector<std::string>& launch_log();

namespace detail {

using Thunk = void (*)(void*);
void launch(const char* name, dim3 grid, dim3 block, int64_t smem_bytes, int64_t smem_limit, Thunk body, void* ctx);
unsigned char* dynamic_smem();
// a static __shared__ array of the running kernel: counted once per block against the launch's limit
void note_static_smem(const void* array, size_t bytes);
void syncthreads();
// a warp exchange: every lane in mask deposits `value` and reads the value of lane src(lane)
uint64_t exchange(const char* what, unsigned mask, uint64_t value, int src_lane);
unsigned ballot(const char* what, unsigned mask, bool pred);
int lane_id();

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace detail

// Runs kernel(args...) over the grid. smem_limit: the dynamic shared memory the kernel may ask for
// (48 KiB unless the launcher opted in, as cudaFuncSetAttribute would).
template <typename... KArgs, typename... Args>
void launch(const char* name, void (*kernel)(KArgs...), dim3 grid, dim3 block, int64_t smem_bytes, int64_t smem_limit,
            Args&&... args) {
  struct Ctx {
    void (*kernel)(KArgs...);
    std::tuple<std::decay_t<KArgs>...> args;
  } ctx{kernel, std::tuple<std::decay_t<KArgs>...>(std::forward<Args>(args)...)};
  detail::launch(
      name, grid, block, smem_bytes, smem_limit,
      [](void* p) {
        auto* c = static_cast<Ctx*>(p);
        std::apply(c->kernel, c->args);
      },
      &ctx);
}

}  // namespace simt

inline void __syncthreads() { simt::detail::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = simt::detail::lane_id();
  int src = lane ^ lane_mask;
  if (src / width != lane / width) src = lane;  // outside the segment: the lane keeps its own value
  return simt::detail::from_bits<T>(simt::detail::exchange("__shfl_xor_sync", mask, simt::detail::to_bits(v), src));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = simt::detail::lane_id();
  const int src = (lane % width) + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane;
  return simt::detail::from_bits<T>(simt::detail::exchange("__shfl_down_sync", mask, simt::detail::to_bits(v), src));
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = simt::detail::lane_id();
  const int src = (lane / width) * width + ((src_lane % width) + width) % width;
  return simt::detail::from_bits<T>(simt::detail::exchange("__shfl_sync", mask, simt::detail::to_bits(v), src));
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  return simt::detail::ballot("__ballot_sync", mask, pred != 0);
}
