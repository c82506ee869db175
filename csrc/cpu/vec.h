// The bfloat16 <-> float32 loops of the mixed-precision CPU kernels, compiled for AVX-512, AVX2
// and a portable baseline (picked at load time): the extension itself is built for baseline
// x86-64, where these passes over activation- and weight-sized data would run SSE2-wide.
// bfloat16 values are raw uint16_t bits; rounding is to nearest even, NaN stays NaN.
#pragma once

#include <cstdint>

namespace miss_ext {
namespace cpu {
namespace vec {

// Asks for [p, p + bytes) in L2, a cache line at a time: for a read the hardware prefetcher does
// not keep ahead of (rows a stride apart), issued while other work runs.
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// acc[c] += row[j * r + c] over the whole row (n values; the last block may be partial).
void blocksum_bf16(const uint16_t* row, int64_t n, int64_t r, float* acc);

// out[k] = bf16(base[k] + s[k % r]) for k < n.
void tile_bf16(const uint16_t* base, const float* s, int64_t r, int64_t n, uint16_t* out);

// out[k] = bf16(base[k] + p[k]) for k < n.
void add_bf16(const uint16_t* base, const float* p, int64_t n, uint16_t* out);

// Rows of r: out[t, c] = bf16(w[t, c] + (p[t, c] + b[c])), p with row stride ldp, b one row
// shared by all `rows` rows (the BAT transform's epilogue).
void transform_rows_bf16(const uint16_t* w, const float* p, int64_t ldp, const float* b,
                         int64_t rows, int64_t r, uint16_t* out);

// f[k] = p1[k] + p2[k] (+ p3[k]): `pieces` (1, 2 or 3) bf16 pieces, each the rounded rest of the
// ones before (three hold any normal float exactly; one is f rounded). Unused pieces may be null.
void split_bf16(const float* f, int64_t n, int pieces, uint16_t* p1, uint16_t* p2, uint16_t* p3);

// The same over `rows` rows of `cols` values: source row t at f + t * ldf, its pieces at
// p_q + t * ldp.
void split_bf16_rows(const float* f, int64_t rows, int64_t cols, int64_t ldf, int pieces,
                     uint16_t* p1, uint16_t* p2, uint16_t* p3, int64_t ldp);

// split_bf16_rows that also adds each source row t into sum + t * lds (one pass over f).
void split_sum_bf16_rows(const float* f, int64_t rows, int64_t cols, int64_t ldf, int pieces,
                         uint16_t* p1, uint16_t* p2, uint16_t* p3, int64_t ldp, float* sum,
                         int64_t lds);

// dst row t (at dst + t * ldd) = f row t, and f row t added into sum + t * lds (cols values a
// row): split_sum_bf16_rows for an fp32 product's operand (no split).
void copy_sum_rows_f32(const float* f, int64_t rows, int64_t cols, int64_t ldf, float* dst,
                       int64_t ldd, float* sum, int64_t lds);

// dst[t * ldd + c] = float(src[t * lds + c]) for t < rows, c < cols (exact).
void widen_rows_bf16(const uint16_t* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                     int64_t ldd);

// dst[2k] = a[k], dst[2k + 1] = b[k] (b null: 0), for k < n: a row pair in VNNI order.
void interleave_bf16(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* dst);

// Row pair k, k + 1 (k even; a/b null: zeros) of a VNNI-packed matrix stored in column panels of
// `panel` columns (the last may be narrower), each panel kp rows deep: element (k, n) of the
// panel starting at column s, of width w, is at kp * s + (k / 2) * 2w + 2 (n - s) + k % 2.
void interleave_panels_bf16(const uint16_t* a, const uint16_t* b, int64_t n, int64_t panel,
                            int64_t kp, int64_t k, uint16_t* dst);

// The B operand [p1(D) | p2(D)]^T (K = kp, N = 2r) in the panel layout above, packed
// straight from D (r x kp, fp32, row stride ldd; kp even): column c < r holds piece 1
// of D's row c, column r + c piece 2 (split_bf16's two pieces). Writes the row pairs [kk0, kk1)
// (pair kk is rows 2kk, 2kk + 1) of every panel; dst is the panels' storage.
void pack_split_columns_bf16(const float* d, int64_t r, int64_t ldd, int64_t panel, int64_t kp,
                             int64_t kk0, int64_t kk1, uint16_t* dst);

// `blocks` blocks of r values of two rows a and b, interleaved (VNNI pairs) into dst + j * stride
// for block j: dst[j * stride + 2c] = a[j r + c], dst[j * stride + 2c + 1] = b[j r + c].
void interleave_blocks_bf16(const uint16_t* a, const uint16_t* b, int64_t blocks, int64_t r,
                            int64_t stride, uint16_t* dst);

// dst[c * ldd + t] = src[t * lds + c] for t < rows, c < cols: a transpose of 16-bit values
// (16 x 16 register tiles on AVX2 machines).
void transpose_u16(const uint16_t* src, int64_t rows, int64_t cols, int64_t lds, uint16_t* dst,
                   int64_t ldd);

}  // namespace vec
}  // namespace cpu
}  // namespace miss_ext
