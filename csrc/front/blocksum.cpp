// The blocksum family: the block sum over the last dim and its adjoint, tile, each with an
// optional fused dropout, and tile_add. Kernels: csrc/cpu/blocksum.cpp, csrc/cuda/blocksum.cu.
#include <torch/library.h>

#include "front/checks.h"
#include "front/families.h"

namespace miss_ext {
namespace front {

at::Tensor blocksum_into(const char* op, const at::Tensor& x, int64_t r, const DropoutArgs& drop,
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

namespace {

// base + tile(s) (base optional) in `out_dtype`, which s's dtype must hold.
at::Tensor tile_into(const char* op, const at::Tensor& s, int64_t features, const at::Tensor& base,
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

// The optional output dtype of a widening op: `dtype`, checked to hold `from`, else `from`.
at::ScalarType widened(const char* op, const char* from_name, at::ScalarType from,
                       std::optional<at::ScalarType> dtype) {
  if (!dtype.has_value()) return from;
  TORCH_CHECK(holds(from, *dtype), "miss_ext.", op, ": argument 'dtype' (", *dtype,
              ") must be ", from_name, "'s dtype (", from,
              ") or a wider float (float32 or float64) that holds it");
  return *dtype;
}

// The output dtype of tile/tile_dropout: `dtype` must be s's dtype or narrower (s holds it).
at::ScalarType narrowed(const char* op, const at::Tensor& s, std::optional<at::ScalarType> dtype) {
  if (!dtype.has_value()) return s.scalar_type();
  TORCH_CHECK(is_supported_float(*dtype) && holds(*dtype, s.scalar_type()), "miss_ext.", op,
              ": argument 'dtype' (", *dtype, ") must be s's dtype (", s.scalar_type(),
              ") or a narrower float that s's dtype holds (the tiled term is rounded once to it)");
  return *dtype;
}

at::Tensor blocksum(const at::Tensor& x, int64_t r, std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  check_float("blocksum", "x", x);
  return blocksum_into("blocksum", x, r, DropoutArgs{},
                       widened("blocksum", "x", x.scalar_type(), dtype));
}

at::Tensor blocksum_dropout(const at::Tensor& x, int64_t r, double p, const at::Tensor& seed,
                            std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "blocksum_dropout";
  check_float(op, "x", x);
  return blocksum_into(op, x, r, dropout_args(op, p, seed), widened(op, "x", x.scalar_type(), dtype));
}

at::Tensor tile(const at::Tensor& s, int64_t features, std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  check_float("tile", "s", s);
  return tile_into("tile", s, features, at::Tensor(), DropoutArgs{}, narrowed("tile", s, dtype));
}

at::Tensor tile_dropout(const at::Tensor& s, int64_t features, double p, const at::Tensor& seed,
                        std::optional<at::ScalarType> dtype) {
  MISS_EXT_NO_AUTOCAST;
  const char* op = "tile_dropout";
  check_float(op, "s", s);
  return tile_into(op, s, features, at::Tensor(), dropout_args(op, p, seed), narrowed(op, s, dtype));
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
  return tile_into("tile_add", s, base.size(-1), base, DropoutArgs{}, base.scalar_type());
}

}  // namespace

void define_blocksum(torch::Library& m) {
  // Block sum over the last dim, zero-padded to a multiple of r: (..., in) -> (..., r), in x's
  // dtype or a wider `dtype` (float32/float64: summed straight into it, x never copied).
  m.def("blocksum(Tensor x, int r, ScalarType? dtype=None) -> Tensor");
  // Block sum of dropout(x) with the mask regenerated from (seed, element index).
  m.def("blocksum_dropout(Tensor x, int r, float p, Tensor seed, ScalarType? dtype=None) -> Tensor");
  // Repeat the last dim to `features` columns: (..., r) -> (..., features), the adjoint of
  // blocksum, in s's dtype or a narrower `dtype` (rounded once).
  m.def("tile(Tensor s, int features, ScalarType? dtype=None) -> Tensor");
  // tile with the dropout mask of blocksum_dropout: the adjoint of blocksum_dropout.
  m.def("tile_dropout(Tensor s, int features, float p, Tensor seed, ScalarType? dtype=None) -> Tensor");
  // base + tile(s, base.shape[-1]) in base's dtype; s may be wider (rounded once).
  m.def("tile_add(Tensor base, Tensor s) -> Tensor");
}

void impl_blocksum(torch::Library& m) {
  m.impl("blocksum", &blocksum);
  m.impl("blocksum_dropout", &blocksum_dropout);
  m.impl("tile", &tile);
  m.impl("tile_dropout", &tile_dropout);
  m.impl("tile_add", &tile_add);
}

}  // namespace front
}  // namespace miss_ext
