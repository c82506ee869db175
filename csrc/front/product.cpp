// Standard and mini MiSS: the fused layer miss_linear and the two mixed-precision products
// (block sum times block, and their gradients) it and its backward use when the block is wider
// than x. Kernels: csrc/cpu/product.cpp, csrc/cuda/product.cu; miss_linear also uses the
// blocksum family's kernels.
#include <torch/library.h>

#include "front/checks.h"
#include "front/families.h"
#include "front/half_gemm.h"

namespace miss_ext {
namespace front {
namespace {

std::tuple<at::Tensor, at::Tensor> miss_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& block, double p,
                                               const std::optional<at::Tensor>& seed,
                                               bool round_base) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "miss_linear";
  check_float(op, "x", x);
  check_float(op, "weight", weight);
  check_float(op, "block", block);
  check_dim(op, "weight", weight, 2, "(out_features, in_features)");
  check_dim(op, "block", block, 2, "(r, out_features) or, for mini, (r, mini_r)");
  // Checked for every p, not only p > 0: a negative (or NaN) p would otherwise mean "no dropout".
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "miss_ext.", op,
              ": argument 'p' (the dropout probability) must be in [0, 1] (got ", p, ")");
  check_same_device(op, "x", x, "weight", weight);
  check_same_device(op, "x", x, "block", block);
  check_same_dtype(op, "x", x, "weight", weight);
  check_block_holds(op, "x", x, block);
  const int64_t out_f = weight.size(0), in_f = weight.size(1), r = block.size(0), m = block.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_f, "miss_ext.", op,
              ": argument 'x' must end in in_features = ", in_f, " (got shape ", x.sizes(), ")");
  check_rank(op, "block.shape[0]", r);
  TORCH_CHECK(m > 0 && out_f % m == 0, "miss_ext.", op, ": out_features (", out_f,
              ") must be divisible by block.shape[1] (", m,
              "; out_features for standard MiSS, mini_r for mini)");
  const auto b = checked_bias(op, x, bias, out_f);
  at::Tensor x2 = as_rows(x);
  const int64_t n = x2.size(0);
  DropoutArgs drop;
  if (p > 0.0) {
    TORCH_CHECK(seed.has_value(), "miss_ext.", op, ": argument 'seed' is required when p > 0");
    drop = dropout_args(op, p, *seed);
  }
  // S is in the block's precision: for a half-type x it is summed straight into float32.
  at::Tensor s = blocksum_into(op, x, r, drop, block.scalar_type());
  const at::Tensor s2 = s.view({n, r});
  const at::Tensor blk = block.contiguous();
  if (block.scalar_type() != x.scalar_type() || round_base) {
    // PEFT's rounding: the base output rounded in x's dtype (nn.Linear's own GEMM, so the same
    // bits), plus the term in the block's precision, rounded once. A block of x's half type is
    // autocast's copy (round_base): its product is rounded to that type first, as autocast does
    // for PEFT.
    // Where torch emulates the half type's GEMM, the same GEMM upcast (docs/MATH.md 11.5).
    at::Tensor y;
    if (half_gemm_emulated(x)) {
      y = at::empty(with_last(x, out_f), x.options());
      at::Tensor y2 = y.view({n, out_f});
      half_mm_out(y2, x2, weight.t(), b);
    } else {
      y = at::linear(x, weight, b).contiguous();
    }
    at::Tensor y2 = y.view({n, out_f});
    // In place on the CPU (each element is read, then written); CUDA's kernels take restrict
    // pointers, so there the sum goes to a new tensor.
    at::Tensor out = x.is_cuda() ? at::empty_like(y) : y;
    at::Tensor out2 = out.view({n, out_f});
    if (n > 0 && out_f > 0) {
      if (m == out_f && block.scalar_type() == x.scalar_type()) {
        // One GEMM and one in-place pass: measured faster on CPU than rounding the product
        // chunk by chunk inside miss_add_product.
        at::add_out(out2, y2, at::mm(s2, blk));
      } else if (m == out_f) {
        MISS_EXT_ON_DEVICE(x, miss_add_product, y2, s2, blk, out2);
      } else {
        MISS_EXT_ON_DEVICE(x, tile, at::mm(s2, blk), y2, DropoutArgs{}, out2);
      }
    }
    return {out, s};
  }
  // Equal dtypes: the adapter term (and the bias) first, then the frozen GEMM accumulates into
  // it (beta = 1): no separate pass adds the adapter to the base output. y is allocated in its
  // final shape so the result is not a view.
  at::Tensor y = at::empty(with_last(x, out_f), x.options());
  at::Tensor y2 = y.view({n, out_f});
  if (m == out_f) {
    half_mm_out(y2, s2, blk, b);  // the bias rides in the term's GEMM: one rounding, no pass
  } else {
    if (n > 0 && out_f > 0) MISS_EXT_ON_DEVICE(x, tile, at::mm(s2, blk), at::Tensor(), DropoutArgs{}, y2);
    if (b.has_value()) y2.add_(*b);
  }
  half_addmm_(y2, x2, weight.t());
  return {y, s};
}

// The argument rules of the two standard-MiSS product ops: `a` (base or grad, (..., out)),
// s (..., r) and block (r, out), s and block in one dtype that holds a's.
void check_product(const char* op, const char* a_name, const at::Tensor& a, const at::Tensor& s,
                   const at::Tensor& block) {
  check_float(op, a_name, a);
  check_float(op, "s", s);
  check_float(op, "block", block);
  check_same_device(op, a_name, a, "s", s);
  check_same_device(op, a_name, a, "block", block);
  check_same_dtype(op, "s", s, "block", block);
  check_block_holds(op, a_name, a, block);
  check_dim(op, "block", block, 2, "(r, out_features)");
  TORCH_CHECK(a.dim() >= 1 && a.dim() == s.dim() &&
                  a.sizes().slice(0, a.dim() - 1) == s.sizes().slice(0, s.dim() - 1),
              "miss_ext.", op, ": arguments '", a_name, "' ", a.sizes(), " and 's' ", s.sizes(),
              " must have the same leading dimensions");
  TORCH_CHECK(s.size(-1) == block.size(0) && a.size(-1) == block.size(1), "miss_ext.", op,
              ": argument 'block' must have shape (s.shape[-1], ", a_name, ".shape[-1]) = (",
              s.size(-1), ", ", a.size(-1), ") (got ", block.sizes(), ")");
}

at::Tensor miss_add_product(const at::Tensor& base, const at::Tensor& s, const at::Tensor& block) {
  MISS_EXT_NO_AUTOCAST;
  check_product("miss_add_product", "base", base, s, block);
  const at::Tensor b2 = as_rows(base).contiguous(), s2 = as_rows(s).contiguous();
  at::Tensor out = at::empty(base.sizes(), base.options());
  at::Tensor out2 = out.view({b2.size(0), b2.size(1)});
  if (out.numel() > 0) {
    MISS_EXT_ON_DEVICE(base, miss_add_product, b2, s2, block.contiguous(), out2);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> miss_block_grads(const at::Tensor& grad, const at::Tensor& s,
                                                    const at::Tensor& block) {
  MISS_EXT_NO_AUTOCAST;
  check_product("miss_block_grads", "grad", grad, s, block);
  const at::Tensor g2 = as_rows(grad).contiguous(), s2 = as_rows(s).contiguous();
  at::Tensor grad_block = at::zeros(block.sizes(), block.options());
  at::Tensor grad_s = at::empty(s.sizes(), s.options());
  if (g2.size(0) > 0 && grad.size(-1) > 0) {
    at::Tensor gs2 = grad_s.view({g2.size(0), s.size(-1)});
    MISS_EXT_ON_DEVICE(grad, miss_block_grads, g2, s2, block.contiguous(), grad_block, gs2);
  } else {
    grad_s.zero_();
  }
  return {grad_block, grad_s};
}

}  // namespace

void define_product(torch::Library& m) {
  // Standard (block (r, out)) or mini (block (r, mini_r)) MiSS fused with its frozen nn.Linear:
  // y = x W^T + b + tile_out(blocksum_r(dropout(x)) @ block); also returns the block sum S,
  // which backward needs (it is N x r: nothing weight- or input-sized is saved).
  // With a block wider than x (mixed precision) the base output is rounded in x's dtype and the
  // block-precision term added and rounded once, as PEFT does; S is in the block's dtype.
  // round_base (a block of x's dtype): PEFT's order of roundings instead of the GEMM accumulating
  // into the term, the base output and the term each rounded before their sum (autocast).
  m.def("miss_linear(Tensor x, Tensor weight, Tensor? bias, Tensor block, float p, Tensor? seed, bool round_base=False) -> (Tensor, Tensor)");
  // base + s @ block with the product in the block's precision, rounded once to base's dtype.
  m.def("miss_add_product(Tensor base, Tensor s, Tensor block) -> Tensor");
  // (s^T grad, grad block^T) in the block's precision, grad read in its own dtype.
  m.def("miss_block_grads(Tensor grad, Tensor s, Tensor block) -> (Tensor, Tensor)");
}

void impl_product(torch::Library& m) {
  m.impl("miss_linear", &miss_linear);
  m.impl("miss_add_product", &miss_add_product);
  m.impl("miss_block_grads", &miss_block_grads);
}

}  // namespace front
}  // namespace miss_ext
