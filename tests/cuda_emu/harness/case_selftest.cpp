// The emulator's own test: each broken kernel of selftest/faults.cu must be caught, each
// correct twin must pass. A fault that goes unnoticed is a failure of this suite.
#include "../selftest/faults.h"
#include "emu_test.h"

namespace {
using namespace emu_test;

std::vector<double> zeros(size_t n) { return std::vector<double>(n, 0.0); }

void rotate_case(bool sync) {
  Tensor in = make(at::kFloat, {256});
  Tensor out = poisoned(at::kFloat, {256});
  if (!call("rotate", {&in}, {&out}, [&] { emu_faults::rotate(in, out, sync); })) return;
  std::vector<double> x = values(in), ref(256);
  for (int i = 0; i < 256; ++i) ref[i] = x[(i + 1) % 256];
  check("rotate sync=" + std::to_string(sync), out, ref, zeros(256), true);
}

void copy_case(int shift, int skip, bool write_input) {
  Tensor in = make(at::kFloat, {1000});
  Tensor out = poisoned(at::kFloat, {1000});
  if (!call("copy", {&in}, {&out}, [&] { emu_faults::copy(in, out, shift, skip, write_input); })) return;
  check("copy", out, values(in), zeros(1000), true);
}

void wmma_case(int offset, unsigned ld, bool disagree, bool diverge) {
  Tensor a = make(at::kHalf, {16 * 64 + 64});
  Tensor out = poisoned(at::kFloat, {8, 16, 16});
  if (!call("wmma", {&a}, {&out}, [&] { emu_faults::wmma(a, out, offset, ld, disagree, diverge); })) return;
  const std::vector<double> av = values(a);
  std::vector<double> ref(8 * 256), mag(8 * 256);
  for (int w = 0; w < 8; ++w)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j)
        for (int k = 0; k < 16; ++k) {
          const double t = av[offset + i * ld + k] * av[offset + j * ld + k];
          ref[w * 256 + i * 16 + j] += t;
          mag[w * 256 + i * 16 + j] += std::fabs(t);
        }
  check("wmma", out, ref, mag);
}

}  // namespace

EMU_SUITE(selftest, "the emulator catches each planted fault of selftest/faults.cu") {
  // Correct twins first: they must pass.
  rotate_case(true);
  copy_case(0, -1, false);
  wmma_case(0, 64, false, false);
  wmma_case(16, 32, false, false);  // 32 bytes in: still aligned

  expect_caught("missing barrier", "rotate", [] { rotate_case(false); });
  expect_caught("exit before barrier", "divergent __syncthreads", [] {
    Tensor out = poisoned(at::kFloat, {256});
    call("exit_before_barrier", {}, {&out}, [&] { emu_faults::exit_before_barrier(out); });
  });
  expect_caught("barrier sites differ", "different barriers", [] {
    Tensor out = poisoned(at::kFloat, {256});
    call("barrier_sites", {}, {&out}, [&] { emu_faults::barrier_sites(out); });
  });
  expect_caught("out-of-bounds write", "guard zone", [] { copy_case(1, -1, false); });
  expect_caught("unwritten element", "1 of 1000 elements wrong", [] { copy_case(0, 7, false); });
  expect_caught("write into an input", "wrote into an input", [] { copy_case(0, -1, true); });
  expect_caught("workspace overrun", "guard zone", [] { call("workspace_overrun", {}, {}, emu_faults::workspace_overrun); });
  expect_caught("WMMA misaligned", "not 256-bit", [] { wmma_case(8, 64, false, false); });
  expect_caught("WMMA bad ldm", "ldm 12", [] { wmma_case(0, 12, false, false); });
  expect_caught("WMMA lanes disagree", "different pointers", [] { wmma_case(0, 64, true, false); });
  expect_caught("WMMA divergent warp", "divergent warp", [] { wmma_case(0, 64, false, true); });
  expect_caught("shared memory > 48 KB", "exceeds 48 KB", [] {
    call("dynamic_smem", {}, {}, [] { emu_faults::dynamic_smem(64 * 1024, false); });
  });
  expect_caught("dynamic smem overrun", "dynamic shared memory written past", [] {
    call("dynamic_smem", {}, {}, [] { emu_faults::dynamic_smem(1024, true); });
  });
  expect_caught("empty grid", "invalid launch configuration", [] { call("empty_grid", {}, {}, emu_faults::empty_grid); });
}
