// Device-neutral front ends of the miss_ext operators: argument checks, dtype unification
// and layout preparation, then a call into the kernel of the input's device.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace miss_ext {

at::Tensor blocksum(const at::Tensor& x, int64_t r, std::optional<at::ScalarType> dtype);
at::Tensor blocksum_dropout(const at::Tensor& x, int64_t r, double p, const at::Tensor& seed,
                            std::optional<at::ScalarType> dtype);
at::Tensor tile(const at::Tensor& s, int64_t features, std::optional<at::ScalarType> dtype);
at::Tensor tile_dropout(const at::Tensor& s, int64_t features, double p, const at::Tensor& seed,
                        std::optional<at::ScalarType> dtype);
at::Tensor tile_add(const at::Tensor& base, const at::Tensor& s);
at::Tensor bat_transform(const at::Tensor& weight, const at::Tensor& block,
                         std::optional<at::ScalarType> dtype);
at::Tensor bat_input_grad(const at::Tensor& grad, const at::Tensor& weight, at::TensorList blocks);
at::Tensor bat_io_block_grad(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                             int64_t r, std::optional<at::ScalarType> dtype);
at::Tensor bat_block_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t r);
at::Tensor bat_weight_grad(const at::Tensor& grad, const at::Tensor& block);
at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight,
                      const std::optional<at::Tensor>& bias, at::TensorList blocks);
at::Tensor bat_unmerge(const at::Tensor& weight, const at::Tensor& block);
std::tuple<at::Tensor, at::Tensor> miss_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const at::Tensor& block, double p,
                                               const std::optional<at::Tensor>& seed);
at::Tensor miss_add_product(const at::Tensor& base, const at::Tensor& s, const at::Tensor& block);
std::tuple<at::Tensor, at::Tensor> miss_block_grads(const at::Tensor& grad, const at::Tensor& s,
                                                    const at::Tensor& block);
at::Tensor miss_merge(const at::Tensor& weight, const at::Tensor& block, double alpha);
at::Tensor miss_gathered_product(const at::Tensor& base, const at::Tensor& s,
                                 at::TensorList blocks, const at::Tensor& index);

}  // namespace miss_ext
