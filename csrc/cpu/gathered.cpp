// CPU kernel of the mixed-adapter (serving) product: every row adds the product of its block
// sum with its own adapter's block (docs/MATH.md section 12).
//
//   out[n, o] = base[n, o] + sum_c s[n, c] * blocks[index[n]][c, o % m],  index[n] = -1: base
//
// Rows are grouped by adapter with one counting sort of `index` (no loop over adapters outside
// the kernel), then each task takes up to kRows rows of one adapter and a column panel, gathers
// their block-sum rows (N x r is small), runs one dense product with the adapter's block and adds
// it to the base rows, rounding once. A chunk of the product never leaves cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/kernels.h"
#include "cpu/blas_threads.h"
#include "cpu/convert.h"
#include "cpu/vec.h"

namespace miss_ext {
namespace cpu {
namespace {

constexpr int64_t kRows = 128;  // rows per task: one GEMM's M
constexpr int64_t kCols = 512;  // output columns per task (standard blocks)

struct Task {
  int64_t group;  // -1: rows without an adapter (copied)
  int64_t begin, end;  // range in `order`
  int64_t c0, c1;      // columns
};

template <typename out_t, typename acc_t>
void gathered_kernel(const at::Tensor& base, const at::Tensor& s, const std::vector<at::Tensor>& blocks,
                     const at::Tensor& index, at::Tensor& out) {
  const int64_t n = base.size(0), out_f = base.size(1), r = s.size(1);
  const int64_t k_count = static_cast<int64_t>(blocks.size());
  const int64_t* idx = index.const_data_ptr<int64_t>();

  // Counting sort of the rows by adapter: group g's rows are order[start[g + 1], start[g + 2]),
  // the rows without an adapter come first. Stable, so each group keeps the batch order.
  std::vector<int64_t> start(k_count + 2, 0), order(n);
  for (int64_t t = 0; t < n; ++t) ++start[idx[t] + 2];
  for (int64_t g = 0; g <= k_count; ++g) start[g + 1] += start[g];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);  // fill[g + 1]: next slot of g
    for (int64_t t = 0; t < n; ++t) order[fill[idx[t] + 1]++] = t;
  }

  std::vector<Task> tasks;
  for (int64_t g = -1; g < k_count; ++g) {
    const int64_t b = start[g + 1], e = start[g + 2];
    if (b == e) continue;
    // A mini block is narrow: its rows of the product are tiled over the whole output row.
    const int64_t m = g < 0 ? out_f : blocks[g].size(1);
    const int64_t panel = (g < 0 || m < out_f) ? out_f : kCols;
    for (int64_t t0 = b; t0 < e; t0 += kRows)
      for (int64_t c0 = 0; c0 < out_f; c0 += panel)
        tasks.push_back({g, t0, std::min(e, t0 + kRows), c0, std::min(out_f, c0 + panel)});
  }

  const out_t* bp = base.const_data_ptr<out_t>();
  const int64_t ldb = base.stride(0);  // out_f, or 0 for a broadcast row (a bias)
  const acc_t* sp = s.const_data_ptr<acc_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const auto opts = s.options();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t tb, int64_t te) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: never record a graph
    const SequentialBlas sequential_blas;  // each product's bits independent of the thread count
    std::vector<acc_t> gathered;
    for (int64_t ti = tb; ti < te; ++ti) {
      const Task& task = tasks[ti];
      const int64_t len = task.end - task.begin, w = task.c1 - task.c0;
      if (task.group < 0) {
        for (int64_t k = task.begin; k < task.end; ++k) {
          const int64_t row = order[k];
          std::memcpy(op + row * out_f, bp + row * ldb, sizeof(out_t) * out_f);
        }
        continue;
      }
      const at::Tensor& block = blocks[task.group];
      const int64_t m = block.size(1);
      const int64_t first = order[task.begin];
      // Rows of one sequence sit together: then s, base and out are plain views of them.
      const bool run = order[task.end - 1] - first == len - 1;
      if (run && std::is_same_v<out_t, acc_t> && m == out_f) {
        // Equal dtypes: one GEMM reads the base rows and writes out (beta = 1).
        at::Tensor o = out.narrow(0, first, len).narrow(1, task.c0, w);
        at::addmm_out(o, base.narrow(0, first, len).narrow(1, task.c0, w), s.narrow(0, first, len),
                      block.narrow(1, task.c0, w));
        continue;
      }
      at::Tensor sg;
      if (run) {
        sg = s.narrow(0, first, len);
      } else {
        gathered.resize(len * r);
        for (int64_t k = 0; k < len; ++k)
          std::memcpy(gathered.data() + k * r, sp + order[task.begin + k] * r, sizeof(acc_t) * r);
        sg = at::from_blob(gathered.data(), {len, r}, opts);
      }
      const at::Tensor p = m < out_f ? at::mm(sg, block) : at::mm(sg, block.narrow(1, task.c0, w));
      const acc_t* pp = p.const_data_ptr<acc_t>();
      const int64_t pw = p.size(1);  // m (mini) or w
      for (int64_t k = 0; k < len; ++k) {
        const int64_t row = order[task.begin + k];
        const out_t* b = bp + row * ldb + task.c0;
        out_t* o = op + row * out_f + task.c0;
        const acc_t* prow = pp + k * pw;
        if constexpr (std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
          vec::tile_bf16(reinterpret_cast<const uint16_t*>(b), prow, pw, w,
                         reinterpret_cast<uint16_t*>(o));
        } else {
          for (int64_t j0 = 0; j0 < w; j0 += pw) {
            const int64_t run = std::min(pw, w - j0);
            for (int64_t c = 0; c < run; ++c)
              store<out_t>(o + j0 + c, load<acc_t>(b + j0 + c) + prow[c]);
          }
        }
      }
    }
  });
}

}  // namespace

void miss_gathered_product(const at::Tensor& base, const at::Tensor& s,
                           const std::vector<at::Tensor>& blocks, const at::Tensor& index,
                           at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(),
                                  "miss_ext_miss_gathered_product", [&] {
    if (s.scalar_type() == at::kDouble) {
      gathered_kernel<scalar_t, double>(base, s, blocks, index, out);
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      gathered_kernel<scalar_t, float>(base, s, blocks, index, out);
    } else {
      TORCH_CHECK(false, "miss_ext.miss_gathered_product: a float64 base needs float64 blocks");
    }
  });
}

}  // namespace cpu
}  // namespace miss_ext
