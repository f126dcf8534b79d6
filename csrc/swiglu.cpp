// swiglu: CPU kernel. Rows in parallel; each row's loop runs on float lanes (the exponential is a
// polynomial, so it vectorises).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_convert.h"
#include "swiglu.h"
#include "swiglu_math.h"

namespace blip3o_fast {
namespace swiglu {
namespace {

template <typename scalar_t>
B3F_ALWAYS_INLINE void forward_rows(const Args<scalar_t>& p, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const int64_t F = p.F;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* a = p.ab + row * 2 * F;
    const scalar_t* b = a + F;
    scalar_t* out = p.out + row * F;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) out[c] = store<scalar_t>(swiglu::forward<acc>(load(a[c]), load(b[c])));
  }
}

template <typename scalar_t>
B3F_ALWAYS_INLINE void backward_rows(const Args<scalar_t>& p, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const int64_t F = p.F;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* a = p.ab + row * 2 * F;
    const scalar_t* b = a + F;
    const scalar_t* g = p.grad + row * F;
    scalar_t* da = p.out + row * 2 * F;
    scalar_t* db = da + F;
#pragma omp simd
    for (int64_t c = 0; c < F; ++c) {
      acc ga, gb;
      swiglu::backward<acc>(load(g[c]), load(a[c]), load(b[c]), &ga, &gb);
      da[c] = store<scalar_t>(ga);
      db[c] = store<scalar_t>(gb);
    }
  }
}

#define B3F_SWIGLU_CLONES(scalar)                                                                            \
  B3F_CPU_CLONES void forward_cloned(const Args<scalar>& p, int64_t b, int64_t e) { forward_rows(p, b, e); } \
  B3F_CPU_CLONES void backward_cloned(const Args<scalar>& p, int64_t b, int64_t e) { backward_rows(p, b, e); }
B3F_SWIGLU_CLONES(float)
B3F_SWIGLU_CLONES(double)
B3F_SWIGLU_CLONES(at::Half)
B3F_SWIGLU_CLONES(at::BFloat16)
#undef B3F_SWIGLU_CLONES

int64_t grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, F)); }

struct CpuForward {
  template <typename scalar_t>
  void operator()(const Args<scalar_t>& p) const {
    at::parallel_for(0, p.rows, grain(p.F), [&](int64_t b, int64_t e) { forward_cloned(p, b, e); });
  }
};

struct CpuBackward {
  template <typename scalar_t>
  void operator()(const Args<scalar_t>& p) const {
    at::parallel_for(0, p.rows, grain(p.F), [&](int64_t b, int64_t e) { backward_cloned(p, b, e); });
  }
};

at::Tensor swiglu_cpu(const at::Tensor& ab) {
  TORCH_CHECK(ab.device().is_cpu(), "ab must be a CPU tensor for the CPU kernel");
  return forward(ab, CpuForward{});
}

at::Tensor swiglu_bwd_cpu(const at::Tensor& grad, const at::Tensor& ab) {
  TORCH_CHECK(ab.device().is_cpu(), "ab must be a CPU tensor for the CPU kernel");
  return backward(grad, ab, CpuBackward{});
}

}  // namespace
}  // namespace swiglu

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("swiglu", &swiglu::swiglu_cpu);
  m.impl("swiglu_bwd", &swiglu::swiglu_bwd_cpu);
}

}  // namespace blip3o_fast
