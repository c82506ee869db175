// CPU kernels of the block sum and its adjoint, tile (both with optional fused dropout).
// Both are one pass over the (N, features) side, parallel over rows; the inner loops run over
// contiguous r-wide column runs so the compiler vectorizes them. The narrow side (x of the block
// sum, the output of tile) may be bfloat16/float16 while the block side is float32/float64:
// that is the mixed-precision layer (docs/MATH.md, mixed precision), and neither side is ever
// copied to the other's dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/kernels.h"
#include "common/philox.h"
#include "cpu/convert.h"
#include "cpu/vec.h"

namespace miss_ext {
namespace cpu {
namespace {

// Rows per parallel task: enough work to amortize the task, few enough to balance 2+ threads.
int64_t row_grain(int64_t features) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(features, 1));
}

// mask[k] = 1 if element start + k is kept, else 0 (the same mask as philox.h on every device).
void fill_keep_mask(const DropoutArgs& drop, uint64_t start, int64_t len, float* mask) {
  const uint64_t threshold = dropout_threshold(drop.p);
  uint64_t block = start >> 2;
  Philox4 words = philox4x32_10(drop.seed, block);
  for (int64_t k = 0; k < len; ++k) {
    const uint64_t idx = start + static_cast<uint64_t>(k);
    if ((idx >> 2) != block) {
      block = idx >> 2;
      words = philox4x32_10(drop.seed, block);
    }
    mask[k] = dropout_keep(words.v[idx & 3], threshold) ? 1.0f : 0.0f;
  }
}

template <typename in_t, typename out_t>
void blocksum_kernel(const at::Tensor& x, int64_t r, const DropoutArgs& drop, at::Tensor& out) {
  using acc_t = acc_of<in_t, out_t>;
  const int64_t n_rows = x.size(0), in = x.size(1), ld = x.stride(0);
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* op = out.mutable_data_ptr<out_t>();
  const acc_t scale = drop.enabled ? static_cast<acc_t>(dropout_keep_scale(drop.p)) : acc_t(1);
  at::parallel_for(0, n_rows, row_grain(in), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(r);
    std::vector<float> mask(drop.enabled ? in : 0);
    for (int64_t n = begin; n < end; ++n) {
      const in_t* row = xp + n * ld;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* a = acc.data();
      if (drop.enabled) {
        fill_keep_mask(drop, static_cast<uint64_t>(n) * static_cast<uint64_t>(in), in,
                       mask.data());
        const float* m = mask.data();
        for (int64_t j0 = 0; j0 < in; j0 += r) {
          const int64_t len = std::min(r, in - j0);
          // Multiply rather than select, so a dropped inf/NaN gives NaN as torch's dropout does.
          for (int64_t c = 0; c < len; ++c)
            a[c] += load<acc_t>(row + j0 + c) * static_cast<acc_t>(m[j0 + c]);
        }
      } else if constexpr (std::is_same_v<in_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
        vec::blocksum_bf16(reinterpret_cast<const uint16_t*>(row), in, r, a);
      } else {
        for (int64_t j0 = 0; j0 < in; j0 += r) {
          const int64_t len = std::min(r, in - j0);
          for (int64_t c = 0; c < len; ++c) a[c] += load<acc_t>(row + j0 + c);
        }
      }
      out_t* o = op + n * r;
      for (int64_t c = 0; c < r; ++c) store<out_t>(o + c, a[c] * scale);
    }
  });
}

// out = base + scale * keep * s (tiled), rounded once to out's dtype; s may be wider than out.
template <typename s_t, typename out_t>
void tile_kernel(const at::Tensor& s, const at::Tensor& base, const DropoutArgs& drop,
                 at::Tensor& out) {
  using acc_t = acc_of<s_t, out_t>;
  const int64_t n_rows = s.size(0), r = s.size(1), feats = out.size(1);
  const s_t* sp = s.const_data_ptr<s_t>();
  const out_t* bp = base.defined() ? base.const_data_ptr<out_t>() : nullptr;
  out_t* op = out.mutable_data_ptr<out_t>();
  const acc_t scale = drop.enabled ? static_cast<acc_t>(dropout_keep_scale(drop.p)) : acc_t(1);
  at::parallel_for(0, n_rows, row_grain(feats), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> srow(r);
    std::vector<out_t> orow(bp || drop.enabled ? 0 : r);
    std::vector<float> mask(drop.enabled ? feats : 0);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < r; ++c) srow[c] = load<acc_t>(sp + n * r + c) * scale;
      const acc_t* sv = srow.data();
      out_t* o = op + n * feats;
      const out_t* b = bp ? bp + n * feats : nullptr;
      if (!bp && !drop.enabled) {
        // A plain tile: the row rounded once, then copied block by block (rounding every copy
        // again ran at half the speed of writing the output).
        for (int64_t c = 0; c < r; ++c) store<out_t>(orow.data() + c, sv[c]);
        for (int64_t j0 = 0; j0 < feats; j0 += r) {
          std::memcpy(o + j0, orow.data(), std::min(r, feats - j0) * sizeof(out_t));
        }
        continue;
      }
      if (drop.enabled) {
        fill_keep_mask(drop, static_cast<uint64_t>(n) * static_cast<uint64_t>(feats), feats,
                       mask.data());
      }
      if constexpr (std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
        if (!drop.enabled) {
          vec::tile_bf16(reinterpret_cast<const uint16_t*>(b), sv, r, feats, reinterpret_cast<uint16_t*>(o));
          continue;
        }
      }
      const float* m = mask.data();
      for (int64_t j0 = 0; j0 < feats; j0 += r) {
        const int64_t len = std::min(r, feats - j0);
        if (drop.enabled) {
          for (int64_t c = 0; c < len; ++c) {
            const acc_t v = sv[c] * static_cast<acc_t>(m[j0 + c]);
            store<out_t>(o + j0 + c, b ? load<acc_t>(b + j0 + c) + v : v);
          }
        } else {  // a base (the plain tile returned above)
          for (int64_t c = 0; c < len; ++c) store<out_t>(o + j0 + c, load<acc_t>(b + j0 + c) + sv[c]);
        }
      }
    }
  });
}

// Calls fn.template operator()<a_t, b_t>() for the two dtypes (b_t is the same as a_t, or
// float/double when it is wider).
#define MISS_EXT_DISPATCH_TWO(A_TYPE, B_TYPE, NAME, ...)                                    \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A_TYPE, NAME, [&] {             \
    using a_t = scalar_t;                                                                    \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B_TYPE, NAME, [&] {           \
      using b_t = scalar_t;                                                                  \
      __VA_ARGS__();                                                                         \
    });                                                                                      \
  })

}  // namespace

void blocksum(const at::Tensor& x, int64_t r, const DropoutArgs& drop, at::Tensor& out) {
  MISS_EXT_DISPATCH_TWO(x.scalar_type(), out.scalar_type(), "miss_ext_blocksum",
                        [&] { blocksum_kernel<a_t, b_t>(x, r, drop, out); });
}

void tile(const at::Tensor& s, const at::Tensor& base, const DropoutArgs& drop, at::Tensor& out) {
  MISS_EXT_DISPATCH_TWO(s.scalar_type(), out.scalar_type(), "miss_ext_tile",
                        [&] { tile_kernel<a_t, b_t>(s, base, drop, out); });
}

}  // namespace cpu
}  // namespace miss_ext
