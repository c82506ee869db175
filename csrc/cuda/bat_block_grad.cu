// BAT block gradient: out_i = W3[i]^T G3[i] + sum_j G_ij, i.e. for every slab i
//   out_i[k, c] = sum_t W3[i][t, k] G3[i][t, c]  +  sum_{t in [k, k+1) * in/r} G3[i][t, c]
// (the second term is the "+ I" of (W_ij + I)^T G_ij: row t of the slab is row t / (in/r) of
// its block). Both sums run over the in rows of a slab; nothing is atomic. When the slabs
// alone cannot fill the device, the rows are split into fixed chunks whose fp32 partials a
// second kernel adds in chunk order, so results are bit-identical run to run.
// Three paths:
//   r <= 16:                 one block per (slab, chunk); threads own (k, c) pairs and stride
//                            over the rows, group partials added in a fixed order
//   half types, r % 16 == 0: WMMA tensor cores on 64 x 64 tiles of out_i
//   otherwise:               SIMT tiles (32 x 32 or 64 x 64) of out_i
// bat_io_block_grad runs these kernels on Gw = grad^T x, formed by cuBLAS one group of slabs at
// a time.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "cuda/cuda_utils.cuh"

namespace miss_ext {
namespace cuda {
namespace {

using namespace detail;

template <typename scalar_t, typename acc_t>
struct BGrad {
  const scalar_t* g;  // (nb, in, r)
  const scalar_t* w;  // (nb, in, r)
  scalar_t* out;      // (nb, r, r), written when splits == 1
  acc_t* ws;          // (splits, nb, r, r) partials when splits > 1
  int64_t nb;
  int64_t in;
  int64_t r;
  int splits;
  int64_t chunk;  // rows per split
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void put(const BGrad<scalar_t, acc_t>& p, int64_t slab, int split,
                                    int64_t k, int64_t c, acc_t v) {
  const int64_t e = (slab * p.r + k) * p.r + c;
  if (p.splits == 1) {
    p.out[e] = static_cast<scalar_t>(v);
  } else {
    p.ws[split * p.nb * p.r * p.r + e] = v;
  }
}

// The work of block b in a tiled launch: output tile (k0, c0) of slab `slab`, summed over the
// rows [ts, te) of split `split`. Blocks run tiles fastest, then tile rows, splits, slabs.
struct TileWork {
  int64_t slab, k0, c0, ts, te;
  int split;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ TileWork tile_work(const BGrad<scalar_t, acc_t>& p, int64_t b,
                                              int64_t tiles, int64_t bm) {
  TileWork w;
  const int64_t ct = b % tiles;
  b /= tiles;
  const int64_t kt = b % tiles;
  b /= tiles;
  w.split = static_cast<int>(b % p.splits);
  w.slab = b / p.splits;
  w.k0 = kt * bm;
  w.c0 = ct * bm;
  w.ts = w.split * p.chunk;
  w.te = p.in < w.ts + p.chunk ? p.in : w.ts + p.chunk;
  return w;
}

// ---------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bgrad_small_kernel(const BGrad<scalar_t, acc_t> p) {
  __shared__ acc_t red[kThreads];
  const int64_t slab = blockIdx.x / p.splits;
  const int split = static_cast<int>(blockIdx.x % p.splits);
  const int r = static_cast<int>(p.r);
  const int P = r * r, Q = kThreads / P;
  const int tid = threadIdx.x;
  const int pi = tid % P, g = tid / P, k = pi / r, c = pi % r;
  const int64_t ts = split * p.chunk;
  const int64_t te = p.in < ts + p.chunk ? p.in : ts + p.chunk;
  const int64_t per_a = p.in / r;
  const int64_t lo = k * per_a, hi = lo + per_a;  // rows of the slab that are rows of block k
  const scalar_t* gs = p.g + slab * p.in * r;
  const scalar_t* ws = p.w + slab * p.in * r;

  acc_t acc = acc_t(0), isum = acc_t(0);
  if (g < Q) {
    for (int64_t t = ts + g; t < te; t += Q) {
      const acc_t gv = static_cast<acc_t>(gs[t * r + c]);
      acc += static_cast<acc_t>(ws[t * r + k]) * gv;
      if (t >= lo && t < hi) isum += gv;
    }
  }
  red[tid] = acc + isum;
  __syncthreads();
  if (tid < P) {
    acc_t sum = acc_t(0);
    for (int q = 0; q < Q; ++q) sum += red[q * P + tid];
    put(p, slab, split, k, c, sum);
  }
}

// ---------------------------------------------------------------------------------------
// SIMT tiles of out_i: (16 * TILE) x (16 * TILE), 16 x 16 threads with TILE x TILE each.
template <typename scalar_t, typename acc_t, int TILE>
__global__ void __launch_bounds__(kThreads)
    bgrad_tiled_kernel(const BGrad<scalar_t, acc_t> p, int64_t tiles) {
  constexpr int BM = 16 * TILE, BK = 16;
  __shared__ acc_t as[BK][BM + 1];
  __shared__ acc_t gsm[BK][BM + 1];
  const TileWork tw = tile_work(p, blockIdx.x, tiles, BM);
  const int split = tw.split;
  const int64_t slab = tw.slab, r = p.r, k0 = tw.k0, c0 = tw.c0, ts = tw.ts, te = tw.te;
  const int64_t per_a = p.in / r;
  const scalar_t* gs = p.g + slab * p.in * r;
  const scalar_t* ws = p.w + slab * p.in * r;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  acc_t acc[TILE][TILE], isum[TILE][TILE];
#pragma unroll
  for (int i = 0; i < TILE; ++i)
#pragma unroll
    for (int j = 0; j < TILE; ++j) acc[i][j] = isum[i][j] = acc_t(0);

  for (int64_t t0 = ts; t0 < te; t0 += BK) {
#pragma unroll
    for (int e = tid; e < BK * BM; e += kThreads) {
      const int tt = e / BM, mm = e % BM;
      const int64_t t = t0 + tt;
      const bool row_ok = t < te;
      as[tt][mm] = (row_ok && k0 + mm < r) ? static_cast<acc_t>(ws[t * r + k0 + mm]) : acc_t(0);
      gsm[tt][mm] = (row_ok && c0 + mm < r) ? static_cast<acc_t>(gs[t * r + c0 + mm]) : acc_t(0);
    }
    __syncthreads();
    // Block row of slab row t0 + tt, advanced without a division per row.
    int64_t a = t0 / per_a, rem = t0 - a * per_a;
#pragma unroll 4
    for (int tt = 0; tt < BK; ++tt) {
      acc_t av[TILE], gv[TILE];
#pragma unroll
      for (int i = 0; i < TILE; ++i) av[i] = as[tt][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < TILE; ++j) gv[j] = gsm[tt][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TILE; ++i) {
#pragma unroll
        for (int j = 0; j < TILE; ++j) acc[i][j] += av[i] * gv[j];
        if (a == k0 + ty + 16 * i) {  // rows past te hold zeros, so no bound check is needed
#pragma unroll
          for (int j = 0; j < TILE; ++j) isum[i][j] += gv[j];
        }
      }
      if (++rem == per_a) {
        rem = 0;
        ++a;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TILE; ++i) {
    const int64_t k = k0 + ty + 16 * i;
    if (k >= r) continue;
#pragma unroll
    for (int j = 0; j < TILE; ++j) {
      const int64_t c = c0 + tx + 16 * j;
      if (c < r) put(p, slab, split, k, c, acc[i][j] + isum[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Half types, r % 16 == 0: 64 x 64 tiles of out_i, 8 warps of 16 x 32, k-steps of 32 rows.
// A = W3 rows as a (k x t) col-major operand, B = G3 rows as a (t x c) row-major operand.
// The identity term is summed in fp32 by the SIMT lanes from the staged G tile: thread
// (q, n) owns rows [16q, 16q + 16) of column n of `ident`, so no two threads share a slot.
namespace wmma = nvcuda::wmma;

constexpr int kBM = 64, kBK = 32;
constexpr int kLd = kBM + 8;  // 16-byte aligned rows, fewer bank conflicts
constexpr int kLdC = kBM + 4;
constexpr int kTileBytes = kBK * kLd * 2;
constexpr int kCBytes = kBM * kLdC * 4;
constexpr int kStageBytes = 2 * kTileBytes > kCBytes ? 2 * kTileBytes : kCBytes;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bgrad_wmma_kernel(const BGrad<scalar_t, float> p, int64_t tiles) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host never picks this path below it
#else
  using V8 = Vec<scalar_t, 8>;
  using frag_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, __nv_bfloat16>;
  __shared__ __align__(128) unsigned char stage[kStageBytes];
  __shared__ float ident[kBM][kBM + 1];
  scalar_t* sa = reinterpret_cast<scalar_t*>(stage);
  scalar_t* sg = reinterpret_cast<scalar_t*>(stage + kTileBytes);
  float* sc = reinterpret_cast<float*>(stage);

  const TileWork tw = tile_work(p, blockIdx.x, tiles, kBM);
  const int split = tw.split;
  const int64_t slab = tw.slab, r = p.r, k0 = tw.k0, c0 = tw.c0, ts = tw.ts, te = tw.te;
  const int64_t per_a = p.in / r;
  const scalar_t* gsrc = p.g + slab * p.in * r;
  const scalar_t* wsrc = p.w + slab * p.in * r;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wr = warp / 2, wc = warp % 2;         // 4 x 2 warps: 16 rows (k) x 32 columns (c)
  const int in_n = tid % kBM, in_q = tid / kBM;   // identity-sum ownership

  for (int e = tid; e < kBM * (kBM + 1); e += kThreads) (&ident[0][0])[e] = 0.0f;

  // One 8-wide piece of each tile per thread: 32 rows x 8 pieces.
  const int lrow = tid / 8, lpiece = tid % 8;
  V8 rw, rg;
  auto fetch = [&](int64_t t0) {
    const int64_t t = t0 + lrow;
    const bool row_ok = t < te;
    const int64_t k = k0 + lpiece * 8, c = c0 + lpiece * 8;
    if (row_ok && k < r) {
      rw = load_vec<scalar_t, 8>(wsrc + t * r + k);
    } else {
#pragma unroll
      for (int z = 0; z < 8; ++z) rw.v[z] = scalar_t(0);
    }
    if (row_ok && c < r) {
      rg = load_vec<scalar_t, 8>(gsrc + t * r + c);
    } else {
#pragma unroll
      for (int z = 0; z < 8; ++z) rg.v[z] = scalar_t(0);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  if (ts < te) fetch(ts);
  for (int64_t t0 = ts; t0 < te; t0 += kBK) {
    store_vec<scalar_t, 8>(sa + lrow * kLd + lpiece * 8, rw);
    store_vec<scalar_t, 8>(sg + lrow * kLd + lpiece * 8, rg);
    __syncthreads();
    if (t0 + kBK < te) fetch(t0 + kBK);
    const frag_t* a_s = reinterpret_cast<const frag_t*>(sa);
    const frag_t* g_s = reinterpret_cast<const frag_t*>(sg);
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, frag_t, wmma::col_major> fa;
      wmma::load_matrix_sync(fa, a_s + kk * kLd + wr * 16, kLd);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, frag_t, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, g_s + kk * kLd + wc * 32 + j * 16, kLd);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
    {
      int64_t a = t0 / per_a, rem = t0 - a * per_a;
      for (int tt = 0; tt < kBK; ++tt) {
        const int64_t m = a - k0 - 16 * in_q;
        if (m >= 0 && m < 16) ident[16 * in_q + m][in_n] += static_cast<float>(sg[tt * kLd + in_n]);
        if (++rem == per_a) {
          rem = 0;
          ++a;
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(sc + wr * 16 * kLdC + wc * 32 + j * 16, acc[j], kLdC,
                            wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kBM * kBM; e += kThreads) {
    const int m = e / kBM, n = e % kBM;
    if (k0 + m < r && c0 + n < r) put(p, slab, split, k0 + m, c0 + n, sc[m * kLdC + n] + ident[m][n]);
  }
#endif
}

// Adds the split partials in split order.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bgrad_finish_kernel(const acc_t* ws, scalar_t* out, int64_t total, int splits) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    acc_t sum = acc_t(0);
    for (int s = 0; s < splits; ++s) sum += ws[s * total + e];
    out[e] = static_cast<scalar_t>(sum);
  }
}

// ---------------------------------------------------------------------------------------
// Splits of the in rows so that about two blocks per SM run; at least `min_rows` rows each,
// a multiple of `step` so every split starts on a k-step boundary.
template <typename scalar_t, typename acc_t>
void choose_splits(BGrad<scalar_t, acc_t>& p, int64_t blocks_per_split, int64_t step,
                   int64_t min_rows) {
  const int64_t target = 2 * int64_t(sm_count());
  int64_t splits = std::clamp<int64_t>(ceil_div(target, blocks_per_split), 1,
                                       std::max<int64_t>(1, p.in / min_rows));
  p.chunk = ceil_div(ceil_div(p.in, splits), step) * step;
  p.splits = static_cast<int>(ceil_div(p.in, p.chunk));
}

template <typename scalar_t>
void launch(const at::Tensor& grad, const at::Tensor& weight, int64_t r, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  BGrad<scalar_t, acc_t> p;
  p.g = grad.data_ptr<scalar_t>();
  p.w = weight.data_ptr<scalar_t>();
  p.out = out.data_ptr<scalar_t>();
  p.ws = nullptr;
  p.nb = grad.size(0) / r;
  p.in = grad.size(1);
  p.r = r;
  const auto stream = at::cuda::getCurrentCUDAStream();

  enum class Path { kSmall, kTiled2, kTiled4, kMma } path;
  int64_t tiles = 1;
  constexpr bool kHalfType =
      std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
  if (r <= 16) {
    path = Path::kSmall;
    choose_splits(p, p.nb, 1, 1024);
  } else if (kHalfType && r > 32 && r % 16 == 0 && aligned16(p.g) && aligned16(p.w) &&
             at::cuda::getCurrentDeviceProperties()->major >= 8) {
    path = Path::kMma;
    tiles = ceil_div(r, kBM);
    choose_splits(p, p.nb * tiles * tiles, kBK, 512);
  } else {
    path = r <= 32 ? Path::kTiled2 : Path::kTiled4;
    tiles = ceil_div(r, r <= 32 ? 32 : 64);
    choose_splits(p, p.nb * tiles * tiles, 16, 512);
  }

  at::Tensor ws;
  if (p.splits > 1) {
    ws = at::empty({p.splits, p.nb, r, r},
                   grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    p.ws = ws.data_ptr<acc_t>();
  }
  const int64_t blocks = p.nb * p.splits * tiles * tiles;
  TORCH_CHECK(blocks <= INT_MAX, "miss_ext.bat_block_grad (CUDA): weight too large for one launch");
  const unsigned grid = capped_blocks(blocks);
  switch (path) {
    case Path::kSmall:
      bgrad_small_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(p);
      break;
    case Path::kTiled2:
      bgrad_tiled_kernel<scalar_t, acc_t, 2><<<grid, kThreads, 0, stream>>>(p, tiles);
      break;
    case Path::kTiled4:
      bgrad_tiled_kernel<scalar_t, acc_t, 4><<<grid, kThreads, 0, stream>>>(p, tiles);
      break;
    case Path::kMma:
      if constexpr (kHalfType) bgrad_wmma_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p, tiles);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    const int64_t total = p.nb * r * r;
    bgrad_finish_kernel<scalar_t, acc_t>
        <<<grid_stride_blocks(total, kThreads), kThreads, 0, stream>>>(p.ws, p.out, total,
                                                                     p.splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r,
                    at::Tensor& out) {
  if (out.numel() == 0) return;
  if (grad.numel() == 0) {
    out.zero_();
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "miss_ext_bat_block_grad_cuda",
                                  [&] { launch<scalar_t>(grad, weight, r, out); });
}

// The block gradient from the layer's input and output gradient, in out's precision (float32,
// float64 for float64 x): Gw = grad^T x by cuBLAS (aten) a group of slabs at a time, then the
// block-gradient kernels above on each group. half_products is ignored (fp32 products, inside
// its bound, docs/MATH.md 11.4).
void bat_io_block_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                       int64_t r, bool /*half_products*/, at::Tensor& out) {
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

}  // namespace cuda
}  // namespace miss_ext
