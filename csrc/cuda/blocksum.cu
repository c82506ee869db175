// blocksum: out[n, c] = scale * sum_j keep * x[n, j*r + c], one pass over x.
//
// A row is split into "units" of V elements (one 16-byte load when the layout allows, else
// V = 1). T threads work on one row (T a power of two, several rows per block when rows are
// short). When the row holds fewer than T units per r-block, thread l owns unit column
// l % ru of group l / ru and the groups step through the r-blocks together, so a warp reads
// one contiguous span; the group partials are then added in a fixed order through shared
// memory. Rows too few to fill the device are also split along j into `splits` chunks whose
// partials a second kernel adds, again in a fixed order: no atomics, bit-identical reruns.
// The output may be wider than x (mixed precision: a bf16/fp16 x summed into float32, any x into
// float64); sums run in the wider of the two (acc_of), x is read as stored and never copied.
//
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

template <typename scalar_t, typename out_t, typename acc_t>
struct BlocksumArgs {
  const scalar_t* x;
  int64_t ld;      // row stride of x, elements
  int64_t rows;
  int64_t in;
  int64_t r;
  int T;           // threads per row
  int splits;      // chunks of r-blocks per row
  int64_t chunk;   // r-blocks per chunk
  out_t* out;      // written when splits == 1
  acc_t* ws;       // (rows, splits, r) partials when splits > 1
  Mask mask;
};

template <typename scalar_t, typename out_t, typename acc_t, int V, bool DROP>
__device__ __forceinline__ void accumulate_unit(const BlocksumArgs<scalar_t, out_t, acc_t>& a,
                                                const scalar_t* row, int64_t n, int64_t ku,
                                                acc_t (&acc)[V]) {
  const Vec<scalar_t, V> v = load_vec<scalar_t, V>(row + ku * V);
  if constexpr (DROP) {
    const uint32_t bits = keep_bits<V>(a.mask, static_cast<uint64_t>(n * a.in + ku * V));
    // Multiply by the 0/1 mask rather than select, as the CPU kernel does, so a dropped
    // inf/NaN still poisons the sum like torch's dropout.
#pragma unroll
    for (int e = 0; e < V; ++e)
      acc[e] += static_cast<acc_t>(v.v[e]) * static_cast<acc_t>((bits >> e) & 1u);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] += static_cast<acc_t>(v.v[e]);
  }
}

template <typename scalar_t, typename out_t, typename acc_t, int V, bool DROP>
__device__ __forceinline__ void emit(const BlocksumArgs<scalar_t, out_t, acc_t>& a, int64_t n,
                                     int split, int64_t col, const acc_t (&acc)[V]) {
  if (a.splits == 1) {
    out_t* o = a.out + n * a.r + col;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      // The dropout scale multiplies the finished sum once, as the CPU kernel does.
      o[e] = static_cast<out_t>(DROP ? acc[e] * static_cast<acc_t>(a.mask.scale) : acc[e]);
    }
  } else {
    acc_t* w = a.ws + (n * a.splits + split) * a.r + col;
#pragma unroll
    for (int e = 0; e < V; ++e) w[e] = acc[e];
  }
}

template <typename scalar_t, typename out_t, typename acc_t, int V, bool DROP>
__global__ void __launch_bounds__(kThreads)
    blocksum_kernel(const BlocksumArgs<scalar_t, out_t, acc_t> a, int64_t total_blocks) {
  __shared__ acc_t part[kThreads * V];
  const int tid = threadIdx.x;
  const int T = a.T;
  const int rg = tid / T, l = tid % T;
  const int rows_per_block = kThreads / T;
  const int64_t ru = a.r / V, inu = a.in / V;
  const int64_t nj = ceil_div(a.in, a.r);

  for (int64_t b = blockIdx.x; b < total_blocks; b += gridDim.x) {  // uniform per block
    const int split = static_cast<int>(b % a.splits);
    const int64_t n = (b / a.splits) * rows_per_block + rg;
    const bool row_ok = n < a.rows;
    const int64_t j0 = split * a.chunk;
    const int64_t j1 = nj < j0 + a.chunk ? nj : j0 + a.chunk;
    const scalar_t* row = a.x + (row_ok ? n : 0) * a.ld;

    if (ru >= T) {
      // Wide blocks: each thread owns whole unit columns and walks down the r-blocks.
      if (row_ok) {
        for (int64_t cu = l; cu < ru; cu += T) {
          acc_t acc[V];
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] = acc_t(0);
#pragma unroll 4
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t ku = j * ru + cu;
            if (ku >= inu) break;
            accumulate_unit<scalar_t, out_t, acc_t, V, DROP>(a, row, n, ku, acc);
          }
          emit<scalar_t, out_t, acc_t, V, DROP>(a, n, split, cu * V, acc);
        }
      }
    } else {
      const int G = T / static_cast<int>(ru);
      const int cu = l % static_cast<int>(ru), g = l / static_cast<int>(ru);
      acc_t acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = acc_t(0);
      if (row_ok && g < G) {
#pragma unroll 4
        for (int64_t j = j0 + g; j < j1; j += G) {
          const int64_t ku = j * ru + cu;
          if (ku >= inu) break;
          accumulate_unit<scalar_t, out_t, acc_t, V, DROP>(a, row, n, ku, acc);
        }
      }
      // G * ru <= T, so a row group's partials fit in its T * V slots.
      acc_t* mine = part + static_cast<int64_t>(rg) * T * V;
      if (g < G) {
#pragma unroll
        for (int e = 0; e < V; ++e) mine[(g * ru + cu) * V + e] = acc[e];
      }
      __syncthreads();
      if (row_ok && l < ru) {
        acc_t sum[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          sum[e] = acc_t(0);
          for (int gg = 0; gg < G; ++gg) sum[e] += mine[(gg * ru + l) * V + e];
        }
        emit<scalar_t, out_t, acc_t, V, DROP>(a, n, split, static_cast<int64_t>(l) * V, sum);
      }
      __syncthreads();
    }
  }
}

// Adds the per-chunk partials in chunk order.
template <typename out_t, typename acc_t, bool DROP>
__global__ void __launch_bounds__(kThreads)
    blocksum_finish_kernel(const acc_t* ws, out_t* out, int64_t rows, int64_t r, int splits,
                           double scale) {
  const int64_t total = rows * r;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = e / r, c = e - n * r;
    const acc_t* p = ws + n * splits * r + c;
    acc_t sum = acc_t(0);
    for (int s = 0; s < splits; ++s) sum += p[s * r];
    out[e] = static_cast<out_t>(DROP ? sum * static_cast<acc_t>(scale) : sum);
  }
}

int threads_per_row(int64_t units) {
  int T = 1;
  while (T < kThreads && T < units) T *= 2;
  return T;
}

template <typename scalar_t, typename out_t, int V, bool DROP>
void launch(const at::Tensor& x, int64_t r, const Mask& mask, at::Tensor& out) {
  using acc_t = acc_of<scalar_t, out_t>;
  BlocksumArgs<scalar_t, out_t, acc_t> a;
  a.x = x.data_ptr<scalar_t>();
  a.ld = x.size(0) > 1 ? x.stride(0) : x.size(1);
  a.rows = x.size(0);
  a.in = x.size(1);
  a.r = r;
  a.T = threads_per_row(a.in / V);
  a.out = out.data_ptr<out_t>();
  a.ws = nullptr;
  a.mask = mask;

  const int64_t ru = r / V;
  const int rows_per_block = kThreads / a.T;
  const int64_t row_blocks = ceil_div(a.rows, rows_per_block);
  const int64_t nj = ceil_div(a.in, r);
  const int G = ru >= a.T ? 1 : a.T / static_cast<int>(ru);
  // Split long rows only when the rows alone cannot fill the device; each chunk keeps at
  // least a few thousand elements so the second pass stays negligible.
  const int64_t target = 2 * int64_t(sm_count());
  int64_t splits = 1;
  if (row_blocks < target && nj > 1) {
    splits = std::min<int64_t>({ceil_div(target, row_blocks), nj, std::max<int64_t>(1, a.in / 4096)});
    splits = std::max<int64_t>(splits, 1);
  }
  a.chunk = std::max<int64_t>(ceil_div(nj, splits), std::min<int64_t>(G, nj));
  splits = ceil_div(nj, a.chunk);
  a.splits = static_cast<int>(splits);

  at::Tensor ws;
  if (splits > 1) {
    ws = at::empty({a.rows, splits, r}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    a.ws = ws.data_ptr<acc_t>();
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t total_blocks = row_blocks * splits;
  blocksum_kernel<scalar_t, out_t, acc_t, V, DROP>
      <<<capped_blocks(total_blocks), kThreads, 0, stream>>>(a, total_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    blocksum_finish_kernel<out_t, acc_t, DROP>
        <<<grid_stride_blocks(a.rows * r, kThreads), kThreads, 0, stream>>>(
            a.ws, a.out, a.rows, r, a.splits, mask.scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename out_t, bool DROP>
void launch_any_width(const at::Tensor& x, int64_t r, const Mask& mask, at::Tensor& out) {
  constexpr int V = vec16<scalar_t>();
  const int64_t ld = x.size(0) > 1 ? x.stride(0) : x.size(1);
  const bool vec_ok = aligned16(x.data_ptr()) && ld % V == 0 && x.size(1) % V == 0 && r % V == 0;
  if (vec_ok) {
    launch<scalar_t, out_t, V, DROP>(x, r, mask, out);
  } else {
    launch<scalar_t, out_t, 1, DROP>(x, r, mask, out);
  }
}

}  // namespace

void blocksum(const at::Tensor& x, int64_t r, const DropoutArgs& drop, at::Tensor& out) {
  if (x.size(0) == 0 || r == 0) return;
  if (x.size(1) == 0) {
    out.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const Mask mask = make_mask(drop);
  const bool use_mask = dropout_active(drop);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "miss_ext_blocksum_cuda", [&] {
    // out is x's dtype or a wider one (the mixed-precision sum).
    dispatch_wider<scalar_t>(out.scalar_type(), "blocksum", [&](auto out_tag) {
      using out_t = decltype(out_tag);
      if (use_mask) {
        launch_any_width<scalar_t, out_t, true>(x, r, mask, out);
      } else {
        launch_any_width<scalar_t, out_t, false>(x, r, mask, out);
      }
    });
  });
}

// ------------------------------------------------------------------------------------ tile

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
void launch_tile(const at::Tensor& s, const at::Tensor& base, const Mask& mask, at::Tensor& out) {
  const int64_t rows = out.size(0), features = out.size(1);
  tile_kernel<s_t, scalar_t, V, DROP, BASE>
      <<<grid_stride_blocks(rows * (features / V), kThreads), kThreads, 0,
         at::cuda::getCurrentCUDAStream()>>>(
          s.data_ptr<s_t>(), BASE ? base.data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), rows, features, s.size(1), mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename s_t, typename scalar_t, bool DROP, bool BASE>
void launch_tile_any_width(const at::Tensor& s, const at::Tensor& base, const Mask& mask,
                      at::Tensor& out) {
  constexpr int V = vec16<scalar_t>();
  const bool vec_ok = out.size(1) % V == 0 && aligned16(out.data_ptr()) &&
                      (!BASE || aligned16(base.data_ptr()));
  if (vec_ok) {
    launch_tile<s_t, scalar_t, V, DROP, BASE>(s, base, mask, out);
  } else {
    launch_tile<s_t, scalar_t, 1, DROP, BASE>(s, base, mask, out);
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
          launch_tile_any_width<s_t, scalar_t, true, true>(s, base, mask, out);
        } else {
          launch_tile_any_width<s_t, scalar_t, true, false>(s, base, mask, out);
        }
      } else {
        if (has_base) {
          launch_tile_any_width<s_t, scalar_t, false, true>(s, base, mask, out);
        } else {
          launch_tile_any_width<s_t, scalar_t, false, false>(s, base, mask, out);
        }
      }
    });
  });
}

}  // namespace cuda
}  // namespace miss_ext
