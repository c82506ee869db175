#include "cpu/vec.h"

#include "cpu/convert.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MISS_EXT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace miss_ext {
namespace cpu {
namespace vec {
namespace {

inline float to_f32(uint16_t h) { return bf16_bits_to_float(h); }
inline uint16_t to_bf16(float f) { return float_to_bf16_bits(f); }

}  // namespace

MISS_EXT_MULTIVERSION void blocksum_bf16(const uint16_t* row, int64_t n, int64_t r, float* acc) {
  for (int64_t j0 = 0; j0 < n; j0 += r) {
    const int64_t len = n - j0 < r ? n - j0 : r;
    const uint16_t* x = row + j0;
    for (int64_t c = 0; c < len; ++c) acc[c] += to_f32(x[c]);
  }
}

MISS_EXT_MULTIVERSION void tile_bf16(const uint16_t* base, const float* s, int64_t r, int64_t n,
                                     uint16_t* out) {
  for (int64_t j0 = 0; j0 < n; j0 += r) {
    const int64_t len = n - j0 < r ? n - j0 : r;
    for (int64_t c = 0; c < len; ++c) out[j0 + c] = to_bf16(to_f32(base[j0 + c]) + s[c]);
  }
}

MISS_EXT_MULTIVERSION void add_bf16(const uint16_t* base, const float* p, int64_t n, uint16_t* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = to_bf16(to_f32(base[k]) + p[k]);
}

MISS_EXT_MULTIVERSION void transform_rows_bf16(const uint16_t* w, const float* p, int64_t ldp,
                                               const float* b, int64_t rows, int64_t r,
                                               uint16_t* out) {
  for (int64_t t = 0; t < rows; ++t, w += r, p += ldp, out += r) {
    for (int64_t c = 0; c < r; ++c) out[c] = to_bf16(to_f32(w[c]) + (p[c] + b[c]));
  }
}

namespace {

// One row of split_bf16, inlined into each multiversioned caller (and vectorized for its target).
inline void split_run(const float* f, int64_t n, int pieces, uint16_t* p1, uint16_t* p2,
                      uint16_t* p3) {
  if (pieces == 1) {
    for (int64_t k = 0; k < n; ++k) p1[k] = to_bf16(f[k]);
  } else if (pieces == 2) {
    for (int64_t k = 0; k < n; ++k) {
      const uint16_t h = to_bf16(f[k]);
      p1[k] = h;
      p2[k] = to_bf16(f[k] - to_f32(h));
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const uint16_t h = to_bf16(f[k]);
      const float rest = f[k] - to_f32(h);
      const uint16_t m = to_bf16(rest);
      p1[k] = h;
      p2[k] = m;
      p3[k] = to_bf16(rest - to_f32(m));
    }
  }
}

}  // namespace

MISS_EXT_MULTIVERSION void split_bf16(const float* f, int64_t n, int pieces, uint16_t* p1,
                                      uint16_t* p2, uint16_t* p3) {
  split_run(f, n, pieces, p1, p2, p3);
}

MISS_EXT_MULTIVERSION void split_bf16_rows(const float* f, int64_t rows, int64_t cols, int64_t ldf,
                                           int pieces, uint16_t* p1, uint16_t* p2, uint16_t* p3,
                                           int64_t ldp) {
  for (int64_t t = 0; t < rows; ++t) {
    split_run(f + t * ldf, cols, pieces, p1 + t * ldp, p2 + t * ldp, p3 ? p3 + t * ldp : nullptr);
  }
}

MISS_EXT_MULTIVERSION void split_sum_bf16_rows(const float* f, int64_t rows, int64_t cols,
                                               int64_t ldf, int pieces, uint16_t* p1, uint16_t* p2,
                                               uint16_t* p3, int64_t ldp, float* sum, int64_t lds) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* src = f + t * ldf;
    float* acc = sum + t * lds;
    for (int64_t c = 0; c < cols; ++c) acc[c] += src[c];
    split_run(src, cols, pieces, p1 + t * ldp, p2 ? p2 + t * ldp : nullptr, p3 ? p3 + t * ldp : nullptr);
  }
}

MISS_EXT_MULTIVERSION void copy_sum_rows_f32(const float* f, int64_t rows, int64_t cols,
                                             int64_t ldf, float* dst, int64_t ldd, float* sum,
                                             int64_t lds) {
  for (int64_t t = 0; t < rows; ++t) {
    const float* src = f + t * ldf;
    float* acc = sum + t * lds;
    float* d = dst + t * ldd;
    for (int64_t c = 0; c < cols; ++c) {
      d[c] = src[c];
      acc[c] += src[c];
    }
  }
}

MISS_EXT_MULTIVERSION void widen_rows_bf16(const uint16_t* src, int64_t rows, int64_t cols,
                                           int64_t lds, float* dst, int64_t ldd) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t c = 0; c < cols; ++c) dst[t * ldd + c] = to_f32(src[t * lds + c]);
}

MISS_EXT_MULTIVERSION void interleave_bf16(const uint16_t* a, const uint16_t* b, int64_t n,
                                           uint16_t* dst) {
  if (b) {
    for (int64_t k = 0; k < n; ++k) {
      dst[2 * k] = a[k];
      dst[2 * k + 1] = b[k];
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      dst[2 * k] = a[k];
      dst[2 * k + 1] = 0;
    }
  }
}

MISS_EXT_MULTIVERSION void interleave_panels_bf16(const uint16_t* a, const uint16_t* b, int64_t n,
                                                  int64_t panel, int64_t kp, int64_t k,
                                                  uint16_t* dst) {
  for (int64_t s = 0; s < n; s += panel) {
    const int64_t w = n - s < panel ? n - s : panel;
    uint16_t* d = dst + kp * s + (k / 2) * 2 * w;
    if (a && b) {
      // As 32-bit pairs (little-endian: a in the low half), a form the compiler vectorises;
      // the branchy element loop below does not vectorise.
      for (int64_t j = 0; j < w; ++j) {
        const uint32_t pair = static_cast<uint32_t>(a[s + j]) | (static_cast<uint32_t>(b[s + j]) << 16);
        std::memcpy(d + 2 * j, &pair, sizeof pair);
      }
      continue;
    }
    for (int64_t j = 0; j < w; ++j) {
      d[2 * j] = a ? a[s + j] : 0;
      d[2 * j + 1] = b ? b[s + j] : 0;
    }
  }
}

// One source row into two panel columns at a time: the row is read in sequence and each
// column written as 32-bit VNNI pairs (one per pair row, a panel row apart), so a block of
// kPairBlock pair rows keeps every column's lines in L1 while the rows go by. One pass over D
// and one over the panels, instead of a split, two 16-bit transposes and a pack.
MISS_EXT_MULTIVERSION void pack_split_columns_bf16(const float* d, int64_t r, int64_t ldd,
                                                   int64_t panel, int64_t kp,
                                                   int64_t kk0, int64_t kk1, uint16_t* dst) {
  constexpr int64_t kPairBlock = 32;
  const int64_t n = 2 * r;
  for (int64_t kb = kk0; kb < kk1; kb += kPairBlock) {
    const int64_t ke = kk1 - kb < kPairBlock ? kk1 : kb + kPairBlock;
    for (int64_t row = 0; row < r; ++row) {
      const float* src = d + row * ldd;
      // Column c of B lives in the panel starting at s = c - c % panel, width w, as 32-bit
      // pairs w apart.
      const int64_t s1 = row / panel * panel, s2 = (r + row) / panel * panel;
      const int64_t w1 = n - s1 < panel ? n - s1 : panel, w2 = n - s2 < panel ? n - s2 : panel;
      uint32_t* hi = reinterpret_cast<uint32_t*>(dst + kp * s1) + (row - s1);
      uint32_t* lo = reinterpret_cast<uint32_t*>(dst + kp * s2) + (r + row - s2);
      for (int64_t kk = kb; kk < ke; ++kk) {
        const float f0 = src[2 * kk], f1 = src[2 * kk + 1];
        const uint16_t h0 = to_bf16(f0), h1 = to_bf16(f1);
        const uint16_t l0 = to_bf16(f0 - to_f32(h0)), l1 = to_bf16(f1 - to_f32(h1));
        hi[kk * w1] = static_cast<uint32_t>(h0) | (static_cast<uint32_t>(h1) << 16);
        lo[kk * w2] = static_cast<uint32_t>(l0) | (static_cast<uint32_t>(l1) << 16);
      }
    }
  }
}

MISS_EXT_MULTIVERSION void interleave_blocks_bf16(const uint16_t* a, const uint16_t* b, int64_t blocks,
                                                  int64_t r, int64_t stride, uint16_t* dst) {
  for (int64_t j = 0; j < blocks; ++j) {
    const uint16_t* x = a + j * r;
    const uint16_t* y = b + j * r;
    uint16_t* d = dst + j * stride;
    // As 32-bit pairs (see interleave_panels_bf16): the form the compiler vectorises.
    for (int64_t c = 0; c < r; ++c) {
      const uint32_t pair = static_cast<uint32_t>(x[c]) | (static_cast<uint32_t>(y[c]) << 16);
      std::memcpy(d + 2 * c, &pair, sizeof pair);
    }
  }
}

namespace {

#if defined(__x86_64__)
// A full 16 x 16 tile: 16-, 32- and 64-bit interleaves transpose each 128-bit lane's 8 x 8
// blocks, then a lane permute joins the halves of every output row.
__attribute__((target("avx2"))) void transpose_tile16_avx2(const uint16_t* src, int64_t lds,
                                                            uint16_t* dst, int64_t ldd) {
  __m256i r[16], u[16], v[16], w[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * lds));
  for (int k = 0; k < 8; ++k) {
    u[2 * k] = _mm256_unpacklo_epi16(r[2 * k], r[2 * k + 1]);
    u[2 * k + 1] = _mm256_unpackhi_epi16(r[2 * k], r[2 * k + 1]);
  }
  for (int m = 0; m < 4; ++m) {
    v[4 * m + 0] = _mm256_unpacklo_epi32(u[4 * m], u[4 * m + 2]);
    v[4 * m + 1] = _mm256_unpackhi_epi32(u[4 * m], u[4 * m + 2]);
    v[4 * m + 2] = _mm256_unpacklo_epi32(u[4 * m + 1], u[4 * m + 3]);
    v[4 * m + 3] = _mm256_unpackhi_epi32(u[4 * m + 1], u[4 * m + 3]);
  }
  // w[g * 8 + c']: rows 8g..8g+7 of column c' (low lane) and c' + 8 (high lane).
  for (int g = 0; g < 2; ++g) {
    for (int k = 0; k < 4; ++k) {
      w[g * 8 + 2 * k] = _mm256_unpacklo_epi64(v[8 * g + k], v[8 * g + 4 + k]);
      w[g * 8 + 2 * k + 1] = _mm256_unpackhi_epi64(v[8 * g + k], v[8 * g + 4 + k]);
    }
  }
  for (int c = 0; c < 8; ++c) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * ldd), _mm256_permute2x128_si256(w[c], w[8 + c], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (c + 8) * ldd), _mm256_permute2x128_si256(w[c], w[8 + c], 0x31));
  }
}
#endif

// Blocks of `block` x `block` (in L1) of `tile` x `tile` register tiles; full tiles go to
// `fast` when the machine has AVX2, edges to the scalar loop. (A 32-bit version served a fused
// BAT GEMM that measured slower than transform + aten's GEMM, and went with it.)
template <typename T, typename Fast>
void transpose_blocked(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd,
                       int64_t block, int64_t tile, const Fast& fast) {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
#else
  constexpr bool avx2 = false;
#endif
  for (int64_t t0 = 0; t0 < rows; t0 += block) {
    for (int64_t c0 = 0; c0 < cols; c0 += block) {
      const int64_t t1 = std::min(rows, t0 + block), c1 = std::min(cols, c0 + block);
      // The next block down is `block` rows a stride apart: fetched while this one is transposed.
      for (int64_t t = t1; t < std::min(rows, t1 + block); ++t)
        prefetch_l2(src + t * lds + c0, (c1 - c0) * int64_t(sizeof(T)));
      for (int64_t t = t0; t < t1; t += tile) {
        for (int64_t c = c0; c < c1; c += tile) {
          const int64_t th = std::min(tile, t1 - t), cw = std::min(tile, c1 - c);
          if (avx2 && th == tile && cw == tile) {
            fast(src + t * lds + c, lds, dst + c * ldd + t, ldd);
          } else {
            for (int64_t i = 0; i < th; ++i)
              for (int64_t j = 0; j < cw; ++j) dst[(c + j) * ldd + t + i] = src[(t + i) * lds + c + j];
          }
        }
      }
    }
  }
}

}  // namespace

void transpose_u16(const uint16_t* src, int64_t rows, int64_t cols, int64_t lds, uint16_t* dst,
                   int64_t ldd) {
#if defined(__x86_64__)
  transpose_blocked(src, rows, cols, lds, dst, ldd, 64, 16, transpose_tile16_avx2);
#else
  transpose_blocked(src, rows, cols, lds, dst, ldd, 64, 16, [](const uint16_t*, int64_t, uint16_t*, int64_t) {});
#endif
}

}  // namespace vec
}  // namespace cpu
}  // namespace miss_ext
