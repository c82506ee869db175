// miss_merge (csrc/cuda/merge.cu): out[o, k] = W[o, k] + alpha * block[k % r, o % m], in fp32
// (fp64 for float64 weights), the product rounded before the add. Paths: vector or scalar
// units; grid-stride loops on small devices. Compared bit for bit with the CPU rounding.
#include "emu_test.h"

namespace {
using namespace emu_test;

template <class acc_t>
double cpu_merge(ScalarType dt, double w, double b, double alpha) {
  const acc_t prod = static_cast<acc_t>(alpha) * static_cast<acc_t>(b);
  return round_to(dt, static_cast<double>(static_cast<acc_t>(w) + prod));
}

void merge_case(ScalarType dt, int64_t out_f, int64_t in, int64_t r, int64_t m, double alpha, int64_t w_off = 0,
                int64_t out_off = 0) {
  const ScalarType acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  Tensor w = make(dt, {out_f, in}, 1.0, -1, w_off);
  Tensor blk = make(acc, {r, m});
  Tensor out = poisoned(dt, {out_f, in}, out_off);
  const std::string name = label("miss_merge", dt, {out_f, in, r, m},
                                 "alpha=" + std::to_string(alpha).substr(0, 4) + " w_off=" + std::to_string(w_off) +
                                     " out_off=" + std::to_string(out_off));
  if (!call(name, {&w, &blk}, {&out}, [&] { miss_ext::cuda::miss_merge(w, blk, alpha, out); })) return;
  const std::vector<double> wv = values(w), bv = values(blk);
  std::vector<double> ref(out_f * in), mag(out_f * in, 0.0);
  for (int64_t o = 0; o < out_f; ++o)
    for (int64_t k = 0; k < in; ++k) {
      const double b = bv[(k % r) * m + o % m];
      ref[o * in + k] = acc == at::kDouble ? cpu_merge<double>(dt, wv[o * in + k], b, alpha)
                                           : cpu_merge<float>(dt, wv[o * in + k], b, alpha);
    }
  check(name, out, ref, mag, /*exact=*/true);
}

}  // namespace

EMU_SUITE(merge, "miss_merge: standard (m = out) and mini (m < out) blocks, every dtype and path, bit-exact") {
  for (ScalarType dt : dtypes()) {
    for (const auto& t : std::vector<std::array<int64_t, 4>>{
             {64, 100, 7, 64}, {128, 256, 64, 16}, {96, 512, 128, 96}, {10, 3, 5, 5}, {1, 1, 1, 1}, {16, 24, 8, 4}}) {
      merge_case(dt, t[0], t[1], t[2], t[3], 0.5);
      merge_case(dt, t[0], t[1], t[2], t[3], -1.0);
    }
    merge_case(dt, 64, 128, 16, 64, 1.0, 1, 0);  // misaligned weight: the scalar path
    merge_case(dt, 64, 128, 16, 64, 1.0, 0, 3);  // misaligned output
    merge_case(dt, 0, 128, 16, 1, 1.0);          // empty weight: nothing launched
  }
  WithDevice dev({1, 9});  // grid-stride loops
  for (ScalarType dt : dtypes()) merge_case(dt, 64, 4096, 64, 16, 0.25);
}
