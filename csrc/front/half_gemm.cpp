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

void half_mm_out(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b) {
  if (!half_gemm_emulated(a) || a.scalar_type() != b.scalar_type()) {
    at::mm_out(dst, a, b);
    return;
  }
  const at::Tensor a32 = a.to(at::kFloat);
  const int64_t k = b.size(0), n = b.size(1);
  const int64_t width = std::max<int64_t>(1, kUpcastElems / std::max<int64_t>(1, k));
  for (int64_t c0 = 0; c0 < n; c0 += width) {
    const int64_t w = std::min(n, c0 + width) - c0;
    dst.narrow(1, c0, w).copy_(at::mm(a32, b.narrow(1, c0, w).to(at::kFloat)));
  }
}

}  // namespace front
}  // namespace miss_ext
