// miss_gathered_product (csrc/cuda/gathered.cu): out[n, o] = base[n, o] + sum_c s[n, c] *
// blocks[index[n]][c, o % m] in s's precision, rounded once; index -1 copies the base row.
// Paths: runs of rows sharing an adapter and rows alternating inside a tile, row tiles cut
// short, r not a multiple of the staging chunk, mini (m < out) and standard blocks, more adapters
// than one launch's table (several launches), a broadcast base row (stride 0), grid-stride loops
// on small devices.
#include "emu_test.h"

namespace {
using namespace emu_test;

// pattern 0: runs of 5 rows per adapter; 1: alternating; 2: all -1 but the last row.
void gathered_case(ScalarType dt, ScalarType acc, int64_t n, int64_t out_f, int64_t r, int64_t k_count,
                   int pattern, int64_t mini = 0, bool broadcast = false) {
  Tensor base = make(dt, {n, out_f}), s = make(acc, {n, r});
  if (broadcast) base.sd[0] = 0;  // one row for all (a bias), row stride 0
  std::vector<Tensor> blocks;
  for (int64_t k = 0; k < k_count; ++k)
    blocks.push_back(make(acc, {r, (mini > 0 && k % 2 == 1) ? mini : out_f}));
  Tensor index = poisoned(at::kLong, {n});
  int64_t* ip = static_cast<int64_t*>(index.data_ptr());
  for (int64_t t = 0; t < n; ++t) {
    if (pattern == 0) ip[t] = (t / 5) % (k_count + 1) - 1;
    else if (pattern == 1) ip[t] = t % (k_count + 1) - 1;
    else ip[t] = t + 1 == n ? k_count - 1 : -1;
  }
  Tensor out = poisoned(dt, {n, out_f});
  const std::string name = label("miss_gathered_product", dt, {n, out_f, r, k_count},
                                 std::string("s ") + dtype_name(acc) + " pattern " + std::to_string(pattern) +
                                     (mini ? " mini " + std::to_string(mini) : "") +
                                     (broadcast ? " broadcast base" : ""));
  std::vector<const Tensor*> inputs{&base, &s, &index};
  for (auto& b : blocks) inputs.push_back(&b);
  if (!call(name, inputs, {&out}, [&] { miss_ext::cuda::miss_gathered_product(base, s, blocks, index, out); }))
    return;
  const std::vector<double> B = values(base), S = values(s);
  std::vector<std::vector<double>> D;
  for (auto& b : blocks) D.push_back(values(b));
  std::vector<double> ref(n * out_f), mag(n * out_f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t o = 0; o < out_f; ++o) {
      double v = B[t * out_f + o], m = std::fabs(v);
      const int64_t k = ip[t];
      if (k >= 0) {
        const int64_t w = blocks[k].size(1);
        for (int64_t c = 0; c < r; ++c) {
          const double p = S[t * r + c] * D[k][c * w + o % w];
          v += p;
          m += std::fabs(p);
        }
      }
      ref[t * out_f + o] = v;
      mag[t * out_f + o] = m;
    }
  check(name, out, ref, mag);
}

}  // namespace

EMU_SUITE(gathered, "miss_gathered_product: every dtype pair, runs and alternating rows, mini, many adapters") {
  for (ScalarType dt : dtypes()) {
    std::vector<ScalarType> accs = wider_than(dt);
    if (dt == at::kFloat || dt == at::kDouble) accs.push_back(dt);
    for (ScalarType acc : accs) {
      if (acc != at::kFloat && acc != at::kDouble) continue;
      gathered_case(dt, acc, 37, 300, 40, 3, 0);       // runs; r > one staging chunk; a partial column tile
      gathered_case(dt, acc, 19, 64, 7, 4, 1, 16);     // alternating rows, mini blocks, odd r
      gathered_case(dt, acc, 16, 256, 32, 2, 2);       // base rows copied, one adapter row
    }
  }
  gathered_case(at::kFloat, at::kFloat, 80, 32, 4, 40, 1);  // 40 adapters: two launches
  gathered_case(at::kFloat, at::kFloat, 21, 96, 8, 2, 0, 24, true);  // a broadcast base row
  gathered_case(at::kFloat, at::kFloat, 0, 32, 4, 2, 0);    // no rows: nothing launched
  WithDevice dev({1, 9});                                    // grid-stride loop over tiles
  gathered_case(at::kBFloat16, at::kFloat, 70, 520, 8, 3, 0);
}
