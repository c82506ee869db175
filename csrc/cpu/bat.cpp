// CPU kernels of the BAT weight transform and its two gradients, on the copy-free layout of
// docs/MATH.md section 3: weight.view(out/r, in, r) holds, in slab i, the rows of every block W_ij
// (row t = a * (in/r) + j is row a of W_ij). A slab times an r x r matrix is then one GEMM:
// no permuted copy of the weight is ever made.
//
// The r x r products go to the vendor GEMM, chunk by chunk of rows of a slab; the rest (the
// identity term, the B_i broadcast, the sum over j, the rounding to the output dtype) is fused
// into an fp32 pass over each chunk while it is in cache. Chunks are fixed by the shape and the
// block gradient's per-chunk partials are summed in a fixed order, so no result depends on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/kernels.h"
#include "cpu/blas_threads.h"
#include "cpu/convert.h"
#include "cpu/bat_mixed.h"

namespace miss_ext {
namespace cpu {
namespace {

constexpr int64_t kReductionChunk = 512;

// Rows of a slab per task of the block gradient: fixed chunks, a function of the shape only, so
// the summation order of the partials is the same on any number of threads, and short enough
// (K <= 512) that no vendor GEMM splits a chunk's reduction across threads on its own.
int64_t chunk_rows(int64_t, int64_t) { return kReductionChunk; }

int64_t chunks_per_slab(int64_t rows, int64_t chunk) { return (rows + chunk - 1) / chunk; }

// Calls fn(task, i, t0, t1) for every block row i and chunk [t0, t1) of the rows of slab i,
// tasks numbered slab-major.
template <typename F>
void for_each_chunk(int64_t n_slabs, int64_t rows, int64_t chunk, const F& fn) {
  const int64_t per = chunks_per_slab(rows, chunk);
  at::parallel_for(0, n_slabs * per, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: keep the at::mm calls below
    // autograd so they never record a graph on a weight that requires grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const SequentialBlas sequential_blas;  // products independent of the thread count
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / per, t0 = (task % per) * chunk;
      fn(task, i, t0, std::min(rows, t0 + chunk));
    }
  });
}

// Every r x r product runs as W_ij B_i (not W_ij (I + B_i)) in the operands' own dtype, so the
// vendor GEMM for that dtype does it (oneDNN's bf16 GEMM with fp32 accumulation, several times
// faster than converting to fp32 here) and no rounding of I + B_i to a half type loses B_i's low
// bits. Each chunk's product stays in cache while the epilogue adds the identity and B_i terms,
// so the weight is read once and the result written once: the transform is bandwidth-bound at
// small token counts, where extra passes over a weight-sized tensor cost more than the GEMM.

// Rows of a slab per transform/weight-gradient task: 256K elements, L2-sized (measured faster
// than 64K for bf16, where each small GEMM call has a fixed cost).
int64_t product_chunk_rows(int64_t r) { return std::max<int64_t>(1, (int64_t{1} << 18) / r); }

// o = w + (p + b) over `rows` rows of r, with b one r-wide row (or null) shared by all rows.
template <typename scalar_t>
void add_rows(const scalar_t* w, const scalar_t* p, const scalar_t* b, scalar_t* o, int64_t rows,
              int64_t r) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t t = 0; t < rows; ++t, w += r, p += r, o += r) {
    for (int64_t c = 0; c < r; ++c) {
      const acc_t small = static_cast<acc_t>(p[c]) + (b ? static_cast<acc_t>(b[c]) : acc_t(0));
      o[c] = static_cast<scalar_t>(static_cast<acc_t>(w[c]) + small);
    }
  }
}

// bfloat16 on raw bits (cpu/convert.h), so the compiler vectorizes the conversions
// (c10::BFloat16's own, with its NaN branch, stays scalar); built for AVX-512 and AVX2 with a
// portable fallback.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void add_rows_bf16(
    const uint16_t* w, const uint16_t* p, const uint16_t* b, uint16_t* o, int64_t rows, int64_t r) {
  for (int64_t t = 0; t < rows; ++t, w += r, p += r, o += r) {
    for (int64_t c = 0; c < r; ++c) {
      const float small = bf16_bits_to_float(p[c]) + (b ? bf16_bits_to_float(b[c]) : 0.0f);
      o[c] = float_to_bf16_bits(bf16_bits_to_float(w[c]) + small);
    }
  }
}

template <>
void add_rows<c10::BFloat16>(const c10::BFloat16* w, const c10::BFloat16* p,
                             const c10::BFloat16* b, c10::BFloat16* o, int64_t rows, int64_t r) {
  static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t), "bfloat16 is 16 bits");
  add_rows_bf16(reinterpret_cast<const uint16_t*>(w), reinterpret_cast<const uint16_t*>(p),
                reinterpret_cast<const uint16_t*>(b), reinterpret_cast<uint16_t*>(o), rows, r);
}

// out3[i] = x3[i] + x3[i] @ m[i] (+ the row of B_i that each row's block row a takes when
// `block_rows`), chunk by chunk. K = r is never split, so no result depends on the thread count.
template <typename scalar_t>
void slab_products(const at::Tensor& x, const at::Tensor& m, const at::Tensor& block_rows,
                   at::Tensor& out) {
  const int64_t r = m.size(1), nb = m.size(0), in = x.size(1), per_a = in / r;
  const at::Tensor x3 = x.view({nb, in, r});
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* bp = block_rows.defined() ? block_rows.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  for_each_chunk(nb, in, product_chunk_rows(r), [&](int64_t, int64_t i, int64_t t0, int64_t t1) {
    const at::Tensor p = at::mm(x3[i].narrow(0, t0, t1 - t0), m[i]);
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    for (int64_t t = t0; t < t1;) {
      // Rows of one block row a share B_i's row a.
      const int64_t a = t / per_a, t_end = bp ? std::min(t1, (a + 1) * per_a) : t1;
      const int64_t off = (i * in + t) * r;
      add_rows<scalar_t>(xp + off, pp + (t - t0) * r, bp ? bp + (i * r + a) * r : nullptr,
                         op + off, t_end - t, r);
      t = t_end;
    }
  });
}

template <typename scalar_t>
void block_grad_kernel(const at::Tensor& grad, const at::Tensor& weight, int64_t r,
                       at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nb = grad.size(0) / r, in = grad.size(1), per_a = in / r;
  const int64_t chunk = chunk_rows(nb, in), per = chunks_per_slab(in, chunk);
  const at::Tensor g3 = grad.view({nb, in, r}), w3 = weight.view({nb, in, r});
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  // One fp32 r x r partial per chunk, summed below in a fixed order, so the result does not
  // depend on the thread count.
  std::vector<acc_t> partial(static_cast<size_t>(nb * per * r * r));
  for_each_chunk(nb, in, chunk, [&](int64_t task, int64_t i, int64_t t0, int64_t t1) {
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

}  // namespace

void bat_transform(const at::Tensor& weight, const at::Tensor& block, bool half_products,
                   at::Tensor& out) {
  if (block.scalar_type() != weight.scalar_type() || out.scalar_type() != weight.scalar_type()) {
    bat_transform_mixed(weight, block, out, half_products);
    return;
  }
  // W'_ij = W_ij + (W_ij B_i + B_i)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "miss_ext_bat_transform",
                                  [&] { slab_products<scalar_t>(weight, block, block, out); });
}

void bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "miss_ext_bat_block_grad",
                                  [&] { block_grad_kernel<scalar_t>(grad, weight, r, out); });
}

void bat_weight_grad(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out) {
  // dL/dW_ij = G_ij + G_ij B_i^T
  const at::Tensor block_t = block.transpose(1, 2).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "miss_ext_bat_weight_grad",
                                  [&] { slab_products<scalar_t>(grad, block_t, at::Tensor(), out); });
}

}  // namespace cpu
}  // namespace miss_ext
