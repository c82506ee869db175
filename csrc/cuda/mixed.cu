// The mixed-precision composites on CUDA: products in the block's precision through cuBLAS
// (aten), with the CUDA kernels of this extension for the rest.
#include "cuda/cuda_utils.cuh"

namespace miss_ext {
namespace cuda {

void bat_io_block_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                       int64_t r, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto acc = out.scalar_type();
  const int64_t nb = weight.size(0) / r, in = x.size(1);
  const bool half_in = grad.scalar_type() == at::kBFloat16 || grad.scalar_type() == at::kHalf;
  const at::Tensor xa = (half_in && acc == at::kFloat) || x.scalar_type() == acc ? x : x.to(acc);
  // Gw for a group of slabs at a time (about 16M elements), never the whole weight-sized Gw.
  const int64_t group = std::max<int64_t>(1, (int64_t{1} << 24) / std::max<int64_t>(1, r * in));
  for (int64_t s0 = 0; s0 < nb; s0 += group) {
    const int64_t s1 = std::min(nb, s0 + group), rows = (s1 - s0) * r;
    const at::Tensor g = grad.narrow(1, s0 * r, rows).t();
    // bf16/fp16 inputs with an fp32 result: cuBLAS accumulates in fp32 and never rounds.
    const at::Tensor gw = (half_in && acc == at::kFloat) ? at::mm(g, xa, acc) : at::mm(g.to(acc), xa);
    const at::Tensor wg = weight.narrow(0, s0 * r, rows).to(acc).contiguous();
    at::Tensor o = out.narrow(0, s0, s1 - s0);
    bat_block_grad(gw.contiguous(), wg, r, o);
  }
}

void miss_add_product(const at::Tensor& base, const at::Tensor& s, const at::Tensor& block,
                      at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(base.device());
  // tile with r = out_features adds the product elementwise and rounds once.
  tile(at::mm(s, block), base, DropoutArgs{}, out);
}

void miss_block_grads(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& block,
                      at::Tensor& grad_block, at::Tensor& grad_s) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.to(block.scalar_type());
  at::mm_out(grad_block, s.t(), g);
  at::mm_out(grad_s, g, block.t());
}

}  // namespace cuda
}  // namespace miss_ext
