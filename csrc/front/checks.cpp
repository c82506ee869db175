#include "front/checks.h"

#include <c10/util/Exception.h>

#include <string>

namespace miss_ext {
namespace front {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "miss_ext.", op, ": argument '", name, "' is undefined; pass a tensor");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "miss_ext.", op, ": argument '", name,
              "' must be float32, float64, bfloat16 or float16 (got ", t.scalar_type(),
              "); cast it with .float() or .to(dtype)");
}

void check_same_device(const char* op, const char* name_a, const at::Tensor& a,
                       const char* name_b, const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), "miss_ext.", op, ": arguments '", name_a, "' (on ",
              a.device(), ") and '", name_b, "' (on ", b.device(),
              ") must be on the same device; move one with .to(device)");
}

void check_same_dtype(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "miss_ext.", op, ": arguments '", name_a, "' (",
              a.scalar_type(), ") and '", name_b, "' (", b.scalar_type(),
              ") must have the same dtype; cast one with .to(dtype)");
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim,
               const char* shape) {
  TORCH_CHECK(t.dim() == dim, "miss_ext.", op, ": argument '", name, "' must be ", dim,
              "-D with shape ", shape, " (got ", t.dim(), "-D shape ", t.sizes(), ")");
}

void check_rank(const char* op, const char* name, int64_t r) {
  TORCH_CHECK(r > 0, "miss_ext.", op, ": argument '", name,
              "' (the block size r) must be a positive integer (got ", r, ")");
}

bool holds(at::ScalarType narrow, at::ScalarType wide) {
  if (narrow == wide || wide == at::kDouble) return true;
  return wide == at::kFloat && (narrow == at::kBFloat16 || narrow == at::kHalf);
}

void check_block_holds(const char* op, const char* x_name, const at::Tensor& x,
                       const at::Tensor& block) {
  TORCH_CHECK(holds(x.scalar_type(), block.scalar_type()), "miss_ext.", op, ": argument 'block' (",
              block.scalar_type(), ") must have ", x_name, "'s dtype (", x.scalar_type(),
              ") or a wider float that holds it (a float32 block on a bfloat16 base is the "
              "mixed-precision layer); cast one of them");
}

DropoutArgs dropout_args(const char* op, double p, const at::Tensor& seed) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "miss_ext.", op,
              ": argument 'p' (the dropout probability) must be in [0, 1] (got ", p, ")");
  TORCH_CHECK(seed.defined() && seed.device().is_cpu() && seed.scalar_type() == at::kLong &&
                  seed.numel() == 1,
              "miss_ext.", op,
              ": argument 'seed' must be a CPU int64 tensor with one element (got ",
              seed.defined() ? seed.toString() : std::string("undefined"), " of shape ",
              seed.defined() ? seed.sizes() : at::IntArrayRef{},
              "); draw one with miss_ext.functional.dropout_seed()");
  DropoutArgs d;
  d.enabled = p > 0.0;
  d.p = p;
  d.seed = static_cast<uint64_t>(seed.item<int64_t>());
  return d;
}

std::optional<at::Tensor> checked_bias(const char* op, const at::Tensor& x,
                                       const std::optional<at::Tensor>& bias, int64_t out_f) {
  if (!bias.has_value() || !bias->defined()) return std::nullopt;
  check_float(op, "bias", *bias);
  check_same_device(op, "x", x, "bias", *bias);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_f, "miss_ext.", op,
              ": argument 'bias' must have shape (out_features,) = (", out_f, ",) (got ",
              bias->sizes(), ")");
  return bias->to(x.scalar_type());
}

at::Tensor as_rows(const at::Tensor& t) {
  const int64_t f = t.size(-1);
  const int64_t n = f == 0 ? c10::multiply_integers(t.sizes().slice(0, t.dim() - 1))
                           : t.numel() / f;
  at::Tensor rows = t.reshape({n, f});
  if (f > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  if (n > 1 && rows.stride(0) < f) rows = rows.contiguous();  // expanded rows
  return rows;
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

}  // namespace front
}  // namespace miss_ext
