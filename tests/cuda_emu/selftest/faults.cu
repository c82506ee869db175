// Deliberately broken kernels: each must make the emulator (or the harness's checks) fail.
// Built like csrc/cuda/*.cu (rewritten by emu_prep.py), run by the `selftest` suite.
#include <cuda_fp16.h>
#include <mma.h>

#include "faults.h"

namespace emu_faults {
namespace {

constexpr int kThreads = 256;

__global__ void rotate_kernel(const float* in, float* out, bool sync) {
  __shared__ float s[kThreads];
  s[threadIdx.x] = in[threadIdx.x];
  if (sync) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % kThreads];
}

__global__ void exit_before_barrier_kernel(float* out) {
  out[threadIdx.x] = 1.0f;
  if (threadIdx.x < kThreads / 2) return;
  __syncthreads();
}

__global__ void barrier_sites_kernel(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void copy_kernel(const float* in, float* out, int n, int shift, int skip, bool write_input) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && i != skip) out[i + shift] = in[i];
  if (write_input && i == n / 2) const_cast<float*>(in)[i] = 0.0f;
}

__global__ void fill_kernel(float* p, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) p[i] = 0.0f;  // one past the end
}

namespace wmma = nvcuda::wmma;

__global__ void wmma_kernel(const __half* a, float* out, int offset, unsigned ld, bool disagree, bool diverge) {
  __shared__ __align__(128) __half tile[16 * 64 + 64];
  for (int e = threadIdx.x; e < 16 * 64 + 64; e += blockDim.x) tile[e] = a[e];
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(fa, tile + offset + (disagree && lane >= 16 ? 16 : 0), ld);
  wmma::load_matrix_sync(fb, tile + offset, ld);
  if (!(diverge && lane >= 16)) wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(out + warp * 256, acc, 16, wmma::mem_row_major);
}

__global__ void dynamic_smem_kernel(float* out, int n, bool overrun) {
  extern __shared__ unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (overrun && threadIdx.x == 0) s[n] = 0.0f;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

}  // namespace

void rotate(const at::Tensor& in, at::Tensor& out, bool sync) {
  rotate_kernel<<<1, kThreads>>>(in.data_ptr<float>(), out.data_ptr<float>(), sync);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void exit_before_barrier(at::Tensor& out) {
  exit_before_barrier_kernel<<<1, kThreads>>>(out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void barrier_sites(at::Tensor& out) {
  barrier_sites_kernel<<<1, kThreads>>>(out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy(const at::Tensor& in, at::Tensor& out, int shift, int skip, bool write_input) {
  const int n = static_cast<int>(in.numel());
  copy_kernel<<<(n + kThreads - 1) / kThreads, kThreads>>>(in.data_ptr<float>(), out.data_ptr<float>(), n, shift,
                                                             skip, write_input);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void workspace_overrun() {
  at::Tensor ws = at::empty({100}, at::TensorOptions().dtype(at::kFloat));
  fill_kernel<<<1, 128>>>(ws.data_ptr<float>(), 100);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void wmma(const at::Tensor& a, at::Tensor& out, int offset, unsigned ld, bool disagree, bool diverge) {
  wmma_kernel<<<1, kThreads>>>(a.data_ptr<at::Half>(), out.data_ptr<float>(), offset, ld, disagree, diverge);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dynamic_smem(size_t bytes, bool overrun) {
  at::Tensor out = at::empty({kThreads}, at::TensorOptions().dtype(at::kFloat));
  dynamic_smem_kernel<<<1, kThreads, bytes>>>(out.data_ptr<float>(), static_cast<int>(bytes / 4), overrun);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void empty_grid() {
  at::Tensor out = at::empty({kThreads}, at::TensorOptions().dtype(at::kFloat));
  rotate_kernel<<<0, kThreads>>>(out.data_ptr<float>(), out.data_ptr<float>(), true);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace emu_faults
