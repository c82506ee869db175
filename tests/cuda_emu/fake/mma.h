// nvcuda::wmma emulated from its documented semantics (CUDA C++ Programming Guide, "Warp Matrix
// Functions"), 16x16x16 shapes with __half/__nv_bfloat16 inputs and float accumulators, the only
// ones csrc/cuda/ uses; anything else fails to compile here.
//
// A fragment holds the whole 16x16 tile in every lane, as floats (the hardware spreads it
// over the lanes in an unspecified layout; elementwise loops over num_elements still work).
//   matrix_a (M x K), matrix_b (K x N): element (i, j) at p[i * ldm + j] when row_major,
//   p[j * ldm + i] when col_major; accumulators likewise with mem_row_major/mem_col_major.
// Checked, as the guide requires: the pointer is 256-bit (32-byte) aligned, ldm is a multiple
// of 16 bytes, and all lanes of a warp pass the same pointer, ldm, layout and data.
// The product accumulates in float in k order; tensor cores may round differently, so tests
// compare with a tolerance.
#pragma once

#include <cstring>
#include <string>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "emu_aten.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emulator: only 16x16x16 WMMA fragments");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                 : std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "emulator: float accumulators and __half/__nv_bfloat16 inputs only");
  static_assert(std::is_same_v<Use, accumulator> == std::is_void_v<Layout>,
                "matrix_a/matrix_b fragments need row_major or col_major; accumulators take none");
  static constexpr int num_elements = 256;
  float x[256];
};

namespace detail {
enum Kind { kLoad = 1, kMma = 2, kStore = 3 };

inline void check_ptr_ld(const void* p, unsigned ld, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    emu::fail(std::string("WMMA ") + what + ": pointer not 256-bit (32-byte) aligned");
  if (ld * elem % 16 != 0)
    emu::fail(std::string("WMMA ") + what + ": ldm " + std::to_string(ld) + " is not a multiple of 16 bytes");
}

// Lanes of a warp must agree on the operation, its arguments and the data they see.
inline void agree(Kind kind, const void* p, unsigned ld, int layout, const float* data, const char* what) {
  bool first = false;
  emu::WarpRecord& r = emu::warp_record(kind, first);
  if (first) {
    r.ptr = p;
    r.ld = ld;
    r.layout = layout;
    memcpy(r.in[0], data, sizeof(r.in[0]));
  } else if (r.ptr != p || r.ld != ld || r.layout != layout) {
    emu::fail(std::string("WMMA ") + what + ": the lanes of a warp pass different pointers, ldm or layouts");
  } else if (memcmp(r.in[0], data, sizeof(r.in[0])) != 0) {
    emu::fail(std::string("WMMA ") + what +
              ": the lanes of a warp see different data (memory changed between them: a missing barrier?)");
  }
}

template <class L>
constexpr bool is_row() {
  return std::is_same_v<L, row_major>;
}
}  // namespace detail

template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::check_ptr_ld(p, ld, sizeof(T), "load_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[i * 16 + j] = static_cast<float>(detail::is_row<L>() ? p[i * ld + j] : p[j * ld + i]);
  detail::agree(detail::kLoad, p, ld, detail::is_row<L>() ? 0 : 1, f.x, "load_matrix_sync");
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ld, layout_t l) {
  detail::check_ptr_ld(p, ld, sizeof(float), "load_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i * 16 + j] = l == mem_row_major ? p[i * ld + j] : p[j * ld + i];
  detail::agree(detail::kLoad, p, ld, l == mem_row_major ? 2 : 3, f.x, "load_matrix_sync");
}

template <class Use, class T, class L, class V>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, const V& v) {
  for (float& e : f.x) e = static_cast<float>(static_cast<T>(v));
}

template <class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
              const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same_v<TA, TB>, "matrix_a and matrix_b must have the same element type");
  bool first = false;
  emu::WarpRecord& r = emu::warp_record(detail::kMma, first);
  const bool same = !first && memcmp(r.in[0], a.x, sizeof(a.x)) == 0 && memcmp(r.in[1], b.x, sizeof(b.x)) == 0 &&
                    memcmp(r.in[2], c.x, sizeof(c.x)) == 0;
  if (!first && !same) {
    emu::fail("WMMA mma_sync: the lanes of a warp hold different fragments");
  }
  if (!same) {  // the first lane computes; the others reuse its exact result
    memcpy(r.in[0], a.x, sizeof(a.x));
    memcpy(r.in[1], b.x, sizeof(b.x));
    memcpy(r.in[2], c.x, sizeof(c.x));
    for (int i = 0; i < 16; ++i) {
      float row[16];
      for (int j = 0; j < 16; ++j) row[j] = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) {
        const float aik = a.x[i * 16 + k];
        for (int j = 0; j < 16; ++j) row[j] += aik * b.x[k * 16 + j];
      }
      for (int j = 0; j < 16; ++j) r.out[i * 16 + j] = row[j];
    }
  }
  memcpy(d.x, r.out, sizeof(d.x));  // d may alias c
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t l) {
  detail::check_ptr_ld(p, ld, sizeof(float), "store_matrix_sync");
  detail::agree(detail::kStore, p, ld, l == mem_row_major ? 2 : 3, f.x, "store_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) (l == mem_row_major ? p[i * ld + j] : p[j * ld + i]) = f.x[i * 16 + j];
}

}  // namespace wmma
}  // namespace nvcuda
