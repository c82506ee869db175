// miss_merge: out[o, k] = W[o, k] + alpha * block[k % r, o % m], in the block's dtype.
//
// Elementwise over W in 16-byte units; the product is rounded before the add, as on the CPU,
// so both devices give the same bits. Merging is a one-off per adapter, so the strided
// reads of the small block are left to the cache rather than staged through shared memory.
#include "cuda/cuda_utils.cuh"

namespace miss_ext {
namespace cuda {
namespace {

using namespace detail;

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const scalar_t* __restrict__ w, const acc_t* __restrict__ block,
                 scalar_t* __restrict__ out, int64_t rows, int64_t cols, int64_t r, int64_t m,
                 acc_t alpha) {
  const int64_t cu = cols / V;
  const int64_t total = rows * cu;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < total;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = u / cu;
    const int64_t k0 = (u - o * cu) * V;
    const acc_t* bcol = block + o % m;
    int64_t c = k0 % r;
    const Vec<scalar_t, V> x = load_vec<scalar_t, V>(w + o * cols + k0);
    Vec<scalar_t, V> y;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      y.v[e] = static_cast<scalar_t>(static_cast<acc_t>(x.v[e]) + mul_rn(alpha, bcol[c * m]));
      if (++c == r) c = 0;
    }
    store_vec<scalar_t, V>(out + o * cols + k0, y);
  }
}

template <typename scalar_t, typename acc_t, int V>
void launch(const at::Tensor& w, const at::Tensor& block, double alpha, at::Tensor& out) {
  const int64_t rows = w.size(0), cols = w.size(1);
  merge_kernel<scalar_t, acc_t, V>
      <<<grid_stride_blocks(rows * (cols / V), kThreads), kThreads, 0,
         at::cuda::getCurrentCUDAStream()>>>(w.data_ptr<scalar_t>(), block.data_ptr<acc_t>(),
                                             out.data_ptr<scalar_t>(), rows, cols,
                                             block.size(0), block.size(1),
                                             static_cast<acc_t>(alpha));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void miss_merge(const at::Tensor& weight, const at::Tensor& block, double alpha,
                at::Tensor& out) {
  if (weight.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "miss_ext_merge_cuda", [&] {
    // The front end hands the block over in float32, or float64 for float64 weights.
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(block.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "miss_ext.miss_merge (CUDA): internal error: block dtype ", block.scalar_type(),
                " does not match the weight's compute dtype");
    constexpr int V = vec16<scalar_t>();
    if (weight.size(1) % V == 0 && aligned16(weight.data_ptr()) && aligned16(out.data_ptr())) {
      launch<scalar_t, acc_t, V>(weight, block, alpha, out);
    } else {
      launch<scalar_t, acc_t, 1>(weight, block, alpha, out);
    }
  });
}

}  // namespace cuda
}  // namespace miss_ext
