// The few ATen/c10 pieces that csrc/cuda/ and csrc/common/ use, for the CUDA emulation test.
// Only c10::Half and c10::BFloat16 come from the real torch headers (-I torch/include); the rest
// is a stand-in. A kernel that uses more of ATen fails to compile here: add the piece below.
//
// Every buffer (tensor storage or a kernel's at::empty workspace) sits between two 256-byte
// guard zones; buffers and guards start as 0xFF bytes, which is NaN in every floating dtype,
// so an element nobody wrote reads as NaN and a write past either end is seen when the
// buffer is checked or freed.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "emu_cuda.h"

namespace c10 {
enum class ScalarType { Float, Double, Half, BFloat16, Long, Undefined };
template <class T>
struct CppTypeToScalarType;
template <>
struct CppTypeToScalarType<float> {
  static constexpr ScalarType value = ScalarType::Float;
};
template <>
struct CppTypeToScalarType<double> {
  static constexpr ScalarType value = ScalarType::Double;
};
template <>
struct CppTypeToScalarType<c10::Half> {
  static constexpr ScalarType value = ScalarType::Half;
};
template <>
struct CppTypeToScalarType<c10::BFloat16> {
  static constexpr ScalarType value = ScalarType::BFloat16;
};
inline size_t elementSize(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return 4;
    case ScalarType::Double: return 8;
    case ScalarType::Long: return 8;
    default: return 2;
  }
}
inline const char* toString(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "Float";
    case ScalarType::Double: return "Double";
    case ScalarType::Half: return "Half";
    case ScalarType::BFloat16: return "BFloat16";
    default: return "Long";
  }
}
inline std::ostream& operator<<(std::ostream& o, ScalarType t) { return o << toString(t); }
}  // namespace c10

namespace emu {
// Set by the harness while a kernel launcher runs: a workspace it frees with a broken guard
// zone is an error of that call. (The harness checks its own tensors' guards itself.)
inline bool in_kernel_call = false;

struct Buffer {
  static constexpr size_t kGuard = 256;  // also the data alignment, like the CUDA allocator's
  unsigned char* base = nullptr;
  size_t bytes = 0;
  explicit Buffer(size_t n) : bytes(n) {
    const size_t total = (2 * kGuard + n + kGuard - 1) / kGuard * kGuard;
    base = static_cast<unsigned char*>(aligned_alloc(kGuard, total));
    if (!base) throw std::bad_alloc();
    memset(base, 0xFF, 2 * kGuard + n);
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  unsigned char* data() const { return base + kGuard; }
  size_t total() const { return 2 * kGuard + bytes; }
  bool guards_ok() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (base[i] != 0xFF || base[kGuard + bytes + i] != 0xFF) return false;
    return true;
  }
  ~Buffer() {
    if (in_kernel_call && !guards_ok())
      fail("out-of-bounds write into the guard zone of a " + std::to_string(bytes) + " B workspace");
    free(base);
  }
};
template <class... A>
std::string cat(const A&... a) {
  std::ostringstream s;
  ((s << a), ...);
  return s.str();
}
}  // namespace emu

namespace at {
using c10::ScalarType;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;
constexpr ScalarType kFloat = ScalarType::Float, kDouble = ScalarType::Double, kHalf = ScalarType::Half,
                     kBFloat16 = ScalarType::BFloat16, kLong = ScalarType::Long;

template <class T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<c10::Half> {
  using type = float;
};
template <>
struct OpMath<c10::BFloat16> {
  using type = float;
};
template <class T>
using opmath_type = typename OpMath<T>::type;

struct Device {
  int index = 0;
};
struct TensorOptions {
  ScalarType dt = kFloat;
  TensorOptions dtype(ScalarType t) const {
    TensorOptions o = *this;
    o.dt = t;
    return o;
  }
};

class Tensor {
 public:
  std::shared_ptr<emu::Buffer> buf;
  int64_t off = 0;  // storage offset, elements
  std::vector<int64_t> sz, sd;
  ScalarType dt = kFloat;

  bool defined() const { return static_cast<bool>(buf); }
  int64_t dim() const { return static_cast<int64_t>(sz.size()); }
  int64_t size(int64_t i) const { return sz.at(i < 0 ? i + dim() : i); }
  int64_t stride(int64_t i) const { return sd.at(i < 0 ? i + dim() : i); }
  const std::vector<int64_t>& sizes() const { return sz; }
  const std::vector<int64_t>& strides() const { return sd; }
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : sz) n *= s;
    return n;
  }
  int64_t storage_offset() const { return off; }
  size_t element_size() const { return c10::elementSize(dt); }
  ScalarType scalar_type() const { return dt; }
  TensorOptions options() const { return TensorOptions().dtype(dt); }
  Device device() const { return Device{}; }
  bool is_cuda() const { return true; }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (int64_t i = dim() - 1; i >= 0; --i) {
      if (sz[i] != 1 && sd[i] != expect) return false;
      expect *= sz[i];
    }
    return true;
  }
  void* data_ptr() const { return buf->data() + off * static_cast<int64_t>(element_size()); }
  template <class T>
  T* data_ptr() const {
    if (c10::CppTypeToScalarType<std::remove_cv_t<T>>::value != dt)
      throw std::runtime_error(emu::cat("data_ptr<T>() of a ", dt, " tensor with another T"));
    return reinterpret_cast<T*>(data_ptr());
  }
  template <class T>
  const T* const_data_ptr() const {
    return data_ptr<T>();
  }
  template <class T>
  T* mutable_data_ptr() const {
    return data_ptr<T>();
  }
  // Views and copies that the CUDA launchers' composites use (cuBLAS products around our
  // kernels: csrc/cuda/product.cu, bat_io_block_grad), with ATen's semantics: narrow and t are
  // views, contiguous and to return the tensor itself when nothing changes, else a new packed
  // tensor.
  Tensor narrow(int64_t d, int64_t start, int64_t length) const {
    if (d < 0) d += dim();
    if (start < 0 || length < 0 || start + length > sz.at(d)) throw std::runtime_error("narrow: out of range");
    Tensor v = *this;
    v.off += start * sd[d];
    v.sz[d] = length;
    return v;
  }
  Tensor t() const {
    if (dim() != 2) throw std::runtime_error("t(): expects a 2-D tensor");
    Tensor v = *this;
    std::swap(v.sz[0], v.sz[1]);
    std::swap(v.sd[0], v.sd[1]);
    return v;
  }
  Tensor contiguous() const;
  Tensor to(ScalarType t) const;
  Tensor& copy_(const Tensor& src);
  Tensor& zero_() {
    std::vector<int64_t> idx(sz.size(), 0);
    const int64_t n = numel();
    for (int64_t e = 0; e < n; ++e) {
      int64_t o = 0;
      for (size_t d = 0; d < sz.size(); ++d) o += idx[d] * sd[d];
      memset(static_cast<unsigned char*>(data_ptr()) + o * element_size(), 0, element_size());
      for (int64_t d = dim() - 1; d >= 0 && ++idx[d] == sz[d]; --d) idx[d] = 0;
    }
    return *this;
  }
};

// Element `offset` (from data_ptr()) of t, as a double; and storing v rounded to t's dtype (via
// float for the half types, as c10's conversions from double do).
inline double element(const Tensor& t, int64_t offset) {
  const void* p = t.data_ptr();
  switch (t.dt) {
    case kFloat: return static_cast<const float*>(p)[offset];
    case kDouble: return static_cast<const double*>(p)[offset];
    case kHalf: return static_cast<float>(static_cast<const c10::Half*>(p)[offset]);
    case kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[offset]);
    default: throw std::runtime_error("emulator: no elements of this dtype");
  }
}
inline void set_element(const Tensor& t, int64_t offset, double v) {
  void* p = t.data_ptr();
  switch (t.dt) {
    case kFloat: static_cast<float*>(p)[offset] = static_cast<float>(v); break;
    case kDouble: static_cast<double*>(p)[offset] = v; break;
    case kHalf: static_cast<c10::Half*>(p)[offset] = c10::Half(static_cast<float>(v)); break;
    case kBFloat16: static_cast<c10::BFloat16*>(p)[offset] = c10::BFloat16(static_cast<float>(v)); break;
    default: throw std::runtime_error("emulator: no elements of this dtype");
  }
}
// Offset from data_ptr() of logical element e (row-major over t's sizes).
inline int64_t offset_of(const Tensor& t, int64_t e) {
  int64_t o = 0;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    o += (e % t.sz[d]) * t.sd[d];
    e /= t.sz[d];
  }
  return o;
}

inline Tensor empty(std::vector<int64_t> sizes, TensorOptions o) {
  Tensor t;
  t.sz = sizes;
  t.dt = o.dt;
  t.sd.resize(sizes.size());
  int64_t s = 1;
  for (int64_t i = static_cast<int64_t>(sizes.size()) - 1; i >= 0; --i) {
    t.sd[i] = s;
    s *= sizes[i];
  }
  t.buf = std::make_shared<emu::Buffer>(static_cast<size_t>(s) * c10::elementSize(o.dt));
  return t;
}

inline Tensor empty_like(const Tensor& t) { return empty(t.sz, t.options()); }

inline Tensor& Tensor::copy_(const Tensor& src) {
  if (src.sz != sz) throw std::runtime_error("copy_: sizes differ");
  for (int64_t e = 0; e < numel(); ++e) set_element(*this, offset_of(*this, e), element(src, offset_of(src, e)));
  return *this;
}
inline Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  Tensor c = empty(sz, options());
  return c.copy_(*this);
}
inline Tensor Tensor::to(ScalarType t) const {
  if (t == dt) return *this;
  Tensor c = empty(sz, TensorOptions().dtype(t));
  return c.copy_(*this);
}

// cuBLAS products, as ATen checks and computes them: sums in double, rounded once to the
// result's dtype (cuBLAS accumulates in fp32, so its sums can differ in the last bits; the
// tests' tolerances cover that, not its rounding order).
inline void mm_into(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(0))
    throw std::runtime_error("mm: a (n, k) and b (k, m) expected");
  if (out.dim() != 2 || out.size(0) != a.size(0) || out.size(1) != b.size(1))
    throw std::runtime_error("mm: out must be (n, m)");
  const int64_t n = a.size(0), k = a.size(1), m = b.size(1);
  std::vector<double> av(n * k), bv(k * m);
  for (int64_t i = 0; i < n * k; ++i) av[i] = element(a, (i / k) * a.sd[0] + (i % k) * a.sd[1]);
  for (int64_t i = 0; i < k * m; ++i) bv[i] = element(b, (i / m) * b.sd[0] + (i % m) * b.sd[1]);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      double s = 0;
      for (int64_t q = 0; q < k; ++q) s += av[i * k + q] * bv[q * m + j];
      set_element(out, i * out.sd[0] + j * out.sd[1], s);
    }
}
inline Tensor mm(const Tensor& a, const Tensor& b) {
  if (a.dt != b.dt) throw std::runtime_error(emu::cat("mm: expected both operands in one dtype, got ", a.dt, " and ", b.dt));
  Tensor out = empty({a.size(0), b.size(1)}, a.options());
  mm_into(out, a, b);
  return out;
}
// mm.dtype: half-type operands with a float32 result (or the operands' own dtype).
inline Tensor mm(const Tensor& a, const Tensor& b, ScalarType out_dtype) {
  if (a.dt != b.dt) throw std::runtime_error(emu::cat("mm: expected both operands in one dtype, got ", a.dt, " and ", b.dt));
  if (!(out_dtype == a.dt || (out_dtype == kFloat && (a.dt == kHalf || a.dt == kBFloat16))))
    throw std::runtime_error(emu::cat("mm: out_dtype ", out_dtype, " must be the operands' (", a.dt, ") or float32 for half types"));
  Tensor out = empty({a.size(0), b.size(1)}, TensorOptions().dtype(out_dtype));
  mm_into(out, a, b);
  return out;
}
inline Tensor& mm_out(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.dt != b.dt || out.dt != a.dt)
    throw std::runtime_error(emu::cat("mm_out: expected one dtype, got ", a.dt, ", ", b.dt, " into ", out.dt));
  mm_into(out, a, b);
  return out;
}

namespace cuda {
struct DeviceProp {
  int multiProcessorCount = 132;  // an H100/H200
  int major = 9;
  int minor = 0;
  size_t sharedMemPerBlock = 48 * 1024;
};
inline DeviceProp device_prop;
inline const DeviceProp* getCurrentDeviceProperties() { return &device_prop; }
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(at::Device) {}
};
}  // namespace cuda
}  // namespace c10

#define TORCH_CHECK(cond, ...)                                                                  \
  do {                                                                                          \
    if (!(cond)) throw std::runtime_error(::emu::cat("TORCH_CHECK(" #cond ") failed: ", ##__VA_ARGS__)); \
  } while (0)
// The launch error of CUDA: an emulator error stops the kernel call here.
#define C10_CUDA_KERNEL_LAUNCH_CHECK()                                     \
  do {                                                                     \
    if (::emu::has_error()) throw std::runtime_error(::emu::error_text);   \
  } while (0)

// EMU_DTYPES (a bit mask: 1 float, 2 double, 4 half, 8 bfloat16) leaves the other dtypes out of
// every dispatch; a mutant harness (tests/test_cuda_emulation.py) compiles its mutated file
// for the dtypes its run uses only. Such units are built without the precompiled header.
#ifndef EMU_DTYPES
#define EMU_DTYPES 15
#endif
#define EMU_DISPATCH_CASE(BIT, ST, T, ...)                                                  \
  case ST: {                                                                                \
    if constexpr ((EMU_DTYPES & BIT) != 0) {                                                \
      using scalar_t = T;                                                                   \
      return __VA_ARGS__();                                                                 \
    } else {                                                                                \
      throw std::runtime_error("emulator: this harness was built without " #T " (EMU_DTYPES)"); \
    }                                                                                       \
  }
#define AT_DISPATCH_FLOATING_TYPES_AND2(A, B, TYPE, NAME, ...)                                          \
  [&] {                                                                                                  \
    static_assert((A == at::kHalf && B == at::kBFloat16) || (A == at::kBFloat16 && B == at::kHalf),      \
                  "emulator: only the Half/BFloat16 pair is dispatched");                                \
    switch (TYPE) {                                                                                      \
      EMU_DISPATCH_CASE(1, at::kFloat, float, __VA_ARGS__)                                               \
      EMU_DISPATCH_CASE(2, at::kDouble, double, __VA_ARGS__)                                             \
      EMU_DISPATCH_CASE(4, at::kHalf, c10::Half, __VA_ARGS__)                                            \
      EMU_DISPATCH_CASE(8, at::kBFloat16, c10::BFloat16, __VA_ARGS__)                                    \
      default:                                                                                           \
        throw std::runtime_error(std::string(NAME) + ": unsupported dtype");                             \
    }                                                                                                    \
  }()
