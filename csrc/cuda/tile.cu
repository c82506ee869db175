// tile: out[n, k] = base[n, k] + scale * keep * s[n, k % r], the adjoint of blocksum.
//
// Elementwise over out in 16-byte units (scalar when a row is not a whole number of units or
// a pointer is misaligned). s is small and re-read across a row, so its loads hit cache.
// s may be wider than out (mixed precision: an fp32 term into a bf16/fp16 output); the sum runs
// in the wider type (acc_of) and is rounded once. base has out's dtype.
#include "cuda/cuda_utils.cuh"

namespace miss_ext {
namespace cuda {
namespace {

using namespace detail;

template <typename s_t, typename scalar_t, int V, bool DROP, bool BASE>
__global__ void __launch_bounds__(kThreads)
    tile_kernel(const s_t* __restrict__ s, const scalar_t* __restrict__ base,
                scalar_t* __restrict__ out, int64_t rows, int64_t features, int64_t r,
                Mask mask) {
  using acc_t = acc_of<s_t, scalar_t>;
  const int64_t fu = features / V;
  const int64_t total = rows * fu;
  for (int64_t u = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; u < total;
       u += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = u / fu;
    const int64_t k0 = (u - n * fu) * V;
    const int64_t at_ = n * features + k0;
    const s_t* srow = s + n * r;
    int64_t c = k0 % r;
    uint32_t bits = ~0u;
    if constexpr (DROP) bits = keep_bits<V>(mask, static_cast<uint64_t>(at_));
    Vec<scalar_t, V> b;
    if constexpr (BASE) b = load_vec<scalar_t, V>(base + at_);
    Vec<scalar_t, V> o;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      acc_t v = static_cast<acc_t>(srow[c]);
      if (++c == r) c = 0;
      // (s * scale) * mask in this order, as the CPU kernel does; multiplying by the 0/1 mask
      // keeps a dropped inf/NaN visible like torch's dropout.
      if constexpr (DROP)
        v = v * static_cast<acc_t>(mask.scale) * static_cast<acc_t>((bits >> e) & 1u);
      if constexpr (BASE) v = static_cast<acc_t>(b.v[e]) + v;
      o.v[e] = static_cast<scalar_t>(v);
    }
    store_vec<scalar_t, V>(out + at_, o);
  }
}

template <typename s_t, typename scalar_t, int V, bool DROP, bool BASE>
void launch(const at::Tensor& s, const at::Tensor& base, const Mask& mask, at::Tensor& out) {
  const int64_t rows = out.size(0), features = out.size(1);
  tile_kernel<s_t, scalar_t, V, DROP, BASE>
      <<<grid_stride_blocks(rows * (features / V), kThreads), kThreads, 0,
         at::cuda::getCurrentCUDAStream()>>>(
          s.data_ptr<s_t>(), BASE ? base.data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), rows, features, s.size(1), mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename s_t, typename scalar_t, bool DROP, bool BASE>
void launch_any_width(const at::Tensor& s, const at::Tensor& base, const Mask& mask,
                      at::Tensor& out) {
  constexpr int V = vec16<scalar_t>();
  const bool vec_ok = out.size(1) % V == 0 && aligned16(out.data_ptr()) &&
                      (!BASE || aligned16(base.data_ptr()));
  if (vec_ok) {
    launch<s_t, scalar_t, V, DROP, BASE>(s, base, mask, out);
  } else {
    launch<s_t, scalar_t, 1, DROP, BASE>(s, base, mask, out);
  }
}

}  // namespace

void tile(const at::Tensor& s, const at::Tensor& base, const DropoutArgs& drop, at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(s.device());
  const Mask mask = make_mask(drop);
  const bool use_mask = dropout_active(drop);
  const bool has_base = base.defined();
  // Dispatched on out's dtype; s has it too, or a wider one (the mixed-precision term).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "miss_ext_tile_cuda", [&] {
    dispatch_wider<scalar_t>(s.scalar_type(), "tile", [&](auto s_tag) {
      using s_t = decltype(s_tag);
      if (use_mask) {
        if (has_base) {
          launch_any_width<s_t, scalar_t, true, true>(s, base, mask, out);
        } else {
          launch_any_width<s_t, scalar_t, true, false>(s, base, mask, out);
        }
      } else {
        if (has_base) {
          launch_any_width<s_t, scalar_t, false, true>(s, base, mask, out);
        } else {
          launch_any_width<s_t, scalar_t, false, false>(s, base, mask, out);
        }
      }
    });
  });
}

}  // namespace cuda
}  // namespace miss_ext
