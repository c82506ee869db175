// The contract between the device-neutral operator front ends (csrc/ops_front.cpp) and the
// per-device kernels (csrc/cpu/, csrc/cuda/).
//
// The front end validates every argument, unifies dtypes and prepares layouts, so a kernel
// may assume what its comment states and nothing more. Kernels write into `out`, which the
// front end allocated with the right shape, dtype and device. All sizes are int64_t.
// Half types (float16, bfloat16) are accumulated in float32.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace miss_ext {

// Dropout applied inside a kernel; see philox.h for the mask definition.
struct DropoutArgs {
  bool enabled = false;
  uint64_t seed = 0;
  double p = 0.0;
};

#define MISS_EXT_DECLARE_KERNELS                                                              \
  /* x: (N, in), stride(1) == 1, any row stride. out: (N, r) contiguous, x's dtype.        */ \
  /* out[n, c] = scale * sum_j keep(n*in + k) * x[n, k], k = j*r + c < in.                 */ \
  void blocksum(const at::Tensor& x, int64_t r, const DropoutArgs& drop, at::Tensor& out);    \
  /* s: (N, r) contiguous. base: undefined or (N, n) contiguous, s's dtype.                */ \
  /* out: (N, n) contiguous. out[n, k] = base[n, k] + scale * keep(n*n + k) * s[n, k % r]. */ \
  void tile(const at::Tensor& s, const at::Tensor& base, const DropoutArgs& drop,             \
            at::Tensor& out);                                                                 \
  /* weight: (out, in) contiguous; block: (out/r, r, r) contiguous, same dtype.           */ \
  /* out: like weight. W'_ij = W_ij (I + B_i) + B_i.                                       */ \
  void bat_transform(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out);     \
  /* grad, weight: (out, in) contiguous, same dtype. out: (out/r, r, r) contiguous.        */ \
  /* out_i = sum_j (W_ij + I)^T G_ij.                                                      */ \
  void bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r,            \
                      at::Tensor& out);                                                       \
  /* grad: (out, in) contiguous; block: (out/r, r, r) contiguous, same dtype.             */ \
  /* out: like grad. out_ij = G_ij (I + B_i)^T.                                            */ \
  void bat_weight_grad(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out);     \
  /* weight: (out, in) contiguous; block: (r, m) contiguous in float32 (float64 when the   */ \
  /* weight is float64), out % m == 0. out: like weight.                                   */ \
  /* out[o, k] = W[o, k] + alpha * block[k % r, o % m], computed in block's dtype.         */ \
  void miss_merge(const at::Tensor& weight, const at::Tensor& block, double alpha,            \
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
