// CPU kernels of the BAT weight transform and its two gradients, on the copy-free layout of
// SPEC section 3: weight.view(out/r, in, r) holds, in slab i, the rows of every block W_ij
// (row t = a * (in/r) + j is row a of W_ij). A slab times an r x r matrix is then one GEMM:
// no permuted copy of the weight is ever made.
//
// The r x r products go to the vendor GEMM: one batched GEMM over the slabs for the transform
// and the weight gradient; fixed chunks of rows for the block gradient, whose reduction over
// rows is then summed in a fixed order, so no result depends on the thread count. The rest (the
// identity term, the B_i broadcast, the sum over j, the rounding to the output dtype) is fused
// into one fp32 pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <vector>

#include "common/kernels.h"

namespace miss_ext {
namespace cpu {
namespace {

// Rows of a slab per task of the block gradient: whole slabs when there are enough slabs to
// keep the threads busy (one GEMM call each), else fixed chunks. A function of the shape only,
// never of the thread count, so the summation order is the same on any number of threads.
int64_t chunk_rows(int64_t n_slabs, int64_t rows) { return n_slabs >= 8 ? rows : 512; }

int64_t chunks_per_slab(int64_t n_slabs, int64_t rows) {
  const int64_t chunk = chunk_rows(n_slabs, rows);
  return (rows + chunk - 1) / chunk;
}

// Calls fn(task, i, t0, t1) for every block row i and chunk [t0, t1) of the rows of slab i.
template <typename F>
void for_each_chunk(int64_t n_slabs, int64_t rows, const F& fn) {
  const int64_t per = chunks_per_slab(n_slabs, rows), chunk = chunk_rows(n_slabs, rows);
  at::parallel_for(0, n_slabs * per, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep the at::mm calls below
    // autograd so they never record a graph on a weight that requires grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / per, t0 = (task % per) * chunk;
      fn(task, i, t0, std::min(rows, t0 + chunk));
    }
  });
}

// Every r x r product runs as W_ij B_i (not W_ij (I + B_i)) in the operands' own dtype, so the
// vendor GEMM for that dtype does it (oneDNN's bf16 GEMM with fp32 accumulation, several times
// faster than converting to fp32 here) and no rounding of I + B_i to a half type loses B_i's low
// bits; the identity part is added in the fp32 epilogue, which rounds once.

// W'_ij = W_ij + (W_ij B_i + B_i): one batched GEMM over the slabs (its K = r is never split,
// so the result does not depend on the thread count), then two of ATen's vectorized passes.
// The small terms are summed first, so the weight-sized sum rounds once at the weight's scale.
void transform_products(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out) {
  const int64_t r = block.size(1), nb = block.size(0), out_f = weight.size(0), in = weight.size(1);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor p = at::bmm(weight.view({nb, in, r}), block);
  p.view({nb, r, in / r, r}).add_(block.unsqueeze(2));
  at::add_out(out, weight, p.view({out_f, in}));
}

template <typename scalar_t>
void block_grad_kernel(const at::Tensor& grad, const at::Tensor& weight, int64_t r,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = grad.size(0) / r, in = grad.size(1), per_a = in / r;
  const int64_t per = chunks_per_slab(nb, in);
  const at::Tensor g3 = grad.view({nb, in, r}), w3 = weight.view({nb, in, r});
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  // One fp32 r x r partial per chunk, summed below in a fixed order, so the result does not
  // depend on the thread count.
  std::vector<acc_t> partial(static_cast<size_t>(nb * per * r * r));
  for_each_chunk(nb, in, [&](int64_t task, int64_t i, int64_t t0, int64_t t1) {
    const at::Tensor m = at::mm(w3[i].narrow(0, t0, t1 - t0).t(), g3[i].narrow(0, t0, t1 - t0))
                             .contiguous();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    acc_t* dst = partial.data() + task * r * r;
    for (int64_t e = 0; e < r * r; ++e) dst[e] = static_cast<acc_t>(mp[e]);
    // The "+ I" of (W_ij + I)^T G_ij: each row t of G_ij adds into row a of the block.
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* drow = dst + (t / per_a) * r;
      const scalar_t* grow = gp + (i * in + t) * r;
      for (int64_t c = 0; c < r; ++c) drow[c] += static_cast<acc_t>(grow[c]);
    }
  });
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(r * r);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t k = 0; k < per; ++k) {
        const acc_t* src = partial.data() + (i * per + k) * r * r;
        for (int64_t e = 0; e < r * r; ++e) sum[e] += src[e];
      }
      for (int64_t e = 0; e < r * r; ++e) op[i * r * r + e] = static_cast<scalar_t>(sum[e]);
    }
  });
}

// dL/dW_ij = G_ij + G_ij B_i^T, like the transform.
void weight_grad_products(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out) {
  const int64_t r = block.size(1), nb = block.size(0), in = grad.size(1);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor p = at::bmm(grad.view({nb, in, r}), block.transpose(1, 2));
  at::add_out(out, grad, p.view_as(grad));
}

}  // namespace

void bat_transform(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out) {
  transform_products(weight, block, out);
}

void bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "miss_ext_bat_block_grad",
                                  [&] { block_grad_kernel<scalar_t>(grad, weight, r, out); });
}

void bat_weight_grad(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out) {
  weight_grad_products(grad, block, out);
}

}  // namespace cpu
}  // namespace miss_ext
