// miss_gathered_product on CUDA: the mixed-adapter (serving) product (docs/MATH.md section 12),
//
//   out[n, o] = base[n, o] + sum_c s[n, c] * blocks[index[n]][c, o % m],  index[n] = -1: base
//
// A thread block takes a tile of kTileRows consecutive rows and kThreads output columns; each
// thread owns one column and keeps one accumulator per row of the tile in registers. The tile's
// block-sum rows are staged through shared memory kChunk columns at a time. Rows of a serving
// batch come in runs that share an adapter (a sequence is many rows), so the tile is walked run
// by run: one load of the run's block element serves every row of the run. No sort, no atomics,
// and each output element is written once, so reruns are bit-identical.
//
// `base` may be one row broadcast to all (row stride 0: a bias), read as it is.
//
// The blocks' pointers travel in the kernel's arguments (kMaxBlocks per launch); more adapters
// take more launches, each writing only its own rows (the first one also copies the others).
#include "cuda/cuda_utils.cuh"

#include <type_traits>

namespace miss_ext {
namespace cuda {
namespace {

using namespace detail;

constexpr int kTileRows = 16;
constexpr int kChunk = 32;
constexpr int kMaxBlocks = 32;

template <typename acc_t>
struct BlockTable {
  const acc_t* ptr[kMaxBlocks];
  int64_t m[kMaxBlocks];
};

template <typename out_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gathered_kernel(const out_t* __restrict__ base, const acc_t* __restrict__ s,
                    const int64_t* __restrict__ index, const BlockTable<acc_t> table, int64_t k0,
                    int64_t k1, bool copy_others, out_t* __restrict__ out, int64_t rows,
                    int64_t out_f, int64_t r, int64_t ldb) {
  __shared__ acc_t s_tile[kTileRows][kChunk];
  __shared__ int64_t idx_tile[kTileRows];
  const int tid = threadIdx.x;
  const int64_t col_tiles = ceil_div(out_f, kThreads);
  const int64_t total = ceil_div(rows, kTileRows) * col_tiles;
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {  // uniform per block
    const int64_t row0 = (tile / col_tiles) * kTileRows;
    const int64_t o = (tile % col_tiles) * kThreads + tid;
    const int nrows = static_cast<int>(rows - row0 < kTileRows ? rows - row0 : kTileRows);
    __syncthreads();  // the previous tile's readers are done with idx_tile and s_tile
    if (tid < kTileRows) idx_tile[tid] = tid < nrows ? index[row0 + tid] : int64_t{-1};
    __syncthreads();
    bool mine = false;  // the same for every thread: read from shared memory
    for (int t = 0; t < nrows; ++t) mine |= idx_tile[t] >= k0 && idx_tile[t] < k1;

    acc_t acc[kTileRows];
#pragma unroll
    for (int t = 0; t < kTileRows; ++t) acc[t] = acc_t(0);
    if (mine) {
      for (int64_t c0 = 0; c0 < r; c0 += kChunk) {
        const int cw = static_cast<int>(r - c0 < kChunk ? r - c0 : kChunk);
        for (int e = tid; e < kTileRows * kChunk; e += kThreads) {
          const int t = e / kChunk, cc = e % kChunk;
          s_tile[t][cc] = (t < nrows && cc < cw) ? s[(row0 + t) * r + c0 + cc] : acc_t(0);
        }
        __syncthreads();
        if (o < out_f) {
          for (int t = 0; t < nrows;) {  // runs of rows with one adapter
            const int64_t k = idx_tile[t];
            int u = t + 1;
            while (u < nrows && idx_tile[u] == k) ++u;
            if (k >= k0 && k < k1) {
              const int64_t m = table.m[k - k0];
              const acc_t* col = table.ptr[k - k0] + c0 * m + o % m;
              for (int cc = 0; cc < cw; ++cc) {
                const acc_t d = col[cc * m];
#pragma unroll
                for (int tt = 0; tt < kTileRows; ++tt)
                  if (tt >= t && tt < u) acc[tt] += s_tile[tt][cc] * d;
              }
            }
            t = u;
          }
        }
        __syncthreads();  // s_tile is refilled next chunk
      }
    }
    if (o < out_f) {
#pragma unroll
      for (int t = 0; t < kTileRows; ++t) {
        if (t >= nrows) break;
        const int64_t k = idx_tile[t];
        const int64_t at_ = (row0 + t) * out_f + o;
        const out_t b = base[(row0 + t) * ldb + o];
        if (k >= k0 && k < k1) {
          out[at_] = static_cast<out_t>(static_cast<acc_t>(b) + acc[t]);
        } else if (copy_others) {
          out[at_] = b;
        }
      }
    }
  }
}

template <typename out_t, typename acc_t>
void launch(const at::Tensor& base, const at::Tensor& s, const std::vector<at::Tensor>& blocks,
            const at::Tensor& index, at::Tensor& out) {
  const int64_t rows = base.size(0), out_f = base.size(1), r = s.size(1);
  const int64_t k_count = static_cast<int64_t>(blocks.size());
  const int64_t tiles = ceil_div(rows, kTileRows) * ceil_div(out_f, kThreads);
  for (int64_t k0 = 0; k0 < k_count; k0 += kMaxBlocks) {
    const int64_t k1 = std::min<int64_t>(k_count, k0 + kMaxBlocks);
    BlockTable<acc_t> table{};
    for (int64_t k = k0; k < k1; ++k) {
      table.ptr[k - k0] = blocks[k].data_ptr<acc_t>();
      table.m[k - k0] = blocks[k].size(1);
    }
    gathered_kernel<out_t, acc_t><<<grid_stride_blocks(tiles, 1), kThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
        base.data_ptr<out_t>(), s.data_ptr<acc_t>(), static_cast<const int64_t*>(index.data_ptr()), table, k0, k1,
        k0 == 0, out.data_ptr<out_t>(), rows, out_f, r, base.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void miss_gathered_product(const at::Tensor& base, const at::Tensor& s,
                           const std::vector<at::Tensor>& blocks, const at::Tensor& index,
                           at::Tensor& out) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(base.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(),
                                  "miss_ext_miss_gathered_product_cuda", [&] {
    if (s.scalar_type() == at::kDouble) {
      launch<scalar_t, double>(base, s, blocks, index, out);
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      launch<scalar_t, float>(base, s, blocks, index, out);
    } else {
      TORCH_CHECK(false, "miss_ext.miss_gathered_product: a float64 base needs float64 blocks");
    }
  });
}

}  // namespace cuda
}  // namespace miss_ext
