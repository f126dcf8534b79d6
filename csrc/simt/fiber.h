// Fibers for the SIMT runtime: a stack per emulated CUDA thread and a context switch that saves only
// what the x86-64 SysV ABI asks a callee to keep (a switch is a few nanoseconds; swapcontext makes a
// system call for the signal mask). AddressSanitizer is told about every stack switch.
#pragma once

#include <cstddef>

namespace simt {
namespace detail {

class FiberStack {
 public:
  explicit FiberStack(size_t bytes);  // mmap'd, with a guard page below it: an overflow faults
  ~FiberStack();
  FiberStack(const FiberStack&) = delete;
  FiberStack& operator=(const FiberStack&) = delete;
  char* base() const { return base_; }
  size_t size() const { return size_; }
  // after a fiber was abandoned mid-call: clears the redzones its live frames left in ASan's shadow
  void forget_frames() const;

 private:
  char* map_;
  size_t map_size_;
  char* base_;
  size_t size_;
};

// a suspended context: its saved stack pointer (the callee-saved registers lie on its stack)
struct Context {
  void* sp = nullptr;
  const void* stack_bottom = nullptr;  // for AddressSanitizer
  size_t stack_size = 0;
  void* fake_stack = nullptr;
};

// prepares `ctx` to start `entry()` on `stack` at its next switch_to; entry must never return
void make_context(Context* ctx, const FiberStack& stack, void (*entry)());
// saves the running context into `from` and resumes `to`; returns when something switches back.
// dying: `from` will never be resumed (lets AddressSanitizer drop its fake stack).
void switch_to(Context* from, Context* to, bool dying = false);
// first thing a fiber entry function does: completes the switch that started it
void fiber_started(Context* self, Context* from);

}  // namespace detail
}  // namespace simt
