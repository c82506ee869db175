// The BAT family (block affine transform, W'_ij = W_ij (I + B_i) + B_i): the transform, its
// block and weight gradients, the fused layer and its input gradient, the block gradient from
// the layer's input and output gradient, and the unmerge. Kernels: csrc/cpu/bat.cpp and
// bat_mixed.cpp, csrc/cuda/bat.cu and bat_block_grad.cu.
#include <ATen/ops/linalg_solve_ex.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>

#include "cpu/workspace.h"
#include "front/checks.h"
#include "front/families.h"
#include "front/half_gemm.h"

namespace miss_ext {
namespace front {
namespace {

// Shared shape rules of the BAT ops: weight (out, in), block (out/r, r, r).
int64_t check_bat_shapes(const char* op, const char* weight_name, const at::Tensor& weight,
                         const at::Tensor& block) {
  check_float(op, weight_name, weight);
  check_float(op, "block", block);
  check_same_device(op, weight_name, weight, "block", block);
  check_dim(op, weight_name, weight, 2, "(out_features, in_features)");
  check_dim(op, "block", block, 3, "(out_features / r, r, r)");
  const int64_t r = block.size(1);
  check_rank(op, "block.shape[1]", r);
  TORCH_CHECK(block.size(2) == r, "miss_ext.", op,
              ": argument 'block' must have shape (out_features / r, r, r) with square r x r "
              "blocks (got ",
              block.sizes(), ")");
  TORCH_CHECK(weight.size(0) % r == 0 && weight.size(1) % r == 0, "miss_ext.", op,
              ": BAT needs in_features and out_features divisible by r so the weight splits into "
              "r x r blocks (got ",
              weight_name, " shape ", weight.sizes(), ", r = ", r, "); choose r dividing both");
  TORCH_CHECK(block.size(0) == weight.size(0) / r, "miss_ext.", op,
              ": argument 'block' must have out_features / r = ", weight.size(0) / r,
              " blocks along dim 0 (got ", block.size(0), ")");
  return r;
}

// The solve's precision: float64 when either input is, else float32 (no half-type solver).
at::ScalarType fp32_or_fp64(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

// A large temporary of `like`'s device: on the CPU from the workspace cache (cpu/workspace.h).
at::Tensor temp_empty(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  if (like.device().is_cpu()) return cpu::workspace_empty(sizes, dtype);
  return at::empty(sizes, like.options().dtype(dtype));
}

// The BAT transform of `weight` by `block` into `out_dtype`. All three equal: products in that
// dtype. A float32/float64 block: products in its precision, the weight read as stored, the
// result rounded once. A half-type block with anything else differing: the weight is cast to
// the block's dtype first (as PEFT computes BAT in the adapter's dtype). `half_products` permits
// products on the block rounded to the output's half type (docs/MATH.md section 11.4); each
// backend decides where that pays (csrc/common/kernels.h): the CPU's bf16 micro-kernels only.
at::Tensor transform(const at::Tensor& weight, const at::Tensor& block, at::ScalarType out_dtype,
                     bool half_products = false) {
  const auto bt = block.scalar_type();
  const bool wide_block = bt == at::kFloat || bt == at::kDouble;
  at::Tensor w = (wide_block ? weight : weight.to(bt)).contiguous();
  at::Tensor b = block.contiguous();
  const bool equal = w.scalar_type() == bt && out_dtype == bt;
  at::Tensor out = temp_empty(w, w.sizes(), equal || wide_block ? out_dtype : bt);
  if (w.numel() > 0) {
    MISS_EXT_ON_DEVICE(w, bat_transform, w, b, half_products, out);
  }
  return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
}

// The checks bat_linear and bat_input_grad share: `act` is x (ending in in_features) or grad
// (ending in out_features), and every block of the chain must hold act's dtype.
void check_bat_chain(const char* op, const char* act_name, const at::Tensor& act,
                     const at::Tensor& weight, at::TensorList blocks, int64_t weight_dim,
                     const char* features_name) {
  TORCH_CHECK(!blocks.empty(), "miss_ext.", op,
              ": argument 'blocks' must hold at least one (out_features / r, r, r) block");
  check_float(op, act_name, act);
  check_float(op, "weight", weight);
  check_dim(op, "weight", weight, 2, "(out_features, in_features)");
  check_same_device(op, act_name, act, "weight", weight);
  TORCH_CHECK(act.dim() >= 1 && act.size(-1) == weight.size(weight_dim), "miss_ext.", op,
              ": argument '", act_name, "' must end in ", features_name, " = ",
              weight.size(weight_dim), " (got shape ", act.sizes(), ")");
  for (const auto& b : blocks) {
    check_bat_shapes(op, "weight", weight, b);
    TORCH_CHECK(holds(act.scalar_type(), b.scalar_type()), "miss_ext.", op, ": every block (got ",
                b.scalar_type(), ") must have ", act_name, "'s dtype (", act.scalar_type(),
                ") or a wider float that holds it (mixed precision: W' is formed in the block's "
                "precision and rounded once to ", act_name, "'s dtype); cast ", act_name,
                " or the blocks");
  }
}

// W' of a chain: intermediate weights stay in their block's precision, the last transform rounds
// once to the GEMM's dtype (docs/MATH.md, mixed precision).
at::Tensor chain_transform(const at::Tensor& weight, at::TensorList blocks, at::ScalarType dtype,
                           bool half_products) {
  at::Tensor w = weight;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const bool last = k + 1 == blocks.size();
    w = last ? transform(w, blocks[k], dtype, half_products)
             : transform(w, blocks[k], blocks[k].scalar_type());
  }
  return w;
}

at::Tensor bat_transform(const at::Tensor& weight, const at::Tensor& block,
                         std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "bat_transform";
  check_bat_shapes(op, "weight", weight, block);
  if (dtype.has_value()) {
    TORCH_CHECK(is_supported_float(*dtype), "miss_ext.", op,
                ": argument 'dtype' must be float32, float64, bfloat16 or float16 (got ", *dtype, ")");
  }
  return transform(weight, block, dtype.value_or(block.scalar_type()));
}

at::Tensor bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "bat_block_grad";
  check_float(op, "grad", grad);
  check_float(op, "weight", weight);
  check_same_device(op, "grad", grad, "weight", weight);
  check_dim(op, "grad", grad, 2, "(out_features, in_features)");
  check_rank(op, "r", r);
  TORCH_CHECK(grad.sizes() == weight.sizes(), "miss_ext.", op, ": arguments 'grad' ",
              grad.sizes(), " and 'weight' ", weight.sizes(), " must have the same shape");
  TORCH_CHECK(grad.size(0) % r == 0 && grad.size(1) % r == 0, "miss_ext.", op,
              ": BAT needs in_features and out_features divisible by r (got shape ", grad.sizes(),
              ", r = ", r, ")");
  at::Tensor g = grad.contiguous();
  at::Tensor w = weight.to(grad.scalar_type()).contiguous();
  at::Tensor out = at::empty({grad.size(0) / r, r, r}, grad.options());
  if (g.numel() == 0) return out.zero_();
  MISS_EXT_ON_DEVICE(g, bat_block_grad, g, w, r, out);
  return out;
}

at::Tensor bat_weight_grad(const at::Tensor& grad, const at::Tensor& block) {
  MISS_EXT_NO_AUTOCAST;
  check_bat_shapes("bat_weight_grad", "grad", grad, block);
  at::Tensor g = grad.contiguous();
  at::Tensor b = block.to(grad.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(g);
  if (g.numel() > 0) MISS_EXT_ON_DEVICE(g, bat_weight_grad, g, b, out);
  return out;
}

at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::TensorList blocks,
                      bool half_products) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "bat_linear";
  check_bat_chain(op, "x", x, weight, blocks, 1, "in_features");
  const std::optional<at::Tensor> b = checked_bias(op, x, bias, weight.size(0));
  const at::Tensor x2 = as_rows(x);
  const at::Tensor w = chain_transform(weight, blocks, x.scalar_type(), half_products);
  // Through a 2-D view of a result allocated in its final shape, so the output is not a view.
  at::Tensor y = at::empty(with_last(x, weight.size(0)), x.options());
  at::Tensor y2 = y.view({x2.size(0), weight.size(0)});
  half_mm_out(y2, x2, w.t(), b);
  return y;
}

at::Tensor bat_input_grad(const at::Tensor& grad, const at::Tensor& weight, at::TensorList blocks,
                          bool half_products) {
  MISS_EXT_NO_AUTOCAST;
  check_bat_chain("bat_input_grad", "grad", grad, weight, blocks, 0, "out_features");
  const at::Tensor g2 = as_rows(grad);
  at::Tensor dx = at::empty(with_last(grad, weight.size(1)), grad.options());
  at::Tensor dx2 = dx.view({g2.size(0), weight.size(1)});
  if (dx.numel() == 0) return dx;
  half_mm_out(dx2, g2, chain_transform(weight, blocks, grad.scalar_type(), half_products));
  return dx;
}

at::Tensor bat_io_block_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             int64_t r, std::optional<at::ScalarType> dtype, bool half_products) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "bat_io_block_grad";
  check_float(op, "grad", grad);
  check_float(op, "x", x);
  check_float(op, "weight", weight);
  check_same_device(op, "grad", grad, "x", x);
  check_same_device(op, "grad", grad, "weight", weight);
  check_same_dtype(op, "grad", grad, "x", x);
  check_dim(op, "weight", weight, 2, "(out_features, in_features)");
  check_rank(op, "r", r);
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  TORCH_CHECK(out_f % r == 0 && in_f % r == 0, "miss_ext.", op,
              ": BAT needs in_features and out_features divisible by r (got weight shape ",
              weight.sizes(), ", r = ", r, ")");
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == out_f, "miss_ext.", op,
              ": argument 'grad' must end in out_features = ", out_f, " (got shape ",
              grad.sizes(), ")");
  TORCH_CHECK(x.dim() == grad.dim() && x.size(-1) == in_f &&
                  x.sizes().slice(0, x.dim() - 1) == grad.sizes().slice(0, grad.dim() - 1),
              "miss_ext.", op, ": argument 'x' must have grad's leading dimensions and end in "
              "in_features = ", in_f, " (got x ", x.sizes(), ", grad ", grad.sizes(), ")");
  const auto acc = dtype.value_or(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  TORCH_CHECK((acc == at::kFloat || acc == at::kDouble) && holds(x.scalar_type(), acc), "miss_ext.",
              op, ": argument 'dtype' (the accumulation dtype) must be float32 or float64 and hold "
              "x's dtype (got ", acc, " for x of ", x.scalar_type(), ")");
  at::Tensor out = at::zeros({out_f / r, r, r}, grad.options().dtype(acc));
  const at::Tensor g2 = as_rows(grad), x2 = as_rows(x);
  if (g2.size(0) > 0 && out.numel() > 0) {
    const at::Tensor w = weight.contiguous();
    MISS_EXT_ON_DEVICE(g2, bat_io_block_grad, g2, x2, w, r, half_products, out);
  }
  return out;
}

at::Tensor bat_unmerge(const at::Tensor& weight, const at::Tensor& block) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "bat_unmerge";
  const int64_t r = check_bat_shapes(op, "weight", weight, block);
  const int64_t out_f = weight.size(0), in_f = weight.size(1), nb = out_f / r;
  if (weight.numel() == 0) return weight.clone();
  // Copy-free layout (docs/MATH.md section 3): weight.view(nb, r, in/r, r)[i, a, j, c] = W_ij[a, c],
  // and the same memory viewed as (nb, in, r) stacks the rows of every W_ij of block row i.
  const auto acc = fp32_or_fp64(weight, block);
  at::Tensor b = block.to(acc);
  at::Tensor y = weight.to(acc).contiguous().view({nb, r, in_f / r, r}) - b.view({nb, r, 1, r});
  at::Tensor a = b + at::eye(r, b.options());
  // X (I + B_i) = W' - B_i, solved per block row rather than inverting I + B_i.
  auto [x, info] = at::linalg_solve_ex(a, y.view({nb, in_f, r}), /*left=*/false);
  const at::Tensor bad = info.ne(0).nonzero().flatten().cpu();
  if (bad.numel() > 0) {
    std::ostringstream rows;
    for (int64_t k = 0; k < std::min<int64_t>(bad.numel(), 8); ++k)
      rows << (k ? ", " : "") << bad[k].item<int64_t>();
    TORCH_CHECK(false, "miss_ext.", op, ": I + B_i is singular for block row(s) i = ", rows.str(),
                bad.numel() > 8 ? ", ..." : "",
                " of 'block', so this BAT adapter cannot be unmerged; the weight was not changed");
  }
  TORCH_CHECK(!y.isfinite().all().item<bool>() || x.isfinite().all().item<bool>(), "miss_ext.",
              op,
              ": I + B_i is numerically singular (the solve produced non-finite values), so this "
              "BAT adapter cannot be unmerged; the weight was not changed");
  return x.view({out_f, in_f}).to(weight.scalar_type());
}

}  // namespace

void define_bat(torch::Library& m) {
  // BAT: W'_ij = W_ij (I + B_i) + B_i over r x r blocks, in the block's precision, rounded once
  // to `dtype` (default: the block's dtype).
  m.def("bat_transform(Tensor weight, Tensor block, ScalarType? dtype=None) -> Tensor");
  // dL/dB_i = sum_j (W_ij + I)^T G_ij for G = dL/dW'.
  m.def("bat_block_grad(Tensor grad, Tensor weight, int r) -> Tensor");
  // grad W' with W' as in bat_linear (rounded once to grad's dtype): BAT's input gradient.
  // half_products (bat_input_grad, bat_io_block_grad, bat_linear) permits products on fp32
  // operands rounded to x's half type, autocast's precision (docs/MATH.md section 11.4).
  m.def("bat_input_grad(Tensor grad, Tensor weight, Tensor[] blocks, bool half_products=False) -> Tensor");
  // The same from the layer's output gradient and input, with G = grad^T x never formed,
  // accumulated in `dtype` (float32, or float64 for float64 x).
  m.def("bat_io_block_grad(Tensor grad, Tensor x, Tensor weight, int r, ScalarType? dtype=None, "
        "bool half_products=False) -> Tensor");
  // dL/dW_ij = G_ij (I + B_i)^T for G = dL/dW'.
  m.def("bat_weight_grad(Tensor grad, Tensor block) -> Tensor");
  // x W'^T + b with W' the weight after each block's transform in turn; the blocks may be wider
  // than x (W' formed in their precision, rounded once to x's dtype for the GEMM).
  m.def("bat_linear(Tensor x, Tensor weight, Tensor? bias, Tensor[] blocks, "
        "bool half_products=False) -> Tensor");
  // Inverse of bat_transform: W_ij = (W'_ij - B_i)(I + B_i)^-1, by a solve in float32/64.
  m.def("bat_unmerge(Tensor weight, Tensor block) -> Tensor");
}

void impl_bat(torch::Library& m) {
  m.impl("bat_transform", &bat_transform);
  m.impl("bat_block_grad", &bat_block_grad);
  m.impl("bat_io_block_grad", &bat_io_block_grad);
  m.impl("bat_input_grad", &bat_input_grad);
  m.impl("bat_weight_grad", &bat_weight_grad);
  m.impl("bat_linear", &bat_linear);
  m.impl("bat_unmerge", &bat_unmerge);
}

}  // namespace front
}  // namespace miss_ext
