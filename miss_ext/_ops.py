"""Fake (meta) kernels and autograd formulas of the torch.ops.miss_ext operators.

Every backward is built from registered operators only (ours and aten's), so
torch.compile(fullgraph=True) traces forward and backward without a graph break.
Formulas: ../shared/SPEC.md sections 1-4 and 6.
"""

import torch

ops = torch.ops.miss_ext
_LIB = "miss_ext::"


def _needs(ctx, i):
    return ctx.needs_input_grad[i]


# ---------------------------------------------------------------- fake kernels


def _same_device(op, **tensors):
    """The device rule of the real kernels, so meta/fake calls reject what real calls reject."""
    (first_name, first), *rest = [(k, v) for k, v in tensors.items() if v is not None]
    for name, t in rest:
        torch._check(
            t.device == first.device,
            lambda: f"miss_ext.{op}: arguments '{first_name}' (on {first.device}) and '{name}' "
            f"(on {t.device}) must be on the same device; move one with .to(device)",
        )


@torch.library.register_fake(_LIB + "blocksum")
def _(x, r):
    return x.new_empty((*x.shape[:-1], r))


@torch.library.register_fake(_LIB + "blocksum_dropout")
def _(x, r, p, seed):
    return x.new_empty((*x.shape[:-1], r))


@torch.library.register_fake(_LIB + "tile")
def _(s, features):
    return s.new_empty((*s.shape[:-1], features))


@torch.library.register_fake(_LIB + "tile_dropout")
def _(s, features, p, seed):
    return s.new_empty((*s.shape[:-1], features))


@torch.library.register_fake(_LIB + "tile_add")
def _(base, s):
    _same_device("tile_add", base=base, s=s)
    return base.new_empty(base.shape)


@torch.library.register_fake(_LIB + "bat_transform")
def _(weight, block):
    _same_device("bat_transform", weight=weight, block=block)
    return weight.new_empty(weight.shape, dtype=block.dtype)


@torch.library.register_fake(_LIB + "bat_block_grad")
def _(grad, weight, r):
    _same_device("bat_block_grad", grad=grad, weight=weight)
    return grad.new_empty((grad.shape[0] // r, r, r))


@torch.library.register_fake(_LIB + "bat_weight_grad")
def _(grad, block):
    _same_device("bat_weight_grad", grad=grad, block=block)
    return grad.new_empty(grad.shape)


@torch.library.register_fake(_LIB + "bat_linear")
def _(x, weight, bias, blocks):
    _same_device("bat_linear", x=x, weight=weight, bias=bias, **{f"blocks[{i}]": b for i, b in enumerate(blocks)})
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(_LIB + "bat_unmerge")
def _(weight, block):
    _same_device("bat_unmerge", weight=weight, block=block)
    return weight.new_empty(weight.shape)


@torch.library.register_fake(_LIB + "miss_merge")
def _(weight, block, alpha):
    _same_device("miss_merge", weight=weight, block=block)
    return weight.new_empty(weight.shape)


# ---------------------------------------------------------------- block sum family


def _blocksum_setup(ctx, inputs, output):
    ctx.features = inputs[0].shape[-1]


def _blocksum_backward(ctx, grad):
    return ops.tile(grad, ctx.features), None


torch.library.register_autograd(_LIB + "blocksum", _blocksum_backward, setup_context=_blocksum_setup)


def _blocksum_dropout_setup(ctx, inputs, output):
    x, _, p, seed = inputs
    ctx.features, ctx.p = x.shape[-1], p
    ctx.save_for_backward(seed)


def _blocksum_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return ops.tile_dropout(grad, ctx.features, ctx.p, seed), None, None, None


torch.library.register_autograd(
    _LIB + "blocksum_dropout", _blocksum_dropout_backward, setup_context=_blocksum_dropout_setup
)


def _tile_setup(ctx, inputs, output):
    ctx.r = inputs[0].shape[-1]


def _tile_backward(ctx, grad):
    # tile cuts its repeats to `features` columns; zero-padded blocksum is exactly its adjoint.
    return ops.blocksum(grad, ctx.r), None


torch.library.register_autograd(_LIB + "tile", _tile_backward, setup_context=_tile_setup)


def _tile_dropout_setup(ctx, inputs, output):
    s, _, p, seed = inputs
    ctx.r, ctx.p = s.shape[-1], p
    ctx.save_for_backward(seed)


def _tile_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return ops.blocksum_dropout(grad, ctx.r, ctx.p, seed), None, None, None


torch.library.register_autograd(
    _LIB + "tile_dropout", _tile_dropout_backward, setup_context=_tile_dropout_setup
)


def _tile_add_backward(ctx, grad):
    grad_s = ops.blocksum(grad, ctx.r) if _needs(ctx, 1) else None
    return grad, grad_s


torch.library.register_autograd(
    _LIB + "tile_add", _tile_add_backward,
    setup_context=lambda ctx, inputs, output: setattr(ctx, "r", inputs[1].shape[-1]),
)


# ---------------------------------------------------------------- BAT


def _slabs(t, r):
    """Copy-free layout: (out, in) -> (out/r, in, r); slab i stacks the rows of every W_ij."""
    return t.reshape(t.shape[0] // r, t.shape[1], r)


def _bat_transform_setup(ctx, inputs, output):
    weight, block = inputs
    ctx.save_for_backward(weight, block)


def _bat_transform_backward(ctx, grad):
    weight, block = ctx.saved_tensors
    grad_w = grad_b = None
    if _needs(ctx, 1):
        grad_b = ops.bat_block_grad(grad, weight, block.shape[1])
    if _needs(ctx, 0):
        grad_w = ops.bat_weight_grad(grad, block).to(weight.dtype)
    return grad_w, grad_b


torch.library.register_autograd(
    _LIB + "bat_transform", _bat_transform_backward, setup_context=_bat_transform_setup
)


def _bat_block_grad_setup(ctx, inputs, output):
    grad, weight, r = inputs
    ctx.r = r
    ctx.save_for_backward(grad, weight)


def _bat_block_grad_backward(ctx, up):
    # out_i = sum_j (W_ij + I)^T G_ij, so dG_ij = (W_ij + I) U_i and dW_ij = G_ij U_i^T.
    grad, weight = ctx.saved_tensors
    r = ctx.r
    d_grad = d_weight = None
    if _needs(ctx, 0):
        w = weight.to(grad.dtype)
        d_grad = (_slabs(w, r) @ up).reshape(grad.shape) + up.unsqueeze(2).expand(
            -1, -1, grad.shape[1] // r, -1
        ).reshape(grad.shape)
    if _needs(ctx, 1):
        d_weight = (_slabs(grad, r) @ up.transpose(1, 2)).reshape(grad.shape).to(weight.dtype)
    return d_grad, d_weight, None


torch.library.register_autograd(
    _LIB + "bat_block_grad", _bat_block_grad_backward, setup_context=_bat_block_grad_setup
)


def _bat_weight_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bat_weight_grad_backward(ctx, up):
    # out_ij = G_ij (I + B_i)^T, so dG_ij = U_ij (I + B_i) and dB_i = sum_j U_ij^T G_ij.
    grad, block = ctx.saved_tensors
    r = block.shape[1]
    d_grad = d_block = None
    if _needs(ctx, 0):
        eye = torch.eye(r, dtype=grad.dtype, device=grad.device)
        d_grad = (_slabs(up, r) @ (block.to(grad.dtype) + eye)).reshape(grad.shape)
    if _needs(ctx, 1):
        d_block = (_slabs(up, r).transpose(1, 2) @ _slabs(grad, r)).to(block.dtype)
    return d_grad, d_block


torch.library.register_autograd(
    _LIB + "bat_weight_grad", _bat_weight_grad_backward, setup_context=_bat_weight_grad_setup
)


def _bat_linear_setup(ctx, inputs, output):
    x, weight, bias, blocks = inputs
    # Only the inputs are kept: W' is recomputed in backward, so nothing weight-sized is saved
    # beyond the weight itself (SPEC section 3).
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.n_blocks = len(blocks)
    ctx.save_for_backward(x, weight, *blocks)


def _bat_linear_backward(ctx, grad):
    x, weight, *blocks = ctx.saved_tensors
    needs_x, needs_w, needs_bias = ctx.needs_input_grad[:3]
    needs_blocks = ctx.needs_input_grad[3]
    if isinstance(needs_blocks, bool):
        needs_blocks = [needs_blocks] * len(blocks)
    # Weights before each transform: W_0 = weight, W_{k+1} = T(W_k, B_k).
    chain = [weight]
    for b in blocks:
        chain.append(ops.bat_transform(chain[-1], b))
    g2 = grad.reshape(-1, grad.shape[-1])
    grad_x = grad_w = grad_bias = None
    if needs_x:
        grad_x = (g2 @ chain[-1]).reshape(x.shape)
    grad_blocks = [None] * len(blocks)
    if needs_w or any(needs_blocks):
        gw = g2.t() @ x.reshape(-1, x.shape[-1])  # dL/dW' of the last transform
        for k in range(len(blocks) - 1, -1, -1):
            if needs_blocks[k]:
                grad_blocks[k] = ops.bat_block_grad(gw, chain[k], blocks[k].shape[1])
            if k > 0 or needs_w:
                gw = ops.bat_weight_grad(gw, blocks[k])
        if needs_w:
            grad_w = gw.to(weight.dtype)
    if needs_bias:
        grad_bias = g2.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_bias, grad_blocks


torch.library.register_autograd(
    _LIB + "bat_linear", _bat_linear_backward, setup_context=_bat_linear_setup
)


def _bat_unmerge_setup(ctx, inputs, output):
    weight, block = inputs
    ctx.save_for_backward(block, output)


def _bat_unmerge_backward(ctx, up):
    # X = (W' - B_i) A_i^-1 with A_i = I + B_i: dW' = U A^-T, dB_i = -sum_j (X_ij + I)^T dW'_ij.
    block, x = ctx.saved_tensors
    r = block.shape[1]
    acc = torch.float64 if torch.float64 in (up.dtype, block.dtype) else torch.float32
    a = block.to(acc) + torch.eye(r, dtype=acc, device=block.device)
    z = torch.linalg.solve(a.transpose(1, 2), _slabs(up.to(acc), r), left=False).reshape(up.shape)
    grad_w = z.to(up.dtype) if _needs(ctx, 0) else None
    grad_b = None
    if _needs(ctx, 1):
        grad_b = (-ops.bat_block_grad(z, x.to(acc), r)).to(block.dtype)
    return grad_w, grad_b


torch.library.register_autograd(
    _LIB + "bat_unmerge", _bat_unmerge_backward, setup_context=_bat_unmerge_setup
)


# ---------------------------------------------------------------- standard / mini merge


def _miss_merge_setup(ctx, inputs, output):
    weight, block, alpha = inputs
    ctx.alpha, ctx.block_shape, ctx.block_dtype = alpha, block.shape, block.dtype


def _miss_merge_backward(ctx, up):
    # dW[o, k] = alpha * block[k % r, o % m]: the block's gradient sums U over both tilings.
    grad_b = None
    if _needs(ctx, 1):
        r, m = ctx.block_shape
        grad_b = ops.blocksum(ops.blocksum(up, r).t(), m) * ctx.alpha
        grad_b = grad_b.to(ctx.block_dtype)
    return (up if _needs(ctx, 0) else None), grad_b, None


torch.library.register_autograd(
    _LIB + "miss_merge", _miss_merge_backward, setup_context=_miss_merge_setup
)
