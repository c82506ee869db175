// Deliberately broken kernels (faults.cu) that the emulator must catch; see case_selftest.cpp.
#pragma once

#include <ATen/ATen.h>

namespace emu_faults {
// out[i] = in[(i + 1) % 256] through shared memory, with or without the barrier it needs.
void rotate(const at::Tensor& in, at::Tensor& out, bool sync);
// Half the threads skip a __syncthreads() that the others wait at.
void exit_before_barrier(at::Tensor& out);
// Threads wait at two different __syncthreads() calls.
void barrier_sites(at::Tensor& out);
// out[i + shift] = in[i] for i != skip; write_input also stores into `in`.
void copy(const at::Tensor& in, at::Tensor& out, int shift, int skip, bool write_input);
// A kernel writes one element past an at::empty workspace.
void workspace_overrun();
// One 16x16x16 WMMA product per warp, out (8 warps x 16 x 16) = A(16 x 16) B(16 x 16) with A
// row-major and B col-major at `offset` halves into a shared tile of 16 rows of `ld` halves.
// disagree: lanes 16..31 pass another pointer; diverge: they skip the mma.
void wmma(const at::Tensor& a, at::Tensor& out, int offset, unsigned ld, bool disagree, bool diverge);
void dynamic_smem(size_t bytes, bool overrun);
void empty_grid();
}  // namespace emu_faults
