// Per-element and per-row math of the AdaLN ops, shared by the CPU and the CUDA kernels.
// N(x) is LayerNorm ((x - mean)·rstd) or RMSNorm (x·rstd) over C without affine weights; the
// modulation is N(x)·(1 + scale) + shift.
#pragma once

#include <cmath>

#include "macros.h"

namespace blip3o_fast {
namespace adaln {

B3F_HD float rsqrt_of(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / std::sqrt(v);
#endif
}

B3F_HD double rsqrt_of(double v) {
#if defined(__CUDA_ARCH__)
  return rsqrt(v);
#else
  return 1.0 / std::sqrt(v);
#endif
}

// rstd from the row's variance (LayerNorm) or mean square (RMSNorm)
template <typename T>
B3F_HD T rstd_from(T var_or_mean_square, T eps) {
  return rsqrt_of(var_or_mean_square + eps);
}

// the normalized value; RMSNorm passes mean = 0
template <typename T>
B3F_HD T normalized(T x, T mean, T rstd) {
  return (x - mean) * rstd;
}

template <typename T>
B3F_HD T modulate(T n, T shift, T scale) {
  return n * (T(1) + scale) + shift;
}

// the residual seam: x + gate·y
template <typename T>
B3F_HD T gated_residual(T x, T y, T gate) {
  return x + gate * y;
}

// dL/dx of the normalization for one element, given g = dL/dN(x) = dy·(1 + scale) and the row
// means of g and g·N(x) (LayerNorm also removes the mean of g; RMSNorm has no mean to remove)
template <typename T>
B3F_HD T norm_grad(T g, T xhat, T mean_g, T mean_g_xhat, T rstd, bool layer) {
  return rstd * (g - (layer ? mean_g : T(0)) - xhat * mean_g_xhat);
}

}  // namespace adaln
}  // namespace blip3o_fast
