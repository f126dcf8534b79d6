// Per-element and per-row math of rectified flow, shared by the CPU and the CUDA kernels.
// Convention: t in [0, 1], t = 0 noise, t = 1 data; x_t = (1 - t)·x0 + t·x1; u = x1 - x0.
#pragma once

#include <cmath>

#include "macros.h"

namespace blip3o_fast {
namespace flow {

constexpr double kCosEps = 1e-8;  // floor of |v|·|u| in the velocity cosine

template <typename T>
B3F_HD T interpolate(T x1, T x0, T t) {
  return (T(1) - t) * x0 + t * x1;
}

template <typename T>
B3F_HD T target_velocity(T x1, T x0) {
  return x1 - x0;
}

// Running sums of one token's (v, u) pairs: squared error, v·u, |v|², |u|².
template <typename T>
struct RowSums {
  T sq_err = 0, dot = 0, vv = 0, uu = 0;

  B3F_HD void add(T v, T u) {
    const T d = v - u;
    sq_err += d * d;
    dot += v * u;
    vv += v * v;
    uu += u * u;
  }

  B3F_HD void merge(const RowSums& o) {
    sq_err += o.sq_err;
    dot += o.dot;
    vv += o.vv;
    uu += o.uu;
  }
};

B3F_HD float sqrt_of(float v) {
#if defined(__CUDA_ARCH__)
  return sqrtf(v);
#else
  return std::sqrt(v);
#endif
}

B3F_HD double sqrt_of(double v) {
#if defined(__CUDA_ARCH__)
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// cos(v, u) of one token from its sums, with |v|·|u| floored at kCosEps
template <typename T>
B3F_HD T token_cosine(T dot, T vv, T uu) {
  T denom = sqrt_of(vv) * sqrt_of(uu);
  if (denom < T(kCosEps)) denom = T(kCosEps);
  return dot / denom;
}

// dL/dv of one element given g_b = dL/dper_sample_mse[b]: d/dv of mean_{s,c}(v - u)² is 2(v - u)/(S·C)
template <typename T>
B3F_HD T velocity_grad(T v, T u, T grad_per_sample, T inv_count) {
  return T(2) * grad_per_sample * (v - u) * inv_count;
}

}  // namespace flow
}  // namespace blip3o_fast
