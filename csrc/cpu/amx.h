// bf16 x bf16 -> fp32 matrix products on oneDNN's batch-reduce GEMM micro-kernel (AMX or
// AVX512-BF16), as shipped inside torch (at::native::cpublas::brgemm).
//
// Why: the mixed-precision paths (bf16 base, fp32 adapter blocks) need products of bf16 data
// whose result is NOT rounded to bf16. aten's bf16 GEMM can only return bf16, and an fp32 GEMM
// runs several times slower than the bf16 one on AMX machines (2.5x on AVX512-BF16 ones). A
// product with one fp32 operand is done as a sum of products with its bf16 pieces (hi + lo, see
// split_bf16), each exact in fp32, so the result keeps 16 of fp32's 24 mantissa bits of that
// operand before any rounding the caller does.
//
// Layout: the B operand of C = A B (K x N) is packed in VNNI order, in column panels of at
// most kPanel columns: element (k, n) of a panel of width w is at (k / 2) * 2w + 2n + k % 2,
// K padded to even with zeros. A is row-major bf16 with any row stride and at least Kp columns
// (the padding column, when K is odd, must be zero).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace miss_ext {
namespace cpu {
namespace amx {

using bf16 = c10::BFloat16;

constexpr int64_t kPanel = 64;

// True when the micro-kernel runs here and gives right answers (probed once, on first use).
// MISS_EXT_CPU_BRGEMM=0 in the environment turns it off (the fp32 fallbacks then run).
bool available();

// Why available() says what it says: "active", or "off: <reason>" (the CPU, the environment
// variable, the self-test), or "not compiled: <reason>" (this torch's brgemm failed setup.py's
// build probe). build_info() reports it.
const std::string& status();

// Whether a product with N output columns can use it (panels must be multiples of 16 wide).
inline bool width_ok(int64_t n) { return n > 0 && n % 16 == 0; }

inline int64_t padded_k(int64_t k) { return k + (k & 1); }

// The packed B operand, reusable: reset() lays out another shape in the same storage when it
// fits, so a task packing many small operands allocates once.
class Panels {
 public:
  Panels() = default;
  Panels(int64_t k, int64_t n) { reset(k, n); }
  void reset(int64_t k, int64_t n);
  int64_t k() const { return k_; }
  int64_t kp() const { return kp_; }
  int64_t n() const { return n_; }
  int64_t count() const { return (n_ + kPanel - 1) / kPanel; }
  int64_t start(int64_t p) const { return p * kPanel; }
  int64_t width(int64_t p) const { return std::min(kPanel, n_ - p * kPanel); }
  const bf16* panel(int64_t p) const { return data_ + kp_ * start(p); }
  // For packers that fill panel p themselves (the layout above).
  bf16* mutable_panel(int64_t p) { return data_ + kp_ * start(p); }
  // Packs rows [k0, k1) (k0 even) of every panel from row(k), a pointer to the N values of row k
  // of B, or null for a zero row. Rows past K are zero.
  template <typename RowFn>
  void pack_rows(int64_t k0, int64_t k1, const RowFn& row) {
    for (int64_t k = k0; k < k1; k += 2) {
      const bf16* r0 = k < k_ ? row(k) : nullptr;
      const bf16* r1 = k + 1 < k_ ? row(k + 1) : nullptr;
      pack_pair(k, r0, r1);
    }
  }
  // Packs the row pair (k, k + 1) (k even) of every panel from r0/r1 (null: zeros), which hold
  // the N values of their rows.
  void pack_pair(int64_t k, const bf16* r0, const bf16* r1);

 private:
  int64_t k_ = 0, kp_ = 0, n_ = 0;
  at::Tensor storage_;
  bf16* data_ = nullptr;
};

// C[:, start(p) - col0 ...] (M rows, fp32, row stride ldc) = (or +=, when accumulate) A @ B for
// the panels [p0, p1) of B. A: M x B.kp() bf16, row stride lda. One thread; call release() when
// the thread is done with a batch of calls.
void gemm(int64_t m, const bf16* a, int64_t lda, const Panels& b, int64_t p0, int64_t p1,
          float* c, int64_t ldc, bool accumulate, int64_t col0 = 0);

// Frees the micro-kernel's per-thread hardware state (the AMX tile configuration).
void release();

// fp32 x fp32 -> fp32 products on the same micro-kernel library (AVX-512 FMA: no bf16 rounding
// anywhere), B plain row-major, no packing. Why: where bf16 runs on AVX512-BF16 rather than AMX,
// an fp32 product costs twice a bf16 one, not six times, so one fp32 product beats three bf16
// pieces; and at r-wide shapes it beats aten's fp32 mm (measured on a Zen 5: 200-220 GFLOP/s a
// core against aten's 80-90; not measured on an AMX machine). True where available() is, this
// torch declares the fp32 brgemm and its own self-test passes.
bool fp32_available();

// Whether the bf16 micro-kernel runs on AMX tiles (then bf16 pieces beat one fp32 product).
bool tiles();

// C (M x N, row stride ldc) = (or +=, when accumulate) A B, all fp32: A M x K (row stride lda),
// B K x N (row stride ldb). One thread; only where fp32_available().
void gemm_f32(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate);

}  // namespace amx
}  // namespace cpu
}  // namespace miss_ext
