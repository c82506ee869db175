// CPU kernels of standard MiSS with mixed precision (docs/MATH.md, mixed precision): a
// bf16/fp16 base (x, W, G = dL/dy) with an fp32/fp64 block D (r x out) and block sum S (N x r).
//
//   miss_add_product:  y = base + S D, the product in the block's precision, rounded once.
//   miss_block_grads:  dL/dD = S^T G and dL/dS = G D^T, in the block's precision, G read as it is.
//
// The products are small (r columns), so their results never leave cache: each task makes a
// chunk of the product and consumes it at once. With bf16 micro-kernels (cpu/amx.h) the backward
// products use G exactly and the fp32 operand as bf16 pieces: three for S (hi + mid + lo is S
// exactly, so dL/dD has fp32 GEMM accuracy) and two for D (dL/dS is rounded to the half type by
// the caller, so 16 bits of D are plenty); otherwise fp32 GEMMs run on converted chunks. The
// forward product (both operands fp32) runs on the fp32 micro-kernel where it is available.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/kernels.h"
#include "cpu/blas_threads.h"
#include "cpu/amx.h"
#include "cpu/convert.h"
#include "cpu/tasks.h"
#include "cpu/vec.h"
#include "cpu/workspace.h"

namespace miss_ext {
namespace cpu {
namespace {

using amx::bf16;

constexpr int64_t kRowChunk = 64;     // rows of y per forward task (r x out product in L2)
constexpr int64_t kGradRows = 128;    // rows of G per dL/dS task (fallback)
constexpr int64_t kAmxGradRows = 64;  // rows of G per dL/dS task (micro-kernels; finer: spreads evenly)
constexpr int64_t kGradCols = 256;    // columns of dL/dD per fallback task
constexpr int64_t kTokenBlock = 512;  // reduction length per fallback GEMM call
constexpr int64_t kF32Panel = 256;    // output columns per fp32 micro-kernel call (measured best)

template <typename F>
void parallel_tasks(int64_t n_tasks, const F& fn) {
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // worker threads: never record a graph
    const SequentialBlas sequential_blas;  // products independent of the thread count
    for (int64_t t = begin; t < end; ++t) fn(t);
  });
}

// bf16 base, fp32 s and block, on the fp32 micro-kernel: each task's rows in column panels of
// kF32Panel, the product of a panel added into its bf16 output rows while still in L1/L2.
void add_product_f32(const at::Tensor& base, const at::Tensor& s, const at::Tensor& block,
                     at::Tensor& out) {
  const int64_t n = base.size(0), out_f = base.size(1), r = block.size(0);
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(base.const_data_ptr<bf16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<bf16>());
  const float* sp = s.const_data_ptr<float>();
  const float* dp = block.const_data_ptr<float>();
  at::parallel_for(0, (n + kRowChunk - 1) / kRowChunk, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> p(kRowChunk * kF32Panel);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t0 = task * kRowChunk, rows = std::min(n, t0 + kRowChunk) - t0;
      for (int64_t c0 = 0; c0 < out_f; c0 += kF32Panel) {
        const int64_t w = std::min(out_f, c0 + kF32Panel) - c0;
        amx::gemm_f32(rows, w, r, sp + t0 * r, r, dp + c0, out_f, p.data(), w, false);
        for (int64_t t = 0; t < rows; ++t) {
          const int64_t off = (t0 + t) * out_f + c0;
          vec::add_bf16(bp + off, p.data() + t * w, w, op + off);
        }
      }
    }
  });
}

template <typename out_t, typename acc_t>
void add_product_kernel(const at::Tensor& base, const at::Tensor& s, const at::Tensor& block,
                        at::Tensor& out) {
  const int64_t n = base.size(0), out_f = base.size(1);
  const out_t* bp = base.const_data_ptr<out_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  parallel_tasks((n + kRowChunk - 1) / kRowChunk, [&](int64_t task) {
    const int64_t t0 = task * kRowChunk, t1 = std::min(n, t0 + kRowChunk);
    const at::Tensor p = at::mm(s.narrow(0, t0, t1 - t0), block);
    const acc_t* pp = p.const_data_ptr<acc_t>();
    if constexpr (std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
      vec::add_bf16(reinterpret_cast<const uint16_t*>(bp + t0 * out_f), pp, (t1 - t0) * out_f,
                    reinterpret_cast<uint16_t*>(op + t0 * out_f));
    } else {
      for (int64_t t = t0; t < t1; ++t) {
        const out_t* b = bp + t * out_f;
        const acc_t* prow = pp + (t - t0) * out_f;
        out_t* o = op + t * out_f;
        for (int64_t c = 0; c < out_f; ++c) store<out_t>(o + c, load<acc_t>(b + c) + prow[c]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// dst = sum over k-chunks of a(k0, len) @ b(k0, len): the reduction in chunks of kTokenBlock,
// accumulated in order, so MKL never splits it across threads (see cpu/blas_threads.h).
template <typename A, typename B>
void chunked_mm(at::Tensor& dst, int64_t k, const A& a, const B& b) {
  for (int64_t k0 = 0; k0 < k; k0 += kTokenBlock) {
    const int64_t len = std::min(k, k0 + kTokenBlock) - k0;
    if (k0 == 0) {
      at::mm_out(dst, a(k0, len), b(k0, len));
    } else {
      dst.addmm_(a(k0, len), b(k0, len));
    }
  }
}

void block_grads_fallback(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& block,
                          at::Tensor& grad_block, at::Tensor& grad_s) {
  const int64_t n = grad.size(0), out_f = grad.size(1);
  const auto acc = block.scalar_type();
  const at::Tensor block_t = block.t();
  parallel_tasks((n + kGradRows - 1) / kGradRows, [&](int64_t task) {
    const int64_t t0 = task * kGradRows, len = std::min(n, t0 + kGradRows) - t0;
    at::Tensor dst = grad_s.narrow(0, t0, len);
    chunked_mm(
        dst, out_f,
        [&](int64_t c0, int64_t w) { return grad.narrow(0, t0, len).narrow(1, c0, w).to(acc); },
        [&](int64_t c0, int64_t w) { return block_t.narrow(0, c0, w); });
  });
  const at::Tensor s_t = s.t();
  parallel_tasks((out_f + kGradCols - 1) / kGradCols, [&](int64_t task) {
    const int64_t c0 = task * kGradCols, w = std::min(out_f, c0 + kGradCols) - c0;
    at::Tensor dst = grad_block.narrow(1, c0, w);
    chunked_mm(
        dst, n, [&](int64_t t0, int64_t len) { return s_t.narrow(1, t0, len); },
        [&](int64_t t0, int64_t len) { return grad.narrow(0, t0, len).narrow(1, c0, w).to(acc); });
  });
}

// grad bf16 (N x out), s and block fp32; out % 16 == 0, r % 8 == 0.
//   dL/dS = G [hi(D) | lo(D)]^T              (G read in place as the A operand)
//   dL/dD = [S1; S2; S3]^T G, S = S1 + S2 + S3 exactly (three bf16 pieces)
// in two parallel regions, packing then products, the tasks of each spread over the threads
// (cpu/tasks.h); one region per step, as before, measured 2-8% slower on 2 threads of an AMX
// Xeon (512 tokens, out 1024-2816, r = 64). Every output element is made by one task in a fixed
// order, so nothing depends on the thread count.
void block_grads_amx(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& block,
                     at::Tensor& grad_block, at::Tensor& grad_s) {
  const int64_t n = grad.size(0), out_f = grad.size(1), r = block.size(0);
  const int64_t ldg = grad.stride(0);
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(grad.const_data_ptr<bf16>());
  const float* dp = block.const_data_ptr<float>();
  const float* sp = s.const_data_ptr<float>();
  TORCH_CHECK(out_f % 2 == 0, "miss_ext internal: dL/dS packing needs an even out_features");

  amx::Panels pd(out_f, 2 * r);  // dL/dS's B operand, [hi(D) | lo(D)]^T (out x 2r)
  amx::Panels pg(n, out_f);      // dL/dD's B operand, G (row pairs in VNNI order)
  const int64_t kp = amx::padded_k(n);
  std::vector<uint16_t> a(3 * r * kp, 0);  // dL/dD's A operand, the pieces of S^T (zero pad column)
  Scratch<uint16_t> pieces(3 * n * r);

  // Phase 1: D's pieces packed (row pairs of out), G packed (row pairs of tokens), S split and
  // transposed (one task: N x r is small).
  enum { kPackD, kPackG, kSplitS, kGradS, kGradD };
  uint16_t* pd_dst = reinterpret_cast<uint16_t*>(pd.mutable_panel(0));
  const auto pack = spread_tasks({task_ranges(kPackD, pd.kp() / 2, 128), task_ranges(kPackG, pg.kp() / 2, 16),
                            {Task{kSplitS, 0, 1}}});
  run_tasks(pack, 0, [&](const Task& t, float*) {
    if (t.kind == kPackD) {  // straight from D: one pass (split, transposes and pack in one)
      vec::pack_split_columns_bf16(dp, r, out_f, amx::kPanel, pd.kp(), t.begin, t.end, pd_dst);
    } else if (t.kind == kPackG) {
      pg.pack_rows(2 * t.begin, 2 * t.end, [&](int64_t k) {
        return reinterpret_cast<const bf16*>(gp + k * ldg);
      });
    } else {
      vec::split_bf16_rows(sp, n, r, r, 3, pieces.data(), pieces.data() + n * r,
                           pieces.data() + 2 * n * r, r);
      for (int q = 0; q < 3; ++q)
        vec::transpose_u16(pieces.data() + q * n * r, n, r, r, a.data() + q * r * kp, kp);
    }
  });

  // Phase 2: dL/dS by row blocks of G, dL/dD by column panels of G.
  float* gsp = grad_s.mutable_data_ptr<float>();
  float* gbp = grad_block.mutable_data_ptr<float>();
  const auto products = spread_tasks({task_ranges(kGradS, n, kAmxGradRows), task_ranges(kGradD, pg.count(), 1)});
  const int64_t scratch = std::max(kAmxGradRows * 2 * r, 3 * r * amx::kPanel);
  run_tasks(products, scratch, [&](const Task& t, float* c) {
    if (t.kind == kGradS) {
      const int64_t t0 = t.begin, len = t.end - t.begin;
      amx::gemm(len, reinterpret_cast<const bf16*>(gp + t0 * ldg), ldg, pd, 0, pd.count(), c, 2 * r,
                false);
      for (int64_t i = 0; i < len; ++i)
        for (int64_t cc = 0; cc < r; ++cc)
          gsp[(t0 + i) * r + cc] = c[i * 2 * r + cc] + c[i * 2 * r + r + cc];
    } else {
      const int64_t p = t.begin, c0 = pg.start(p), w = pg.width(p);
      amx::gemm(3 * r, reinterpret_cast<const bf16*>(a.data()), kp, pg, p, p + 1, c, w, false, c0);
      for (int64_t row = 0; row < r; ++row)
        for (int64_t j = 0; j < w; ++j)
          gbp[row * out_f + c0 + j] = (c[row * w + j] + c[(r + row) * w + j]) + c[(2 * r + row) * w + j];
    }
  });
}

}  // namespace

void miss_add_product(const at::Tensor& base, const at::Tensor& s, const at::Tensor& block,
                      at::Tensor& out) {
  if (base.scalar_type() == at::kBFloat16 && block.scalar_type() == at::kFloat &&
      amx::fp32_available()) {
    add_product_f32(base, s, block, out);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(),
                                  "miss_ext_miss_add_product", [&] {
    if (block.scalar_type() == at::kDouble) {
      add_product_kernel<scalar_t, double>(base, s, block, out);
    } else {
      add_product_kernel<scalar_t, float>(base, s, block, out);
    }
  });
}

void miss_block_grads(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& block,
                      at::Tensor& grad_block, at::Tensor& grad_s) {
  const bool amx_ok = grad.scalar_type() == at::kBFloat16 && block.scalar_type() == at::kFloat &&
                      amx::width_ok(grad.size(1)) && amx::width_ok(2 * block.size(0)) &&
                      grad.size(0) > 0 && amx::available();
  if (amx_ok) {
    block_grads_amx(grad, s, block, grad_block, grad_s);
  } else {
    block_grads_fallback(grad, s, block, grad_block, grad_s);
  }
}

}  // namespace cpu
}  // namespace miss_ext
