// Element loads and stores of the CPU kernels: storage dtype <-> accumulation type.
//
// c10's BFloat16 conversions are correct but do not vectorise (the NaN test is a branch), so a bf16
// loop ran scalar, up to 8x slower than its float32 twin. These are the same round-to-nearest-even,
// bit for bit, written as shifts and selects that GCC vectorises.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "common.h"

namespace blip3o_fast {

template <typename scalar_t>
B3F_ALWAYS_INLINE acc_t<scalar_t> load(scalar_t v) {
  return static_cast<acc_t<scalar_t>>(v);
}

template <>
B3F_ALWAYS_INLINE float load<c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename scalar_t>
B3F_ALWAYS_INLINE scalar_t store(acc_t<scalar_t> v) {
  return static_cast<scalar_t>(v);
}

template <>
B3F_ALWAYS_INLINE c10::BFloat16 store<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint16_t out = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);  // NaN stays a quiet NaN
  return c10::BFloat16(out, c10::BFloat16::from_bits());
}

}  // namespace blip3o_fast
