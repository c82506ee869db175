// Element conversions for the CPU kernels. bfloat16 goes through its raw bits so loops that
// convert it vectorize (c10::BFloat16's own conversion, with its NaN branch, stays scalar).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace miss_ext {
namespace cpu {

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// Accumulation type of a kernel that reads `in_t` and writes `out_t`: double when either is
// double, else float.
template <typename in_t, typename out_t>
using acc_of = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>,
                                  double, float>;

template <typename acc_t, typename T>
inline acc_t load(const T* p) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return static_cast<acc_t>(bf16_bits_to_float(reinterpret_cast<const uint16_t*>(p)[0]));
  } else {
    return static_cast<acc_t>(*p);
  }
}

template <typename T, typename acc_t>
inline void store(T* p, acc_t v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(p)[0] = float_to_bf16_bits(static_cast<float>(v));
  } else {
    *p = static_cast<T>(v);
  }
}

}  // namespace cpu
}  // namespace miss_ext
