#include "ops_front.h"

#include <ATen/ops/linalg_solve_ex.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

#include "common/kernels.h"
#include "cpu/workspace.h"

namespace miss_ext {
namespace {

// Routes a kernel call to the device of `t`. A CUDA tensor only reaches a front end when the
// CUDA kernels were built (they are registered under the CUDA key only then).
#ifdef MISS_EXT_WITH_CUDA
#define MISS_EXT_ON_DEVICE(t, kernel, ...) \
  ((t).is_cuda() ? cuda::kernel(__VA_ARGS__) : cpu::kernel(__VA_ARGS__))
#else
#define MISS_EXT_ON_DEVICE(t, kernel, ...) cpu::kernel(__VA_ARGS__)
#endif

// The front ends call aten GEMMs on inputs whose dtypes they chose; a live autocast would recast
// those calls and break the kernels' dtype contract, so every operator runs with autocast off.
#define MISS_EXT_NO_AUTOCAST \
  c10::impl::ExcludeDispatchKeyGuard no_autocast_guard(c10::autocast_dispatch_keyset)

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

// Whether `wide` holds every value of `narrow` (the mixed-precision pairs: a half type with
// float32/float64, float32 with float64, or the same dtype).
bool holds(at::ScalarType narrow, at::ScalarType wide) {
  if (narrow == wide || wide == at::kDouble) return true;
  return wide == at::kFloat && (narrow == at::kBFloat16 || narrow == at::kHalf);
}

// The optional output dtype of a widening op: `dtype`, checked to hold `from`, else `from`.
at::ScalarType widened(const char* op, const char* from_name, at::ScalarType from,
                       std::optional<at::ScalarType> dtype) {
  if (!dtype.has_value()) return from;
  TORCH_CHECK(holds(from, *dtype), "miss_ext.", op, ": argument 'dtype' (", *dtype,
              ") must be ", from_name, "'s dtype (", from,
              ") or a wider float (float32 or float64) that holds it");
  return *dtype;
}

// (..., f) -> (N, f) with unit stride along features; copies only when the view cannot.
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

// The block sum of x into `out_dtype` (x's dtype or a wider float: x is never copied).
at::Tensor blocksum_impl(const char* op, const at::Tensor& x, int64_t r, const DropoutArgs& drop,
                         at::ScalarType out_dtype) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "miss_ext.", op,
              ": argument 'x' must have at least 1 dimension (features last), got a scalar");
  check_rank(op, "r", r);
  at::Tensor rows = as_rows(x);
  // Allocated in the final shape and filled through a 2-D view, so the result is not a view
  // (FSDP and in-place autograd treat views specially).
  at::Tensor out = at::empty(with_last(x, r), x.options().dtype(out_dtype));
  at::Tensor out_rows = out.view({rows.size(0), r});
  if (rows.size(1) == 0) {
    out.zero_();
  } else if (rows.size(0) > 0) {
    MISS_EXT_ON_DEVICE(x, blocksum, rows, r, drop, out_rows);
  }
  return out;
}

// base + tile(s) (base optional) in `out_dtype`, which s's dtype must hold.
at::Tensor tile_impl(const char* op, const at::Tensor& s, int64_t features, const at::Tensor& base,
                     const DropoutArgs& drop, at::ScalarType out_dtype) {
  check_float(op, "s", s);
  TORCH_CHECK(s.dim() >= 1, "miss_ext.", op,
              ": argument 's' must have at least 1 dimension (block last), got a scalar");
  TORCH_CHECK(s.size(-1) > 0, "miss_ext.", op,
              ": argument 's' must have a non-empty last dimension (the block size r)");
  TORCH_CHECK(features >= 0, "miss_ext.", op, ": argument 'features' must be >= 0 (got ",
              features, ")");
  at::Tensor rows = as_rows(s).contiguous();
  at::Tensor base_rows;
  if (base.defined()) base_rows = base.reshape({rows.size(0), features}).contiguous();
  at::Tensor out = at::empty(with_last(s, features), s.options().dtype(out_dtype));
  at::Tensor out_rows = out.view({rows.size(0), features});
  if (rows.size(0) > 0 && features > 0) {
    MISS_EXT_ON_DEVICE(s, tile, rows, base_rows, drop, out_rows);
  }
  return out;
}

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

// The linear layer's optional bias, checked (float, x's device, shape (out_features,)) and cast
// to x's dtype; nullopt when there is none.
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

at::ScalarType fp32_or_fp64(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble
                                                                            : at::kFloat;
}

// The output dtype of tile/tile_dropout: `dtype` must be s's dtype or narrower (s holds it).
at::ScalarType narrowed(const char* op, const at::Tensor& s, std::optional<at::ScalarType> dtype) {
  if (!dtype.has_value()) return s.scalar_type();
  TORCH_CHECK(is_supported_float(*dtype) && holds(*dtype, s.scalar_type()), "miss_ext.", op,
              ": argument 'dtype' (", *dtype, ") must be s's dtype (", s.scalar_type(),
              ") or a narrower float that s's dtype holds (the tiled term is rounded once to it)");
  return *dtype;
}

// A large temporary of `like`'s device: on the CPU from the workspace cache (cpu/workspace.h).
at::Tensor temp_empty(const at::Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  if (like.device().is_cpu()) return cpu::workspace_empty(sizes, dtype);
  return at::empty(sizes, like.options().dtype(dtype));
}

// The BAT transform of `weight` by `block` into `out_dtype`. All three equal: products in that
// dtype. A float32/float64 block: products in its precision, the weight read as stored, the
// result rounded once. A half-type block with anything else differing: the weight is cast to
// the block's dtype first (as PEFT computes BAT in the adapter's dtype).
at::Tensor transform(const at::Tensor& weight, const at::Tensor& block, at::ScalarType out_dtype) {
  const auto bt = block.scalar_type();
  const bool wide_block = bt == at::kFloat || bt == at::kDouble;
  at::Tensor w = (wide_block ? weight : weight.to(bt)).contiguous();
  at::Tensor b = block.contiguous();
  const bool equal = w.scalar_type() == bt && out_dtype == bt;
  at::Tensor out = temp_empty(w, w.sizes(), equal || wide_block ? out_dtype : bt);
  if (w.numel() > 0) MISS_EXT_ON_DEVICE(w, bat_transform, w, b, out);
  return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
}

// The block precision of a standard/mini op: the block's dtype, which must hold x's.
void check_block_holds(const char* op, const char* x_name, const at::Tensor& x,
                       const at::Tensor& block) {
  TORCH_CHECK(holds(x.scalar_type(), block.scalar_type()), "miss_ext.", op, ": argument 'block' (",
              block.scalar_type(), ") must have ", x_name, "'s dtype (", x.scalar_type(),
              ") or a wider float that holds it (a float32 block on a bfloat16 base is the "
              "mixed-precision layer); cast one of them");
}

}  // namespace

at::Tensor blocksum(const at::Tensor& x, int64_t r, std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  check_float("blocksum", "x", x);
  return blocksum_impl("blocksum", x, r, DropoutArgs{},
                       widened("blocksum", "x", x.scalar_type(), dtype));
}

at::Tensor blocksum_dropout(const at::Tensor& x, int64_t r, double p, const at::Tensor& seed,
                            std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "blocksum_dropout";
  check_float(op, "x", x);
  return blocksum_impl(op, x, r, dropout_args(op, p, seed), widened(op, "x", x.scalar_type(), dtype));
}

at::Tensor tile(const at::Tensor& s, int64_t features, std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  check_float("tile", "s", s);
  return tile_impl("tile", s, features, at::Tensor(), DropoutArgs{}, narrowed("tile", s, dtype));
}

at::Tensor tile_dropout(const at::Tensor& s, int64_t features, double p, const at::Tensor& seed,
                        std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "tile_dropout";
  check_float(op, "s", s);
  return tile_impl(op, s, features, at::Tensor(), dropout_args(op, p, seed), narrowed(op, s, dtype));
}

at::Tensor tile_add(const at::Tensor& base, const at::Tensor& s) {
  MISS_EXT_NO_AUTOCAST;
  check_float("tile_add", "base", base);
  check_float("tile_add", "s", s);
  check_same_device("tile_add", "base", base, "s", s);
  TORCH_CHECK(holds(base.scalar_type(), s.scalar_type()), "miss_ext.tile_add: argument 's' (",
              s.scalar_type(), ") must have base's dtype (", base.scalar_type(),
              ") or a wider float that holds it (the sum is rounded once to base's dtype)");
  TORCH_CHECK(base.dim() >= 1 && base.dim() == s.dim() &&
                  base.sizes().slice(0, base.dim() - 1) == s.sizes().slice(0, s.dim() - 1),
              "miss_ext.tile_add: arguments 'base' ", base.sizes(), " and 's' ", s.sizes(),
              " must have the same leading dimensions (only the last may differ)");
  return tile_impl("tile_add", s, base.size(-1), base, DropoutArgs{}, base.scalar_type());
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

namespace {

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
at::Tensor chain_transform(const at::Tensor& weight, at::TensorList blocks, at::ScalarType dtype) {
  at::Tensor w = weight;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const bool last = k + 1 == blocks.size();
    w = transform(w, blocks[k], last ? dtype : blocks[k].scalar_type());
  }
  return w;
}

}  // namespace

at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::TensorList blocks) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "bat_linear";
  check_bat_chain(op, "x", x, weight, blocks, 1, "in_features");
  const std::optional<at::Tensor> b = checked_bias(op, x, bias, weight.size(0));
  const at::Tensor x2 = as_rows(x);
  const at::Tensor w = chain_transform(weight, blocks, x.scalar_type());
  // Through a 2-D view of a result allocated in its final shape, so the output is not a view.
  at::Tensor y = at::empty(with_last(x, weight.size(0)), x.options());
  at::Tensor y2 = y.view({x2.size(0), weight.size(0)});
  if (b.has_value()) {
    at::addmm_out(y2, *b, x2, w.t());
  } else {
    at::mm_out(y2, x2, w.t());
  }
  return y;
}

at::Tensor bat_input_grad(const at::Tensor& grad, const at::Tensor& weight, at::TensorList blocks) {
  MISS_EXT_NO_AUTOCAST;
  check_bat_chain("bat_input_grad", "grad", grad, weight, blocks, 0, "out_features");
  const at::Tensor g2 = as_rows(grad);
  at::Tensor dx = at::empty(with_last(grad, weight.size(1)), grad.options());
  at::Tensor dx2 = dx.view({g2.size(0), weight.size(1)});
  if (dx.numel() == 0) return dx;
  at::mm_out(dx2, g2, chain_transform(weight, blocks, grad.scalar_type()));
  return dx;
}

at::Tensor bat_io_block_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             int64_t r, std::optional<at::ScalarType> dtype) {
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
    MISS_EXT_ON_DEVICE(g2, bat_io_block_grad, g2, x2, w, r, out);
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

std::tuple<at::Tensor, at::Tensor> miss_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& block, double p,
                                               const std::optional<at::Tensor>& seed) {
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
  at::Tensor s = blocksum_impl(op, x, r, drop, block.scalar_type());
  const at::Tensor s2 = s.view({n, r});
  const at::Tensor blk = block.contiguous();
  if (block.scalar_type() != x.scalar_type()) {
    // Mixed precision, PEFT's rounding: the base output rounded in x's dtype (nn.Linear's own
    // GEMM, so the same bits), plus the term in the block's precision, rounded once.
    at::Tensor y = at::linear(x, weight, b).contiguous();
    at::Tensor y2 = y.view({n, out_f});
    // In place on the CPU (each element is read, then written); CUDA's kernels take restrict
    // pointers, so there the sum goes to a new tensor.
    at::Tensor out = x.is_cuda() ? at::empty_like(y) : y;
    at::Tensor out2 = out.view({n, out_f});
    if (n > 0 && out_f > 0) {
      if (m == out_f) {
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
    at::mm_out(y2, s2, blk);
  } else if (n > 0 && out_f > 0) {
    MISS_EXT_ON_DEVICE(x, tile, at::mm(s2, blk), at::Tensor(), DropoutArgs{}, y2);
  }
  if (b.has_value()) y2.add_(*b);
  y2.addmm_(x2, weight.t());
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

}  // namespace miss_ext
