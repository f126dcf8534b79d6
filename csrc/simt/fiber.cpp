// Fiber stacks and the context switch (see fiber.h).
#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <new>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#endif

#if !defined(__x86_64__)
#error "the SIMT fiber switch is written for x86-64"
#endif

// simt_switch(void** save_sp, void* load_sp): pushes the callee-saved registers and the FP control
// words, stores rsp, loads the other stack and pops its registers in reverse.
asm(R"(
.text
.globl simt_switch
.type simt_switch,@function
simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size simt_switch,.-simt_switch
.section .note.GNU-stack,"",@progbits
.text
)");

extern "C" void simt_switch(void** save_sp, void* load_sp);

namespace simt {
namespace detail {

FiberStack::FiberStack(size_t bytes) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  size_ = (bytes + page - 1) / page * page;
  map_size_ = size_ + page;
  void* p = mmap(nullptr, map_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  map_ = static_cast<char*>(p);
  mprotect(map_, page, PROT_NONE);  // the guard page: stacks grow down into it
  base_ = map_ + page;
}

FiberStack::~FiberStack() { munmap(map_, map_size_); }

void FiberStack::forget_frames() const {
#ifdef SIMT_ASAN
  __asan_unpoison_memory_region(base_, size_);
#endif
}

void make_context(Context* ctx, const FiberStack& stack, void (*entry)()) {
#ifdef SIMT_ASAN
  // the words written below; frames of a fiber that ran to its end are unpoisoned by their epilogues
  __asan_unpoison_memory_region(stack.base() + stack.size() - 256, 256);
#endif
  // the frame simt_switch pops: FP control words, six registers, then `entry` as the return address.
  auto top = reinterpret_cast<uintptr_t>(stack.base() + stack.size()) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;  // entry's (never used) return address: entry starts with rsp = 8 mod 16, as after a call
  *--sp = reinterpret_cast<uint64_t>(entry);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  uint32_t control[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  *--sp = 0;
  std::memcpy(sp, control, sizeof(control));
  ctx->sp = sp;
  ctx->stack_bottom = stack.base();
  ctx->stack_size = stack.size();
  ctx->fake_stack = nullptr;
}

void switch_to(Context* from, Context* to, bool dying) {
#ifdef SIMT_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &from->fake_stack, to->stack_bottom, to->stack_size);
#else
  (void)dying;
#endif
  simt_switch(&from->sp, to->sp);
#ifdef SIMT_ASAN
  // what resumed us is the context we switched to (fibers only ever switch with the scheduler)
  __sanitizer_finish_switch_fiber(from->fake_stack, &to->stack_bottom, &to->stack_size);
#endif
}

void fiber_started(Context* self, Context* from) {
  (void)self;
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &from->stack_bottom, &from->stack_size);
#else
  (void)from;
#endif
}

}  // namespace detail
}  // namespace simt
