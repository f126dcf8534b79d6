// Per-element math of rope3d, shared by the CPU and the CUDA kernel.
#pragma once

#include "macros.h"

namespace blip3o_fast {
namespace rope {

// Rotates the interleaved pair (x0, x1) by the angle with cosine c and sine s. The backward is the
// rotation by the negative angle: the same call with -s (a rotation's inverse is its transpose).
template <typename T>
B3F_HD void rotate_pair(T x0, T x1, T c, T s, T* y0, T* y1) {
  *y0 = x0 * c - x1 * s;
  *y1 = x0 * s + x1 * c;
}

// Where the pair `pair` of a [B, S, H, D/2]-pair-indexed tensor lives: its (b, s, h, j) coordinates.
struct PairIndex {
  long long b, s, h, j;
};

B3F_HD PairIndex locate_pair(long long pair, long long S, long long H, long long half) {
  PairIndex p;
  p.j = pair % half;
  long long rest = pair / half;
  p.h = rest % H;
  rest /= H;
  p.s = rest % S;
  p.b = rest / S;
  return p;
}

}  // namespace rope
}  // namespace blip3o_fast
