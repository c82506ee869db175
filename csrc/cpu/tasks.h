// One parallel region for several kinds of independent work (packing different operands, or
// products of different shapes): the tasks of every kind are spread over one list, so that
// at::parallel_for's contiguous share per thread holds a proportional mix of each kind and no
// thread waits at a barrier between kinds.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu/amx.h"
#include "cpu/workspace.h"

namespace miss_ext {
namespace cpu {

struct Task {
  int kind;
  int64_t begin, end;  // the range of whatever this kind walks
};

// [0, total) in tasks of `step`, of kind `kind`.
inline std::vector<Task> task_ranges(int kind, int64_t total, int64_t step) {
  std::vector<Task> out;
  for (int64_t b = 0; b < total; b += step) out.push_back({kind, b, std::min(total, b + step)});
  return out;
}

// The lists merged, each spread evenly over the result (list order kept within a kind).
inline std::vector<Task> spread_tasks(const std::vector<std::vector<Task>>& lists) {
  std::vector<std::pair<double, Task>> keyed;
  for (const auto& l : lists)
    for (size_t k = 0; k < l.size(); ++k) keyed.push_back({(k + 0.5) / l.size(), l[k]});
  std::stable_sort(keyed.begin(), keyed.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<Task> out;
  out.reserve(keyed.size());
  for (const auto& k : keyed) out.push_back(k.second);
  return out;
}

// Every task in one parallel region; fn(task, scratch) gets a per-thread buffer of
// `scratch_floats` floats. The micro-kernel's thread state is released at the end.
template <typename F>
void run_tasks(const std::vector<Task>& tasks, int64_t scratch_floats, const F& fn) {
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: never record a graph
    Scratch<float> scratch(scratch_floats);
    for (int64_t t = begin; t < end; ++t) fn(tasks[t], scratch.data());
    amx::release();
  });
}

}  // namespace cpu
}  // namespace miss_ext
