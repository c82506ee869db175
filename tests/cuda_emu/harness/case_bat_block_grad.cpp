// bat_block_grad (csrc/cuda/bat_block_grad.cu): out_i = sum_j (W_ij + I)^T G_ij.
// Paths: r <= 16 (small), WMMA (half types, r > 32, r % 16 == 0, 16-byte aligned, sm_80+),
// SIMT tiles of 32 (r <= 32) or 64 otherwise; each with or without split rows and the
// finishing kernel (the split count follows the SM count).
#include "bat_cases.h"

namespace {
using namespace emu_test;

void block_grad_case(ScalarType dt, const BatShape& s, int64_t w_off = 0) {
  const int64_t nb = s.out / s.r, nj = s.in / s.r, r = s.r, in = s.in;
  Tensor g = make(dt, {s.out, s.in});
  Tensor w = make(dt, {s.out, s.in}, 1.0, -1, w_off);
  Tensor out = poisoned(dt, {nb, r, r});
  const std::string name = label("bat_block_grad", dt, {s.out, s.in, r}, "w_off=" + std::to_string(w_off));
  if (!call(name, {&g, &w}, {&out}, [&] { miss_ext::cuda::bat_block_grad(g, w, r, out); })) return;
  const std::vector<double> G = values(g), W = values(w);
  std::vector<double> ref(nb * r * r, 0.0), mag(nb * r * r, 0.0);
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j < nj; ++j)
      for (int64_t a = 0; a < r; ++a) {
        const double* wrow = &W[(i * r + a) * in + j * r];  // W_ij[a, :]
        const double* grow = &G[(i * r + a) * in + j * r];  // G_ij[a, :]
        for (int64_t k = 0; k < r; ++k) {
          double* o = &ref[(i * r + k) * r];
          double* m = &mag[(i * r + k) * r];
          const double wk = wrow[k] + (a == k ? 1.0 : 0.0);  // (W_ij + I)[a, k]
          for (int64_t c = 0; c < r; ++c) {
            o[c] += wk * grow[c];
            m[c] += std::fabs(wk * grow[c]);
          }
        }
      }
  check(name, out, ref, mag);
}

}  // namespace

EMU_SUITE(bat_block_grad, "bat_block_grad: every dtype, path, split and alignment") {
  for (ScalarType dt : dtypes()) {
    for (const BatShape& s : kBatShapes) block_grad_case(dt, s);
    for (const BatOffset& o : kBatOffsets) block_grad_case(dt, {96, 192, 48}, o.off);
    block_grad_case(dt, {0, 64, 16});  // no blocks: nothing launched
    block_grad_case(dt, {32, 0, 16});  // in = 0: zeros
  }
  {
    WithDevice dev({132, 7});  // before sm_80: no WMMA
    for (ScalarType dt : half_dtypes()) {
      block_grad_case(dt, {96, 192, 48});
      block_grad_case(dt, {160, 1280, 80});
    }
  }
  for (int sms : {1, 8}) {  // other split counts
    WithDevice dev({sms, 9});
    for (ScalarType dt : dtypes()) {
      block_grad_case(dt, {48, 4096, 16});
      block_grad_case(dt, {64, 2048, 32});
      block_grad_case(dt, {64, 2048, 64});
      block_grad_case(dt, {160, 1280, 80});
    }
  }
}
