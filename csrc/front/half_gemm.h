// Half-type GEMMs on CPUs where torch emulates them (docs/MATH.md section 11.5).
#pragma once

#include <ATen/ATen.h>

namespace miss_ext {
namespace front {

// True for a bf16/fp16 CPU tensor where oneDNN has no kernel for its type (e.g. an AVX2-only
// CPU), so that aten's GEMM in it is an emulation, many times slower than the fp32 GEMM.
bool half_gemm_emulated(const at::Tensor& t);

// dst = a @ b (+ bias, a row vector) (dst, a, b 2-D, one half type); where
// half_gemm_emulated(a), as fp32 GEMMs of the exact upcast operands, the bias added in fp32,
// rounded once; b is upcast a column slab (~16 MB of fp32) at a time.
void half_mm_out(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b,
                 const std::optional<at::Tensor>& bias = std::nullopt);

// dst += a @ b (beta = 1, one rounding), upcast as half_mm_out where half_gemm_emulated(a).
void half_addmm_(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b);

}  // namespace front
}  // namespace miss_ext
