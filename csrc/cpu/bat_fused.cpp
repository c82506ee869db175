// BAT's two GEMMs with W' formed on the way (mixed precision on bf16 micro-kernels):
//
//   bat_linear_fused:       y  = x W'^T + b
//   bat_input_grad_fused:   dx = G W'
//
// W' = round_bf16(W + (W B_i + B_i)) is made slab by slab (the r rows of block row i) in an
// L2-sized buffer and packed straight into the B operand of the GEMM: W'^T in VNNI column
// panels (a 32-bit transpose of the slab: a row of W' read in bf16 pairs is already a VNNI word)
// for y, W' row pairs interleaved for dx. Against forming W' as a tensor and calling aten's GEMM,
// this skips writing and re-reading W' and aten's own repacking of it: passes over a weight-sized
// tensor that cost as much as the GEMM when there are few tokens. The GEMM itself is the same
// micro-kernel blocked over (token block, panel) tasks; every output element is one reduction in
// a fixed order, so nothing depends on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/amx.h"
#include "cpu/bat_mixed.h"
#include "cpu/vec.h"

namespace miss_ext {
namespace cpu {
namespace {

using amx::bf16;

constexpr int64_t kTokenBlock = 128;  // rows of x (or G) per GEMM task: A stays in L2

// Runs fn(slab_transform, i, w_slab) for every slab i with its W' rows (r x in, bf16) formed in
// a per-thread buffer, in parallel over slabs.
template <typename F>
void for_each_w_slab(const at::Tensor& weight, const at::Tensor& block, const F& fn) {
  const int64_t r = block.size(1), nb = block.size(0), in = weight.size(1);
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    SlabTransform st(weight, block);
    std::vector<uint16_t> w_slab(r * in);
    for (int64_t i = begin; i < end; ++i) {
      st.rows(i, 0, in, w_slab.data());
      fn(i, w_slab.data());
    }
    amx::release();
  });
}

// C = A @ B over (token block, panel) tasks, each finished by out_row(t, p, c_row, width).
template <typename F>
void blocked_gemm(const bf16* a, int64_t lda, int64_t m, const amx::Panels& b, const F& out_row) {
  const int64_t blocks = (m + kTokenBlock - 1) / kTokenBlock, tasks = blocks * b.count();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> c(kTokenBlock * amx::kPanel);
    for (int64_t task = begin; task < end; ++task) {
      // Tasks run panels fastest, so a thread's consecutive tasks share the same A rows.
      const int64_t tb = task / b.count(), p = task % b.count();
      const int64_t t0 = tb * kTokenBlock, rows = std::min(kTokenBlock, m - t0), w = b.width(p);
      amx::gemm(rows, a + t0 * lda, lda, b, p, p + 1, c.data(), w, false, b.start(p));
      for (int64_t t = 0; t < rows; ++t) out_row(t0 + t, p, c.data() + t * w, w);
    }
    amx::release();
  });
}

}  // namespace

bool bat_fused_ok(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& block) {
  return x.device().is_cpu() && x.scalar_type() == at::kBFloat16 &&
         weight.scalar_type() == at::kBFloat16 && block.scalar_type() == at::kFloat &&
         amx::width_ok(block.size(1)) && amx::width_ok(weight.size(0)) && amx::available();
}

void bat_linear_fused(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& block, at::Tensor& y) {
  const int64_t n = x.size(0), in = weight.size(1), out_f = weight.size(0), r = block.size(1);
  // W'^T as the B operand (K = in, N = out): word (k / 2, o) of panel p = the bf16 pair
  // W'[o, k : k + 2], so slab i's rows (as in / 2 words each) transpose into its panel columns.
  amx::Panels wt(in, out_f);
  for_each_w_slab(weight, block, [&](int64_t i, const uint16_t* w_slab) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(w_slab);
    for (int64_t o0 = 0; o0 < r;) {
      const int64_t o = i * r + o0, p = o / amx::kPanel, col = o - wt.start(p);
      const int64_t rows = std::min(r - o0, wt.width(p) - col);
      uint32_t* dst = reinterpret_cast<uint32_t*>(wt.mutable_panel(p)) + col;
      vec::transpose_u32(src + o0 * (in / 2), rows, in / 2, in / 2, dst, wt.width(p));
      o0 += rows;
    }
  });
  std::vector<float> b;
  if (bias.defined()) {
    const at::Tensor bf = bias.to(at::kFloat).contiguous();
    b.assign(bf.const_data_ptr<float>(), bf.const_data_ptr<float>() + out_f);
  }
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<bf16>());
  const int64_t ldy = y.stride(0);
  blocked_gemm(x.const_data_ptr<bf16>(), x.stride(0), n, wt,
               [&](int64_t t, int64_t p, const float* c, int64_t w) {
                 vec::store_bf16(c, b.empty() ? nullptr : b.data() + wt.start(p), w,
                                 yp + t * ldy + wt.start(p));
               });
}

void bat_input_grad_fused(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& block,
                          at::Tensor& dx) {
  const int64_t n = grad.size(0), in = weight.size(1), out_f = weight.size(0), r = block.size(1);
  amx::Panels wp(out_f, in);  // W' as the B operand (K = out, N = in): row pairs interleaved
  for_each_w_slab(weight, block, [&](int64_t i, const uint16_t* w_slab) {
    for (int64_t a = 0; a < r; a += 2) {
      wp.pack_pair(i * r + a, reinterpret_cast<const bf16*>(w_slab + a * in),
                   reinterpret_cast<const bf16*>(w_slab + (a + 1) * in));
    }
  });
  uint16_t* dp = reinterpret_cast<uint16_t*>(dx.mutable_data_ptr<bf16>());
  const int64_t ldd = dx.stride(0);
  blocked_gemm(grad.const_data_ptr<bf16>(), grad.stride(0), n, wp,
               [&](int64_t t, int64_t p, const float* c, int64_t w) {
                 vec::store_bf16(c, nullptr, w, dp + t * ldd + wp.start(p));
               });
}

}  // namespace cpu
}  // namespace miss_ext
