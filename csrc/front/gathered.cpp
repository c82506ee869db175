// Mixed-adapter batches (serving): every row adds the product of its block sum with its own
// adapter's block. Kernels: csrc/cpu/gathered.cpp, csrc/cuda/gathered.cu.
#include <torch/library.h>

#include <vector>

#include "front/checks.h"
#include "front/families.h"

namespace miss_ext {
namespace front {
namespace {

at::Tensor miss_gathered_product(const at::Tensor& base, const at::Tensor& s, at::TensorList blocks,
                                 const at::Tensor& index) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "miss_gathered_product";
  check_float(op, "base", base);
  check_float(op, "s", s);
  TORCH_CHECK(!blocks.empty(), "miss_ext.", op,
              ": argument 'blocks' must hold at least one (r, out_features) or (r, mini_r) block");
  check_same_device(op, "base", base, "s", s);
  TORCH_CHECK(base.dim() >= 1 && base.dim() == s.dim() &&
                  base.sizes().slice(0, base.dim() - 1) == s.sizes().slice(0, s.dim() - 1),
              "miss_ext.", op, ": arguments 'base' ", base.sizes(), " and 's' ", s.sizes(),
              " must have the same leading dimensions (one block-sum row per output row)");
  const int64_t r = s.size(-1), out_f = base.size(-1);
  check_rank(op, "s.shape[-1]", r);
  for (size_t k = 0; k < blocks.size(); ++k) {
    const at::Tensor& b = blocks[k];
    check_float(op, "blocks[k]", b);
    check_same_device(op, "base", base, "blocks[k]", b);
    check_same_dtype(op, "s", s, "blocks[k]", b);
    check_dim(op, "blocks[k]", b, 2, "(r, out_features) or, for mini, (r, mini_r)");
    TORCH_CHECK(b.size(0) == r, "miss_ext.", op, ": blocks[", k, "] has ", b.size(0),
                " rows but s has r = ", r, " columns; blocks of one call share r (call once per r)");
    TORCH_CHECK(b.size(1) > 0 && out_f % b.size(1) == 0, "miss_ext.", op, ": out_features (",
                out_f, ") must be divisible by blocks[", k, "].shape[1] (", b.size(1),
                "; out_features for standard MiSS, mini_r for mini)");
  }
  check_block_holds(op, "base", base, blocks[0]);
  TORCH_CHECK(index.defined() && index.scalar_type() == at::kLong, "miss_ext.", op,
              ": argument 'index' must be an int64 tensor (got ",
              index.defined() ? c10::toString(index.scalar_type()) : "undefined",
              "); build it with torch.tensor(..., dtype=torch.int64)");
  check_same_device(op, "base", base, "index", index);
  TORCH_CHECK(index.sizes() == base.sizes().slice(0, base.dim() - 1), "miss_ext.", op,
              ": argument 'index' must have base's leading shape ",
              base.sizes().slice(0, base.dim() - 1), " (one adapter per output row), got ",
              index.sizes());
  const int64_t k_count = static_cast<int64_t>(blocks.size());
  if (index.numel() > 0) {
    const auto [lo, hi] = at::aminmax(index);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = hi.item<int64_t>();
    TORCH_CHECK(lo_v >= -1 && hi_v < k_count, "miss_ext.", op,
                ": argument 'index' must hold values in [-1, ", k_count,
                ") (-1: the base row alone, k: blocks[k]); got values in [", lo_v, ", ", hi_v, "]");
  }
  // Half-type blocks (the equal-dtype half layer) are summed in float32, like every half-type
  // product here; float32/float64 blocks are the precision itself.
  const auto acc = (s.scalar_type() == at::kDouble || s.scalar_type() == at::kFloat)
                       ? s.scalar_type()
                       : at::kFloat;
  // A row broadcast to every row (bias.expand(...)) is read in place, never materialised: the
  // layer adds the term to the bias first and lets the frozen GEMM accumulate into the result.
  at::Tensor b2 = base;
  const bool broadcast_row = base.dim() >= 1 && base.size(-1) > 0 && base.stride(-1) == 1 &&
                             [&] {
                               for (int64_t d = 0; d + 1 < base.dim(); ++d)
                                 if (base.stride(d) != 0) return false;
                               return true;
                             }();
  const int64_t n_rows = index.numel();
  if (broadcast_row) {
    b2 = base.as_strided({n_rows, out_f}, {0, 1});
  } else {
    b2 = as_rows(base).contiguous();
  }
  const at::Tensor s2 = as_rows(s).to(acc).contiguous();
  std::vector<at::Tensor> blks;
  blks.reserve(blocks.size());
  for (const auto& b : blocks) blks.push_back(b.to(acc).contiguous());
  const at::Tensor idx = index.reshape({-1}).contiguous();
  at::Tensor out = at::empty(base.sizes(), base.options());
  if (out.numel() > 0) {
    at::Tensor out2 = out.view({b2.size(0), out_f});
    MISS_EXT_ON_DEVICE(base, miss_gathered_product, b2, s2, blks, idx, out2);
  }
  return out;
}

}  // namespace

void define_gathered(torch::Library& m) {
  // Mixed-adapter batches (serving): base + per-row tile_out(s[n] @ blocks[index[n]]), each row
  // with its own standard (r, out) or mini (r, mini_r) block, index -1 for the base alone; the
  // product in the blocks' precision, rounded once to base's dtype.
  m.def("miss_gathered_product(Tensor base, Tensor s, Tensor[] blocks, Tensor index) -> Tensor");
}

void impl_gathered(torch::Library& m) { m.impl("miss_gathered_product", &miss_gathered_product); }

}  // namespace front
}  // namespace miss_ext
