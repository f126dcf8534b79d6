// rope3d: CPU kernel. Rows (b, s) in parallel; each row rotates all heads with one table row.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_convert.h"
#include "rope3d.h"
#include "rope3d_math.h"

namespace blip3o_fast {
namespace rope {
namespace {

template <typename scalar_t, typename table_t>
B3F_ALWAYS_INLINE void rotate_rows(const RopeView<scalar_t, table_t>& v, table_t sign, int64_t begin, int64_t end) {
  const int64_t half = v.half, D = 2 * half;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / v.S, s = row % v.S;
    const table_t* c = v.cos + s * half;
    const table_t* sn = v.sin + s * half;
    for (int64_t h = 0; h < v.H; ++h) {
      const scalar_t* x = v.x + b * v.stride_b + s * v.stride_s + h * v.stride_h;
      scalar_t* o = v.out + (row * v.H + h) * D;
      for (int64_t j = 0; j < half; ++j) {
        table_t y0, y1;
        rotate_pair<table_t>(load(x[2 * j]), load(x[2 * j + 1]), c[j], sign * sn[j], &y0, &y1);
        o[2 * j] = store<scalar_t>(y0);
        o[2 * j + 1] = store<scalar_t>(y1);
      }
    }
  }
}

// One multi-versioned instance per dtype (target_clones cannot apply to templates).
#define B3F_ROPE_CLONE(scalar, table)                                                                          \
  B3F_CPU_CLONES void rotate_rows_cloned(const RopeView<scalar, table>& v, table sign, int64_t b, int64_t e) { \
    rotate_rows<scalar, table>(v, sign, b, e);                                                                 \
  }
B3F_ROPE_CLONE(float, float)
B3F_ROPE_CLONE(double, double)
B3F_ROPE_CLONE(at::Half, float)
B3F_ROPE_CLONE(at::BFloat16, float)
#undef B3F_ROPE_CLONE

template <typename scalar_t, typename table_t>
void rotate_cpu(const at::Tensor& x, at::Tensor& out, const at::Tensor& cos, const at::Tensor& sin, table_t sign) {
  const auto v = make_view<scalar_t, table_t>(x, out, cos, sin);
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, x.size(2) * x.size(3)));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { rotate_rows_cloned(v, sign, begin, end); });
}

std::tuple<at::Tensor, at::Tensor> rope3d_rotate(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                 const at::Tensor& cos_k, const at::Tensor& sin_k, bool inverse,
                                                 const char* qn, const char* kn) {
  check_rope3d(q_in, k_in, cos_q, sin_q, cos_k, sin_k, qn, kn);
  TORCH_CHECK(q_in.device().is_cpu(), qn, " must be a CPU tensor for the CPU kernel");
  const auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  const auto cq = cos_q.contiguous(), sq = sin_q.contiguous(), ck = cos_k.contiguous(), sk = sin_k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope3d_cpu", [&] {
    using table_t = acc_t<scalar_t>;
    const table_t sign = inverse ? table_t(-1) : table_t(1);
    if (q.numel() > 0) rotate_cpu<scalar_t, table_t>(q, q_out, cq, sq, sign);
    if (k.numel() > 0) rotate_cpu<scalar_t, table_t>(k, k_out, ck, sk, sign);
  });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope3d_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_q,
                                              const at::Tensor& sin_q, const at::Tensor& cos_k,
                                              const at::Tensor& sin_k) {
  return rope3d_rotate(q, k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/false, "q", "k");
}

std::tuple<at::Tensor, at::Tensor> rope3d_bwd_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                  const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                  const at::Tensor& cos_k, const at::Tensor& sin_k) {
  return rope3d_rotate(grad_q, grad_k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/true, "grad_q", "grad_k");
}

}  // namespace
}  // namespace rope

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("rope3d", &rope::rope3d_cpu);
  m.impl("rope3d_bwd", &rope::rope3d_bwd_cpu);
}

}  // namespace blip3o_fast
