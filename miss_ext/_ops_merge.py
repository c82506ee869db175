"""Merging a standard or mini block into a weight (``miss_merge``): fake kernel and autograd.
docs/MATH.md section 6.
"""

import torch

from ._ops_common import (
    LIB,
    check_dim,
    check_float,
    check_rank,
    needs,
    ops,
    register_autograd,
    same_device,
)


# ---------------------------------------------------------------- miss_merge


@torch.library.register_fake(LIB + "miss_merge")
def _(weight, block, alpha):
    op = "miss_merge"
    check_float(op, "weight", weight)
    check_float(op, "block", block)
    same_device(op, weight=weight, block=block)
    check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    check_dim(op, "block", block, 2, "(r, out_features) or, for mini, (r, mini_r)")
    check_rank(op, "block.shape[0]", block.shape[0])
    m = block.shape[1]
    torch._check(
        m > 0 and weight.shape[0] % m == 0,
        lambda: f"miss_ext.{op}: out_features ({weight.shape[0]}) must be divisible by block.shape[1] ({m}; out_features for standard MiSS, mini_r for mini)",
    )
    return weight.new_empty(weight.shape)


def _miss_merge_setup(ctx, inputs, output):
    weight, block, alpha = inputs
    ctx.alpha, ctx.block_shape, ctx.block_dtype = alpha, block.shape, block.dtype


def _miss_merge_backward(ctx, up):
    # dW[o, k] = alpha * block[k % r, o % m]: the block's gradient sums U over both tilings.
    grad_b = None
    if needs(ctx, 1):
        r, m = ctx.block_shape
        grad_b = ops.blocksum(ops.blocksum(up, r).t(), m) * ctx.alpha
        grad_b = grad_b.to(ctx.block_dtype)
    return (up if needs(ctx, 0) else None), grad_b, None


register_autograd("miss_merge", _miss_merge_backward, _miss_merge_setup)
