// rope3d: CUDA kernel. One launch rotates q and k: threads [0, q_groups) take q, the rest take k.
// Each thread rotates PAIRS consecutive pairs of one head with 16-byte loads when the layout allows.
#include <torch/library.h>

#include "cuda_utils.cuh"
#include "rope3d.h"
#include "rope3d_math.h"

namespace blip3o_fast {
namespace rope {
namespace {

template <typename scalar_t, typename table_t, int PAIRS, bool VEC>
__global__ void rope3d_kernel(const RopeView<scalar_t, table_t> q, const RopeView<scalar_t, table_t> k,
                              int64_t q_groups, int64_t total_groups, table_t sign) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (gid >= total_groups) return;
  const bool is_q = gid < q_groups;
  const RopeView<scalar_t, table_t>& v = is_q ? q : k;
  const PairIndex p = locate_pair((is_q ? gid : gid - q_groups) * PAIRS, v.S, v.H, v.half);
  const scalar_t* x = v.x + p.b * v.stride_b + p.s * v.stride_s + p.h * v.stride_h + 2 * p.j;
  scalar_t* out = v.out + ((p.b * v.S + p.s) * v.H + p.h) * 2 * v.half + 2 * p.j;
  const table_t* c = v.cos + p.s * v.half + p.j;
  const table_t* s = v.sin + p.s * v.half + p.j;
  using Vec = cuda::Pack<scalar_t, 2 * PAIRS>;
  Vec in, res;
  if constexpr (VEC) {
    in = *reinterpret_cast<const Vec*>(x);
  } else {
#pragma unroll
    for (int i = 0; i < 2 * PAIRS; ++i) in.v[i] = x[i];
  }
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    table_t y0, y1;
    rotate_pair<table_t>(static_cast<table_t>(in.v[2 * i]), static_cast<table_t>(in.v[2 * i + 1]), c[i],
                         sign * s[i], &y0, &y1);
    res.v[2 * i] = static_cast<scalar_t>(y0);
    res.v[2 * i + 1] = static_cast<scalar_t>(y1);
  }
  if constexpr (VEC) {
    *reinterpret_cast<Vec*>(out) = res;
  } else {
#pragma unroll
    for (int i = 0; i < 2 * PAIRS; ++i) out[i] = res.v[i];
  }
}

template <int PAIRS, typename scalar_t, typename table_t>
bool vectorizable(const RopeView<scalar_t, table_t>& v) {
  const int64_t elems = 2 * PAIRS;
  return v.half % PAIRS == 0 && v.stride_b % elems == 0 && v.stride_s % elems == 0 && v.stride_h % elems == 0 &&
         cuda::aligned(v.x, sizeof(scalar_t) * elems) && cuda::aligned(v.out, sizeof(scalar_t) * elems);
}

template <int PAIRS, bool VEC, typename scalar_t, typename table_t>
void launch(const RopeView<scalar_t, table_t>& q, const RopeView<scalar_t, table_t>& k, int64_t q_pairs,
            int64_t k_pairs, table_t sign) {
  const int64_t q_groups = q_pairs / PAIRS, total = q_groups + k_pairs / PAIRS;
  constexpr int threads = 256;
  rope3d_kernel<scalar_t, table_t, PAIRS, VEC><<<cuda::ceil_div(total, threads), threads, 0,
                                                 at::cuda::getCurrentCUDAStream()>>>(q, k, q_groups, total, sign);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rope3d_rotate(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                 const at::Tensor& cos_k, const at::Tensor& sin_k, bool inverse,
                                                 const char* qn, const char* kn) {
  check_rope3d(q_in, k_in, cos_q, sin_q, cos_k, sin_k, qn, kn);
  TORCH_CHECK(q_in.is_cuda(), qn, " must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const auto k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  auto q_out = at::empty(q.sizes(), q.options());
  auto k_out = at::empty(k.sizes(), k.options());
  const int64_t q_pairs = q.numel() / 2, k_pairs = k.numel() / 2;
  if (q_pairs + k_pairs == 0) return {q_out, k_out};
  const auto cq = cos_q.contiguous(), sq = sin_q.contiguous(), ck = cos_k.contiguous(), sk = sin_k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rope3d_cuda", [&] {
    using table_t = acc_t<scalar_t>;
    const table_t sign = inverse ? table_t(-1) : table_t(1);
    const auto qv = make_view<scalar_t, table_t>(q, q_out, cq, sq);
    const auto kv = make_view<scalar_t, table_t>(k, k_out, ck, sk);
    constexpr int kPairs = 16 / (2 * sizeof(scalar_t));  // pairs per 16-byte vector
    // an empty tensor takes no part: its view must not block the vector path of the other
    const bool vec = (q_pairs == 0 || vectorizable<kPairs>(qv)) && (k_pairs == 0 || vectorizable<kPairs>(kv));
    if (vec)
      launch<kPairs, true>(qv, kv, q_pairs, k_pairs, sign);
    else
      launch<1, false>(qv, kv, q_pairs, k_pairs, sign);
  });
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> rope3d_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_q,
                                               const at::Tensor& sin_q, const at::Tensor& cos_k,
                                               const at::Tensor& sin_k) {
  return rope3d_rotate(q, k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/false, "q", "k");
}

std::tuple<at::Tensor, at::Tensor> rope3d_bwd_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                   const at::Tensor& cos_q, const at::Tensor& sin_q,
                                                   const at::Tensor& cos_k, const at::Tensor& sin_k) {
  return rope3d_rotate(grad_q, grad_k, cos_q, sin_q, cos_k, sin_k, /*inverse=*/true, "grad_q", "grad_k");
}

}  // namespace
}  // namespace rope

TORCH_LIBRARY_IMPL(blip3o_fast, CUDA, m) {
  m.impl("rope3d", &rope::rope3d_cuda);
  m.impl("rope3d_bwd", &rope::rope3d_bwd_cuda);
}

}  // namespace blip3o_fast
