// The SIMT scheduler: one fiber per thread of a block, run until each reaches a barrier, a warp
// exchange or its end; see simt.h for what is checked.
#include "simt.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "fiber.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace simt {
namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 128 * 1024;  // kernels keep a few dozen registers' worth of locals
constexpr int kBallot = -1;                 // exchange() source lane that asks for the mask of predicates
constexpr unsigned kMaxBlockThreads = 1024, kMaxGridYZ = 65535;

enum class State { Ready, Barrier, Exchange, Done };

struct Thread {
  detail::Context ctx;
  uint3 idx;
  int linear = 0;
  State state = State::Ready;
  const char* waiting_on = nullptr;
};

struct Warp {
  unsigned arrived = 0, mask = 0, exists = 0;
  const char* what = nullptr;
  uint64_t value[kWarp], result[kWarp];
  int src[kWarp];
};

// the block being run on this OS thread
struct Block {
  const char* kernel = nullptr;
  detail::Thunk body = nullptr;
  void* body_ctx = nullptr;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::deque<int> runnable;
  int at_barrier = 0;
  int current = -1;
  detail::Context scheduler;
  std::unique_ptr<unsigned char[]> smem;
  int64_t smem_bytes = 0, smem_limit = 0, static_bytes = 0;
  std::vector<const void*> static_arrays;    // counted against the limit, once per launch
  std::vector<const void*> poisoned_arrays;  // filled with the schedule's byte, once per block
  unsigned char fill = 0;
  std::string error;
  std::mt19937 rng;
};

thread_local Block* tl_block = nullptr;
thread_local Schedule tl_schedule = Schedule::InOrder;
thread_local std::vector<std::string> tl_log;
thread_local std::vector<std::unique_ptr<detail::FiberStack>> tl_stacks;

std::string where(const Block& b, int t) {
  std::ostringstream os;
  const auto& th = b.threads[t];
  os << "kernel " << b.kernel << ", block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << "), thread ("
     << th.idx.x << "," << th.idx.y << "," << th.idx.z << ")";
  return os.str();
}

[[noreturn]] void fail(const std::string& msg) { throw std::runtime_error("simt: " + msg); }

Thread& self() { return tl_block->threads[tl_block->current]; }

// back to the scheduler; returns when this thread is resumed
void yield() {
  Block& b = *tl_block;
  detail::switch_to(&self().ctx, &b.scheduler);
}

// an error found inside a thread: recorded, and the thread never runs again
[[noreturn]] void thread_error(const std::string& msg) {
  Block& b = *tl_block;
  if (b.error.empty()) b.error = msg;
  self().state = State::Done;
  detail::switch_to(&self().ctx, &b.scheduler, /*dying=*/true);
  std::abort();  // not reached: a failed block is never resumed
}

// threads woken together (by a barrier or an exchange) join the run queue in the schedule's order
void wake(Block& b, std::vector<int>& ids) {
  for (int t : ids) b.threads[t].state = State::Ready;
  switch (tl_schedule) {
    case Schedule::InOrder:
      std::sort(ids.begin(), ids.end());
      b.runnable.insert(b.runnable.begin(), ids.begin(), ids.end());
      break;
    case Schedule::Reversed:
      std::sort(ids.rbegin(), ids.rend());
      b.runnable.insert(b.runnable.end(), ids.begin(), ids.end());
      break;
    case Schedule::Shuffled:
      b.runnable.insert(b.runnable.end(), ids.begin(), ids.end());
      break;
  }
}

void fiber_main() {
  Block& b = *tl_block;
  detail::fiber_started(&self().ctx, &b.scheduler);
  try {
    b.body(b.body_ctx);
  } catch (const std::exception& e) {
    thread_error(std::string("exception in ") + where(b, b.current) + ": " + e.what());
  }
  self().state = State::Done;
  detail::switch_to(&self().ctx, &b.scheduler, /*dying=*/true);
  std::abort();
}

// nothing can run but some threads have not finished: name who waits where, and who left
std::string deadlock(const Block& b) {
  std::ostringstream os;
  for (size_t w = 0; w < b.warps.size(); ++w) {
    const Warp& wp = b.warps[w];
    if (!wp.arrived) continue;
    const unsigned missing = wp.mask & ~wp.arrived;
    const int lane = __builtin_ctz(missing ? missing : wp.arrived);
    const int t = static_cast<int>(w) * kWarp + lane;
    const auto& th = b.threads[t];
    os << wp.what << " with mask 0x" << std::hex << wp.mask << std::dec << " was reached by lanes 0x" << std::hex
       << wp.arrived << std::dec << " of warp " << w << " only (a divergent shuffle): lane " << lane << " "
       << (th.state == State::Done ? "exited" : "waits at __syncthreads()") << "; " << where(b, t);
    return os.str();
  }
  int waiting = -1, done = -1, n_waiting = 0, n_done = 0;
  for (const auto& th : b.threads) {
    if (th.state == State::Barrier) ++n_waiting, waiting = waiting < 0 ? th.linear : waiting;
    if (th.state == State::Done) ++n_done, done = done < 0 ? th.linear : done;
  }
  os << "__syncthreads() reached by only part of the block (a deadlock on a GPU): " << n_waiting
     << " threads wait, first " << where(b, waiting < 0 ? 0 : waiting) << "; " << n_done << " exited";
  if (done >= 0) {
    const auto& d = b.threads[done].idx;
    os << ", first thread (" << d.x << "," << d.y << "," << d.z << ")";
  }
  return os.str();
}

void run_block(Block& b, unsigned char fill, int64_t smem_bytes) {
  if (smem_bytes > 0) std::memset(b.smem.get(), fill, static_cast<size_t>(smem_bytes));
  b.fill = fill;
  b.poisoned_arrays.clear();
  b.runnable.clear();
  b.at_barrier = 0;
  const int n = static_cast<int>(b.threads.size());
  for (int t = 0; t < n; ++t) {
    b.threads[t].state = State::Ready;
    detail::make_context(&b.threads[t].ctx, *tl_stacks[t], &fiber_main);
    b.runnable.push_back(tl_schedule == Schedule::Reversed ? n - 1 - t : t);
  }
  for (auto& w : b.warps) w.arrived = 0;
  if (tl_schedule == Schedule::Shuffled) std::shuffle(b.runnable.begin(), b.runnable.end(), b.rng);
  while (!b.runnable.empty() && b.error.empty()) {
    int t;
    if (tl_schedule == Schedule::Shuffled) {
      const size_t pick = std::uniform_int_distribution<size_t>(0, b.runnable.size() - 1)(b.rng);
      std::swap(b.runnable[pick], b.runnable.front());
    }
    t = b.runnable.front();
    b.runnable.pop_front();
    b.current = t;
    threadIdx = b.threads[t].idx;
    detail::switch_to(&b.scheduler, &b.threads[t].ctx);
  }
  b.current = -1;
  std::string error = b.error;
  for (const auto& th : b.threads)
    if (error.empty() && th.state != State::Done) error = deadlock(b);
  if (!error.empty()) {
    for (size_t t = 0; t < b.threads.size(); ++t) tl_stacks[t]->forget_frames();
    fail(error);
  }
}

}  // namespace

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::InOrder:
      return "in-order";
    case Schedule::Reversed:
      return "reversed";
    case Schedule::Shuffled:
      return "shuffled";
  }
  return "?";
}

void set_schedule(Schedule s) { tl_schedule = s; }
Schedule schedule() { return tl_schedule; }

Device& device() {
  static Device d;
  return d;
}

std::vector<std::string>& launch_log() { return tl_log; }

namespace detail {

void launch(const char* name, dim3 grid, dim3 block, int64_t smem_bytes, int64_t smem_limit, Thunk body, void* ctx) {
  if (tl_block) fail(std::string("kernel ") + name + " launched from inside kernel " + tl_block->kernel);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  std::ostringstream cfg;
  cfg << "kernel " << name << ": invalid configuration (grid " << grid.x << "x" << grid.y << "x" << grid.z << ", block "
      << block.x << "x" << block.y << "x" << block.z << ", " << smem_bytes << " bytes of dynamic shared memory): ";
  if (threads == 0 || threads > kMaxBlockThreads || block.z > 64) fail(cfg.str() + "block size");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
    fail(cfg.str() + "grid size (grid.y and grid.z are at most 65535)");
  if (smem_bytes < 0 || smem_bytes > smem_limit)
    fail(cfg.str() + "more dynamic shared memory than the kernel may use (" + std::to_string(smem_limit) + ")");
  tl_log.emplace_back(name);

  Block b;
  b.kernel = name;
  b.body = body;
  b.body_ctx = ctx;
  b.smem_bytes = smem_bytes;
  b.smem_limit = smem_limit;
  b.rng.seed(12345);  // fixed: a failure reproduces
  b.threads.resize(threads);
  b.warps.resize((threads + kWarp - 1) / kWarp);
  for (unsigned t = 0; t < threads; ++t) {
    b.threads[t].idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
    b.threads[t].linear = static_cast<int>(t);
    b.warps[t / kWarp].exists |= 1u << (t % kWarp);
  }
  while (tl_stacks.size() < threads) tl_stacks.push_back(std::make_unique<FiberStack>(kStackBytes));
  // one allocation per block, exactly the requested size: AddressSanitizer sees any overrun
  const unsigned char fill = tl_schedule == Schedule::InOrder ? 0xff : tl_schedule == Schedule::Reversed ? 0x7f : 0xa5;

  struct Reset {  // the built-ins and the block pointer are cleared even when a block fails
    ~Reset() { tl_block = nullptr; }
  } reset;
  tl_block = &b;
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z, sample = device().block_sample;
  for (uint64_t i = 0; i < blocks; ++i) {
    if (sample > 0 && i >= sample && i + sample < blocks) continue;
    blockIdx = uint3{static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                     static_cast<unsigned>(i / (uint64_t(grid.x) * grid.y))};
    b.smem.reset(smem_bytes > 0 ? new unsigned char[smem_bytes] : nullptr);
    run_block(b, fill, smem_bytes);
  }
}

unsigned char* dynamic_smem() {
  if (!tl_block) fail("dynamic shared memory used outside a kernel");
  return tl_block->smem.get();
}

void note_static_smem(const void* array, size_t bytes) {
  Block& b = *tl_block;
  // the first thread of a block to declare the array finds it holding the schedule's byte, not what
  // an earlier block or launch left: a read before any write differs between schedules
  if (std::find(b.poisoned_arrays.begin(), b.poisoned_arrays.end(), array) == b.poisoned_arrays.end()) {
    b.poisoned_arrays.push_back(array);
    std::memset(const_cast<void*>(array), b.fill, bytes);
  }
  if (std::find(b.static_arrays.begin(), b.static_arrays.end(), array) != b.static_arrays.end()) return;
  b.static_arrays.push_back(array);
  b.static_bytes += static_cast<int64_t>(bytes);
  if (b.static_bytes + b.smem_bytes > b.smem_limit)
    thread_error("kernel " + std::string(b.kernel) + " takes " + std::to_string(b.static_bytes) +
                 " bytes of static and " + std::to_string(b.smem_bytes) +
                 " of dynamic shared memory, more than its launch allows (" + std::to_string(b.smem_limit) +
                 "; cudaFuncSetAttribute opts in to more): a launch failure on a GPU; " + where(b, b.current));
}

void syncthreads() {
  Block& b = *tl_block;
  Thread& me = self();
  me.state = State::Barrier;
  if (++b.at_barrier == static_cast<int>(b.threads.size())) {
    b.at_barrier = 0;
    std::vector<int> all(b.threads.size());
    for (size_t t = 0; t < all.size(); ++t) all[t] = static_cast<int>(t);
    wake(b, all);
  }
  yield();
}

int lane_id() { return self().linear % kWarp; }

uint64_t exchange(const char* what, unsigned mask, uint64_t value, int src_lane) {
  Block& b = *tl_block;
  Thread& me = self();
  const int lane = me.linear % kWarp;
  Warp& w = b.warps[me.linear / kWarp];
  if (!(mask >> lane & 1u)) thread_error(std::string(what) + " by a lane outside its mask; " + where(b, b.current));
  if (mask & ~w.exists)
    thread_error(std::string(what) + " names lanes that do not exist (a partial warp); " + where(b, b.current));
  if (w.arrived && (w.mask != mask || std::strcmp(w.what, what) != 0))
    thread_error(std::string(what) + " meets a different warp exchange (" + w.what + ") in its warp; " +
                 where(b, b.current));
  w.mask = mask;
  w.what = what;
  w.value[lane] = value;
  w.src[lane] = src_lane;
  w.arrived |= 1u << lane;
  me.state = State::Exchange;
  if (w.arrived == mask) {
    std::vector<int> lanes;
    for (int l = 0; l < kWarp; ++l) {
      if (!(mask >> l & 1u)) continue;
      if (w.src[l] == kBallot) {
        w.result[l] = 0;
        for (int k = 0; k < kWarp; ++k) w.result[l] |= ((mask >> k & 1u) && w.value[k] ? 1ull : 0ull) << k;
        lanes.push_back((me.linear / kWarp) * kWarp + l);
        continue;
      }
      if (!(mask >> w.src[l] & 1u))
        thread_error(std::string(what) + " reads lane " + std::to_string(w.src[l]) + ", which is outside the mask; " +
                     where(b, (me.linear / kWarp) * kWarp + l));
      w.result[l] = w.value[w.src[l]];
      lanes.push_back((me.linear / kWarp) * kWarp + l);
    }
    w.arrived = 0;
    wake(b, lanes);
  }
  yield();
  return w.result[lane];
}

unsigned ballot(const char* what, unsigned mask, bool pred) {
  return static_cast<unsigned>(exchange(what, mask, pred ? 1 : 0, kBallot));
}

}  // namespace detail
}  // namespace simt
