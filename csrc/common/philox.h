// Counter-based dropout mask shared by the CPU and CUDA kernels.
//
// The mask of element `idx` (its index in the logical, row-major (N, features) view of the
// input, independent of strides and device) is a pure function of (seed, idx), so the
// backward pass regenerates it instead of storing it, and a CUDA kernel reproduces the CPU
// mask bit for bit.
//
// Generator: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3").
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(idx / 4), hi32(idx / 4), 0, 0)
//   word    = output[idx % 4]
//   keep    = word >= threshold,  threshold = dropout_threshold(p)
// so each Philox call serves four consecutive elements.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MISS_HD __host__ __device__ __forceinline__
#else
#define MISS_HD inline
#endif

namespace miss_ext {

struct Philox4 {
  uint32_t v[4];
};

MISS_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Four 32-bit random words for counter block `block` (= idx / 4) under `seed`.
MISS_HD Philox4 philox4x32_10(uint64_t seed, uint64_t block) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32);
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  Philox4 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// Elements whose word is below the threshold are dropped: P(drop) = threshold / 2^32.
// p = 1 drops everything (threshold saturates and keep_scale is 0).
MISS_HD uint64_t dropout_threshold(double p) {
  if (p <= 0.0) return 0;
  if (p >= 1.0) return 0x100000000ull;
  return static_cast<uint64_t>(p * 4294967296.0);
}

// In double so float64 inputs get 1 / (1 - p) to full precision; kernels cast it to their
// accumulation type.
MISS_HD double dropout_keep_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

MISS_HD bool dropout_keep(uint32_t word, uint64_t threshold) {
  return static_cast<uint64_t>(word) >= threshold;
}

}  // namespace miss_ext
