// Per-element math of swiglu, shared by the CPU and the CUDA kernels: out = silu(a)·b.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "macros.h"

namespace blip3o_fast {
namespace swiglu {

// exp(x) for float, |x| <= 87, that compilers vectorise (no libm call in the loop): x = k·ln2 + r,
// |r| <= ln2/2, exp(r) by a degree-6 polynomial (Cephes' expf coefficients), 2^k through the exponent
// bits. Relative error ~2e-7. Host only: the GPU has its own fast exponential. Callers bound x.
inline float exp_poly(float x) {
  // round to nearest by adding and removing 1.5·2^23 (|x·log2 e| < 2^22): plain adds, so the loop
  // vectorises even for the baseline x86-64 clone, which has no vector floor
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

B3F_HD double exp_acc(double x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}

B3F_HD float exp_acc(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return exp_poly(x);
#endif
}

// Where σ saturates: for float, e^-30 ≈ 9e-14 is far below the resolution of 1 + e^-x, and a wider
// bound is slow: vectorised code evaluates the saturated branch on every lane and blends, and at
// e.g. ±88 that branch multiplies by 1/(1 + e^88) ≈ 6e-39, a subnormal, which costs a microcode assist
// per vector (5x slower without flush-to-zero). For double (gradcheck), a bound exp never overflows.
template <typename T>
B3F_HD T sigmoid_bound() {
  return T(700);
}
template <>
B3F_HD float sigmoid_bound<float>() {
  return 30.0f;
}

template <typename T>
B3F_HD T sigmoid(T x) {
  const T bound = sigmoid_bound<T>();
  x = x < -bound ? -bound : (x > bound ? bound : x);
  return T(1) / (T(1) + exp_acc(-x));
}

// silu(a)·b
template <typename T>
B3F_HD T forward(T a, T b) {
  return a * sigmoid(a) * b;
}

// d(silu(a)·b)/da = b·σ(a)·(1 + a·(1 - σ(a))), d/db = silu(a): both gradients of one element
template <typename T>
B3F_HD void backward(T g, T a, T b, T* grad_a, T* grad_b) {
  const T s = sigmoid(a);
  *grad_a = g * b * s * (T(1) + a * (T(1) - s));
  *grad_b = g * a * s;
}

}  // namespace swiglu
}  // namespace blip3o_fast
