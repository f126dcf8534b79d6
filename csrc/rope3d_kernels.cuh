// rope3d: CUDA kernel. One launch rotates q and k: threads [0, q_groups) take q, the rest take k.
// Each thread rotates PAIRS consecutive pairs of one head with 16-byte loads when the layout allows.
//
// The device code and its launchers. Included by rope3d_cuda.cu (nvcc) and by csrc/simt/rope3d_simt.cpp
// (the host compiler, against the SIMT emulator): the tests run these same kernels on the CPU.
#pragma once

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
    rotate_pair<table_t>(static_cast<table_t>(in.v[2 * i]), static_cast<table_t>(in.v[2 * i + 1]), c[i], sign * s[i],
                         &y0, &y1);
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
  cuda::launch(VEC ? "rope3d_kernel<vector>" : "rope3d_kernel<scalar>", rope3d_kernel<scalar_t, table_t, PAIRS, VEC>,
               cuda::ceil_div(total, threads), threads, 0, q, k, q_groups, total, sign);
}

// the launcher rotate() calls: 16-byte vectors where both views allow them, else a pair per thread
struct CudaRotate {
  template <typename scalar_t, typename table_t>
  void operator()(const RopeView<scalar_t, table_t>& qv, const RopeView<scalar_t, table_t>& kv, int64_t q_pairs,
                  int64_t k_pairs, table_t sign) const {
    constexpr int kPairs = 16 / (2 * sizeof(scalar_t));  // pairs per 16-byte vector
    // an empty tensor takes no part: its view must not block the vector path of the other
    const bool vec = (q_pairs == 0 || vectorizable<kPairs>(qv)) && (k_pairs == 0 || vectorizable<kPairs>(kv));
    if (vec)
      launch<kPairs, true>(qv, kv, q_pairs, k_pairs, sign);
    else
      launch<1, false>(qv, kv, q_pairs, k_pairs, sign);
  }
};

}  // namespace
}  // namespace rope
}  // namespace blip3o_fast
