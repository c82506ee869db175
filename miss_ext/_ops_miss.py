"""Standard and mini MiSS products: the fused layer ``miss_linear`` and the mixed-precision product
pieces ``miss_add_product`` and ``miss_block_grads``; each op's fake kernel next to its autograd
formula. docs/MATH.md sections 1, 2, 9 and 11.1.
"""

import torch

from ._ops_common import (
    LIB,
    check_bias,
    check_dim,
    check_dropout,
    check_float,
    check_holds,
    check_rank,
    half_mm,
    needs,
    ops,
    register_autograd,
    same_device,
    same_dtype,
    upcast_if_emulated,
)


def _check_product(op, a_name, a, s, block):
    for name, t in ((a_name, a), ("s", s), ("block", block)):
        check_float(op, name, t)
    same_device(op, **{a_name: a, "s": s, "block": block})
    same_dtype(op, "s", s, "block", block)
    check_holds(op, a_name, a, block)
    check_dim(op, "block", block, 2, "(r, out_features)")
    torch._check(
        a.dim() >= 1 and a.dim() == s.dim() and a.shape[:-1] == s.shape[:-1],
        lambda: f"miss_ext.{op}: arguments '{a_name}' {list(a.shape)} and 's' {list(s.shape)} must have the same leading dimensions",
    )
    torch._check(
        s.shape[-1] == block.shape[0] and a.shape[-1] == block.shape[1],
        lambda: f"miss_ext.{op}: argument 'block' must have shape (s.shape[-1], {a_name}.shape[-1]) = ({s.shape[-1]}, {a.shape[-1]}) (got {list(block.shape)})",
    )


# ---------------------------------------------------------------- miss_linear


@torch.library.register_fake(LIB + "miss_linear")
def _(x, weight, bias, block, p, seed, round_base=False):
    op = "miss_linear"
    for name, t in (("x", x), ("weight", weight), ("block", block)):
        check_float(op, name, t)
    check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    check_dim(op, "block", block, 2, "(r, out_features) or, for mini, (r, mini_r)")
    torch._check(0.0 <= p <= 1.0, lambda: f"miss_ext.{op}: argument 'p' (the dropout probability) must be in [0, 1] (got {p:g})")
    same_device(op, x=x, weight=weight, block=block, bias=bias)
    same_dtype(op, "x", x, "weight", weight)
    check_holds(op, "x", x, block)
    out_f, in_f = weight.shape
    r, m = block.shape
    torch._check(x.dim() >= 1 and x.shape[-1] == in_f, lambda: f"miss_ext.{op}: argument 'x' must end in in_features = {in_f} (got shape {list(x.shape)})")
    check_rank(op, "block.shape[0]", r)
    torch._check(m > 0 and out_f % m == 0, lambda: f"miss_ext.{op}: out_features ({out_f}) must be divisible by block.shape[1] ({m}; out_features for standard MiSS, mini_r for mini)")
    if p > 0:
        torch._check(seed is not None, lambda: f"miss_ext.{op}: argument 'seed' is required when p > 0")
        check_dropout(op, p, seed)
    check_bias(op, bias, out_f)
    return x.new_empty((*x.shape[:-1], out_f)), x.new_empty((*x.shape[:-1], r), dtype=block.dtype)


def _miss_linear_setup(ctx, inputs, output):
    x, weight, bias, block, p, seed = inputs[:6]
    ctx.p, ctx.in_features = p, x.shape[-1]
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # S (N x r) replaces x for the block gradient; x itself is kept only when the base weight
    # trains (its gradient needs x, exactly as a trainable nn.Linear keeps it).
    keep_x = x if ctx.needs_input_grad[1] else None
    ctx.save_for_backward(output[1], weight, block, seed, keep_x)
    # S is an output only for backward's sake; its gradient is almost always unused, and a
    # materialised zero gradient would cost a pass and an add.
    ctx.set_materialize_grads(False)


def _miss_linear_backward(ctx, grad_y, grad_s):
    s, weight, block, seed, x = ctx.saved_tensors
    r, m = block.shape
    out_f = weight.shape[0]
    if grad_y is None:  # only S was used
        grad_y = s.new_zeros((*s.shape[:-1], out_f), dtype=weight.dtype)
    g2 = grad_y.reshape(-1, out_f)
    s2 = s.reshape(-1, r)
    mixed = block.dtype != weight.dtype  # a float32 block on a half-type base (x has weight's dtype)
    need_x, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x = grad_w = grad_bias = grad_block = d_s = g32 = None
    if need_x or need_block:
        if mixed and m == out_f:
            # One pass over G gives both products in the block's precision.
            grad_block, d_s = ops.miss_block_grads(g2, s2, block)
        elif m == out_f:
            # Where the half-type GEMM is emulated, G is upcast once for its three products.
            g32 = upcast_if_emulated(g2)
            if need_block:
                # S^T made contiguous (N x r, a small copy): oneDNN's product then reads it as
                # rows, measured 12% (512 tokens) to 34% (2048) faster than from the transposed
                # view; elsewhere the copy is the only cost, a pass over S.
                grad_block = half_mm(s2.t().contiguous(), g2, b32=g32)
            if need_x:
                d_s = half_mm(g2, block.t(), a32=g32)
        else:
            # mini: the output tiles share Dm, so their gradients sum first (the same block-sum
            # kernel). A half-type block (autocast's copy) has both products taken in fp32 and
            # rounded once: PEFT rounds each tile's product, so this stays within its error
            # (docs/MATH.md section 11.4).
            acc = block.dtype if block.dtype in (torch.float32, torch.float64) else torch.float32
            gs = ops.blocksum(g2, m, acc)
            if need_block:
                grad_block = (s2.to(acc).t() @ gs).to(block.dtype)
            if need_x:
                d_s = (gs @ block.to(acc).t()).to(block.dtype)
    if need_x:
        if grad_s is not None:
            d_s = d_s + grad_s.reshape(-1, r)
        half = g2.dtype in (torch.bfloat16, torch.float16)
        if ctx.p == 0 and (mixed or half):
            # Mixed: PEFT's rounding, the block-precision term rounded to x's dtype, then added to
            # the frozen GEMM's gradient. Equal half types: measured on CPU (oneDNN), a half-type
            # GEMM with beta = 1 costs more than a plain GEMM plus one fused pass.
            grad_x = ops.tile_add(half_mm(g2, weight, a32=g32), d_s.to(g2.dtype))
        elif mixed:
            grad_x = half_mm(g2, weight) + ops.tile_dropout(d_s, ctx.in_features, ctx.p, seed, g2.dtype)
        else:
            if ctx.p > 0:
                dx = ops.tile_dropout(d_s, ctx.in_features, ctx.p, seed)
            else:
                dx = ops.tile(d_s, ctx.in_features)
            # The frozen GEMM accumulates into the adapter's input gradient (beta = 1).
            grad_x = torch.addmm(dx, g2, weight)
        grad_x = grad_x.reshape(*grad_y.shape[:-1], ctx.in_features)
    if not need_block:
        grad_block = None
    if ctx.needs_input_grad[1]:
        grad_w = g2.t() @ x.reshape(-1, ctx.in_features)
    if ctx.needs_input_grad[2]:
        grad_bias = g2.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_bias, grad_block, None, None, None


register_autograd("miss_linear", _miss_linear_backward, _miss_linear_setup)


# ---------------------------------------------------------------- miss_add_product


@torch.library.register_fake(LIB + "miss_add_product")
def _(base, s, block):
    _check_product("miss_add_product", "base", base, s, block)
    return base.new_empty(base.shape)


def _miss_add_product_setup(ctx, inputs, output):
    base, s, block = inputs
    ctx.save_for_backward(s, block)


def _miss_add_product_backward(ctx, up):
    s, block = ctx.saved_tensors
    grad_block = grad_s = None
    if needs(ctx, 1) or needs(ctx, 2):
        grad_block, grad_s = ops.miss_block_grads(up, s, block)
    return (up if needs(ctx, 0) else None), grad_s, grad_block


register_autograd("miss_add_product", _miss_add_product_backward, _miss_add_product_setup)


# ---------------------------------------------------------------- miss_block_grads


@torch.library.register_fake(LIB + "miss_block_grads")
def _(grad, s, block):
    _check_product("miss_block_grads", "grad", grad, s, block)
    return block.new_empty(block.shape), s.new_empty(s.shape)


def _miss_block_grads_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _miss_block_grads_backward(ctx, up_block, up_s):
    # (gb, gs) = (s^T G, G D^T): dG = s U_b + U_s D, ds = G U_b^T, dD = U_s^T G.
    grad, s, block = ctx.saved_tensors
    acc = block.dtype
    g2 = grad.reshape(-1, grad.shape[-1]).to(acc)
    s2 = s.reshape(-1, s.shape[-1])
    us = up_s.reshape(-1, s.shape[-1]) if up_s is not None else None
    d_grad = d_s = d_block = None
    if needs(ctx, 0):
        d = torch.zeros_like(g2)
        if up_block is not None:
            d = d + s2 @ up_block
        if us is not None:
            d = d + us @ block
        d_grad = d.reshape(grad.shape).to(grad.dtype)
    if needs(ctx, 1):
        d_s = (g2 @ up_block.t()).reshape(s.shape) if up_block is not None else torch.zeros_like(s)
    if needs(ctx, 2):
        d_block = us.t() @ g2 if us is not None else torch.zeros_like(block)
    return d_grad, d_s, d_block


register_autograd("miss_block_grads", _miss_block_grads_backward, _miss_block_grads_setup)
