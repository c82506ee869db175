// CPU kernels of BAT with mixed precision (docs/MATH.md, mixed precision): a bf16/fp16 (or any)
// weight with fp32/fp64 blocks.
//
//   bat_transform, mixed:  W' = W + (W B_i + B_i) formed in the blocks' precision from the stored
//                          weight and rounded ONCE to the output dtype (the layer's compute dtype).
//   bat_io_block_grad:     dL/dB_i = sum_j (W_ij + I)^T Gw_ij with Gw = G^T x, from the layer's
//                          output gradient G and input x, accumulated in fp32 (fp64) and never
//                          rounded to the half type; Gw is never materialised.
//
// On machines with bf16 micro-kernels (cpu/amx.h) the products run there: W is exact in bf16, an
// fp32 operand enters as its hi + lo bf16 pieces (each product exact, fp32 accumulation), so the
// result carries 16 of fp32's mantissa bits of that operand; everything else falls back to fp32
// (fp64) GEMMs on converted chunks. Both paths are deterministic and independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common/kernels.h"
#include "cpu/blas_threads.h"
#include "cpu/amx.h"
#include "cpu/bat_mixed.h"
#include "cpu/convert.h"
#include "cpu/tasks.h"
#include "cpu/vec.h"
#include "cpu/workspace.h"

namespace miss_ext {
namespace cpu {
namespace {

using amx::bf16;

// Rows of a slab per transform task: few, large brgemm calls (measured: 1024 rows take 25% less
// time than 256), and the fp32 product of a task still fits in L2 for r up to 128.
constexpr int64_t kTransformRows = 1024;

// Calls fn(i, t0, t1) for every slab i and chunk [t0, t1) of its `rows` rows, in parallel.
template <typename F>
void for_slab_chunks(int64_t n_slabs, int64_t rows, int64_t chunk, const F& fn) {
  const int64_t per = (rows + chunk - 1) / chunk;
  at::parallel_for(0, n_slabs * per, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: never record a graph
    const SequentialBlas sequential_blas;  // products independent of the thread count
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / per, t0 = (task % per) * chunk;
      fn(i, t0, std::min(rows, t0 + chunk));
    }
  });
}

// Rows [t0, t1) of a slab: out = w + (p + B_i[a(t), :]), p the product rows (row stride ldp, the
// sum of `pieces` r-wide parts), rounded once to out_t. w, p and out point at row t0.
template <typename w_t, typename out_t, typename acc_t>
void transform_epilogue(const w_t* w, const acc_t* p, int64_t ldp, int pieces, const acc_t* blk,
                        out_t* out, int64_t t0, int64_t t1, int64_t r, int64_t per_a) {
  for (int64_t t = t0; t < t1; ++t) {
    const acc_t* prow = p + (t - t0) * ldp;
    const acc_t* brow = blk + (t / per_a) * r;
    const w_t* wrow = w + (t - t0) * r;
    out_t* orow = out + (t - t0) * r;
    for (int64_t c = 0; c < r; ++c) {
      acc_t prod = prow[c];
      for (int q = 1; q < pieces; ++q) prod += prow[q * r + c];
      store<out_t>(orow + c, load<acc_t>(wrow + c) + (prod + brow[c]));
    }
  }
}

// weight bf16, block fp32 (contiguous), r % 16 == 0: two pieces of B when W' is rounded to bf16,
// three (B exactly) for a float32 W', one (B rounded to bf16, as autocast rounds PEFT's block)
// when the caller permits half products.
template <typename out_t>
void transform_amx(const at::Tensor& weight, const at::Tensor& block, bool half_products,
                   at::Tensor& out) {
  const int64_t r = block.size(1), nb = block.size(0), in = weight.size(1), per_a = in / r;
  const bf16* wp = weight.const_data_ptr<bf16>();
  const float* bp = block.const_data_ptr<float>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const int64_t per = (in + kTransformRows - 1) / kTransformRows;
  at::parallel_for(0, nb * per, 1, [&](int64_t begin, int64_t end) {
    SlabTransform st(weight, block, std::is_same_v<out_t, float> ? 3 : half_products ? 1 : 2);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / per, t0 = (task % per) * kTransformRows;
      const int64_t t1 = std::min(in, t0 + kTransformRows);
      out_t* o = op + (i * in + t0) * r;
      if constexpr (std::is_same_v<out_t, bf16>) {
        st.rows(i, t0, t1, reinterpret_cast<uint16_t*>(o));
      } else {
        transform_epilogue<bf16, out_t, float>(wp + (i * in + t0) * r, st.products(i, t0, t1), r, 1,
                                               bp + i * r * r, o, t0, t1, r, per_a);
      }
    }
    amx::release();
  });
}

// Any dtypes; block already in acc_t (float or double).
template <typename out_t, typename acc_t>
void transform_fallback(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out) {
  const int64_t r = block.size(1), nb = block.size(0), in = weight.size(1), per_a = in / r;
  const at::Tensor w3 = weight.view({nb, in, r});
  const acc_t* bp = block.const_data_ptr<acc_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  for_slab_chunks(nb, in, kTransformRows, [&](int64_t i, int64_t t0, int64_t t1) {
    const at::Tensor wc = w3[i].narrow(0, t0, t1 - t0).to(acc);
    const at::Tensor p = at::mm(wc, block[i]);
    transform_epilogue<acc_t, out_t, acc_t>(wc.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>(),
                                            r, 1, bp + i * r * r, op + (i * in + t0) * r, t0,
                                            t1, r, per_a);
  });
}

// ---------------------------------------------------------------------------------------
// dL/dB from (G, x, W), bf16, on the micro-kernels. For slab i and a chunk of input columns,
//   Ct  = x_chunk^T G_i           (w x r, fp32: rows (j, c) of Gw_i^T, never rounded)
//   D_i += A3 Wrows               (3r x r, fp32)
// where A3[q r + c, (j, a)] = piece_q(Ct[j r + c, a]) (Ct = piece_1 + piece_2 + piece_3 exactly)
// and Wrows[(j, a), k] = W[i r + a, j r + k], so D_i = sum_j Gw_ij^T W_ij = (dL/dB_i - I-term)^T
// with fp32 GEMM accuracy (`pieces` = 3, or, on CPUs without AMX, one fp32 product of Ct's
// blocks and W widened; 1 rounds Ct to bf16 for the product, as autocast rounds PEFT's dL/dW');
// the I-term sum_j Gw_ij is added from the unrounded Ct directly.
// x^T and G are prepared once. Chunks run in order and, within a chunk, slabs in parallel: the
// chunk of x^T (the A operand of every slab's Ct) stays in cache while all slabs use it, and each
// slab's sums grow in chunk order, so nothing depends on the thread count.
void io_block_grad_amx(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                       int64_t r, int pieces, at::Tensor& out) {
  const int64_t n = grad.size(0), out_f = grad.size(1), in = x.size(1), nb = out_f / r;
  const int64_t ldg = grad.stride(0), kp = amx::padded_k(n);
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(grad.const_data_ptr<bf16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<bf16>());
  float* op = out.mutable_data_ptr<float>();

  at::Tensor xt_t = workspace_empty({in, kp}, at::kBFloat16);
  uint16_t* xt_w = reinterpret_cast<uint16_t*>(xt_t.mutable_data_ptr<bf16>());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<bf16>());
  amx::Panels pg(n, out_f);  // G as the B operand: panel p holds output columns [64p, 64p + 64)
  // x^T (in x kp, zero-padded to an even K) by column blocks of x and G's packing by row pairs,
  // in one region.
  enum { kTransposeX, kPackG };
  const auto prep = spread_tasks({task_ranges(kTransposeX, (in + 63) / 64, 1),
                                  task_ranges(kPackG, pg.kp() / 2, 16)});
  run_tasks(prep, 0, [&](const Task& t, float*) {
    if (t.kind == kTransposeX) {
      const int64_t c0 = t.begin * 64, c1 = std::min(in, t.end * 64);
      vec::transpose_u16(xp + c0, n, c1 - c0, x.stride(0), xt_w + c0 * kp, kp);
      if (kp > n)
        for (int64_t c = c0; c < c1; ++c) xt_w[c * kp + n] = 0;
    } else {
      pg.pack_rows(2 * t.begin, 2 * t.end, [&](int64_t k) { return reinterpret_cast<const bf16*>(gp + k * ldg); });
    }
  });
  const uint16_t* xt = xt_w;
  // Column chunks of whole r-blocks, about 512 columns (a chunk of x^T stays in L2).
  const int64_t chunk = std::min(in, r * std::max<int64_t>(1, 512 / r));
  // fp32 accuracy on AVX512-BF16 without AMX: one fp32 product (Ct itself, W widened) costs
  // two bf16 ones there, so it beats the three pieces (on AMX tiles the pieces win).
  const bool f32 = pieces == 3 && amx::fp32_available() && !amx::tiles();
  const int parts = f32 ? 1 : pieces;
  const int64_t width = parts * r;
  Scratch<float> d(nb * width * r);  // every slab's rows written by chunk 0's product
  std::vector<float> rowsum_t(nb * r * r, 0.0f);
  const int64_t group_cols = std::lcm(r, amx::kPanel), per_group = group_cols / r;
  const int64_t groups = (nb + per_group - 1) / per_group;

  for (int64_t c0 = 0; c0 < in; c0 += chunk) {
    const int64_t w = std::min(in, c0 + chunk) - c0, blocks = w / r;
    const bf16* a = reinterpret_cast<const bf16*>(xt + c0 * kp);
    // Slabs in groups that fill whole G panels (lcm(r, 64) columns: 4 slabs of r = 16, one of
    // r = 64), so the product for a panel is made once and each slab of the group reads its r
    // columns of it.
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      Scratch<float> ct(w * group_cols), a32(f32 ? r * w : 0), w32(f32 ? w * r : 0);
      Scratch<uint16_t> a3(f32 ? 0 : width * w);
      amx::Panels pw;
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t s0 = gi * per_group, s1 = std::min(nb, s0 + per_group);
        const int64_t col0 = s0 * r, cols = (s1 - s0) * r;
        const int64_t p0 = col0 / amx::kPanel, p1 = (col0 + cols + amx::kPanel - 1) / amx::kPanel;
        // The group's W rows are read from memory once, by the packing below; fetched into L2
        // while the compute-bound product runs, they do not stall it.
        for (int64_t row = s0 * r; row < s1 * r; ++row) vec::prefetch_l2(wp + row * in + c0, w * 2);
        amx::gemm(w, a, kp, pg, p0, p1, ct.data(), cols, false, col0);
        for (int64_t i = s0; i < s1; ++i) {
          const float* ctp = ct.data() + (i - s0) * r;  // slab i's Ct: w rows of r, row stride cols
          // A3[q r + c, jj r + a] = piece_q(Ct[jj r + c, a]): each r x r block of Ct splits
          // straight into its place in A3, no element transpose; the same pass adds the I-term,
          // rowsum_t[c, a] += Ct[jj r + c, a] (jj in order, as any thread count sums it).
          float* rs = rowsum_t.data() + i * r * r;
          if (f32) {
            // A = Ct's blocks side by side (A[c, jj r + a] = Ct[jj r + c, a]), B = Wrows widened.
            for (int64_t jj = 0; jj < blocks; ++jj)
              vec::copy_sum_rows_f32(ctp + jj * r * cols, r, r, cols, a32.data() + jj * r, w, rs, r);
            for (int64_t a = 0; a < r; ++a)
              vec::widen_rows_bf16(wp + (i * r + a) * in + c0, blocks, r, r, w32.data() + a * r, r * r);
            amx::gemm_f32(r, r, w, a32.data(), w, w32.data(), r, d.data() + i * width * r, r, c0 > 0);
            continue;
          }
          for (int64_t jj = 0; jj < blocks; ++jj) {
            uint16_t* dst = a3.data() + jj * r;
            vec::split_sum_bf16_rows(ctp + jj * r * cols, r, r, cols, pieces, dst,
                                     pieces > 1 ? dst + r * w : nullptr,
                                     pieces > 2 ? dst + 2 * r * w : nullptr, w, rs, r);
          }
          // Wrows: row k = (jj, a) is W[i r + a, c0 + jj r : + r]. With one panel (r <= 64) the
          // row pair (jj, a), (jj, a + 1) lands at jj r^2 + a r: one interleave per a-pair.
          pw.reset(w, r);
          if (r <= amx::kPanel) {
            uint16_t* dst = reinterpret_cast<uint16_t*>(pw.mutable_panel(0));
            for (int64_t a = 0; a < r; a += 2) {
              const uint16_t* w0 = wp + (i * r + a) * in + c0;
              vec::interleave_blocks_bf16(w0, w0 + in, blocks, r, r * r, dst + a * r);
            }
          } else {
            pw.pack_rows(0, pw.kp(), [&](int64_t k) {
              return reinterpret_cast<const bf16*>(wp + (i * r + k % r) * in + c0 + (k / r) * r);
            });
          }
          amx::gemm(width, reinterpret_cast<const bf16*>(a3.data()), w, pw, 0, pw.count(),
                    d.data() + i * width * r, r, c0 > 0);
        }
      }
      amx::release();
    });
  }
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* di = d.data() + i * width * r;
      const float* rs = rowsum_t.data() + i * r * r;
      float* o = op + i * r * r;
      for (int64_t k = 0; k < r; ++k)
        for (int64_t c = 0; c < r; ++c) {
          float v = di[c * r + k];
          for (int q = 1; q < parts; ++q) v += di[(q * r + c) * r + k];
          o[k * r + c] = v + rs[c * r + k];
        }
    }
  });
}

// Any dtypes: Gw for a group of slabs at a time in acc (out's dtype), then the fp32/fp64 block
// gradient kernel on it. Groups are parallel tasks with sequential GEMMs inside, so the result
// does not depend on the thread count.
void io_block_grad_fallback(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                            int64_t r, at::Tensor& out) {
  const auto acc = out.scalar_type();
  const int64_t nb = weight.size(0) / r;
  const at::Tensor xa = x.to(acc);
  const at::Tensor ga = grad.to(acc);
  // At most ~4M elements of Gw per group, and at least 8 groups when there are enough slabs.
  const int64_t cap = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(1, r * x.size(1)));
  const int64_t group = std::max<int64_t>(1, std::min(cap, (nb + 7) / 8));
  for_slab_chunks(1, nb, group, [&](int64_t, int64_t s0, int64_t s1) {
    const int64_t rows = (s1 - s0) * r;
    // Over tokens in fixed chunks of 512, accumulated in order: no vendor GEMM gets a reduction
    // long enough to split across threads (see cpu/blas_threads.h).
    at::Tensor gw;
    for (int64_t t0 = 0; t0 < ga.size(0); t0 += 512) {
      const int64_t len = std::min<int64_t>(512, ga.size(0) - t0);
      const at::Tensor a = ga.narrow(0, t0, len).narrow(1, s0 * r, rows).t();
      const at::Tensor b = xa.narrow(0, t0, len);
      if (t0 == 0) {
        gw = at::mm(a, b);
      } else {
        gw.addmm_(a, b);
      }
    }
    const at::Tensor wg = weight.narrow(0, s0 * r, rows).to(acc).contiguous();
    at::Tensor o = out.narrow(0, s0, s1 - s0);
    bat_block_grad(gw.contiguous(), wg, r, o);
  });
}

}  // namespace

SlabTransform::SlabTransform(const at::Tensor& weight, const at::Tensor& block, int pieces)
    : w_(weight.const_data_ptr<bf16>()),
      b_(block.const_data_ptr<float>()),
      r_(block.size(1)),
      in_(weight.size(1)),
      pieces_(pieces),
      parts_(3 * r_ * r_),
      prod_(kMaxRows * r_) {}

const float* SlabTransform::products(int64_t i, int64_t t0, int64_t t1) {
  const int64_t r = r_;
  if (i != slab_) {  // B_i's pieces, each packed as a B operand (K = N = r)
    vec::split_bf16(b_ + i * r * r, r * r, pieces_, parts_.data(), parts_.data() + r * r,
                    parts_.data() + 2 * r * r);
    for (int q = 0; q < pieces_; ++q) {
      const bf16* part = reinterpret_cast<const bf16*>(parts_.data() + q * r * r);
      packed_[q].reset(r, r);
      packed_[q].pack_rows(0, packed_[q].kp(), [&](int64_t k) { return part + k * r; });
    }
    slab_ = i;
  }
  const bf16* w_rows = w_ + (i * in_ + t0) * r;
  for (int q = 0; q < pieces_; ++q)
    amx::gemm(t1 - t0, w_rows, r, packed_[q], 0, packed_[q].count(), prod_.data(), r, q > 0);
  return prod_.data();
}

void SlabTransform::rows(int64_t i, int64_t t0, int64_t t1, uint16_t* out) {
  const int64_t r = r_, per_a = in_ / r;
  for (int64_t c0 = t0; c0 < t1; c0 += kMaxRows) {
    const int64_t c1 = std::min(t1, c0 + kMaxRows);
    const float* prod = products(i, c0, c1);
    // Runs of rows that share B_i's row a(t) = t / (in / r).
    for (int64_t t = c0; t < c1;) {
      const int64_t a = t / per_a, t_end = std::min(c1, (a + 1) * per_a);
      vec::transform_rows_bf16(reinterpret_cast<const uint16_t*>(w_ + (i * in_ + t) * r),
                               prod + (t - c0) * r, r, b_ + (i * r + a) * r, t_end - t, r,
                               out + (t - t0) * r);
      t = t_end;
    }
  }
}

void bat_transform_mixed(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out,
                         bool half_products) {
  const int64_t r = block.size(1);
  const bool amx_ok = weight.scalar_type() == at::kBFloat16 && block.scalar_type() == at::kFloat &&
                      (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat) &&
                      amx::width_ok(r) && amx::available();
  if (amx_ok) {
    if (out.scalar_type() == at::kBFloat16) {
      transform_amx<bf16>(weight, block, half_products, out);
    } else {
      transform_amx<float>(weight, block, false, out);
    }
    return;
  }
  // The weight is converted chunk by chunk, so only the output dtype is a template parameter.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(),
                                  "miss_ext_bat_transform_mixed", [&] {
    if (block.scalar_type() == at::kDouble) {
      transform_fallback<scalar_t, double>(weight, block, out);
    } else {
      transform_fallback<scalar_t, float>(weight, block, out);
    }
  });
}

void bat_io_block_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                       int64_t r, bool half_products, at::Tensor& out) {
  const bool amx_ok = grad.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
                      weight.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kFloat &&
                      amx::width_ok(r) && amx::available();
  if (amx_ok) {
    io_block_grad_amx(grad, x, weight, r, half_products ? 1 : 3, out);
  } else {
    io_block_grad_fallback(grad, x, weight, r, out);
  }
}

}  // namespace cpu
}  // namespace miss_ext
