// The one registration file: the operator library, its per-device implementations (each family
// contributes its schemas and functions, csrc/front/families.h), and the small pybind11 module
// `miss_ext._C` (build information only; operators go through torch.ops.miss_ext, never through
// pybind11).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/amx.h"
#include "cpu/workspace.h"
#include "front/families.h"

#ifndef MISS_EXT_TORCH_VERSION
#define MISS_EXT_TORCH_VERSION "unknown"
#endif
#ifndef MISS_EXT_CUDA_ARCHS
#define MISS_EXT_CUDA_ARCHS ""
#endif

// Every family's front end (csrc/front/<family>.cpp) holds its operators' schemas and the
// functions that implement them; the device-neutral front ends route to the CPU or CUDA kernel
// themselves, so the CPU and CUDA keys register the same functions. Definition order is the
// operators' order in torch.ops.miss_ext.
TORCH_LIBRARY(miss_ext, m) {
  miss_ext::front::define_blocksum(m);
  miss_ext::front::define_bat(m);
  miss_ext::front::define_product(m);
  miss_ext::front::define_merge(m);
  miss_ext::front::define_gathered(m);
}

#define MISS_EXT_REGISTER_ALL(m)     \
  miss_ext::front::impl_blocksum(m); \
  miss_ext::front::impl_bat(m);      \
  miss_ext::front::impl_product(m);  \
  miss_ext::front::impl_merge(m);    \
  miss_ext::front::impl_gathered(m)

TORCH_LIBRARY_IMPL(miss_ext, CPU, m) { MISS_EXT_REGISTER_ALL(m); }

#ifdef MISS_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(miss_ext, CUDA, m) { MISS_EXT_REGISTER_ALL(m); }
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = MISS_EXT_TORCH_VERSION;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#ifdef MISS_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = MISS_EXT_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
#endif
  // Which CPU paths run: torch's brgemm micro-kernel (AMX) for the bf16 mixed-precision GEMMs,
  // and the instruction set the bf16 conversion loops (target_clones) were dispatched to.
  info["cpu_brgemm"] = miss_ext::cpu::amx::available();
  info["cpu_brgemm_status"] = miss_ext::cpu::amx::status();
  // Its fp32 products (the fp32-block products where no bf16 piece is cheaper), and whether its
  // bf16 runs on AMX tiles (there bf16 pieces beat any fp32 product).
  info["cpu_brgemm_fp32"] = miss_ext::cpu::amx::fp32_available();
  info["cpu_brgemm_amx"] = miss_ext::cpu::amx::available() && miss_ext::cpu::amx::tiles();
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  info["cpu_vector_isa"] = __builtin_cpu_supports("x86-64-v4")   ? "avx512"
                           : __builtin_cpu_supports("x86-64-v3") ? "avx2"
                                                                 : "portable";
#else
  info["cpu_vector_isa"] = "portable";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "miss_ext compiled core: operators live in torch.ops.miss_ext";
  module.def("build_info", &build_info,
             "How this extension was built and which CPU paths it runs: torch version, OpenMP, CUDA and its archs, brgemm, vector ISA.");
  module.def("cpu_workspace_release", &miss_ext::cpu::workspace_release,
             "Frees the CPU workspace buffers kept for reuse; returns the bytes released.");
  module.def("cpu_workspace_cached_bytes", &miss_ext::cpu::workspace_cached_bytes,
             "Bytes of CPU workspace buffers kept for reuse.");
}
