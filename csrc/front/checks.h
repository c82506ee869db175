// What the family front ends (csrc/front/<family>.cpp) share: argument checks with messages
// that name the argument and the fix, the dtype policy of mixed precision, the row layout the
// kernels take, and the routing of a kernel call to the input's device.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <vector>

#include "common/kernels.h"

// Routes a kernel call to the device of `t`. A CUDA tensor only reaches a front end when the
// CUDA kernels were built (they are registered under the CUDA key only then).
#ifdef MISS_EXT_WITH_CUDA
#define MISS_EXT_ON_DEVICE(t, kernel, ...) \
  ((t).is_cuda() ? ::miss_ext::cuda::kernel(__VA_ARGS__) : ::miss_ext::cpu::kernel(__VA_ARGS__))
#else
#define MISS_EXT_ON_DEVICE(t, kernel, ...) ::miss_ext::cpu::kernel(__VA_ARGS__)
#endif

// The front ends call aten GEMMs on inputs whose dtypes they chose; a live autocast would recast
// those calls and break the kernels' dtype contract, so every operator runs with autocast off.
#define MISS_EXT_NO_AUTOCAST \
  c10::impl::ExcludeDispatchKeyGuard no_autocast_guard(c10::autocast_dispatch_keyset)

namespace miss_ext {
namespace front {

// float32, float64, bfloat16 or float16: the dtypes every kernel is built for.
bool is_supported_float(at::ScalarType t);

void check_float(const char* op, const char* name, const at::Tensor& t);
void check_same_device(const char* op, const char* name_a, const at::Tensor& a,
                       const char* name_b, const at::Tensor& b);
void check_same_dtype(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b);
// `shape` is the expected shape in words, quoted in the message.
void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
               const char* shape);
void check_rank(const char* op, const char* name, int64_t r);

// Whether `wide` holds every value of `narrow` (the mixed-precision pairs: a half type with
// float32/float64, float32 with float64, or the same dtype).
bool holds(at::ScalarType narrow, at::ScalarType wide);

// The block precision of a standard/mini op: the block's dtype, which must hold x's.
void check_block_holds(const char* op, const char* x_name, const at::Tensor& x,
                       const at::Tensor& block);

// The dropout probability and seed tensor of an op, checked, as the kernels take them.
DropoutArgs dropout_args(const char* op, double p, const at::Tensor& seed);

// The linear layer's optional bias, checked (float, x's device, shape (out_features,)) and cast
// to x's dtype; nullopt when there is none.
std::optional<at::Tensor> checked_bias(const char* op, const at::Tensor& x,
                                       const std::optional<at::Tensor>& bias, int64_t out_f);

// (..., f) -> (N, f) with unit stride along features; copies only when the view cannot.
at::Tensor as_rows(const at::Tensor& t);

// t's shape with the last dimension replaced by `last`.
std::vector<int64_t> with_last(const at::Tensor& t, int64_t last);

// The block sum of x into `out_dtype` (x's dtype or a wider float: x is never copied); the
// blocksum ops and the first step of miss_linear (defined in front/blocksum.cpp).
at::Tensor blocksum_into(const char* op, const at::Tensor& x, int64_t r, const DropoutArgs& drop,
                         at::ScalarType out_dtype);

}  // namespace front
}  // namespace miss_ext
