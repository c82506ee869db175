// BAT transform and weight gradient. On the copy-free layout X3 = X.view(out/r, in, r) both
// are "each slab times an r x r matrix":
//   bat_transform:   out3[i] = W3[i] (I + B_i) + B_i[a(t), :]   (a(t) = t / (in/r))
//   bat_weight_grad: out3[i] = G3[i] (I + B_i)^T
// computed as X + X @ M (+ B row), never forming I + B_i in the storage dtype, where a
// bfloat16 "1 + b" would lose b. Three paths:
//   r <= 32:                     a slab chunk and M_i staged in shared memory, one output each
//   half types, r % 16 == 0:     WMMA tensor cores (bf16/fp16 in, fp32 accumulate)
//   otherwise:                   64 x 64 SIMT tiles, 4 x 4 outputs per thread
// The mixed-precision transform (a bf16/fp16/fp32 weight, a wider float32/float64 block, the
// result in the weight's dtype: BAT's default mode) runs the first or last path with the block's
// precision as the accumulator, reading the weight as stored and rounding once on the store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "cuda/cuda_utils.cuh"

namespace miss_ext {
namespace cuda {
namespace {

using namespace detail;

// x and out in one dtype, the block in it or a wider one (the products' precision).
template <typename scalar_t, typename block_t = scalar_t>
struct RowMM {
  const scalar_t* x;   // (nb, in, r)
  const block_t* b;    // (nb, r, r)
  scalar_t* out;       // (nb, in, r)
  int64_t in;
  int64_t r;
};

// M(k, c) of slab b: B(k, c), or B(c, k) for the weight gradient.
template <bool TRANS, typename scalar_t>
__device__ __forceinline__ scalar_t m_at(const scalar_t* b, int64_t r, int64_t k, int64_t c) {
  return TRANS ? b[c * r + k] : b[k * r + c];
}

// ---------------------------------------------------------------------------------------
// r <= 32: a run of rows of one slab and the whole M_i fit in shared memory.
template <typename scalar_t, typename block_t, bool TRANS, bool ADD>
__global__ void __launch_bounds__(kThreads)
    rowmm_small_kernel(const RowMM<scalar_t, block_t> p, int64_t chunks, int rows_per_block) {
  using acc_t = at::opmath_type<block_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* m = reinterpret_cast<acc_t*>(smem_raw);
  const int r = static_cast<int>(p.r);
  acc_t* xs = m + r * r;
  const int64_t slab = blockIdx.x / chunks;
  const int64_t t0 = (blockIdx.x % chunks) * rows_per_block;
  const int64_t nrows = p.in - t0 < rows_per_block ? p.in - t0 : rows_per_block;
  const block_t* bs = p.b + slab * r * r;
  const int64_t base = (slab * p.in + t0) * r;
  const int64_t n = nrows * r;

  for (int e = threadIdx.x; e < r * r; e += blockDim.x)
    m[e] = static_cast<acc_t>(m_at<TRANS>(bs, r, e / r, e % r));
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) xs[e] = static_cast<acc_t>(p.x[base + e]);
  __syncthreads();

  const int64_t per_a = p.in / r;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    const int tr = static_cast<int>(e / r), c = static_cast<int>(e % r);
    const acc_t* xrow = xs + tr * r;
    acc_t acc = acc_t(0);
    for (int k = 0; k < r; ++k) acc += xrow[k] * m[k * r + c];
    acc_t v = acc + xs[e];
    if constexpr (ADD) v += static_cast<acc_t>(bs[((t0 + tr) / per_a) * r + c]);
    p.out[base + e] = static_cast<scalar_t>(v);
  }
}

// ---------------------------------------------------------------------------------------
// General r: SIMT tiles of 64 rows x 64 columns, 16 x 16 threads with 4 x 4 outputs each.
template <typename scalar_t, typename block_t, bool TRANS, bool ADD>
__global__ void __launch_bounds__(kThreads)
    rowmm_tiled_kernel(const RowMM<scalar_t, block_t> p, int64_t row_tiles, int64_t col_tiles) {
  using acc_t = at::opmath_type<block_t>;
  constexpr int BM = 64, BN = 64, BK = 16;
  __shared__ acc_t as[BK][BM + 1];
  __shared__ acc_t bsm[BK][BN + 1];
  const int64_t ct = blockIdx.x % col_tiles;
  const int64_t rest = blockIdx.x / col_tiles;
  const int64_t rt = rest % row_tiles, slab = rest / row_tiles;
  const int64_t t0 = rt * BM, c0 = ct * BN, r = p.r;
  const scalar_t* xs = p.x + slab * p.in * r;
  const block_t* bs = p.b + slab * r * r;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  acc_t acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);

  for (int64_t k0 = 0; k0 < r; k0 += BK) {
#pragma unroll
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int mm = e / BK, k = e % BK;
      const int64_t t = t0 + mm, kk = k0 + k;
      as[k][mm] = (t < p.in && kk < r) ? static_cast<acc_t>(xs[t * r + kk]) : acc_t(0);
    }
#pragma unroll
    for (int e = tid; e < BK * BN; e += kThreads) {
      const int k = e / BN, nn = e % BN;
      const int64_t kk = k0 + k, c = c0 + nn;
      bsm[k][nn] = (kk < r && c < r) ? static_cast<acc_t>(m_at<TRANS>(bs, r, kk, c)) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      acc_t a[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = as[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = bsm[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * bv[j];
    }
    __syncthreads();
  }

  const int64_t per_a = p.in / r;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + ty + 16 * i;
    if (t >= p.in) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c >= r) continue;
      acc_t v = acc[i][j] + static_cast<acc_t>(xs[t * r + c]);
      if constexpr (ADD) v += static_cast<acc_t>(bs[(t / per_a) * r + c]);
      p.out[(slab * p.in + t) * r + c] = static_cast<scalar_t>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Half types with r % 16 == 0: WMMA 16x16x16, 128 x 64 tiles, 8 warps of 32 x 32 each.
// The next k-tile is fetched into registers while the tensor cores work on the current one.
namespace wmma = nvcuda::wmma;

constexpr int kMmaBM = 128, kMmaBN = 64, kMmaBK = 32;
constexpr int kMmaLdA = kMmaBK + 8;  // padding keeps rows 16-byte aligned, breaks bank conflicts
constexpr int kMmaLdB = kMmaBN + 8;  // non-transposed B tile: [k][c]
constexpr int kMmaLdBt = kMmaBK + 8; // transposed B tile: [c][k]
constexpr int kMmaLdC = kMmaBN + 4;

// Shared memory: the A and B tiles during the k loop, then the fp32 C tile over them. Raw
// bytes, because c10::Half/BFloat16 members would make a union non-trivial.
constexpr int kMmaABytes = kMmaBM * kMmaLdA * 2;
constexpr int kMmaBBytes = (kMmaBK * kMmaLdB > kMmaBN * kMmaLdBt ? kMmaBK * kMmaLdB : kMmaBN * kMmaLdBt) * 2;
constexpr int kMmaCBytes = kMmaBM * kMmaLdC * 4;
constexpr int kMmaSmemBytes = kMmaABytes + kMmaBBytes > kMmaCBytes ? kMmaABytes + kMmaBBytes : kMmaCBytes;

template <typename scalar_t, bool TRANS, bool ADD>
__global__ void __launch_bounds__(kThreads)
    rowmm_wmma_kernel(const RowMM<scalar_t> p, int64_t row_tiles, int64_t col_tiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host never picks this path below it
#else
  using V8 = Vec<scalar_t, 8>;
  __shared__ __align__(128) unsigned char smem[kMmaSmemBytes];
  scalar_t* sm_a = reinterpret_cast<scalar_t*>(smem);
  scalar_t* sm_b = reinterpret_cast<scalar_t*>(smem + kMmaABytes);
  float* sm_c = reinterpret_cast<float*>(smem);
  const int64_t ct = blockIdx.x % col_tiles;
  const int64_t rest = blockIdx.x / col_tiles;
  const int64_t rt = rest % row_tiles, slab = rest / row_tiles;
  const int64_t t0 = rt * kMmaBM, c0 = ct * kMmaBN, r = p.r;
  const scalar_t* xs = p.x + slab * p.in * r;
  const scalar_t* bs = p.b + slab * r * r;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wr = warp / 2, wc = warp % 2;  // 4 x 2 warps, each 32 rows x 32 columns

  // Per thread per k-tile: two 8-wide pieces of A (128 rows x 4 pieces), one of B.
  V8 ra[2], rb;
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int e = tid + q * kThreads;
      const int row = e / 4, piece = e % 4;
      const int64_t t = t0 + row, k = k0 + piece * 8;
      if (t < p.in && k < r) {
        ra[q] = load_vec<scalar_t, 8>(xs + t * r + k);
      } else {
#pragma unroll
        for (int z = 0; z < 8; ++z) ra[q].v[z] = scalar_t(0);
      }
    }
    bool ok;
    const scalar_t* src;
    if constexpr (TRANS) {  // B rows c, k contiguous: 64 rows x 4 pieces
      const int64_t c = c0 + tid / 4, k = k0 + (tid % 4) * 8;
      ok = c < r && k < r;
      src = bs + c * r + k;
    } else {  // B rows k, c contiguous: 32 rows x 8 pieces
      const int64_t k = k0 + tid / 8, c = c0 + (tid % 8) * 8;
      ok = k < r && c < r;
      src = bs + k * r + c;
    }
    if (ok) {
      rb = load_vec<scalar_t, 8>(src);
    } else {
#pragma unroll
      for (int z = 0; z < 8; ++z) rb.v[z] = scalar_t(0);
    }
  };
  auto stash = [&]() {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int e = tid + q * kThreads;
      store_vec<scalar_t, 8>(sm_a + (e / 4) * kMmaLdA + (e % 4) * 8, ra[q]);
    }
    if constexpr (TRANS) {
      store_vec<scalar_t, 8>(sm_b + (tid / 4) * kMmaLdBt + (tid % 4) * 8, rb);
    } else {
      store_vec<scalar_t, 8>(sm_b + (tid / 8) * kMmaLdB + (tid % 8) * 8, rb);
    }
  };

  using BLayout = std::conditional_t<TRANS, wmma::col_major, wmma::row_major>;
  using frag_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, __nv_bfloat16>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  fetch(0);
  for (int64_t k0 = 0; k0 < r; k0 += kMmaBK) {
    stash();
    __syncthreads();
    if (k0 + kMmaBK < r) fetch(k0 + kMmaBK);
    const frag_t* a_s = reinterpret_cast<const frag_t*>(sm_a);
    const frag_t* b_s = reinterpret_cast<const frag_t*>(sm_b);
#pragma unroll
    for (int kk = 0; kk < kMmaBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, frag_t, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, frag_t, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], a_s + (wr * 32 + i * 16) * kMmaLdA + kk, kMmaLdA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = wc * 32 + j * 16;
        if constexpr (TRANS) {
          wmma::load_matrix_sync(fb[j], b_s + col * kMmaLdBt + kk, kMmaLdBt);
        } else {
          wmma::load_matrix_sync(fb[j], b_s + kk * kMmaLdB + col, kMmaLdB);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // The C staging area overlays the A/B tiles; the loop's last barrier freed them.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sm_c + (wr * 32 + i * 16) * kMmaLdC + wc * 32 + j * 16, acc[i][j],
                              kMmaLdC, wmma::mem_row_major);
  __syncthreads();

  const int64_t per_a = p.in / r;
  for (int e = tid; e < kMmaBM * (kMmaBN / 8); e += kThreads) {
    const int row = e / (kMmaBN / 8), piece = e % (kMmaBN / 8);
    const int64_t t = t0 + row, c = c0 + piece * 8;
    if (t >= p.in || c >= r) continue;
    const V8 xv = load_vec<scalar_t, 8>(xs + t * r + c);
    V8 bv;
    if constexpr (ADD) bv = load_vec<scalar_t, 8>(bs + (t / per_a) * r + c);
    V8 o;
#pragma unroll
    for (int z = 0; z < 8; ++z) {
      float v = sm_c[row * kMmaLdC + piece * 8 + z] + static_cast<float>(xv.v[z]);
      if constexpr (ADD) v += static_cast<float>(bv.v[z]);
      o.v[z] = static_cast<scalar_t>(v);
    }
    store_vec<scalar_t, 8>(p.out + (slab * p.in + t) * r + c, o);
  }
#endif
}

// ---------------------------------------------------------------------------------------
template <typename scalar_t, bool TRANS, bool ADD, typename block_t = scalar_t>
void launch(const at::Tensor& x, const at::Tensor& block, at::Tensor& out) {
  using acc_t = at::opmath_type<block_t>;
  RowMM<scalar_t, block_t> p;
  p.x = x.data_ptr<scalar_t>();
  p.b = block.data_ptr<block_t>();
  p.out = out.data_ptr<scalar_t>();
  p.r = block.size(1);
  p.in = x.size(1);
  const int64_t nb = block.size(0), r = p.r;
  const auto stream = at::cuda::getCurrentCUDAStream();

  if (r <= 32) {
    const int rows_per_block = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, 2048 / r), p.in));
    const int64_t chunks = ceil_div(p.in, rows_per_block);
    const size_t smem = static_cast<size_t>(r * r + rows_per_block * r) * sizeof(acc_t);
    TORCH_CHECK(nb * chunks <= INT_MAX, "miss_ext BAT (CUDA): weight too large for one launch");
    rowmm_small_kernel<scalar_t, block_t, TRANS, ADD>
        <<<static_cast<unsigned>(nb * chunks), kThreads, smem, stream>>>(p, chunks, rows_per_block);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  // WMMA takes half-type operands only: a wider (mixed-precision) block takes the SIMT tiles.
  constexpr bool kHalfType = std::is_same_v<scalar_t, block_t> &&
                             (std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>);
  if constexpr (kHalfType) {
    const bool mma_ok = r % 16 == 0 && aligned16(p.x) && aligned16(p.b) && aligned16(p.out) &&
                        at::cuda::getCurrentDeviceProperties()->major >= 8;
    if (mma_ok) {
      const int64_t row_tiles = ceil_div(p.in, kMmaBM), col_tiles = ceil_div(r, kMmaBN);
      TORCH_CHECK(nb * row_tiles * col_tiles <= INT_MAX,
                  "miss_ext BAT (CUDA): weight too large for one launch");
      rowmm_wmma_kernel<scalar_t, TRANS, ADD>
          <<<static_cast<unsigned>(nb * row_tiles * col_tiles), kThreads, 0, stream>>>(
              p, row_tiles, col_tiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }

  const int64_t row_tiles = ceil_div(p.in, 64), col_tiles = ceil_div(r, 64);
  TORCH_CHECK(nb * row_tiles * col_tiles <= INT_MAX,
              "miss_ext BAT (CUDA): weight too large for one launch");
  rowmm_tiled_kernel<scalar_t, block_t, TRANS, ADD>
      <<<static_cast<unsigned>(nb * row_tiles * col_tiles), kThreads, 0, stream>>>(
          p, row_tiles, col_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// A float32/float64 block on a narrower weight, the result in the weight's dtype (BAT's default
// mixed mode): one fused pass, the weight read as stored, products in the block's precision,
// rounded once on the store; nothing weight-sized beyond the output.
template <typename scalar_t>
bool mixed_transform(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out) {
  if (block.scalar_type() == at::kFloat && !std::is_same_v<scalar_t, float>) {
    launch<scalar_t, false, true, float>(weight, block, out);
    return true;
  }
  if (block.scalar_type() == at::kDouble) {
    launch<scalar_t, false, true, double>(weight, block, out);
    return true;
  }
  return false;
}

// half_products is ignored: fp32 products are inside its bound (docs/MATH.md 11.4), and the
// tensor cores' bf16 path would need its own kernel for a gain not yet measured on a GPU.
void bat_transform(const at::Tensor& weight, const at::Tensor& block, bool /*half_products*/,
                   at::Tensor& out) {
  if (weight.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto bt = block.scalar_type(), wt = weight.scalar_type();
  if (wt != bt && out.scalar_type() == wt && wt != at::kDouble) {
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wt, "miss_ext_bat_transform_mixed_cuda",
                                    [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) done = mixed_transform<scalar_t>(weight, block, out);
    });
    if (done) return;
  }
  if (wt != bt || out.scalar_type() != bt) {
    // Other mixed combinations (an output in the block's dtype, as the chained transforms of
    // several BAT adapters ask): the equal-dtype transform of the weight converted to the
    // block's dtype, then one conversion into out. Weight-sized temporaries; rare.
    const at::Tensor w = weight.to(bt).contiguous();
    const bool direct = out.scalar_type() == bt;
    at::Tensor o = direct ? out : at::empty_like(w);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bt, "miss_ext_bat_transform_cuda",
                                    [&] { launch<scalar_t, false, true>(w, block, o); });
    if (!direct) out.copy_(o);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(),
                                  "miss_ext_bat_transform_cuda",
                                  [&] { launch<scalar_t, false, true>(weight, block, out); });
}

void bat_weight_grad(const at::Tensor& grad, const at::Tensor& block, at::Tensor& out) {
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "miss_ext_bat_weight_grad_cuda",
                                  [&] { launch<scalar_t, true, false>(grad, block, out); });
}

}  // namespace cuda
}  // namespace miss_ext
