// The mixed-precision BAT transform of the CPU backend, which cpu::bat_transform hands over to
// when the weight, block and output dtypes are not all equal (cpu/bat_mixed.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cpu/amx.h"
#include "cpu/workspace.h"

namespace miss_ext {
namespace cpu {

// `half_products` permits the products to take fp32 operands rounded to bf16 (one piece), the
// precision autocast gives PEFT's (docs/MATH.md section 11.4); only the bf16 micro-kernel path
// has a faster kernel for it, every other path keeps fp32 products.
void bat_transform_mixed(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out,
                         bool half_products);

// W' = W + (W B_i + B_i) on the micro-kernels, slab by slab, for a bf16 weight and fp32 blocks
// (contiguous, r % 16 == 0, amx::available()). B_i enters as `pieces` bf16 pieces (2: 16 of fp32's
// mantissa bits, enough for a W' rounded to bf16; 3: B exactly; 1: B rounded to bf16). One object per thread: it keeps
// its scratch and the packed pieces of the last slab.
class SlabTransform {
 public:
  SlabTransform(const at::Tensor& weight, const at::Tensor& block, int pieces = 2);
  // W B_i in fp32 for rows [t0, t1) of slab i in the copy-free view (in rows of r, row t =
  // W[i r + t / (in / r), (t % (in / r)) r : + r]); valid until the next call. At most
  // kMaxRows rows per call.
  const float* products(int64_t i, int64_t t0, int64_t t1);
  // The same rows of W' rounded to bf16, written from out (row t0 first).
  void rows(int64_t i, int64_t t0, int64_t t1, uint16_t* out);
  static constexpr int64_t kMaxRows = 1024;

 private:
  const amx::bf16* w_;
  const float* b_;
  int64_t r_, in_;
  int pieces_;
  int64_t slab_ = -1;
  Scratch<uint16_t> parts_;
  Scratch<float> prod_;
  amx::Panels packed_[3];
};

}  // namespace cpu
}  // namespace miss_ext
