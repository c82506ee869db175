// bat_transform and bat_weight_grad (csrc/cuda/bat.cu):
//   transform:   W'_ij = W_ij (I + B_i) + B_i
//   weight grad: out_ij = G_ij (I + B_i)^T
// Paths: r <= 32 (slab chunk in dynamic shared memory), WMMA (half types, r % 16 == 0, 16-byte
// aligned, sm_80+), SIMT 64 x 64 tiles otherwise (also the WMMA fallback). The transform also
// takes mixed dtypes (kernels.h): any weight dtype, a float32/float64 block, any output dtype,
// products in the block's precision, rounded once.
#include "bat_cases.h"

namespace {
using namespace emu_test;

// TRANSFORM: out = X + X B + B[a]; else out = X + X B^T. b_dt/out_dt: the block's and the
// output's dtypes when they differ from X's (the mixed-precision transform). half: the transform
// is called with half_products, which CUDA ignores (kernels.h): the same bound holds.
void rowmm_case(bool transform, ScalarType dt, const BatShape& s, int64_t off = 0,
                ScalarType b_dt = ScalarType::Undefined, ScalarType out_dt = ScalarType::Undefined,
                bool half = false) {
  const int64_t nb = s.out / s.r, nj = s.in / s.r, r = s.r, in = s.in;
  if (b_dt == ScalarType::Undefined) b_dt = dt;
  if (out_dt == ScalarType::Undefined) out_dt = dt;
  Tensor x = make(dt, {s.out, s.in}, 1.0, -1, off);
  Tensor b = make(b_dt, {nb, r, r}, 0.1);
  Tensor out = poisoned(out_dt, {s.out, s.in});
  const std::string mixed = b_dt != dt || out_dt != dt
                                ? std::string(" block ") + dtype_name(b_dt) + " into " + dtype_name(out_dt) +
                                      (half ? " half_products" : "")
                                : "";
  const std::string name =
      label(transform ? "bat_transform" : "bat_weight_grad", dt, {s.out, s.in, r}, "off=" + std::to_string(off) + mixed);
  if (!call(name, {&x, &b}, {&out}, [&] {
        if (transform) miss_ext::cuda::bat_transform(x, b, half, out);
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
  check(name, out, ref, mag, false, b_dt);  // products in the block's precision
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

EMU_SUITE(bat_transform_mixed, "bat_transform with a float32/float64 block, any weight and output dtype") {
  for (ScalarType w : dtypes())
    for (ScalarType b : {at::kFloat, at::kDouble})
      for (ScalarType o : {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}) {
        if (w == b && o == b) continue;  // all equal: the suite above
        for (const BatShape& s : std::vector<BatShape>{{32, 64, 16}, {96, 192, 48}, {80, 160, 40}})
          rowmm_case(true, w, s, 0, b, o);
        rowmm_case(true, w, {96, 192, 48}, 1, b, o);
      }
  // half_products as autocast passes it: a half-type weight and output, a float32 block.
  for (ScalarType w : half_dtypes())
    for (const BatShape& s : std::vector<BatShape>{{32, 64, 16}, {96, 192, 48}})
      rowmm_case(true, w, s, 0, at::kFloat, w, true);
}
