// Every call miss_ext makes into torch's internal bf16 brgemm (at::native::cpublas, the oneDNN
// micro-kernel behind the AMX fast path). It is not a public API and may change in any torch
// release, so setup.py first compiles and links a probe that includes this very header against
// the torch being built for; only when that succeeds does it define MISS_EXT_HAVE_TORCH_BRGEMM
// and csrc/cpu/amx.cpp include it. Otherwise the build goes on with the portable kernels.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <cstdint>

#ifndef CPUBLAS_BRGEMM_BF16BF16F32  // torch's own marker for the overload below
#error "this torch's CPUBlas.h does not declare the bf16 x bf16 -> fp32 brgemm"
#endif

namespace miss_ext {
namespace cpu {
namespace torch_brgemm {

// Whether oneDNN can pack bf16 operands here (false on CPUs without the needed instructions).
inline bool could_pack() { return at::native::cpublas::could_pack(at::kBFloat16); }

// C (m x n, fp32, row stride ldc) = (or +=, when accumulate) A B; B VNNI-packed (k x n).
inline void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                 bool accumulate, const c10::BFloat16* a, const c10::BFloat16* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/true);
}

inline void release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

// fp32 x fp32 -> fp32 with a plain row-major B, where this torch declares it (its own marker);
// without it the fp32 products keep their bf16-piece and aten paths.
#ifdef CPUBLAS_BRGEMM_F32F32F32
#define MISS_EXT_HAVE_TORCH_BRGEMM_F32 1
inline void gemm_f32(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                     bool accumulate, const float* a, const float* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}
#endif

}  // namespace torch_brgemm
}  // namespace cpu
}  // namespace miss_ext
