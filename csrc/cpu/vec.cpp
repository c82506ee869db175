#include "cpu/vec.h"

#include <cstring>

#define MISS_EXT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

namespace miss_ext {
namespace cpu {
namespace vec {
namespace {

inline float to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

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
    if (base) {
      for (int64_t c = 0; c < len; ++c) out[j0 + c] = to_bf16(to_f32(base[j0 + c]) + s[c]);
    } else {
      for (int64_t c = 0; c < len; ++c) out[j0 + c] = to_bf16(s[c]);
    }
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
  if (pieces == 2) {
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
    for (int64_t j = 0; j < w; ++j) {
      d[2 * j] = a ? a[s + j] : 0;
      d[2 * j + 1] = b ? b[s + j] : 0;
    }
  }
}

MISS_EXT_MULTIVERSION void interleave_blocks_bf16(const uint16_t* a, const uint16_t* b, int64_t blocks,
                                                  int64_t r, int64_t stride, uint16_t* dst) {
  for (int64_t j = 0; j < blocks; ++j) {
    const uint16_t* x = a + j * r;
    const uint16_t* y = b + j * r;
    uint16_t* d = dst + j * stride;
    for (int64_t c = 0; c < r; ++c) {
      d[2 * c] = x[c];
      d[2 * c + 1] = y[c];
    }
  }
}

MISS_EXT_MULTIVERSION void add_f32(const float* src, int64_t n, float* dst) {
  for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

}  // namespace vec
}  // namespace cpu
}  // namespace miss_ext
