"""Block sum and tiling (``blocksum``, ``blocksum_dropout``, ``tile``, ``tile_dropout``, ``tile_add``):
each op's fake kernel next to its autograd formula. docs/MATH.md sections 1, 2 and 4.
"""

import torch

from ._ops_common import (
    FLOATS,
    LIB,
    check_dropout,
    check_features_last,
    check_float,
    check_rank,
    cpp_dtype,
    holds,
    needs,
    ops,
    register_autograd,
    same_device,
)


def _widened(op, from_name, from_dtype, dtype):
    if dtype is None:
        return from_dtype
    torch._check(
        holds(from_dtype, dtype),
        lambda: f"miss_ext.{op}: argument 'dtype' ({cpp_dtype(dtype)}) must be {from_name}'s dtype ({cpp_dtype(from_dtype)}) or a "
        f"wider float (float32 or float64) that holds it",
    )
    return dtype


def _narrowed(op, s, dtype):
    if dtype is None:
        return s.dtype
    torch._check(
        dtype in FLOATS and holds(dtype, s.dtype),
        lambda: f"miss_ext.{op}: argument 'dtype' ({cpp_dtype(dtype)}) must be s's dtype ({cpp_dtype(s.dtype)}) or a narrower float "
        "that s's dtype holds (the tiled term is rounded once to it)",
    )
    return dtype


def _blocksum_fake(op, x, r, dtype=None):
    check_float(op, "x", x)
    out_dtype = _widened(op, "x", x.dtype, dtype)
    check_features_last(op, "x", x, "features")
    check_rank(op, "r", r)
    return x.new_empty((*x.shape[:-1], r), dtype=out_dtype)


def _tile_fake(op, s, features, dtype=None):
    check_float(op, "s", s)
    out_dtype = _narrowed(op, s, dtype)
    check_features_last(op, "s", s, "block")
    torch._check(s.shape[-1] > 0, lambda: f"miss_ext.{op}: argument 's' must have a non-empty last dimension (the block size r)")
    torch._check(features >= 0, lambda: f"miss_ext.{op}: argument 'features' must be >= 0 (got {features})")
    return s.new_empty((*s.shape[:-1], features), dtype=out_dtype)


# ---------------------------------------------------------------- blocksum


@torch.library.register_fake(LIB + "blocksum")
def _(x, r, dtype=None):
    return _blocksum_fake("blocksum", x, r, dtype)


def _blocksum_setup(ctx, inputs, output):
    ctx.features, ctx.x_dtype = inputs[0].shape[-1], inputs[0].dtype


def _blocksum_backward(ctx, grad):
    # The tiled gradient is rounded to x's dtype, as a cast of x to the wider dtype would do.
    return ops.tile(grad, ctx.features, ctx.x_dtype), None, None


register_autograd("blocksum", _blocksum_backward, _blocksum_setup)


# ---------------------------------------------------------------- blocksum_dropout


@torch.library.register_fake(LIB + "blocksum_dropout")
def _(x, r, p, seed, dtype=None):
    check_float("blocksum_dropout", "x", x)
    check_dropout("blocksum_dropout", p, seed)
    return _blocksum_fake("blocksum_dropout", x, r, dtype)


def _blocksum_dropout_setup(ctx, inputs, output):
    x, _, p, seed = inputs[:4]
    ctx.features, ctx.p, ctx.x_dtype = x.shape[-1], p, x.dtype
    ctx.save_for_backward(seed)


def _blocksum_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return ops.tile_dropout(grad, ctx.features, ctx.p, seed, ctx.x_dtype), None, None, None, None


register_autograd("blocksum_dropout", _blocksum_dropout_backward, _blocksum_dropout_setup)


# ---------------------------------------------------------------- tile


@torch.library.register_fake(LIB + "tile")
def _(s, features, dtype=None):
    return _tile_fake("tile", s, features, dtype)


def _tile_setup(ctx, inputs, output):
    ctx.r, ctx.s_dtype = inputs[0].shape[-1], inputs[0].dtype


def _tile_backward(ctx, grad):
    # tile cuts its repeats to `features` columns; zero-padded blocksum is exactly its adjoint.
    return ops.blocksum(grad, ctx.r, ctx.s_dtype), None, None


register_autograd("tile", _tile_backward, _tile_setup)


# ---------------------------------------------------------------- tile_dropout


@torch.library.register_fake(LIB + "tile_dropout")
def _(s, features, p, seed, dtype=None):
    check_float("tile_dropout", "s", s)
    check_dropout("tile_dropout", p, seed)
    return _tile_fake("tile_dropout", s, features, dtype)


def _tile_dropout_setup(ctx, inputs, output):
    s, _, p, seed = inputs[:4]
    ctx.r, ctx.p, ctx.s_dtype = s.shape[-1], p, s.dtype
    ctx.save_for_backward(seed)


def _tile_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return ops.blocksum_dropout(grad, ctx.r, ctx.p, seed, ctx.s_dtype), None, None, None, None


register_autograd("tile_dropout", _tile_dropout_backward, _tile_dropout_setup)


# ---------------------------------------------------------------- tile_add


@torch.library.register_fake(LIB + "tile_add")
def _(base, s):
    op = "tile_add"
    check_float(op, "base", base)
    check_float(op, "s", s)
    same_device(op, base=base, s=s)
    torch._check(
        holds(base.dtype, s.dtype),
        lambda: f"miss_ext.{op}: argument 's' ({cpp_dtype(s.dtype)}) must have base's dtype ({cpp_dtype(base.dtype)}) or a wider float "
        "that holds it (the sum is rounded once to base's dtype)",
    )
    torch._check(
        base.dim() >= 1 and base.dim() == s.dim() and base.shape[:-1] == s.shape[:-1],
        lambda: f"miss_ext.{op}: arguments 'base' {list(base.shape)} and 's' {list(s.shape)} must have the same leading dimensions (only the last may differ)",
    )
    _tile_fake(op, s, base.shape[-1])
    return base.new_empty(base.shape)


def _tile_add_setup(ctx, inputs, output):
    ctx.r, ctx.s_dtype = inputs[1].shape[-1], inputs[1].dtype


def _tile_add_backward(ctx, grad):
    grad_s = ops.blocksum(grad, ctx.r, ctx.s_dtype) if needs(ctx, 1) else None
    return grad, grad_s


register_autograd("tile_add", _tile_add_backward, _tile_add_setup)
