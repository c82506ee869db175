// The operator families. Each front end (csrc/front/<family>.cpp) defines its operators'
// schemas beside the functions that implement them; csrc/ops.cpp, the one registration file,
// calls these from TORCH_LIBRARY and from the CPU and CUDA impl blocks.
#pragma once

namespace torch {
class Library;
}  // namespace torch

namespace miss_ext {
namespace front {

// blocksum, blocksum_dropout, tile, tile_dropout, tile_add (front/blocksum.cpp).
void define_blocksum(torch::Library& m);
void impl_blocksum(torch::Library& m);

// bat_transform, bat_block_grad, bat_input_grad, bat_io_block_grad, bat_weight_grad,
// bat_linear, bat_unmerge (front/bat.cpp).
void define_bat(torch::Library& m);
void impl_bat(torch::Library& m);

// miss_linear, miss_add_product, miss_block_grads: standard and mini MiSS (front/product.cpp).
void define_product(torch::Library& m);
void impl_product(torch::Library& m);

// miss_merge (front/merge.cpp).
void define_merge(torch::Library& m);
void impl_merge(torch::Library& m);

// miss_gathered_product: mixed-adapter batches for serving (front/gathered.cpp).
void define_gathered(torch::Library& m);
void impl_gathered(torch::Library& m);

}  // namespace front
}  // namespace miss_ext
