// Large CPU temporaries (a BAT layer's W', packed operands) from a small cache of reused buffers.
//
// A fresh multi-megabyte allocation is mapped on first touch, one 4 KB page fault at a time;
// measured here, filling a fresh 32 MB buffer costs about ten times filling a reused one, which
// for BAT at few tokens (W' made twice per step) is as much as the GEMMs. Buffers of at least
// kMinBytes come from here: backed by transparent huge pages where the kernel allows it, and
// kept after use (at most kMaxCached of them) for the next request that fits. Everything else
// goes to the ordinary allocator. MISS_EXT_CPU_WORKSPACE=0 turns the cache off (huge pages
// stay); miss_ext.empty_cache() frees the kept buffers.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

namespace miss_ext {
namespace cpu {

constexpr int64_t kMinBytes = int64_t{1} << 21;
constexpr int kMaxCached = 4;

// An uninitialised CPU tensor of `sizes` and `dtype`, contiguous.
at::Tensor workspace_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees every cached buffer; returns the bytes released.
int64_t workspace_release();

// Bytes currently held by cached (unused) buffers.
int64_t workspace_cached_bytes();

// A kernel's per-call scratch array, left uninitialised: every element is written before it is
// read, so the zero fill of a std::vector is wasted work on every call (hundreds of KB a call in
// the BAT kernels).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(n > 0 ? new T[static_cast<size_t>(n)] : nullptr) {}
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }

 private:
  std::unique_ptr<T[]> data_;
};

}  // namespace cpu
}  // namespace miss_ext
