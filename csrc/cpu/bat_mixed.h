// The mixed-precision BAT transform (cpu/bat_mixed.cpp), which cpu::bat_transform hands over to
// when the weight, block and output dtypes are not all equal.
#pragma once

#include <ATen/ATen.h>

namespace miss_ext {
namespace cpu {

void bat_transform_mixed(const at::Tensor& weight, const at::Tensor& block, at::Tensor& out);

}  // namespace cpu
}  // namespace miss_ext
