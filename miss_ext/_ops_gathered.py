"""The mixed-adapter serving product (``miss_gathered_product``): fake kernel and autograd.
docs/MATH.md section 12.
"""

import torch

from ._ops_common import (
    LIB,
    check_dim,
    check_float,
    check_holds,
    check_rank,
    cpp_dtype,
    ops,
    register_autograd,
    same_device,
    same_dtype,
)


# ---------------------------------------------------------------- miss_gathered_product


@torch.library.register_fake(LIB + "miss_gathered_product")
def _(base, s, blocks, index):
    op = "miss_gathered_product"
    check_float(op, "base", base)
    check_float(op, "s", s)
    torch._check(len(blocks) > 0, lambda: f"miss_ext.{op}: argument 'blocks' must hold at least one (r, out_features) or (r, mini_r) block")
    same_device(op, base=base, s=s)
    torch._check(
        base.dim() >= 1 and base.dim() == s.dim() and base.shape[:-1] == s.shape[:-1],
        lambda: f"miss_ext.{op}: arguments 'base' {list(base.shape)} and 's' {list(s.shape)} must have the same "
        "leading dimensions (one block-sum row per output row)",
    )
    r, out_f = s.shape[-1], base.shape[-1]
    check_rank(op, "s.shape[-1]", r)
    for k, b in enumerate(blocks):
        check_float(op, "blocks[k]", b)
        same_device(op, base=base, **{"blocks[k]": b})
        same_dtype(op, "s", s, "blocks[k]", b)
        check_dim(op, "blocks[k]", b, 2, "(r, out_features) or, for mini, (r, mini_r)")
        torch._check(b.shape[0] == r, lambda: f"miss_ext.{op}: blocks[{k}] has {b.shape[0]} rows but s has r = {r} columns; blocks of one call share r (call once per r)")
        torch._check(
            b.shape[1] > 0 and out_f % b.shape[1] == 0,
            lambda: f"miss_ext.{op}: out_features ({out_f}) must be divisible by blocks[{k}].shape[1] ({b.shape[1]}; out_features for standard MiSS, mini_r for mini)",
        )
    check_holds(op, "base", base, blocks[0])
    torch._check(index.dtype == torch.int64, lambda: f"miss_ext.{op}: argument 'index' must be an int64 tensor (got {cpp_dtype(index.dtype)}); build it with torch.tensor(..., dtype=torch.int64)")
    same_device(op, base=base, index=index)
    torch._check(
        index.shape == base.shape[:-1],
        lambda: f"miss_ext.{op}: argument 'index' must have base's leading shape {tuple(base.shape[:-1])} (one adapter per output row), got {list(index.shape)}",
    )
    return base.new_empty(base.shape)


def _miss_gathered_product_setup(ctx, inputs, output):
    base, s, blocks, index = inputs
    ctx.n_blocks = len(blocks)
    ctx.save_for_backward(s, index, *blocks)


def _miss_gathered_product_backward(ctx, up):
    # out[n] = base[n] + tile_out(s[n] @ D_{index[n]}): the base gets U, and for each block k,
    # with Gs the rows of k (U block-summed over the mini tiles), dD_k = s^T Gs and ds = Gs D_k^T.
    # Row masks rather than gathers keep the shapes static (torch.compile); backward is not the
    # serving path, so the pass per block is fine.
    s, index, *blocks = ctx.saved_tensors
    needs_s, needs_blocks = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if isinstance(needs_blocks, bool):
        needs_blocks = [needs_blocks] * len(blocks)
    r, out_f = s.shape[-1], up.shape[-1]
    acc = s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32
    u2 = up.reshape(-1, out_f)
    s2 = s.reshape(-1, r).to(acc)
    idx = index.reshape(-1, 1)
    grad_s = torch.zeros_like(s2) if needs_s else None
    grad_blocks = [None] * len(blocks)
    for k, blk in enumerate(blocks):
        if not (needs_s or needs_blocks[k]):
            continue
        m = blk.shape[1]
        gs = u2.to(acc) if m == out_f else ops.blocksum(u2, m, acc)
        gs = gs * (idx == k).to(acc)
        if needs_blocks[k]:
            grad_blocks[k] = (s2.t() @ gs).to(blk.dtype)
        if needs_s:
            grad_s = grad_s + gs @ blk.to(acc).t()
    if needs_s:
        grad_s = grad_s.reshape(s.shape).to(s.dtype)
    return (up if ctx.needs_input_grad[0] else None), grad_s, grad_blocks, None


register_autograd("miss_gathered_product", _miss_gathered_product_backward, _miss_gathered_product_setup)
