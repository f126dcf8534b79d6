// adaln_modulate / gated_residual_adaln: CPU kernels.
//
// Forward: rows (b, s) in parallel, one pass over the row into a float buffer, two-pass statistics
// from the buffer, one pass out. Backward: fixed chunks of rows in parallel; each chunk writes the
// row gradients and its partial column sums (dshift, dscale, dgate) for its batch entry; the
// partials are then summed in chunk order, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "adaln.h"
#include "adaln_math.h"
#include "cpu_convert.h"

namespace blip3o_fast {
namespace adaln {
namespace {

constexpr int64_t kRowsPerChunk = 16;

template <typename scalar_t>
B3F_ALWAYS_INLINE void forward_rows(const FwdArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const int64_t C = a.C;
  std::vector<acc> buf(C);
  acc* v = buf.data();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / a.S;
    const scalar_t* x = a.x + row * C;
    if (a.y) {
      const scalar_t* y = a.y + row * C;
      const scalar_t* gate = a.gate + b * a.gate_stride;
      scalar_t* x_new = a.x_new + row * C;
      for (int64_t c = 0; c < C; ++c) {
        // statistics of x_new as stored, which is what the backward sees
        const scalar_t stored = store<scalar_t>(gated_residual<acc>(load(x[c]), load(y[c]), load(gate[c])));
        x_new[c] = stored;
        v[c] = load(stored);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) v[c] = load(x[c]);
    }
    acc mean = 0;
    if (a.layer) {
      acc sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += v[c];
      mean = sum / C;
    }
    acc sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t c = 0; c < C; ++c) sq += (v[c] - mean) * (v[c] - mean);
    const acc rstd = rstd_from<acc>(sq / C, a.eps);
    if (a.mean) a.mean[row] = mean;
    a.rstd[row] = rstd;
    const scalar_t* shift = a.shift + b * a.shift_stride;
    const scalar_t* scale = a.scale + b * a.scale_stride;
    scalar_t* out = a.out + row * C;
    for (int64_t c = 0; c < C; ++c)
      out[c] = store<scalar_t>(modulate<acc>(normalized<acc>(v[c], mean, rstd), load(shift[c]), load(scale[c])));
  }
}

// Row gradients of rows [row0, row0 + n) of one batch entry b, and their column partial sums.
template <typename scalar_t>
B3F_ALWAYS_INLINE void backward_chunk(const BwdArgs<scalar_t>& a, int64_t b, int64_t row0, int64_t n,
                                      acc_t<scalar_t>* p_shift, acc_t<scalar_t>* p_scale, acc_t<scalar_t>* p_gate) {
  using acc = acc_t<scalar_t>;
  const int64_t C = a.C;
  std::vector<acc> buf(2 * C);
  acc* xhat = buf.data();
  acc* g = buf.data() + C;
  const scalar_t* scale = a.scale + b * a.scale_stride;
  const scalar_t* gate = a.gate ? a.gate + b * a.gate_stride : nullptr;
  for (int64_t c = 0; c < C; ++c) p_shift[c] = p_scale[c] = 0;
  if (p_gate)
    for (int64_t c = 0; c < C; ++c) p_gate[c] = 0;
  for (int64_t row = row0; row < row0 + n; ++row) {
    const scalar_t* x = a.x + row * C;
    const scalar_t* dh = a.grad_h + row * C;
    const acc mean = a.mean ? a.mean[row] : acc(0);
    const acc rstd = a.rstd[row];
    acc sum_g = 0, sum_gx = 0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t c = 0; c < C; ++c) {
      const acc d = load(dh[c]);
      xhat[c] = normalized<acc>(load(x[c]), mean, rstd);
      g[c] = d * (acc(1) + load(scale[c]));
      sum_g += g[c];
      sum_gx += g[c] * xhat[c];
      p_shift[c] += d;
      p_scale[c] += d * xhat[c];
    }
    const acc mean_g = sum_g / C, mean_gx = sum_gx / C;
    scalar_t* dx = a.grad_x + row * C;
    if (a.y) {
      const scalar_t* dx_new = a.grad_x_new + row * C;
      const scalar_t* y = a.y + row * C;
      scalar_t* dy = a.grad_y + row * C;
      for (int64_t c = 0; c < C; ++c) {
        const acc total = norm_grad<acc>(g[c], xhat[c], mean_g, mean_gx, rstd, a.layer) + load(dx_new[c]);
        dx[c] = store<scalar_t>(total);
        dy[c] = store<scalar_t>(load(gate[c]) * total);
        p_gate[c] += total * load(y[c]);
      }
    } else {
      for (int64_t c = 0; c < C; ++c)
        dx[c] = store<scalar_t>(norm_grad<acc>(g[c], xhat[c], mean_g, mean_gx, rstd, a.layer));
    }
  }
}

// One multi-versioned instance per dtype (target_clones cannot apply to templates).
#define B3F_ADALN_CLONES(scalar)                                                                          \
  B3F_CPU_CLONES void forward_rows_cloned(const FwdArgs<scalar>& a, int64_t begin, int64_t end) {         \
    forward_rows<scalar>(a, begin, end);                                                                  \
  }                                                                                                       \
  B3F_CPU_CLONES void backward_chunk_cloned(const BwdArgs<scalar>& a, int64_t b, int64_t row0, int64_t n, \
                                            acc_t<scalar>* ps, acc_t<scalar>* pc, acc_t<scalar>* pg) {    \
    backward_chunk<scalar>(a, b, row0, n, ps, pc, pg);                                                    \
  }
B3F_ADALN_CLONES(float)
B3F_ADALN_CLONES(double)
B3F_ADALN_CLONES(at::Half)
B3F_ADALN_CLONES(at::BFloat16)
#undef B3F_ADALN_CLONES

template <typename scalar_t>
void forward_cpu(const FwdArgs<scalar_t>& a) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, a.C));
  at::parallel_for(0, a.B * a.S, grain, [&](int64_t begin, int64_t end) { forward_rows_cloned(a, begin, end); });
}

template <typename scalar_t>
void backward_cpu(const BwdArgs<scalar_t>& a) {
  using acc = acc_t<scalar_t>;
  const int64_t C = a.C, chunks_per_b = (a.S + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t chunks = a.B * chunks_per_b, n_partials = a.y ? 3 : 2;
  std::vector<acc> partials(static_cast<size_t>(chunks * n_partials * C));
  auto partial = [&](int64_t chunk, int64_t which) { return partials.data() + (chunk * n_partials + which) * C; };
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t b = chunk / chunks_per_b, s0 = (chunk % chunks_per_b) * kRowsPerChunk;
      const int64_t n = std::min(kRowsPerChunk, a.S - s0);
      backward_chunk_cloned(a, b, b * a.S + s0, n, partial(chunk, 0), partial(chunk, 1),
                            a.y ? partial(chunk, 2) : nullptr);
    }
  });
  // column sums over the chunks of each batch entry, in chunk order
  at::parallel_for(0, a.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> sums(static_cast<size_t>(n_partials * C));
    for (int64_t b = begin; b < end; ++b) {
      std::fill(sums.begin(), sums.end(), acc(0));
      for (int64_t k = 0; k < chunks_per_b; ++k)
        for (int64_t w = 0; w < n_partials; ++w) {
          const acc* p = partial(b * chunks_per_b + k, w);
          acc* s = sums.data() + w * C;
          for (int64_t c = 0; c < C; ++c) s[c] += p[c];
        }
      for (int64_t c = 0; c < C; ++c) {
        a.grad_shift[b * C + c] = store<scalar_t>(sums[c]);
        a.grad_scale[b * C + c] = store<scalar_t>(sums[C + c]);
        if (a.y) a.grad_gate[b * C + c] = store<scalar_t>(sums[2 * C + c]);
      }
    }
  });
}

struct CpuForward {
  template <typename scalar_t>
  void operator()(const FwdArgs<scalar_t>& a) const {
    forward_cpu(a);
  }
};
struct CpuBackward {
  template <typename scalar_t>
  void operator()(const BwdArgs<scalar_t>& a) const {
    backward_cpu(a);
  }
};

void check_cpu(const at::Tensor& x) { TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor for the CPU kernel"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_cpu(const at::Tensor& x, const at::Tensor& shift,
                                                                  const at::Tensor& scale, double eps,
                                                                  c10::string_view norm) {
  check_cpu(x);
  auto [x_new, y, mean, rstd] = forward(x, nullptr, nullptr, shift, scale, eps, std::string(norm), CpuForward{});
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> adaln_modulate_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                      const at::Tensor& scale, const at::Tensor& mean,
                                                                      const at::Tensor& rstd, c10::string_view norm) {
  check_cpu(x);
  auto g = backward(grad_y, nullptr, x, nullptr, nullptr, scale, mean, rstd, std::string(norm), CpuBackward{});
  return {g[0], g[1], g[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_adaln_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale,
    double eps, c10::string_view norm) {
  check_cpu(x);
  return forward(x, &y, &gate, shift, scale, eps, std::string(norm), CpuForward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_residual_adaln_bwd_cpu(
    const at::Tensor& grad_x_new, const at::Tensor& grad_h, const at::Tensor& x_new, const at::Tensor& y,
    const at::Tensor& gate, const at::Tensor& scale, const at::Tensor& mean, const at::Tensor& rstd,
    c10::string_view norm) {
  check_cpu(x_new);
  auto g = backward(grad_h, &grad_x_new, x_new, &y, &gate, scale, mean, rstd, std::string(norm), CpuBackward{});
  return {g[0], g[1], g[2], g[3], g[4]};
}

}  // namespace
}  // namespace adaln

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("adaln_modulate", &adaln::adaln_modulate_cpu);
  m.impl("adaln_modulate_bwd", &adaln::adaln_modulate_bwd_cpu);
  m.impl("gated_residual_adaln", &adaln::gated_residual_adaln_cpu);
  m.impl("gated_residual_adaln_bwd", &adaln::gated_residual_adaln_bwd_cpu);
}

}  // namespace blip3o_fast
