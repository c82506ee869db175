// Shapes and layouts shared by the BAT suites (case_bat_rowmm.cpp, case_bat_block_grad.cpp).
// Weights are (out, in) with r x r blocks W_ij = W[i*r:(i+1)*r, j*r:(j+1)*r]; blocks B are
// (out/r, r, r). Every shape runs in every dtype.
#pragma once

#include "emu_test.h"

namespace emu_test {

struct BatShape {
  int64_t out, in, r;
};
// r = 1, odd r (3, 17), the small paths (r <= 16 / r <= 32) with and without splits, r in
// (32, 64) not a multiple of 16 (SIMT tiles), WMMA sizes with partial, exact and several
// tiles, r == in, long slabs (splits), in / r odd.
inline const std::vector<BatShape> kBatShapes = {
    {8, 12, 1},      {48, 96, 3},    {32, 64, 16},     {17, 34, 17},    {48, 4096, 16},
    {64, 2048, 32},  {80, 160, 40},  {96, 192, 48},    {128, 256, 64},  {128, 128, 128},
    {200, 300, 100}, {64, 2048, 64}, {160, 1280, 80},  {32, 1040, 16},  {48, 1056, 48},
    {160, 160, 80},
};

// Storage offsets of the weight (elements) for the alignment-dependent paths, with why.
struct BatOffset {
  int64_t off;
  const char* why;
};
inline const std::vector<BatOffset> kBatOffsets = {
    {1, "2-byte offset: not 16-byte aligned, the WMMA paths must fall back"},
    {8, "8 half elements = 16 bytes: 16- but not 32-byte aligned, WMMA from global memory is fine"},
    {192, "torch.randn(97, 192)[1:]: a 384-byte offset, 16-byte aligned, so WMMA"},
};

}  // namespace emu_test
