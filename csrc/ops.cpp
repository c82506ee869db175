// The one registration file: operator schemas, their per-device implementations, and the
// small pybind11 module `miss_ext._C` (build information only; operators go through
// torch.ops.miss_ext, never through pybind11).
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/amx.h"
#include "cpu/workspace.h"
#include "ops_front.h"

#ifndef MISS_EXT_TORCH_VERSION
#define MISS_EXT_TORCH_VERSION "unknown"
#endif
#ifndef MISS_EXT_CUDA_ARCHS
#define MISS_EXT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(miss_ext, m) {
  // Block sum over the last dim, zero-padded to a multiple of r: (..., in) -> (..., r), in x's
  // dtype or a wider `dtype` (float32/float64: summed straight into it, x never copied).
  m.def("blocksum(Tensor x, int r, ScalarType? dtype=None) -> Tensor");
  // Block sum of dropout(x) with the mask regenerated from (seed, element index).
  m.def("blocksum_dropout(Tensor x, int r, float p, Tensor seed, ScalarType? dtype=None) -> Tensor");
  // Repeat the last dim to `features` columns: (..., r) -> (..., features), the adjoint of
  // blocksum, in s's dtype or a narrower `dtype` (rounded once).
  m.def("tile(Tensor s, int features, ScalarType? dtype=None) -> Tensor");
  // tile with the dropout mask of blocksum_dropout: the adjoint of blocksum_dropout.
  m.def("tile_dropout(Tensor s, int features, float p, Tensor seed, ScalarType? dtype=None) -> Tensor");
  // base + tile(s, base.shape[-1]) in base's dtype; s may be wider (rounded once).
  m.def("tile_add(Tensor base, Tensor s) -> Tensor");
  // BAT: W'_ij = W_ij (I + B_i) + B_i over r x r blocks, in the block's precision, rounded once
  // to `dtype` (default: the block's dtype).
  m.def("bat_transform(Tensor weight, Tensor block, ScalarType? dtype=None) -> Tensor");
  // dL/dB_i = sum_j (W_ij + I)^T G_ij for G = dL/dW'.
  m.def("bat_block_grad(Tensor grad, Tensor weight, int r) -> Tensor");
  // grad W' with W' as in bat_linear (rounded once to grad's dtype): BAT's input gradient.
  m.def("bat_input_grad(Tensor grad, Tensor weight, Tensor[] blocks) -> Tensor");
  // The same from the layer's output gradient and input, with G = grad^T x never formed,
  // accumulated in `dtype` (float32, or float64 for float64 x).
  m.def("bat_io_block_grad(Tensor grad, Tensor x, Tensor weight, int r, ScalarType? dtype=None) -> Tensor");
  // dL/dW_ij = G_ij (I + B_i)^T for G = dL/dW'.
  m.def("bat_weight_grad(Tensor grad, Tensor block) -> Tensor");
  // x W'^T + b with W' the weight after each block's transform in turn; the blocks may be wider
  // than x (W' formed in their precision, rounded once to x's dtype for the GEMM).
  m.def("bat_linear(Tensor x, Tensor weight, Tensor? bias, Tensor[] blocks) -> Tensor");
  // Inverse of bat_transform: W_ij = (W'_ij - B_i)(I + B_i)^-1, by a solve in float32/64.
  m.def("bat_unmerge(Tensor weight, Tensor block) -> Tensor");
  // Standard (block (r, out)) or mini (block (r, mini_r)) MiSS fused with its frozen nn.Linear:
  // y = x W^T + b + tile_out(blocksum_r(dropout(x)) @ block); also returns the block sum S,
  // which backward needs (it is N x r: nothing weight- or input-sized is saved).
  // With a block wider than x (mixed precision) the base output is rounded in x's dtype and the
  // block-precision term added and rounded once, as PEFT does; S is in the block's dtype.
  m.def("miss_linear(Tensor x, Tensor weight, Tensor? bias, Tensor block, float p, Tensor? seed) -> (Tensor, Tensor)");
  // base + s @ block with the product in the block's precision, rounded once to base's dtype.
  m.def("miss_add_product(Tensor base, Tensor s, Tensor block) -> Tensor");
  // (s^T grad, grad block^T) in the block's precision, grad read in its own dtype.
  m.def("miss_block_grads(Tensor grad, Tensor s, Tensor block) -> (Tensor, Tensor)");
  // W + alpha * dW with dW[o, k] = block[k % r, o % m] (standard: m = out, mini: m = mini_r).
  m.def("miss_merge(Tensor weight, Tensor block, float alpha) -> Tensor");
  // Mixed-adapter batches (serving): base + per-row tile_out(s[n] @ blocks[index[n]]), each row
  // with its own standard (r, out) or mini (r, mini_r) block, index -1 for the base alone; the
  // product in the blocks' precision, rounded once to base's dtype.
  m.def("miss_gathered_product(Tensor base, Tensor s, Tensor[] blocks, Tensor index) -> Tensor");
}

#define MISS_EXT_REGISTER_ALL(m)                     \
  m.impl("blocksum", &miss_ext::blocksum);           \
  m.impl("blocksum_dropout", &miss_ext::blocksum_dropout); \
  m.impl("tile", &miss_ext::tile);                   \
  m.impl("tile_dropout", &miss_ext::tile_dropout);   \
  m.impl("tile_add", &miss_ext::tile_add);           \
  m.impl("bat_transform", &miss_ext::bat_transform); \
  m.impl("bat_block_grad", &miss_ext::bat_block_grad); \
  m.impl("bat_io_block_grad", &miss_ext::bat_io_block_grad); \
  m.impl("bat_input_grad", &miss_ext::bat_input_grad); \
  m.impl("bat_weight_grad", &miss_ext::bat_weight_grad); \
  m.impl("bat_linear", &miss_ext::bat_linear);       \
  m.impl("bat_unmerge", &miss_ext::bat_unmerge);     \
  m.impl("miss_linear", &miss_ext::miss_linear);     \
  m.impl("miss_add_product", &miss_ext::miss_add_product); \
  m.impl("miss_block_grads", &miss_ext::miss_block_grads); \
  m.impl("miss_merge", &miss_ext::miss_merge);       \
  m.impl("miss_gathered_product", &miss_ext::miss_gathered_product)

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
