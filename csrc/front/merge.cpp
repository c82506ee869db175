// The standard/mini merge: W + alpha * dW with dW tiled from the block. Kernels:
// csrc/cpu/merge.cpp, csrc/cuda/merge.cu. (BAT's unmerge is a solve, in front/bat.cpp.)
#include <torch/library.h>

#include "front/checks.h"
#include "front/families.h"

namespace miss_ext {
namespace front {
namespace {

at::Tensor miss_merge(const at::Tensor& weight, const at::Tensor& block, double alpha) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "miss_merge";
  check_float(op, "weight", weight);
  check_float(op, "block", block);
  check_same_device(op, "weight", weight, "block", block);
  check_dim(op, "weight", weight, 2, "(out_features, in_features)");
  check_dim(op, "block", block, 2, "(r, out_features) or, for mini, (r, mini_r)");
  check_rank(op, "block.shape[0]", block.size(0));
  const int64_t m = block.size(1);
  TORCH_CHECK(m > 0 && weight.size(0) % m == 0, "miss_ext.", op,
              ": out_features (", weight.size(0), ") must be divisible by block.shape[1] (", m,
              "; out_features for standard MiSS, mini_r for mini)");
  at::Tensor w = weight.contiguous();
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor b = block.to(acc).contiguous();
  at::Tensor out = at::empty_like(w);
  if (w.numel() > 0) MISS_EXT_ON_DEVICE(w, miss_merge, w, b, alpha, out);
  return out;
}

}  // namespace

void define_merge(torch::Library& m) {
  // W + alpha * dW with dW[o, k] = block[k % r, o % m] (standard: m = out, mini: m = mini_r).
  m.def("miss_merge(Tensor weight, Tensor block, float alpha) -> Tensor");
}

void impl_merge(torch::Library& m) { m.impl("miss_merge", &miss_merge); }

}  // namespace front
}  // namespace miss_ext
