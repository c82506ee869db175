// The kernels the file mode can run (see io.h), one small entry per kernels.h launcher. Keys
// follow the torch.ops.miss_ext operator's arguments, so the test can call the CPU op alike.
#include "io.h"

using at::Tensor;
using emu_test::dropout;
using emu_test::poisoned;

namespace {
// The optional `dtype` key (float32, float64, float16, bfloat16), else `dflt`.
at::ScalarType dtype_or(const emu_test::IoCase& c, at::ScalarType dflt) {
  if (!c.has("dtype")) return dflt;
  for (at::ScalarType t : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16})
    if (c.str("dtype") == emu_test::dtype_name(t)) return t;
  throw std::runtime_error("unknown dtype " + c.str("dtype"));
}
}  // namespace

EMU_IO_OP(blocksum) {  // x r p seed [dtype]
  Tensor x = c.in("x");
  const int64_t r = c.integer("r");
  const auto d = dropout(c.num("p"), c.seed("seed"));
  Tensor out = poisoned(dtype_or(c, x.dt), {x.size(0), r});
  return c.run({&x}, out, [&] { miss_ext::cuda::blocksum(x, r, d, out); }) ? out : Tensor();
}

EMU_IO_OP(tile) {  // s features p seed [base] [dtype]
  Tensor s = c.in("s");
  Tensor base = c.has("base") ? c.in("base") : Tensor();
  const auto d = dropout(c.num("p"), c.seed("seed"));
  Tensor out = poisoned(dtype_or(c, base.defined() ? base.dt : s.dt), {s.size(0), c.integer("features")});
  return c.run({&s, &base}, out, [&] { miss_ext::cuda::tile(s, base, d, out); }) ? out : Tensor();
}

EMU_IO_OP(miss_merge) {  // weight block alpha
  Tensor w = c.in("weight"), b = c.in("block");
  const double alpha = c.num("alpha");
  Tensor out = poisoned(w.dt, w.sizes());
  return c.run({&w, &b}, out, [&] { miss_ext::cuda::miss_merge(w, b, alpha, out); }) ? out : Tensor();
}

EMU_IO_OP(bat_transform) {  // weight block [dtype] [half_products]
  Tensor w = c.in("weight"), b = c.in("block");
  Tensor out = poisoned(dtype_or(c, w.dt), w.sizes());
  const bool half = c.has("half_products") && c.integer("half_products") != 0;
  return c.run({&w, &b}, out, [&] { miss_ext::cuda::bat_transform(w, b, half, out); }) ? out : Tensor();
}

EMU_IO_OP(bat_weight_grad) {  // grad block
  Tensor g = c.in("grad"), b = c.in("block");
  Tensor out = poisoned(g.dt, g.sizes());
  return c.run({&g, &b}, out, [&] { miss_ext::cuda::bat_weight_grad(g, b, out); }) ? out : Tensor();
}

EMU_IO_OP(bat_block_grad) {  // grad weight r
  Tensor g = c.in("grad"), w = c.in("weight");
  const int64_t r = c.integer("r");
  Tensor out = poisoned(g.dt, {g.size(0) / r, r, r});
  return c.run({&g, &w}, out, [&] { miss_ext::cuda::bat_block_grad(g, w, r, out); }) ? out : Tensor();
}

EMU_IO_OP(bat_io_block_grad) {  // grad x weight r [dtype] [half_products]: out in float32 (float64 for float64 x)
  Tensor g = c.in("grad"), x = c.in("x"), w = c.in("weight");
  const int64_t r = c.integer("r");
  const bool half = c.has("half_products") && c.integer("half_products") != 0;
  Tensor out = poisoned(dtype_or(c, x.dt == at::kDouble ? at::kDouble : at::kFloat), {w.size(0) / r, r, r});
  return c.run({&g, &x, &w}, out, [&] { miss_ext::cuda::bat_io_block_grad(g, x, w, r, half, out); }) ? out : Tensor();
}

EMU_IO_OP(miss_add_product) {  // base s block
  Tensor base = c.in("base"), s = c.in("s"), b = c.in("block");
  Tensor out = poisoned(base.dt, base.sizes());
  return c.run({&base, &s, &b}, out, [&] { miss_ext::cuda::miss_add_product(base, s, b, out); }) ? out : Tensor();
}

// miss_block_grads has two outputs: `which=block` or `which=s` picks the one written.
EMU_IO_OP(miss_block_grads) {  // grad s block which
  Tensor g = c.in("grad"), s = c.in("s"), b = c.in("block");
  Tensor gb = poisoned(b.dt, b.sizes()), gs = poisoned(b.dt, s.sizes());
  if (!emu_test::call(c.line, {&g, &s, &b}, {&gb, &gs}, [&] { miss_ext::cuda::miss_block_grads(g, s, b, gb, gs); }))
    return Tensor();
  return c.str("which") == "block" ? gb : gs;
}
