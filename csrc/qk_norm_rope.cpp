// qk_norm_rope3d: CPU kernel. Head vectors (rows of D) in parallel: RMSNorm with weight, then the
// interleaved-pair rotation of rope3d, in one pass over the row. The weight gradient is summed per
// fixed chunk of rows, then over chunks in order: the same bits for any thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "adaln_math.h"
#include "cpu_convert.h"
#include "qk_norm_rope.h"
#include "rope3d_math.h"

namespace blip3o_fast {
namespace qk_norm_rope {
namespace {

// rows per weight-gradient partial: 64, or more so that there are at most kMaxChunks partials (bounded
// memory); a function of the row count only, so the sum is the same for any thread count
constexpr int64_t kMinChunkRows = 64, kMaxChunks = 4096;

template <typename scalar_t>
B3F_ALWAYS_INLINE const scalar_t* row_ptr(const View<scalar_t>& v, int64_t row, int64_t* s) {
  const int64_t h = row % v.H, bs = row / v.H;
  *s = bs % v.S;
  return v.x + (bs / v.S) * v.stride_b + *s * v.stride_s + h * v.stride_h;
}

template <typename scalar_t>
B3F_ALWAYS_INLINE void forward_rows(const View<scalar_t>& v, int64_t begin, int64_t end) {
  using acc = acc_t<scalar_t>;
  const int64_t half = v.half, D = 2 * half;
  for (int64_t row = begin; row < end; ++row) {
    int64_t s;
    const scalar_t* x = row_ptr(v, row, &s);
    acc sq = 0;
#pragma omp simd reduction(+ : sq)
    for (int64_t d = 0; d < D; ++d) sq += load(x[d]) * load(x[d]);
    const acc rstd = adaln::rstd_from<acc>(sq / D, v.eps);
    v.rstd[row] = rstd;
    const acc* c = v.cos + s * half;
    const acc* sn = v.sin + s * half;
    scalar_t* out = v.out + row * D;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      acc y0, y1;
      rope::rotate_pair<acc>(load(x[2 * j]) * rstd * load(v.weight[2 * j]),
                             load(x[2 * j + 1]) * rstd * load(v.weight[2 * j + 1]), c[j], sn[j], &y0, &y1);
      out[2 * j] = store<scalar_t>(y0);
      out[2 * j + 1] = store<scalar_t>(y1);
    }
  }
}

// Rows [begin, end): grad_x, and this chunk's Σ dy·x̂ into partial [D]. Both passes work on the
// interleaved pairs (as the forward does) and recompute dy = RoPE⁻¹(grad) instead of storing it.
template <typename scalar_t>
B3F_ALWAYS_INLINE void backward_rows(const View<scalar_t>& v, int64_t begin, int64_t end, acc_t<scalar_t>* partial) {
  using acc = acc_t<scalar_t>;
  const int64_t half = v.half, D = 2 * half;
  const scalar_t* w = v.weight;
  for (int64_t d = 0; d < D; ++d) partial[d] = 0;
  for (int64_t row = begin; row < end; ++row) {
    int64_t s;
    const scalar_t* x = row_ptr(v, row, &s);
    const scalar_t* g = v.grad + row * D;
    const acc* c = v.cos + s * half;
    const acc* sn = v.sin + s * half;
    const acc rstd = v.rstd[row];
    acc dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < half; ++j) {
      acc dy0, dy1;  // the inverse rotation: the same one by the negative angle
      rope::rotate_pair<acc>(load(g[2 * j]), load(g[2 * j + 1]), c[j], -sn[j], &dy0, &dy1);
      const acc xh0 = load(x[2 * j]) * rstd, xh1 = load(x[2 * j + 1]) * rstd;
      dot += dy0 * load(w[2 * j]) * xh0 + dy1 * load(w[2 * j + 1]) * xh1;
      partial[2 * j] += dy0 * xh0;
      partial[2 * j + 1] += dy1 * xh1;
    }
    const acc mean_dot = dot / D;
    scalar_t* dx = v.out + row * D;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      acc dy0, dy1;
      rope::rotate_pair<acc>(load(g[2 * j]), load(g[2 * j + 1]), c[j], -sn[j], &dy0, &dy1);
      dx[2 * j] = store<scalar_t>(rstd * (dy0 * load(w[2 * j]) - load(x[2 * j]) * rstd * mean_dot));
      dx[2 * j + 1] = store<scalar_t>(rstd * (dy1 * load(w[2 * j + 1]) - load(x[2 * j + 1]) * rstd * mean_dot));
    }
  }
}

#define B3F_QKNR_CLONES(scalar)                                                                              \
  B3F_CPU_CLONES void forward_cloned(const View<scalar>& v, int64_t b, int64_t e) { forward_rows(v, b, e); } \
  B3F_CPU_CLONES void backward_cloned(const View<scalar>& v, int64_t b, int64_t e, acc_t<scalar>* p) {       \
    backward_rows(v, b, e, p);                                                                               \
  }
B3F_QKNR_CLONES(float)
B3F_QKNR_CLONES(double)
B3F_QKNR_CLONES(at::Half)
B3F_QKNR_CLONES(at::BFloat16)
#undef B3F_QKNR_CLONES

struct CpuForward {
  template <typename scalar_t>
  void operator()(const View<scalar_t>& v) const {
    const int64_t grain = std::max<int64_t>(1, 16384 / (2 * v.half));
    at::parallel_for(0, v.rows, grain, [&](int64_t b, int64_t e) { forward_cloned(v, b, e); });
  }
};

struct CpuBackward {
  template <typename scalar_t>
  void operator()(const View<scalar_t>& v, at::Tensor& grad_weight) const {
    using acc = acc_t<scalar_t>;
    const int64_t D = 2 * v.half;
    const int64_t chunk_rows = std::max(kMinChunkRows, (v.rows + kMaxChunks - 1) / kMaxChunks);
    const int64_t chunks = (v.rows + chunk_rows - 1) / chunk_rows;
    std::vector<acc> partials(static_cast<size_t>(chunks * D));
    const int64_t grain = std::max<int64_t>(1, 16384 / (chunk_rows * D));
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        backward_cloned(v, c * chunk_rows, std::min(v.rows, (c + 1) * chunk_rows), partials.data() + c * D);
    });
    std::vector<acc> total(static_cast<size_t>(D), acc(0));
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t d = 0; d < D; ++d) total[d] += partials[c * D + d];
    scalar_t* gw = grad_weight.data_ptr<scalar_t>();
    for (int64_t d = 0; d < D; ++d) gw[d] = store<scalar_t>(total[d]);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weight_q, const at::Tensor& weight_k, double eps,
    const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k) {
  check_inputs(q, k, weight_q, weight_k, cos_q, sin_q, cos_k,
               sin_k);  // mixed devices: named before the kernel's device
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel");
  return forward(q, k, weight_q, weight_k, eps, cos_q, sin_q, cos_k, sin_k, CpuForward{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope3d_bwd_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& weight_q, const at::Tensor& weight_k, const at::Tensor& rstd_q, const at::Tensor& rstd_k,
    const at::Tensor& cos_q, const at::Tensor& sin_q, const at::Tensor& cos_k, const at::Tensor& sin_k) {
  check_inputs(q, k, weight_q, weight_k, cos_q, sin_q, cos_k,
               sin_k);  // mixed devices: named before the kernel's device
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel");
  return backward(grad_q, grad_k, q, k, weight_q, weight_k, rstd_q, rstd_k, cos_q, sin_q, cos_k, sin_k, CpuBackward{});
}

}  // namespace
}  // namespace qk_norm_rope

TORCH_LIBRARY_IMPL(blip3o_fast, CPU, m) {
  m.impl("qk_norm_rope3d", &qk_norm_rope::qk_norm_rope3d_cpu);
  m.impl("qk_norm_rope3d_bwd", &qk_norm_rope::qk_norm_rope3d_bwd_cpu);
}

}  // namespace blip3o_fast
