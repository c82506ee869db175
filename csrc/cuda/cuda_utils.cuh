// Helpers shared by the CUDA kernels: vector access, launch sizing, the dropout mask.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/kernels.h"
#include "common/philox.h"

namespace miss_ext {
namespace cuda {
namespace detail {

constexpr int kThreads = 256;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One 16-byte (or narrower, when N * sizeof(T) < 16) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Elements per 16-byte access.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Grid for a grid-stride loop over `items` work items of `per_block` each: enough blocks to
// fill the device several times over, never zero, never above the grid limit.
inline unsigned grid_stride_blocks(int64_t items, int64_t per_block) {
  const int64_t want = std::max<int64_t>(1, ceil_div(items, per_block));
  return static_cast<unsigned>(std::min<int64_t>(want, int64_t(sm_count()) * 32));
}

// Blocks for a kernel with one block per work item (or a grid-stride loop over the rest).
inline unsigned capped_blocks(int64_t blocks) {
  return static_cast<unsigned>(std::clamp<int64_t>(blocks, 1, INT_MAX));
}

// Accumulation type of a kernel that reads `in_t` and writes `out_t` (mixed precision: one of
// them may be wider): double when either is double, else float, as the CPU kernels' acc_of.
template <typename in_t, typename out_t>
using acc_of = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>,
                                  double, float>;

// Calls fn(wide_t{}) for the dtype `wide`, which must be narrow_t's own or a wider float that
// holds it (float32 for the half types, float64 for all): the mixed-precision pairs of
// kernels.h. Only those pairs are instantiated.
template <typename narrow_t, typename F>
void dispatch_wider(at::ScalarType wide, const char* op, const F& fn) {
  if (wide == c10::CppTypeToScalarType<narrow_t>::value) return fn(narrow_t{});
  if constexpr (std::is_same_v<narrow_t, at::Half> || std::is_same_v<narrow_t, at::BFloat16>) {
    if (wide == at::kFloat) return fn(float{});
  }
  if constexpr (!std::is_same_v<narrow_t, double>) {
    if (wide == at::kDouble) return fn(double{});
  }
  TORCH_CHECK(false, "miss_ext.", op, " (CUDA): internal error: dtype ", wide, " does not hold ",
              c10::CppTypeToScalarType<narrow_t>::value);
}

// a * b rounded on its own: nvcc would otherwise fuse a following add into an FMA, and the
// CPU kernels (no FMA) would then differ in the last bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// The kernel-side view of DropoutArgs. threshold/scale come from philox.h so the host and
// the CPU kernels agree on them exactly.
struct Mask {
  uint64_t seed = 0;
  uint64_t threshold = 0;
  double scale = 1.0;  // cast to the accumulation type at use, as the CPU kernels do
};

inline Mask make_mask(const DropoutArgs& d) {
  Mask m;
  m.seed = d.seed;
  m.threshold = dropout_threshold(d.p);
  m.scale = dropout_keep_scale(d.p);
  return m;
}

// p == 0 keeps every element and scales by exactly 1, so it can take the mask-free path.
inline bool dropout_active(const DropoutArgs& d) { return d.enabled && d.p > 0.0; }

// w.v[k] for a run-time k without sending w to local memory.
__device__ __forceinline__ uint32_t philox_word(const Philox4& w, int k) {
  return k == 0 ? w.v[0] : k == 1 ? w.v[1] : k == 2 ? w.v[2] : w.v[3];
}

// Keep bits (bit e for element idx + e) of N consecutive logical elements. One Philox call
// serves four elements; the loop is rolled so the generator is inlined only once.
template <int N>
__device__ __forceinline__ uint32_t keep_bits(const Mask& m, uint64_t idx) {
  uint32_t bits = 0;
  int e = 0;
  while (e < N) {
    const uint64_t i = idx + e;
    const Philox4 w = philox4x32_10(m.seed, i / 4);
    for (int word = static_cast<int>(i % 4); word < 4 && e < N; ++word, ++e) {
      if (dropout_keep(philox_word(w, word), m.threshold)) bits |= 1u << e;
    }
  }
  return bits;
}

}  // namespace detail
}  // namespace cuda
}  // namespace miss_ext
