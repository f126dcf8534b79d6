// Host-side contract of swiglu shared by the CPU and CUDA entry points.
#pragma once

#include <vector>

#include "common.h"

namespace blip3o_fast {
namespace swiglu {

// rows of [a | b] pairs: ab is [rows, 2F], out / grad are [rows, F]
template <typename scalar_t>
struct Args {
  const scalar_t* ab;
  const scalar_t* grad = nullptr;  // backward only
  scalar_t* out;                   // forward: [rows, F]; backward: grad_ab [rows, 2F]
  int64_t rows, F;
};

inline void check_ab(const at::Tensor& ab) {
  TORCH_CHECK(ab.dim() >= 1, "ab must have at least one dim [..., 2F], got a scalar");
  check_floating(ab, "ab");
  TORCH_CHECK(ab.size(-1) % 2 == 0, "ab's last dim must be even ([a | b], 2F), got ", ab.size(-1));
}

template <typename Launch>
at::Tensor forward(const at::Tensor& ab_in, Launch&& launch) {
  check_ab(ab_in);
  const auto ab = ab_in.contiguous();
  auto shape = ab.sizes().vec();
  shape.back() /= 2;
  auto out = at::empty(shape, ab.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ab.scalar_type(), "swiglu", [&] {
    Args<scalar_t> a{ab.data_ptr<scalar_t>(), nullptr, out.data_ptr<scalar_t>(), out.numel() / shape.back(),
                     shape.back()};
    launch(a);
  });
  return out;
}

template <typename Launch>
at::Tensor backward(const at::Tensor& grad_in, const at::Tensor& ab_in, Launch&& launch) {
  check_ab(ab_in);
  check_same_device(ab_in, "ab", grad_in, "grad");
  check_same_dtype(ab_in, "ab", grad_in, "grad");
  auto want = ab_in.sizes().vec();
  want.back() /= 2;
  TORCH_CHECK(grad_in.sizes().vec() == want, "grad must have shape ", at::IntArrayRef(want),
              " (ab's with half the "
              "last dim), got ",
              grad_in.sizes());
  const auto ab = ab_in.contiguous(), grad = grad_in.contiguous();
  auto grad_ab = at::empty(ab.sizes(), ab.options());
  if (grad.numel() == 0) return grad_ab;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ab.scalar_type(), "swiglu_bwd", [&] {
    Args<scalar_t> a{ab.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad_ab.data_ptr<scalar_t>(),
                     grad.numel() / want.back(), want.back()};
    launch(a);
  });
  return grad_ab;
}

}  // namespace swiglu
}  // namespace blip3o_fast
