// Control of the emulated ops from Python (namespace blip3o_fast_simt) and the result comparison.
#include "simt_ops.h"

#include <torch/library.h>

#include <utility>

namespace blip3o_fast {
namespace simt_ops {

int& schedules() {
  static int n = simt::kSchedules;
  return n;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) {
    if (out.find(n) != std::string::npos) continue;
    out += (out.empty() ? "" : ", ") + n;
  }
  return out;
}

int64_t first_difference(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined() || !b.defined()) return a.defined() == b.defined() ? -1 : 0;
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return 0;
  const auto ac = a.contiguous(), bc = b.contiguous();
  const auto* pa = static_cast<const unsigned char*>(ac.data_ptr());
  const auto* pb = static_cast<const unsigned char*>(bc.data_ptr());
  const int64_t n = static_cast<int64_t>(ac.nbytes());
  if (n == 0 || std::memcmp(pa, pb, n) == 0) return -1;
  for (int64_t i = 0; i < n; ++i)
    if (pa[i] != pb[i]) return i;
  return -1;
}

namespace {

void set_schedules(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= simt::kSchedules, "schedules must be in [1, ", simt::kSchedules, "], got ", n);
  schedules() = static_cast<int>(n);
}

void set_sm_count(int64_t n) {
  TORCH_CHECK(n >= 1, "sm_count must be positive, got ", n);
  simt::device().sm_count = static_cast<int>(n);
}

void set_block_sample(int64_t n) {
  TORCH_CHECK(n >= 0, "block_sample must be >= 0, got ", n);
  simt::device().block_sample = n;
}

std::vector<std::string> launches() { return std::exchange(simt::launch_log(), {}); }

}  // namespace

TORCH_LIBRARY(blip3o_fast_simt, m) {
  m.def("set_schedules(int n) -> ()", &set_schedules);
  m.def("set_sm_count(int n) -> ()", &set_sm_count);
  m.def("set_block_sample(int n) -> ()", &set_block_sample);
  m.def("launches() -> str[]", &launches);
}

}  // namespace simt_ops
}  // namespace blip3o_fast
