#include "front/half_gemm.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace miss_ext {
namespace front {
namespace {

constexpr int64_t kUpcastElems = int64_t{1} << 22;  // fp32 elements of one upcast slab of b

// torch's own query (torch.ops.mkldnn._is_mkldnn_bf16_supported and its fp16 twin); a torch
// without it is taken to have native GEMMs, leaving aten's GEMM in charge.
// MISS_EXT_CPU_HALF_GEMM=upcast or =aten forces the choice (tests run both on any CPU).
bool native(const char* name) {
  if (const char* force = std::getenv("MISS_EXT_CPU_HALF_GEMM")) {
    const std::string f(force);
    if (f == "upcast") return false;
    if (f == "aten") return true;
    TORCH_CHECK(f.empty(), "miss_ext: MISS_EXT_CPU_HALF_GEMM must be 'upcast', 'aten' or unset (got '", f, "')");
  }
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  if (!handle.has_value()) return true;
  return handle->typed<bool()>().call();
}

// dst = a @ b (+ c) in fp32 on the exact upcast operands, rounded once, b upcast a column slab at a
// time. c is a row vector (a bias) or dst itself (accumulation): each slab of c is read before
// the same slab of dst is written.
void upcast_gemm(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, const at::Tensor* c) {
  const at::Tensor a32 = a.to(at::kFloat);
  const int64_t k = b.size(0), n = b.size(1);
  const int64_t width = std::max<int64_t>(1, kUpcastElems / std::max<int64_t>(1, k));
  for (int64_t c0 = 0; c0 < n; c0 += width) {
    const int64_t w = std::min(n, c0 + width) - c0;
    const at::Tensor b32 = b.narrow(1, c0, w).to(at::kFloat);
    dst.narrow(1, c0, w).copy_(c != nullptr ? at::addmm(c->narrow(-1, c0, w).to(at::kFloat), a32, b32)
                                            : at::mm(a32, b32));
  }
}

}  // namespace

bool half_gemm_emulated(const at::Tensor& t) {
  if (!t.device().is_cpu()) return false;
  if (t.scalar_type() == at::kBFloat16) {
    static const bool emulated = !native("mkldnn::_is_mkldnn_bf16_supported");
    return emulated;
  }
  if (t.scalar_type() == at::kHalf) {
    static const bool emulated = !native("mkldnn::_is_mkldnn_fp16_supported");
    return emulated;
  }
  return false;
}

void half_mm_out(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b,
                 const std::optional<at::Tensor>& bias) {
  if (half_gemm_emulated(a) && a.scalar_type() == b.scalar_type()) {
    upcast_gemm(dst, a, b, bias.has_value() ? &*bias : nullptr);
  } else if (bias.has_value()) {
    at::addmm_out(dst, *bias, a, b);
  } else {
    at::mm_out(dst, a, b);
  }
}

void half_addmm_(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b) {
  if (half_gemm_emulated(a) && a.scalar_type() == b.scalar_type()) {
    upcast_gemm(dst, a, b, &dst);
  } else {
    dst.addmm_(a, b);
  }
}

}  // namespace front
}  // namespace miss_ext
