// Shared host code of every op: the accumulation type and the argument checks that both the CPU
// and the CUDA entry points run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <string>

#include "macros.h"

namespace blip3o_fast {

// float for fp32/bf16/fp16, double for fp64 (gradcheck runs in fp64)
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// the statistics / table dtype that goes with an input dtype: float64 for float64, else float32
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.device() == b.device(), na, " and ", nb, " must be on the same device, got ", a.device(), " and ",
              b.device());
}

inline void check_same_dtype(const at::Tensor& a, const char* na, const at::Tensor& b, const char* nb) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), na, " and ", nb, " must have the same dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

// [B, C] modulation parameters (shift, scale, gate) may be column slices of one [B, k*C] projection:
// any row stride is accepted, the last dim must be dense.
inline at::Tensor rows_dense(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

enum class Norm { Layer, Rms };

inline Norm parse_norm(const std::string& norm) {
  if (norm == "layer") return Norm::Layer;
  if (norm == "rms") return Norm::Rms;
  TORCH_CHECK(false, "norm must be \"layer\" or \"rms\", got \"", norm, "\"");
  return Norm::Layer;
}

}  // namespace blip3o_fast
