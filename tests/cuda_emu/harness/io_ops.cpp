// The kernels the file mode can run (see io.h), one small entry per kernels.h launcher. Keys
// follow the torch.ops.miss_ext operator's arguments, so the test can call the CPU op alike.
#include "io.h"

using at::Tensor;
using emu_test::dropout;
using emu_test::poisoned;

EMU_IO_OP(blocksum) {  // x r p seed
  Tensor x = c.in("x");
  const int64_t r = c.integer("r");
  const auto d = dropout(c.num("p"), c.seed("seed"));
  Tensor out = poisoned(x.dt, {x.size(0), r});
  return c.run({&x}, out, [&] { miss_ext::cuda::blocksum(x, r, d, out); }) ? out : Tensor();
}

EMU_IO_OP(tile) {  // s features p seed [base]
  Tensor s = c.in("s");
  Tensor base = c.has("base") ? c.in("base") : Tensor();
  const auto d = dropout(c.num("p"), c.seed("seed"));
  Tensor out = poisoned(s.dt, {s.size(0), c.integer("features")});
  return c.run({&s, &base}, out, [&] { miss_ext::cuda::tile(s, base, d, out); }) ? out : Tensor();
}

EMU_IO_OP(miss_merge) {  // weight block alpha
  Tensor w = c.in("weight"), b = c.in("block");
  const double alpha = c.num("alpha");
  Tensor out = poisoned(w.dt, w.sizes());
  return c.run({&w, &b}, out, [&] { miss_ext::cuda::miss_merge(w, b, alpha, out); }) ? out : Tensor();
}

EMU_IO_OP(bat_transform) {  // weight block
  Tensor w = c.in("weight"), b = c.in("block");
  Tensor out = poisoned(w.dt, w.sizes());
  return c.run({&w, &b}, out, [&] { miss_ext::cuda::bat_transform(w, b, out); }) ? out : Tensor();
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
