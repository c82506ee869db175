// The mixed-precision composites (csrc/cuda/product.cu, and bat_io_block_grad at the end of
// csrc/cuda/bat_block_grad.cu): cuBLAS products (emulated by the fake
// at::mm, see fake/emu_aten.h) around this extension's kernels.
//   bat_io_block_grad: out_i = sum_j (W_ij + I)^T Gw_ij, Gw = grad^T x, in out's precision
//   miss_add_product:  out = base + s @ block, rounded once to base's dtype
//   miss_block_grads:  grad_block = s^T grad, grad_s = grad block^T, in the block's precision
#include "emu_test.h"

namespace {
using namespace emu_test;

ScalarType acc_for(ScalarType dt) { return dt == at::kDouble ? at::kDouble : at::kFloat; }

// half: the call passes half_products, which CUDA ignores (kernels.h): the same fp32 bound holds.
void io_block_grad_case(ScalarType dt, ScalarType w_dt, int64_t n, int64_t out_f, int64_t in, int64_t r,
                        bool half = false) {
  const int64_t nb = out_f / r, nj = in / r;
  Tensor g = make(dt, {n, out_f}), x = make(dt, {n, in}), w = make(w_dt, {out_f, in});
  Tensor out = poisoned(acc_for(dt), {nb, r, r});
  const std::string name = label("bat_io_block_grad", dt, {n, out_f, in, r},
                                 std::string("weight ") + dtype_name(w_dt) + (half ? " half_products" : ""));
  if (!call(name, {&g, &x, &w}, {&out}, [&] { miss_ext::cuda::bat_io_block_grad(g, x, w, r, half, out); })) return;
  const std::vector<double> G = values(g), X = values(x), W = values(w);
  std::vector<double> gw(out_f * in, 0.0), gmag(out_f * in, 0.0);  // Gw = grad^T x
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out_f; ++o)
      for (int64_t k = 0; k < in; ++k) {
        gw[o * in + k] += G[t * out_f + o] * X[t * in + k];
        gmag[o * in + k] += std::fabs(G[t * out_f + o] * X[t * in + k]);
      }
  std::vector<double> ref(nb * r * r, 0.0), mag(nb * r * r, 0.0);
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j < nj; ++j)
      for (int64_t a = 0; a < r; ++a)
        for (int64_t k = 0; k < r; ++k) {
          const double wk = W[(i * r + a) * in + j * r + k] + (a == k ? 1.0 : 0.0);
          for (int64_t c = 0; c < r; ++c) {
            ref[(i * r + k) * r + c] += wk * gw[(i * r + a) * in + j * r + c];
            mag[(i * r + k) * r + c] += std::fabs(wk) * gmag[(i * r + a) * in + j * r + c];
          }
        }
  check(name, out, ref, mag);
}

void add_product_case(ScalarType dt, ScalarType b_dt, int64_t n, int64_t r, int64_t out_f) {
  Tensor base = make(dt, {n, out_f}), s = make(b_dt, {n, r}), blk = make(b_dt, {r, out_f});
  Tensor out = poisoned(dt, {n, out_f});
  const std::string name = label("miss_add_product", dt, {n, r, out_f}, std::string("block ") + dtype_name(b_dt));
  if (!call(name, {&base, &s, &blk}, {&out}, [&] { miss_ext::cuda::miss_add_product(base, s, blk, out); })) return;
  const std::vector<double> B = values(base), S = values(s), K = values(blk);
  std::vector<double> ref(n * out_f), mag(n * out_f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out_f; ++o) {
      double v = B[t * out_f + o], m = std::fabs(v);
      for (int64_t c = 0; c < r; ++c) {
        v += S[t * r + c] * K[c * out_f + o];
        m += std::fabs(S[t * r + c] * K[c * out_f + o]);
      }
      ref[t * out_f + o] = v;
      mag[t * out_f + o] = m;
    }
  check(name, out, ref, mag);
}

void block_grads_case(ScalarType dt, ScalarType b_dt, int64_t n, int64_t r, int64_t out_f) {
  Tensor g = make(dt, {n, out_f}), s = make(b_dt, {n, r}), blk = make(b_dt, {r, out_f});
  Tensor gb = poisoned(b_dt, {r, out_f}), gs = poisoned(b_dt, {n, r});
  const std::string name = label("miss_block_grads", dt, {n, r, out_f}, std::string("block ") + dtype_name(b_dt));
  if (!call(name, {&g, &s, &blk}, {&gb, &gs}, [&] { miss_ext::cuda::miss_block_grads(g, s, blk, gb, gs); })) return;
  const std::vector<double> G = values(g), S = values(s), K = values(blk);
  std::vector<double> rb(r * out_f, 0.0), mb(r * out_f, 0.0), rs(n * r, 0.0), ms(n * r, 0.0);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < r; ++c)
      for (int64_t o = 0; o < out_f; ++o) {
        rb[c * out_f + o] += S[t * r + c] * G[t * out_f + o];
        mb[c * out_f + o] += std::fabs(S[t * r + c] * G[t * out_f + o]);
        rs[t * r + c] += G[t * out_f + o] * K[c * out_f + o];
        ms[t * r + c] += std::fabs(G[t * out_f + o] * K[c * out_f + o]);
      }
  check(name + " grad_block", gb, rb, mb);
  check(name + " grad_s", gs, rs, ms);
}

}  // namespace

EMU_SUITE(mixed, "bat_io_block_grad, miss_add_product, miss_block_grads: every dtype pair") {
  for (ScalarType dt : dtypes()) {
    for (ScalarType w_dt : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
      io_block_grad_case(dt, w_dt, 16, 32, 64, 16);  // small block-grad path
      io_block_grad_case(dt, w_dt, 5, 96, 192, 48);  // tiled block-grad path
    }
    io_block_grad_case(dt, dt, 3, 64, 2048, 64);  // split rows
    std::vector<ScalarType> blocks = wider_than(dt);
    if (dt == at::kFloat || dt == at::kDouble) blocks.push_back(dt);  // the equal-dtype call
    for (ScalarType b_dt : blocks) {
      for (const auto& t : std::vector<std::array<int64_t, 3>>{{7, 16, 64}, {5, 7, 33}, {1, 64, 4096}}) {
        add_product_case(dt, b_dt, t[0], t[1], t[2]);
        block_grads_case(dt, b_dt, t[0], t[1], t[2]);
      }
    }
  }
}

EMU_SUITE(io_half_products, "bat_io_block_grad with half_products, as autocast passes it: fp32 products still") {
  for (ScalarType dt : half_dtypes()) {
    io_block_grad_case(dt, dt, 16, 32, 64, 16, true);
    io_block_grad_case(dt, dt, 5, 96, 192, 48, true);
  }
}

EMU_SUITE(dtype_contract, "launchers refuse dtype pairs outside kernels.h instead of misreading memory") {
  expect_caught("blocksum into a narrower dtype", "does not hold", [] {
    Tensor x = make(at::kFloat, {2, 8});
    Tensor out = poisoned(at::kBFloat16, {2, 4});
    call("blocksum float32 into bfloat16", {&x}, {&out}, [&] { miss_ext::cuda::blocksum(x, 4, {}, out); });
  });
  expect_caught("tile from a narrower s", "does not hold", [] {
    Tensor s = make(at::kHalf, {2, 4});
    Tensor out = poisoned(at::kFloat, {2, 8});
    call("tile float16 into float32", {&s}, {&out}, [&] { miss_ext::cuda::tile(s, Tensor(), {}, out); });
  });
}
