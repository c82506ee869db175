// tile (csrc/cuda/blocksum.cu): out[n, k] = base[n, k] + scale * keep(n*features + k) * s[n, k % r].
// Paths: vector or scalar units (features % V, output/base alignment), dropout, base, neither;
// grid-stride loops on small devices; s wider than out (mixed precision: the fp32 term rounded
// once into a bf16/fp16 output). Compared bit for bit with the CPU kernel's rounding.
#include "emu_test.h"

namespace {
using namespace emu_test;

// The CPU kernel's value (csrc/cpu/blocksum.cpp, tile_kernel), rounded as it rounds:
// (s * scale) * mask, then base + that, in the wider of the two dtypes' opmath types, rounded
// once to out's dtype.
template <class acc_t>
double cpu_tile(ScalarType dt, double sv, double bv, bool has_base, const miss_ext::DropoutArgs& d, bool keep) {
  const acc_t scale = d.enabled ? static_cast<acc_t>(miss_ext::dropout_keep_scale(d.p)) : acc_t(1);
  acc_t v = static_cast<acc_t>(sv) * scale;
  if (d.enabled) v = v * static_cast<acc_t>(keep ? 1.0f : 0.0f);
  if (has_base) v = static_cast<acc_t>(bv) + v;
  return round_to(dt, static_cast<double>(v));
}

// dt: out's and base's dtype; s_dt: s's dtype (dt, or wider).
void tile_case(ScalarType dt, int64_t n, int64_t r, int64_t feats, double p, bool has_base, int64_t out_off = 0,
               int64_t base_off = 0, ScalarType s_dt = ScalarType::Undefined) {
  if (s_dt == ScalarType::Undefined) s_dt = dt;
  Tensor s = make(s_dt, {n, r});
  Tensor base = has_base ? make(dt, {n, feats}, 1.0, -1, base_off) : Tensor();
  Tensor out = poisoned(dt, {n, feats}, out_off);
  const miss_ext::DropoutArgs d = dropout(p, 77);
  const std::string name = label("tile", dt, {n, r, feats},
                                 "p=" + std::to_string(p).substr(0, 4) + (has_base ? " base" : "") +
                                     " out_off=" + std::to_string(out_off) + " base_off=" + std::to_string(base_off) +
                                     (s_dt != dt ? std::string(" from ") + dtype_name(s_dt) : ""));
  if (!call(name, {&s, &base}, {&out}, [&] { miss_ext::cuda::tile(s, base, d, out); })) return;
  const std::vector<double> sv = values(s), bv = has_base ? values(base) : std::vector<double>();
  std::vector<double> ref(n * feats), mag(n * feats, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < feats; ++k) {
      const bool keep = kept(d, static_cast<uint64_t>(i * feats + k));
      const double b = has_base ? bv[i * feats + k] : 0.0;
      const bool wide = dt == at::kDouble || s_dt == at::kDouble;
      ref[i * feats + k] = wide ? cpu_tile<double>(dt, sv[i * r + k % r], b, has_base, d, keep)
                                : cpu_tile<float>(dt, sv[i * r + k % r], b, has_base, d, keep);
    }
  check(name, out, ref, mag, /*exact=*/true);
}

const std::vector<std::array<int64_t, 3>> kShapes = {  // (rows, r, features)
    {7, 4, 64}, {3, 7, 100}, {5, 64, 33}, {3, 1, 8}, {2, 16, 6000}, {1, 1, 1}, {4, 3, 2}, {9, 8, 24}, {2, 5, 4096},
};

}  // namespace

EMU_SUITE(tile, "tile / tile_dropout / tile_add: every dtype and launch path, bit-exact to the CPU rounding") {
  for (ScalarType dt : dtypes()) {
    for (const auto& t : kShapes) {
      const int64_t n = t[0], r = t[1], f = t[2];
      tile_case(dt, n, r, f, 0.0, false);
      tile_case(dt, n, r, f, 0.3, false);
      tile_case(dt, n, r, f, 0.0, true);
      tile_case(dt, n, r, f, 0.3, true);
      tile_case(dt, n, r, f, 0.0, false, 1);   // misaligned output: the scalar path
      tile_case(dt, n, r, f, 0.3, false, 1);
      tile_case(dt, n, r, f, 0.0, true, 0, 3);  // misaligned base: the scalar path
    }
    tile_case(dt, 3, 4, 16, 1.0, false);  // p = 1
    tile_case(dt, 0, 4, 16, 0.0, false);  // empty: nothing launched
    tile_case(dt, 3, 4, 0, 0.0, true);
  }
}

EMU_SUITE(tile_small_devices, "tile on 1 SM: grid-stride loops over many units") {
  WithDevice dev({1, 9});
  for (ScalarType dt : dtypes()) {
    tile_case(dt, 4, 16, 20000, 0.0, false);
    tile_case(dt, 4, 16, 20000, 0.3, false);
    tile_case(dt, 4, 16, 20000, 0.0, true);
    tile_case(dt, 3, 7, 9001, 0.3, false, 1);
  }
}

EMU_SUITE(tile_mixed, "tile of a wider s into a narrower output (mixed precision): every pair and path, bit-exact") {
  for (ScalarType dt : dtypes()) {
    for (ScalarType wide : wider_than(dt)) {
      for (const auto& t : std::vector<std::array<int64_t, 3>>{{7, 4, 64}, {3, 7, 100}, {2, 16, 6000}, {4, 3, 2}}) {
        const int64_t n = t[0], r = t[1], f = t[2];
        for (bool base : {false, true})
          for (double p : {0.0, 0.3}) {
            tile_case(dt, n, r, f, p, base, 0, 0, wide);
            tile_case(dt, n, r, f, p, base, 1, 0, wide);
          }
        tile_case(dt, n, r, f, 0.0, true, 0, 3, wide);
      }
    }
  }
}
