// The contract between the device-neutral operator front ends (csrc/front/<family>.cpp) and the
// per-device kernels (csrc/cpu/<family>.cpp, csrc/cuda/<family>.cu), grouped by family.
//
// The front end validates every argument, unifies dtypes and prepares layouts, so a kernel
// may assume what its comment states and nothing more. Kernels write into `out`, which the
// front end allocated with the right shape, dtype and device. All sizes are int64_t.
// Half types (float16, bfloat16) are accumulated in float32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace miss_ext {

// Dropout applied inside a kernel; see philox.h for the mask definition.
struct DropoutArgs {
  bool enabled = false;
  uint64_t seed = 0;
  double p = 0.0;
};

#define MISS_EXT_DECLARE_KERNELS                                                              \
  /* ---- blocksum family: cpu/blocksum.cpp, cuda/blocksum.cu                               */ \
  /* x: (N, in), stride(1) == 1, any row stride. out: (N, r) contiguous, x's dtype or a     */ \
  /* wider float (float32/float64: the mixed-precision block sum, x never copied).          */ \
  /* out[n, c] = scale * sum_j keep(n*in + k) * x[n, k], k = j*r + c < in, accumulated in   */ \
  /* the wider of the two dtypes' opmath types.                                             */ \
  void blocksum(const at::Tensor& x, int64_t r, const DropoutArgs& drop, at::Tensor& out);    \
  /* s: (N, r) contiguous, out's dtype or wider. base: undefined or (N, n) contiguous in    */ \
  /* out's dtype. out: (N, n) contiguous.                                                   */ \
  /* out[n, k] = base[n, k] + scale * keep(n*n + k) * s[n, k % r], rounded once.            */ \
  void tile(const at::Tensor& s, const at::Tensor& base, const DropoutArgs& drop,             \
            at::Tensor& out);                                                                 \
  /* ---- bat family: cpu/bat.cpp + bat_mixed.cpp, cuda/bat.cu + bat_block_grad.cu          */ \
  /* weight: (out, in) contiguous, any float dtype; block: (out/r, r, r) contiguous, the    */ \
  /* weight's dtype or float32/float64; out: like weight, any float dtype.                 */ \
  /* W'_ij = W_ij (I + B_i) + B_i; with all three dtypes equal the products run in that     */ \
  /* dtype, else in the block's (float32/float64) precision, rounded once to out's dtype.   */ \
  /* half_products (here and in bat_io_block_grad) permits products on the fp32 operand    */ \
  /* rounded to the half input's dtype, autocast's precision (docs/MATH.md 11.4); a backend */ \
  /* may ignore it (CUDA and the CPU fallbacks keep fp32 products, inside that bound).      */ \
  void bat_transform(const at::Tensor& weight, const at::Tensor& block, bool half_products,   \
                     at::Tensor& out);                                                        \
  /* grad, weight: (out, in) contiguous, same dtype. out: (out/r, r, r) contiguous.        */ \
  /* out_i = sum_j (W_ij + I)^T G_ij.                                                      */ \
  void bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r,            \
                      at::Tensor& out);                                                       \
  /* grad: (N, out), x: (N, in), both stride(1) == 1, same dtype; weight: (out, in)         */ \
  /* contiguous, any float dtype; out: (out/r, r, r) contiguous float32 (float64 when x is  */ \
  /* float64). out_i = sum_j (W_ij + I)^T Gw_ij with Gw = grad^T x, all in out's precision: */ \
  /* the BAT block gradient straight from the layer's input and output gradient.           */ \
  void bat_io_block_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, \
                         int64_t r, bool half_products, at::Tensor& out);                     \
  /* grad: (out, in) contiguous; block: (out/r, r, r) contiguous, same dtype.             */ \
  /* out: like grad. out_ij = G_ij (I + B_i)^T.                                            */ \
  void bat_weight_grad(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out);     \
  /* ---- product family (standard/mini MiSS): cpu/product.cpp, cuda/product.cu            */ \
  /* base: (N, out) contiguous; s: (N, r), block: (r, out), both contiguous float32 or      */ \
  /* float64; out: like base. out = base + s @ block, the product in the block's dtype,     */ \
  /* rounded once to base's dtype (the standard mixed-precision forward).                   */ \
  void miss_add_product(const at::Tensor& base, const at::Tensor& s, const at::Tensor& block, \
                        at::Tensor& out);                                                     \
  /* grad: (N, out) contiguous, any float dtype; s: (N, r), block: (r, out) contiguous      */ \
  /* float32/float64; grad_block (r, out), grad_s (N, r): contiguous, the block's dtype.    */ \
  /* grad_block = s^T grad, grad_s = grad block^T, in the block's precision.                */ \
  void miss_block_grads(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& block, \
                        at::Tensor& grad_block, at::Tensor& grad_s);                          \
  /* ---- merge family: cpu/merge.cpp, cuda/merge.cu                                        */ \
  /* weight: (out, in) contiguous; block: (r, m) contiguous in float32 (float64 when the   */ \
  /* weight is float64), out % m == 0. out: like weight.                                   */ \
  /* out[o, k] = W[o, k] + alpha * block[k % r, o % m], computed in block's dtype.         */ \
  void miss_merge(const at::Tensor& weight, const at::Tensor& block, double alpha,            \
                  at::Tensor& out);                                                           \
  /* ---- gathered family (serving): cpu/gathered.cpp, cuda/gathered.cu                    */ \
  /* base: (N, out), any float dtype, unit column stride, row stride out or 0 (a broadcast */ \
  /* row); s: (N, r) contiguous float32/float64 that                                         */ \
  /* holds base's dtype; blocks: K >= 1 tensors (r, m_k) contiguous in s's dtype, with       */ \
  /* out % m_k == 0; index: (N,) contiguous int64 on base's device, values in [-1, K). out:  */ \
  /* like base. out[n, o] = base[n, o] + sum_c s[n, c] blocks[index[n]][c, o % m], in s's    */ \
  /* precision, rounded once; index -1: out[n] = base[n].                                    */ \
  void miss_gathered_product(const at::Tensor& base, const at::Tensor& s,                     \
                             const std::vector<at::Tensor>& blocks, const at::Tensor& index,  \
                             at::Tensor& out);

namespace cpu {
MISS_EXT_DECLARE_KERNELS
}  // namespace cpu

#ifdef MISS_EXT_WITH_CUDA
namespace cuda {
MISS_EXT_DECLARE_KERNELS
}  // namespace cuda
#endif

}  // namespace miss_ext
