// flow_interpolate / flow_matching_loss: CPU kernels.
//
// The loss reduces each token row in parallel into per-row sums, then each sample's rows in row
// order, then the samples in order: the same result whatever the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu_convert.h"
#include "flow_loss.h"
#include "flow_loss_math.h"

namespace blip3o_fast {
namespace flow {
namespace {

constexpr int64_t kGrain = 32768;

// Elements [begin, end) of the flattened [B, S·C] tensors, split at sample boundaries so the inner
// loops run over one sample's contiguous elements with one t.
template <typename scalar_t, typename Body>
B3F_ALWAYS_INLINE void for_sample_segments(const InterpArgs<scalar_t>& a, int64_t begin, int64_t end, Body&& body) {
  while (begin < end) {
    const int64_t b = begin / a.per_sample;
    const int64_t stop = std::min<int64_t>(end, (b + 1) * a.per_sample);
    body(b, begin, stop);
    begin = stop;
  }
}

template <typename scalar_t>
B3F_ALWAYS_INLINE void interpolate_range(const InterpArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  for_sample_segments(a, begin, end, [&](int64_t b, int64_t i0, int64_t i1) {
    const acc t = a.t[b];
    for (int64_t i = i0; i < i1; ++i) a.out[i] = store<scalar_t>(interpolate<acc>(load(a.a[i]), load(a.x0[i]), t));
  });
}

template <typename scalar_t>
B3F_ALWAYS_INLINE void interpolate_bwd_range(const InterpArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  for_sample_segments(a, begin, end, [&](int64_t b, int64_t i0, int64_t i1) {
    const acc t = a.t[b];
    if (a.out)
      for (int64_t i = i0; i < i1; ++i) a.out[i] = store<scalar_t>(t * load(a.a[i]));
    if (a.out0)
      for (int64_t i = i0; i < i1; ++i) a.out0[i] = store<scalar_t>((acc(1) - t) * load(a.a[i]));
  });
}

// per-row squared error and velocity cosine of rows [begin, end)
template <typename scalar_t>
B3F_ALWAYS_INLINE void loss_rows(const LossArgs<scalar_t>& a, acc_t<scalar_t>* row_sq, acc_t<scalar_t>* row_cos,
                                 int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const int64_t C = a.C;
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* v = a.v + row * C;
    const scalar_t* x1 = a.x1 + row * C;
    const scalar_t* x0 = a.x0 + row * C;
    acc sq = 0, dot = 0, vv = 0, uu = 0;
#pragma omp simd reduction(+ : sq, dot, vv, uu)
    for (int64_t c = 0; c < C; ++c) {
      const acc vc = load(v[c]);
      const acc u = target_velocity<acc>(load(x1[c]), load(x0[c]));
      sq += (vc - u) * (vc - u);
      dot += vc * u;
      vv += vc * vc;
      uu += u * u;
    }
    row_sq[row] = sq;
    row_cos[row] = token_cosine<acc>(dot, vv, uu);
  }
}

template <typename scalar_t>
B3F_ALWAYS_INLINE void loss_bwd_rows(const LossArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const int64_t C = a.C;
  const acc inv_count = acc(1) / static_cast<acc>(a.S * C);
  for (int64_t row = begin; row < end; ++row) {
    const acc g = a.grad_per_sample[row / a.S];
    const scalar_t* v = a.v + row * C;
    const scalar_t* x1 = a.x1 + row * C;
    const scalar_t* x0 = a.x0 + row * C;
    scalar_t* dv = a.grad_v + row * C;
    for (int64_t c = 0; c < C; ++c)
      dv[c] =
          store<scalar_t>(velocity_grad<acc>(load(v[c]), target_velocity<acc>(load(x1[c]), load(x0[c])), g, inv_count));
  }
}

// One multi-versioned instance per dtype (target_clones cannot apply to templates).
#define B3F_FLOW_CLONES(scalar)                                                                                    \
  B3F_CPU_CLONES void interpolate_cloned(const InterpArgs<scalar>& a, int64_t b, int64_t e) {                      \
    interpolate_range<scalar>(a, b, e);                                                                            \
  }                                                                                                                \
  B3F_CPU_CLONES void interpolate_bwd_cloned(const InterpArgs<scalar>& a, int64_t b, int64_t e) {                  \
    interpolate_bwd_range<scalar>(a, b, e);                                                                        \
  }                                                                                                                \
  B3F_CPU_CLONES void loss_rows_cloned(const LossArgs<scalar>& a, acc_t<scalar>* sq, acc_t<scalar>* cs, int64_t b, \
                                       int64_t e) {                                                                \
    loss_rows<scalar>(a, sq, cs, b, e);                                                                            \
  }                                                                                                                \
  B3F_CPU_CLONES void loss_bwd_cloned(const LossArgs<scalar>& a, int64_t b, int64_t e) {                           \
    loss_bwd_rows<scalar>(a, b, e);                                                                                \
  }
B3F_FLOW_CLONES(float)
B3F_FLOW_CLONES(double)
B3F_FLOW_CLONES(at::Half)
B3F_FLOW_CLONES(at::BFloat16)
#undef B3F_FLOW_CLONES

int64_t row_grain(int64_t C) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C)); }

struct CpuInterpolate {
  template <typename scalar_t>
  void operator()(const InterpArgs<scalar_t>& a) const {
    at::parallel_for(0, a.B * a.per_sample, kGrain, [&](int64_t b, int64_t e) { interpolate_cloned(a, b, e); });
  }
};

struct CpuInterpolateBwd {
  template <typename scalar_t>
  void operator()(const InterpArgs<scalar_t>& a) const {
    at::parallel_for(0, a.B * a.per_sample, kGrain, [&](int64_t b, int64_t e) { interpolate_bwd_cloned(a, b, e); });
  }
};

struct CpuLoss {
  template <typename scalar_t>
  void operator()(const LossArgs<scalar_t>& a) const {
    using acc = acc_t<scalar_t>;
    const int64_t rows = a.B * a.S;
    std::vector<acc> row_sq(rows), row_cos(rows);
    at::parallel_for(0, rows, row_grain(a.C),
                     [&](int64_t b, int64_t e) { loss_rows_cloned(a, row_sq.data(), row_cos.data(), b, e); });
    acc total = 0;
    for (int64_t b = 0; b < a.B; ++b) {
      acc sq = 0, cs = 0;
      for (int64_t s = 0; s < a.S; ++s) {
        sq += row_sq[b * a.S + s];
        cs += row_cos[b * a.S + s];
      }
      a.mse[b] = sq / static_cast<acc>(a.S * a.C);
      a.cos[b] = cs / static_cast<acc>(a.S);
      total += (a.weight ? a.weight[b] : acc(1)) * a.mse[b];
    }
    *a.loss = total / static_cast<acc>(a.B);
  }
};

struct CpuLossBwd {
  template <typename scalar_t>
  void operator()(const LossArgs<scalar_t>& a) const {
    at::parallel_for(0, a.B * a.S, row_grain(a.C), [&](int64_t b, int64_t e) { loss_bwd_cloned(a, b, e); });
  }
};

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel");
}

at::Tensor flow_interpolate_cpu(const at::Tensor& x1, const at::Tensor& x0, const at::Tensor& t) {
  check_cpu(x1, "x1");
  return interpolate(x1, x0, t, CpuInterpolate{});
}

std::tuple<at::Tensor, at::Tensor> flow_interpolate_bwd_cpu(const at::Tensor& grad, const at::Tensor& t, bool need_x1,
                                                            bool need_x0) {
  check_cpu(grad, "grad_x_t");
  return interpolate_bwd(grad, t, need_x1, need_x0, CpuInterpolateBwd{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flow_matching_loss_cpu(const at::Tensor& v, const at::Tensor& x1,
                                                                      const at::Tensor& x0, const at::Tensor& t,
                                                                      const c10::optional<at::Tensor>& weight) {
  check_cpu(v, "v");
  return loss(v, x1, x0, t, weight, CpuLoss{});
}

at::Tensor flow_matching_loss_bwd_cpu(const at::Tensor& grad_per_sample, const at::Tensor& v, const at::Tensor& x1,
                                      const at::Tensor& x0) {
  check_cpu(v, "v");
  return loss_bwd(grad_per_sample, v, x1, x0, CpuLossBwd{});
}

}  // namespace
}  // namespace flow

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("flow_interpolate", &flow::flow_interpolate_cpu);
  m.impl("flow_interpolate_bwd", &flow::flow_interpolate_bwd_cpu);
  m.impl("flow_matching_loss", &flow::flow_matching_loss_cpu);
  m.impl("flow_matching_loss_bwd", &flow::flow_matching_loss_bwd_cpu);
}

}  // namespace blip3o_fast
