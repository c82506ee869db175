// bf16 x bf16 -> fp32 matrix products on oneDNN's batch-reduce GEMM micro-kernel (AMX or
// AVX512-BF16), as shipped inside torch (at::native::cpublas::brgemm).
//
// Why: the mixed-precision paths (bf16 base, fp32 adapter blocks) need products of bf16 data
// whose result is NOT rounded to bf16. aten's bf16 GEMM can only return bf16, and an fp32 GEMM
// runs several times slower than the bf16 one on AMX machines. A product with one fp32 operand
// is done as a sum of products with its bf16 pieces (hi + lo, see split_bf16), each exact in
// fp32, so the result keeps 16 of fp32's 24 mantissa bits of that operand before any rounding
// the caller does.
//
// Layout: the B operand of C = A B (K x N) is packed in VNNI order, in column panels of at
// most kPanel columns: element (k, n) of a panel of width w is at (k / 2) * 2w + 2n + k % 2,
// K padded to even with zeros. A is row-major bf16 with any row stride and at least Kp columns
// (the padding column, when K is odd, must be zero).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace miss_ext {
namespace cpu {
namespace amx {

using bf16 = c10::BFloat16;

constexpr int64_t kPanel = 64;

// True when the micro-kernel runs here and gives right answers (probed once, on first use).
// MISS_EXT_CPU_BRGEMM=0 in the environment turns it off (the fp32 fallbacks then run).
bool available();

// Whether a product with N output columns can use it (panels must be multiples of 16 wide).
inline bool width_ok(int64_t n) { return n > 0 && n % 16 == 0; }

inline int64_t padded_k(int64_t k) { return k + (k & 1); }

inline uint16_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}
inline float float_of(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// f as a sum of n bf16 pieces, each the rounded rest of the ones before: two hold 16 of f's
// 24 mantissa bits, three hold f exactly (barring results below bf16's normal range).
inline void split_bf16(float f, bf16* pieces, int n, int64_t stride = 1) {
  for (int i = 0; i < n; ++i) {
    const uint16_t h = bits_of(f);
    pieces[i * stride].x = h;
    f -= float_of(h);
  }
}

// The packed B operand.
class Panels {
 public:
  Panels(int64_t k, int64_t n);
  int64_t k() const { return k_; }
  int64_t kp() const { return kp_; }
  int64_t n() const { return n_; }
  int64_t count() const { return static_cast<int64_t>(start_.size()); }
  int64_t start(int64_t p) const { return start_[p]; }
  int64_t width(int64_t p) const { return width_[p]; }
  bf16* panel(int64_t p) { return data_ + offset_[p]; }
  const bf16* panel(int64_t p) const { return data_ + offset_[p]; }
  // Packs rows [k0, k1) (k0 even) of every panel from row(k), a pointer to the N values of row k
  // of B, or null for a zero row. Rows past K are zero.
  template <typename RowFn>
  void pack_rows(int64_t k0, int64_t k1, const RowFn& row) {
    for (int64_t k = k0; k < k1; k += 2) {
      const bf16* r0 = k < k_ ? row(k) : nullptr;
      const bf16* r1 = k + 1 < k_ ? row(k + 1) : nullptr;
      for (int64_t p = 0; p < count(); ++p) pack_pair(p, k, r0, r1);
    }
  }
  // Packs the row pair (k, k + 1) of panel p (k even) from r0/r1 (null: zeros), which hold
  // the N values of their rows.
  void pack_pair(int64_t p, int64_t k, const bf16* r0, const bf16* r1);

 private:
  int64_t k_, kp_, n_;
  at::Tensor storage_;
  bf16* data_ = nullptr;
  std::vector<int64_t> start_, width_, offset_;
};

// C[:, start(p) - col0 ...] (M rows, fp32, row stride ldc) = (or +=, when accumulate) A @ B for
// the panels [p0, p1) of B. A: M x B.kp() bf16, row stride lda. One thread; call release() when
// the thread is done with a batch of calls.
void gemm(int64_t m, const bf16* a, int64_t lda, const Panels& b, int64_t p0, int64_t p1,
          float* c, int64_t ldc, bool accumulate, int64_t col0 = 0);

// Frees the micro-kernel's per-thread hardware state (the AMX tile configuration).
void release();

}  // namespace amx
}  // namespace cpu
}  // namespace miss_ext
