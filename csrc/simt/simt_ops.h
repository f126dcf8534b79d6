// The emulated CUDA ops: each op's CUDA host driver and launchers (from <op>_kernels.cuh) run under
// every thread schedule of the SIMT emulator, and the results must agree bit for bit: a block whose
// result depends on the order its threads run in between barriers has a race (a missing
// __syncthreads()) or reads shared memory before it is written.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstring>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "simt.h"

namespace blip3o_fast {
namespace simt_ops {

// how many of simt::Schedule's orders each op runs under (1: in order only); set from the tests
int& schedules();

inline void collect(const at::Tensor& t, std::vector<at::Tensor>& out) { out.push_back(t); }
inline void collect(const std::vector<at::Tensor>& ts, std::vector<at::Tensor>& out) {
  out.insert(out.end(), ts.begin(), ts.end());
}
template <typename... T>
void collect(const std::tuple<T...>& ts, std::vector<at::Tensor>& out) {
  std::apply([&](const auto&... t) { (collect(t, out), ...); }, ts);
}

std::string join(const std::vector<std::string>& names);

// the first byte at which two results differ, or -1
int64_t first_difference(const at::Tensor& a, const at::Tensor& b);

// f() under each schedule; returns the in-order result, or throws naming the op, the output, the
// element, the schedules and the kernels that were launched
template <typename F>
auto under_schedules(const char* op, F&& f) {
  struct Restore {
    ~Restore() { simt::set_schedule(simt::Schedule::InOrder); }
  } restore;
  simt::set_schedule(simt::Schedule::InOrder);
  auto& log = simt::launch_log();
  const size_t start = log.size();
  auto first = f();
  const size_t end = log.size();  // the launches of one run stay in the log, for launches()
  const auto kernels = join({log.begin() + static_cast<std::ptrdiff_t>(start), log.end()});
  std::vector<at::Tensor> want;
  collect(first, want);
  for (int s = 1; s < schedules() && s < simt::kSchedules; ++s) {
    simt::set_schedule(static_cast<simt::Schedule>(s));
    auto other = f();
    log.resize(end);
    std::vector<at::Tensor> got;
    collect(other, got);
    for (size_t i = 0; i < want.size(); ++i) {
      const int64_t byte = first_difference(want[i], got[i]);
      if (byte < 0) continue;
      const int64_t elem = byte / static_cast<int64_t>(want[i].element_size());
      std::ostringstream os;
      os << "simt: " << op << ": output " << i << " differs between the "
         << simt::schedule_name(simt::Schedule::InOrder) << " and "
         << simt::schedule_name(static_cast<simt::Schedule>(s)) << " thread schedules at element " << elem << " ("
         << want[i].reshape(-1)[elem].item<double>() << " vs " << got[i].reshape(-1)[elem].item<double>()
         << "): a race between the threads of a block (a missing __syncthreads()?) or a read of unwritten shared "
            "memory, in one of the kernels "
         << kernels;
      throw std::runtime_error(os.str());
    }
  }
  return first;
}

}  // namespace simt_ops
}  // namespace blip3o_fast
