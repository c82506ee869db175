// blocksum (csrc/cuda/blocksum.cu): out[n, c] = scale * sum_j keep(n*in + k) x[n, k], k = j*r + c.
// Paths: 16-byte vector units or scalar (layout, offset and r decide), grouped threads
// (r-block narrower than a row's threads) or wide ones, one pass or split rows with a
// finishing kernel, dropout or not, grid-stride finishing loops on small devices; and the
// mixed-precision sums into a wider output (a bf16/fp16 x into float32, anything into float64).
#include "emu_test.h"

namespace {
using namespace emu_test;

// ld < 0: packed rows; off: storage offset in elements.
// out_dt: the output's dtype (x's, or a wider one: the mixed-precision sum).
void blocksum_case(ScalarType dt, int64_t n, int64_t in, int64_t r, double p, int64_t ld = -1, int64_t off = 0,
                   ScalarType out_dt = ScalarType::Undefined) {
  if (out_dt == ScalarType::Undefined) out_dt = dt;
  Tensor x = make(dt, {n, in}, 1.0, ld, off);
  Tensor out = poisoned(out_dt, {n, r});
  const miss_ext::DropoutArgs d = dropout(p, 0x9E3779B97F4A7C15ull);
  const std::string name = label("blocksum", dt, {n, in, r},
                                 "p=" + std::to_string(p).substr(0, 4) + " ld=" + std::to_string(x.stride(0)) +
                                     " off=" + std::to_string(off) +
                                     (out_dt != dt ? std::string(" into ") + dtype_name(out_dt) : ""));
  if (!call(name, {&x}, {&out}, [&] { miss_ext::cuda::blocksum(x, r, d, out); })) return;
  if (n == 0) return;  // nothing to write; call() saw that nothing was
  const std::vector<double> xv = values(x);
  const double scale = d.enabled ? miss_ext::dropout_keep_scale(p) : 1.0;
  std::vector<double> ref(n * r, 0.0), mag(n * r, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < in; ++k) {
      const double v = xv[i * in + k];
      if (kept(d, static_cast<uint64_t>(i * in + k))) ref[i * r + k % r] += v * scale;
      mag[i * r + k % r] += std::fabs(v) * scale;
    }
  check(name, out, ref, mag);
}

// (rows, in, r): tiny, odd and prime r, r > in, r == in, in % r != 0, rows of one unit,
// many short rows (several per block), long rows (split), wide r-blocks (ru >= threads).
const std::vector<std::array<int64_t, 3>> kShapes = {
    {7, 64, 4},     {3, 100, 7},     {5, 33, 64},     {3, 8, 1},       {2, 6000, 16},   {1, 1, 1},
    {1, 3, 5},      {2, 24, 8},      {33, 512, 512},  {4, 512, 64},    {9, 1000, 3},    {300, 16, 16},
    {5, 48, 24},    {2, 40000, 8},   {3, 4096, 1024}, {2, 1024, 2048}, {1, 9000, 3},    {70, 8, 2},
    {1, 16384, 1024}, {2, 12288, 2048}, {1, 20000, 520}, {257, 64, 64},
};

}  // namespace

EMU_SUITE(blocksum, "blocksum / blocksum_dropout: every dtype, layout and launch path") {
  for (ScalarType dt : dtypes()) {
    const int64_t V = 16 / static_cast<int64_t>(c10::elementSize(dt));  // elements per vector unit
    for (const auto& s : kShapes) {
      const int64_t n = s[0], in = s[1], r = s[2];
      blocksum_case(dt, n, in, r, 0.0);
      blocksum_case(dt, n, in, r, 0.3);
      // Row stride not a multiple of the vector width, misaligned start: the scalar path.
      blocksum_case(dt, n, in, r, 0.0, in + 5, 2);
      // Row stride a multiple of the vector width, start 16 bytes in: the vector path on
      // strided rows (a gap of bench/gpu_check.sh's sweep, whose in + 5 stride never is).
      blocksum_case(dt, n, in, r, 0.3, (in + V - 1) / V * V + 2 * V, V);
    }
    blocksum_case(dt, 3, 64, 16, 1.0);  // p = 1 drops everything
    blocksum_case(dt, 0, 64, 16, 0.0);  // no rows: nothing launched, nothing written
    blocksum_case(dt, 4, 0, 3, 0.0);    // no features: zeros
    blocksum_case(dt, 4, 0, 3, 0.5);
  }
}

EMU_SUITE(blocksum_small_devices, "blocksum on 1 and 8 SMs: other split counts, grid-stride finishing loops") {
  for (int sms : {1, 8}) {
    WithDevice dev({sms, 9});
    for (ScalarType dt : dtypes()) {
      blocksum_case(dt, 1, 20000, 9000, 0.0);  // split rows, rows * r > 32 blocks of the finisher
      blocksum_case(dt, 1, 20000, 9000, 0.2);
      blocksum_case(dt, 3, 4096, 1024, 0.0);
      blocksum_case(dt, 2, 40000, 8, 0.3);
      blocksum_case(dt, 5, 3000, 7, 0.0, 3011, 1);
    }
  }
}

EMU_SUITE(blocksum_mixed, "blocksum into a wider output (mixed precision): every pair, layout and path") {
  for (ScalarType dt : dtypes()) {
    const int64_t V = 16 / static_cast<int64_t>(c10::elementSize(dt));
    for (ScalarType wide : wider_than(dt)) {
      for (const auto& s : std::vector<std::array<int64_t, 3>>{
               {7, 64, 4}, {3, 100, 7}, {5, 33, 64}, {2, 6000, 16}, {33, 512, 512}, {1, 16384, 1024}, {1, 1, 1}}) {
        const int64_t n = s[0], in = s[1], r = s[2];
        blocksum_case(dt, n, in, r, 0.0, -1, 0, wide);
        blocksum_case(dt, n, in, r, 0.3, -1, 0, wide);
        blocksum_case(dt, n, in, r, 0.0, in + 5, 2, wide);
        blocksum_case(dt, n, in, r, 0.3, (in + V - 1) / V * V + 2 * V, V, wide);
      }
      blocksum_case(dt, 4, 0, 3, 0.0, -1, 0, wide);
      WithDevice dev({1, 9});
      blocksum_case(dt, 1, 20000, 9000, 0.2, -1, 0, wide);
    }
  }
}
