// CPU kernels of the BAT weight transform and its two gradients, on the copy-free layout of
// SPEC section 3: weight.view(out/r, in, r) holds, in slab i, the rows of every block W_ij
// (row t = a * (in/r) + j is row a of W_ij). A slab times an r x r matrix is then one GEMM:
// no permuted copy of the weight is ever made.
//
// The r x r products go to the vendor GEMM (MKL via at::mm) in fp32 (fp64 for double); the rest
// (the B_i broadcast, the sum over j, the cast back to the half types) is fused into the loop
// that writes each chunk. Work is split into fixed chunks of rows of a slab,
// so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>

#include "common/kernels.h"

namespace miss_ext {
namespace cpu {
namespace {

constexpr int64_t kChunkRows = 512;

int64_t chunks_per_slab(int64_t rows) { return (rows + kChunkRows - 1) / kChunkRows; }

// Calls fn(i, t0, t1) for every block row i and chunk [t0, t1) of the `rows` rows of slab i.
template <typename F>
void for_each_chunk(int64_t n_slabs, int64_t rows, const F& fn) {
  const int64_t per = chunks_per_slab(rows);
  at::parallel_for(0, n_slabs * per, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep the at::mm calls below
    // autograd so they never record a graph on a weight that requires grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / per, t0 = (task % per) * kChunkRows;
      fn(task, i, t0, std::min(rows, t0 + kChunkRows));
    }
  });
}

// (out/r, r, r) stack of I + B_i in the accumulation dtype.
at::Tensor identity_plus(const at::Tensor& block, at::ScalarType acc) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor a = block.to(acc);
  return a + at::eye(block.size(1), a.options());
}

template <typename scalar_t>
void transform_kernel(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t r = block.size(1), nb = block.size(0), in = weight.size(1), per_a = in / r;
  const at::Tensor w3 = weight.view({nb, in, r});
  const at::Tensor a = identity_plus(block, acc);
  const at::Tensor b_acc = block.to(acc).contiguous();
  const acc_t* bp = b_acc.const_data_ptr<acc_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  for_each_chunk(nb, in, [&](int64_t, int64_t i, int64_t t0, int64_t t1) {
    const at::Tensor p = at::mm(w3[i].narrow(0, t0, t1 - t0).to(acc), a[i]).contiguous();
    const acc_t* pp = p.const_data_ptr<acc_t>();
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* brow = bp + (i * r + t / per_a) * r;
      const acc_t* prow = pp + (t - t0) * r;
      scalar_t* orow = op + (i * in + t) * r;
      for (int64_t c = 0; c < r; ++c) orow[c] = static_cast<scalar_t>(prow[c] + brow[c]);
    }
  });
}

template <typename scalar_t>
void block_grad_kernel(const at::Tensor& grad, const at::Tensor& weight, int64_t r,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t nb = grad.size(0) / r, in = grad.size(1), per_a = in / r;
  const int64_t per = chunks_per_slab(in);
  const at::Tensor g3 = grad.view({nb, in, r}), w3 = weight.view({nb, in, r});
  // One r x r partial per chunk, summed below in a fixed order for thread-count independence.
  at::Tensor partial = at::empty({nb * per, r, r}, grad.options().dtype(acc));
  acc_t* pp = partial.mutable_data_ptr<acc_t>();
  for_each_chunk(nb, in, [&](int64_t task, int64_t i, int64_t t0, int64_t t1) {
    const at::Tensor gc = g3[i].narrow(0, t0, t1 - t0).to(acc).contiguous();
    at::Tensor part = partial[task];
    at::mm_out(part, w3[i].narrow(0, t0, t1 - t0).to(acc).t(), gc);
    // The "+ I" of (W_ij + I)^T G_ij: add G_ij itself, i.e. each row t into row a of the block.
    const acc_t* gp = gc.const_data_ptr<acc_t>();
    acc_t* dst = pp + task * r * r;
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* drow = dst + (t / per_a) * r;
      const acc_t* grow = gp + (t - t0) * r;
      for (int64_t c = 0; c < r; ++c) drow[c] += grow[c];
    }
  });
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(r * r);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t k = 0; k < per; ++k) {
        const acc_t* src = pp + (i * per + k) * r * r;
        for (int64_t e = 0; e < r * r; ++e) sum[e] += src[e];
      }
      for (int64_t e = 0; e < r * r; ++e) op[i * r * r + e] = static_cast<scalar_t>(sum[e]);
    }
  });
}

template <typename scalar_t>
void weight_grad_kernel(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t r = block.size(1), nb = block.size(0), in = grad.size(1);
  const at::Tensor g3 = grad.view({nb, in, r});
  const at::Tensor a_t = identity_plus(block, acc).transpose(1, 2);
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  for_each_chunk(nb, in, [&](int64_t, int64_t i, int64_t t0, int64_t t1) {
    const at::Tensor p = at::mm(g3[i].narrow(0, t0, t1 - t0).to(acc), a_t[i]).contiguous();
    const acc_t* pp = p.const_data_ptr<acc_t>();
    scalar_t* o = op + (i * in + t0) * r;
    const int64_t n = (t1 - t0) * r;
    for (int64_t e = 0; e < n; ++e) o[e] = static_cast<scalar_t>(pp[e]);
  });
}

}  // namespace

void bat_transform(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "miss_ext_bat_transform",
                                  [&] { transform_kernel<scalar_t>(weight, block, out); });
}

void bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "miss_ext_bat_block_grad",
                                  [&] { block_grad_kernel<scalar_t>(grad, weight, r, out); });
}

void bat_weight_grad(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "miss_ext_bat_weight_grad",
                                  [&] { weight_grad_kernel<scalar_t>(grad, block, out); });
}

}  // namespace cpu
}  // namespace miss_ext
