// Standard/mini MiSS with a block wider than x (mixed precision) on CUDA: the products in the
// block's precision through cuBLAS (aten), the rounding-once add through this extension's tile.
#include "cuda/cuda_utils.cuh"

namespace miss_ext {
namespace cuda {

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
