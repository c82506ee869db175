// bat_transform and bat_weight_grad (csrc/cuda/bat_rowmm.cu):
//   transform:   W'_ij = W_ij (I + B_i) + B_i
//   weight grad: out_ij = G_ij (I + B_i)^T
// Paths: r <= 32 (slab chunk in dynamic shared memory), WMMA (half types, r % 16 == 0, 16-byte
// aligned, sm_80+), SIMT 64 x 64 tiles otherwise (also the WMMA fallback).
#include "bat_cases.h"

namespace {
using namespace emu_test;

// TRANSFORM: out = X + X B + B[a]; else out = X + X B^T.
void rowmm_case(bool transform, ScalarType dt, const BatShape& s, int64_t off = 0) {
  const int64_t nb = s.out / s.r, nj = s.in / s.r, r = s.r, in = s.in;
  Tensor x = make(dt, {s.out, s.in}, 1.0, -1, off);
  Tensor b = make(dt, {nb, r, r}, 0.1);
  Tensor out = poisoned(dt, {s.out, s.in});
  const std::string name =
      label(transform ? "bat_transform" : "bat_weight_grad", dt, {s.out, s.in, r}, "off=" + std::to_string(off));
  if (!call(name, {&x, &b}, {&out}, [&] {
        if (transform) miss_ext::cuda::bat_transform(x, b, out);
        else miss_ext::cuda::bat_weight_grad(x, b, out);
      }))
    return;
  const std::vector<double> X = values(x), B = values(b);
  std::vector<double> ref(s.out * in), mag(s.out * in);
  for (int64_t i = 0; i < nb; ++i) {
    const double* Bi = &B[i * r * r];
    for (int64_t a = 0; a < r; ++a) {
      const double* xrow = &X[(i * r + a) * in];
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t c = 0; c < r; ++c) {
          double v = xrow[j * r + c] + (transform ? Bi[a * r + c] : 0.0), m = std::fabs(v);
          for (int64_t k = 0; k < r; ++k) {
            const double t = xrow[j * r + k] * (transform ? Bi[k * r + c] : Bi[c * r + k]);
            v += t;
            m += std::fabs(t);
          }
          ref[(i * r + a) * in + j * r + c] = v;
          mag[(i * r + a) * in + j * r + c] = m;
        }
    }
  }
  check(name, out, ref, mag);
}

void both(ScalarType dt, const BatShape& s, int64_t off = 0) {
  rowmm_case(true, dt, s, off);
  rowmm_case(false, dt, s, off);
}

}  // namespace

EMU_SUITE(bat_rowmm, "bat_transform / bat_weight_grad: every dtype, path and alignment") {
  for (ScalarType dt : dtypes()) {
    for (const BatShape& s : kBatShapes) both(dt, s);
    for (const BatOffset& o : kBatOffsets) both(dt, {96, 192, 48}, o.off);
    both(dt, {0, 64, 16});  // empty weight: nothing launched
  }
  {
    WithDevice dev({132, 7});  // before sm_80: no WMMA
    for (ScalarType dt : half_dtypes()) {
      both(dt, {96, 192, 48});
      both(dt, {160, 1280, 80});
    }
  }
}
