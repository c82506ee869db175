// CPU kernel of the standard/mini merge: out[o, k] = W[o, k] + alpha * block[k % r, o % m],
// computed in fp32 (fp64 for double weights) and rounded once, parallel over output rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/kernels.h"

namespace miss_ext {
namespace cpu {
namespace {

template <typename scalar_t>
void merge_kernel(const at::Tensor& weight, const at::Tensor& block, double alpha, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out_f = weight.size(0), in = weight.size(1);
  const int64_t r = block.size(0), m = block.size(1);
  const scalar_t* wp = weight.const_data_ptr<scalar_t>();
  const acc_t* bp = block.const_data_ptr<acc_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t a = static_cast<acc_t>(alpha);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(in, 1));
  at::parallel_for(0, out_f, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> col(r);  // alpha * column o % m of the block, so the inner loop is contiguous
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t c = 0; c < r; ++c) col[c] = a * bp[c * m + o % m];
      const scalar_t* w = wp + o * in;
      scalar_t* dst = op + o * in;
      for (int64_t j0 = 0; j0 < in; j0 += r) {
        const int64_t len = std::min(r, in - j0);
        for (int64_t c = 0; c < len; ++c)
          dst[j0 + c] = static_cast<scalar_t>(static_cast<acc_t>(w[j0 + c]) + col[c]);
      }
    }
  });
}

}  // namespace

void miss_merge(const at::Tensor& weight, const at::Tensor& block, double alpha, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "miss_ext_miss_merge",
                                  [&] { merge_kernel<scalar_t>(weight, block, alpha, out); });
}

}  // namespace cpu
}  // namespace miss_ext
