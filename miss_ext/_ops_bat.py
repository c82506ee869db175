"""BAT (block affine transform) operators: the weight transform, the fused layer ``bat_linear``, its
gradient pieces and the inverse ``bat_unmerge``; each op's fake kernel next to its autograd formula.
docs/MATH.md section 3 (and 11.2 for mixed precision).
"""

import torch

from ._ops_common import (
    FLOATS,
    LIB,
    check_bias,
    check_dim,
    check_float,
    check_rank,
    cpp_dtype,
    holds,
    needs,
    ops,
    register_autograd,
    same_device,
    same_dtype,
)


def _check_bat(op, weight_name, weight, block):
    """The BAT shape rules; returns r."""
    check_float(op, weight_name, weight)
    check_float(op, "block", block)
    same_device(op, **{weight_name: weight, "block": block})
    check_dim(op, weight_name, weight, 2, "(out_features, in_features)")
    check_dim(op, "block", block, 3, "(out_features / r, r, r)")
    r = block.shape[1]
    check_rank(op, "block.shape[1]", r)
    torch._check(block.shape[2] == r, lambda: f"miss_ext.{op}: argument 'block' must have shape (out_features / r, r, r) with square r x r blocks (got {list(block.shape)})")
    torch._check(
        weight.shape[0] % r == 0 and weight.shape[1] % r == 0,
        lambda: f"miss_ext.{op}: BAT needs in_features and out_features divisible by r so the weight splits "
        f"into r x r blocks (got {weight_name} shape {list(weight.shape)}, r = {r}); choose r dividing both",
    )
    torch._check(block.shape[0] == weight.shape[0] // r, lambda: f"miss_ext.{op}: argument 'block' must have out_features / r = {weight.shape[0] // r} blocks along dim 0 (got {block.shape[0]})")
    return r


def _slabs(t, r):
    """Copy-free layout: (out, in) -> (out/r, in, r); slab i stacks the rows of every W_ij."""
    return t.reshape(t.shape[0] // r, t.shape[1], r)


# ---------------------------------------------------------------- bat_transform


@torch.library.register_fake(LIB + "bat_transform")
def _(weight, block, dtype=None):
    _check_bat("bat_transform", "weight", weight, block)
    torch._check(dtype is None or dtype in FLOATS, lambda: f"miss_ext.bat_transform: argument 'dtype' must be float32, float64, bfloat16 or float16 (got {cpp_dtype(dtype)})")
    return weight.new_empty(weight.shape, dtype=dtype or block.dtype)


def _bat_transform_setup(ctx, inputs, output):
    weight, block = inputs[:2]
    ctx.save_for_backward(weight, block)


def _bat_transform_backward(ctx, grad):
    # The transform runs in the block's dtype (the weight read as stored, or cast to a half-type
    # block), so its gradients do too; the rounding to the output dtype passes gradients as is.
    weight, block = ctx.saved_tensors
    acc = block.dtype
    g = grad.to(acc)
    grad_w = grad_b = None
    if needs(ctx, 1):
        grad_b = ops.bat_block_grad(g, weight.to(acc), block.shape[1])
    if needs(ctx, 0):
        grad_w = ops.bat_weight_grad(g, block).to(weight.dtype)
    return grad_w, grad_b, None


register_autograd("bat_transform", _bat_transform_backward, _bat_transform_setup)


# ---------------------------------------------------------------- bat_block_grad


@torch.library.register_fake(LIB + "bat_block_grad")
def _(grad, weight, r):
    op = "bat_block_grad"
    check_float(op, "grad", grad)
    check_float(op, "weight", weight)
    same_device(op, grad=grad, weight=weight)
    check_dim(op, "grad", grad, 2, "(out_features, in_features)")
    check_rank(op, "r", r)
    torch._check(grad.shape == weight.shape, lambda: f"miss_ext.{op}: arguments 'grad' {list(grad.shape)} and 'weight' {list(weight.shape)} must have the same shape")
    torch._check(grad.shape[0] % r == 0 and grad.shape[1] % r == 0, lambda: f"miss_ext.{op}: BAT needs in_features and out_features divisible by r (got shape {list(grad.shape)}, r = {r})")
    return grad.new_empty((grad.shape[0] // r, r, r))


def _bat_block_grad_setup(ctx, inputs, output):
    grad, weight, r = inputs
    ctx.r = r
    ctx.save_for_backward(grad, weight)


def _bat_block_grad_backward(ctx, up):
    # out_i = sum_j (W_ij + I)^T G_ij, so dG_ij = (W_ij + I) U_i and dW_ij = G_ij U_i^T.
    grad, weight = ctx.saved_tensors
    r = ctx.r
    d_grad = d_weight = None
    if needs(ctx, 0):
        w = weight.to(grad.dtype)
        d_grad = (_slabs(w, r) @ up).reshape(grad.shape) + up.unsqueeze(2).expand(
            -1, -1, grad.shape[1] // r, -1
        ).reshape(grad.shape)
    if needs(ctx, 1):
        d_weight = (_slabs(grad, r) @ up.transpose(1, 2)).reshape(grad.shape).to(weight.dtype)
    return d_grad, d_weight, None


register_autograd("bat_block_grad", _bat_block_grad_backward, _bat_block_grad_setup)


# ---------------------------------------------------------------- bat_io_block_grad


@torch.library.register_fake(LIB + "bat_io_block_grad")
def _(grad, x, weight, r, dtype=None, half_products=False):
    op = "bat_io_block_grad"
    for name, t in (("grad", grad), ("x", x), ("weight", weight)):
        check_float(op, name, t)
    same_device(op, grad=grad, x=x, weight=weight)
    same_dtype(op, "grad", grad, "x", x)
    check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    check_rank(op, "r", r)
    out_f, in_f = weight.shape
    torch._check(out_f % r == 0 and in_f % r == 0, lambda: f"miss_ext.{op}: BAT needs in_features and out_features divisible by r (got weight shape {list(weight.shape)}, r = {r})")
    torch._check(grad.dim() >= 1 and grad.shape[-1] == out_f, lambda: f"miss_ext.{op}: argument 'grad' must end in out_features = {out_f} (got shape {list(grad.shape)})")
    torch._check(
        x.dim() == grad.dim() and x.shape[-1] == in_f and x.shape[:-1] == grad.shape[:-1],
        lambda: f"miss_ext.{op}: argument 'x' must have grad's leading dimensions and end in in_features = {in_f} (got x {list(x.shape)}, grad {list(grad.shape)})",
    )
    acc = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    torch._check(acc in (torch.float32, torch.float64) and holds(x.dtype, acc), lambda: f"miss_ext.{op}: argument 'dtype' (the accumulation dtype) must be float32 or float64 and hold x's dtype (got {cpp_dtype(acc)} for x of {cpp_dtype(x.dtype)})")
    return grad.new_empty((out_f // r, r, r), dtype=acc)


def _bat_io_block_grad_setup(ctx, inputs, output):
    # half_products only permits a rounding of the forward; the gradient is the exact one's.
    grad, x, weight, r = inputs[:4]
    ctx.r = r
    ctx.save_for_backward(grad, x, weight)


def _bat_io_block_grad_backward(ctx, up):
    # out_i = sum_j (W_ij + I)^T G_i^T x_j. With M_ij = (W_ij + I) U_i, i.e. M = T(W, U) - W:
    # dG = x M^T, dx = G M, dW_ij = Gw_ij U_i^T = bat_weight_grad(Gw, U) - Gw, Gw = G^T x.
    grad, x, weight = ctx.saved_tensors
    acc = up.dtype
    g2 = grad.reshape(-1, grad.shape[-1]).to(acc)
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    w = weight.to(acc)
    d_grad = d_x = d_weight = None
    if needs(ctx, 0) or needs(ctx, 1):
        m = ops.bat_transform(w, up) - w
        if needs(ctx, 0):
            d_grad = (x2 @ m.t()).reshape(grad.shape).to(grad.dtype)
        if needs(ctx, 1):
            d_x = (g2 @ m).reshape(x.shape).to(x.dtype)
    if needs(ctx, 2):
        gw = g2.t() @ x2
        d_weight = (ops.bat_weight_grad(gw, up) - gw).to(weight.dtype)
    return d_grad, d_x, d_weight, None, None, None


register_autograd("bat_io_block_grad", _bat_io_block_grad_backward, _bat_io_block_grad_setup)


# ---------------------------------------------------------------- bat_weight_grad


@torch.library.register_fake(LIB + "bat_weight_grad")
def _(grad, block):
    _check_bat("bat_weight_grad", "grad", grad, block)
    return grad.new_empty(grad.shape)


def _bat_weight_grad_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bat_weight_grad_backward(ctx, up):
    # out_ij = G_ij (I + B_i)^T, so dG_ij = U_ij (I + B_i) and dB_i = sum_j U_ij^T G_ij.
    grad, block = ctx.saved_tensors
    r = block.shape[1]
    d_grad = d_block = None
    if needs(ctx, 0):
        eye = torch.eye(r, dtype=grad.dtype, device=grad.device)
        d_grad = (_slabs(up, r) @ (block.to(grad.dtype) + eye)).reshape(grad.shape)
    if needs(ctx, 1):
        d_block = (_slabs(up, r).transpose(1, 2) @ _slabs(grad, r)).to(block.dtype)
    return d_grad, d_block


register_autograd("bat_weight_grad", _bat_weight_grad_backward, _bat_weight_grad_setup)


# ---------------------------------------------------------------- bat_linear


@torch.library.register_fake(LIB + "bat_linear")
def _(x, weight, bias, blocks, half_products=False):
    op = "bat_linear"
    torch._check(len(blocks) > 0, lambda: f"miss_ext.{op}: argument 'blocks' must hold at least one (out_features / r, r, r) block")
    check_float(op, "x", x)
    check_float(op, "weight", weight)
    check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    same_device(op, x=x, weight=weight, bias=bias)
    torch._check(
        x.dim() >= 1 and x.shape[-1] == weight.shape[1],
        lambda: f"miss_ext.{op}: argument 'x' must end in in_features = {weight.shape[1]} (got shape {list(x.shape)})",
    )
    for b in blocks:
        _check_bat(op, "weight", weight, b)
        torch._check(
            holds(x.dtype, b.dtype),
            lambda: f"miss_ext.{op}: every block (got {cpp_dtype(b.dtype)}) must have x's dtype ({cpp_dtype(x.dtype)}) or a wider float that "
            "holds it (mixed precision: W' is formed in the block's precision and rounded once to x's dtype); cast x or the blocks",
        )
    check_bias(op, bias, weight.shape[0])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _bat_linear_setup(ctx, inputs, output):
    x, weight, bias, blocks, half_products = inputs
    ctx.half_products = half_products
    # Only the inputs are kept: W' is recomputed in backward, so nothing weight-sized is saved
    # beyond the weight itself (docs/MATH.md section 3).
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, *blocks)


def _acc_dtype(x, blocks):
    """The precision of BAT's block gradients: float64 when x or a block is, else float32."""
    return torch.float64 if torch.float64 in (x.dtype, *(b.dtype for b in blocks)) else torch.float32


def _bat_param_grads(g2, x2, weight, blocks, needs_w, needs_blocks, half_products=False):
    """(dL/dweight, [dL/dB...]) of ``g2 W'`` or ``x2 W'^T`` given ``Gw = g2^T x2`` = dL/dW' of the
    last transform, in the blocks' precision (``half_products``: see bat_linear)."""
    acc = _acc_dtype(x2, blocks)
    grad_w = None
    grad_blocks = [None] * len(blocks)
    if len(blocks) == 1 and not needs_w:
        # One adapter (the usual case): dL/dB from the two factors in fp32, Gw never formed.
        if needs_blocks[0]:
            grad_blocks[0] = ops.bat_io_block_grad(
                g2, x2, weight, blocks[0].shape[1], acc, half_products
            ).to(blocks[0].dtype)
        return grad_w, grad_blocks
    # Chains and a trainable base: Gw taken back through each transform. Weights before each
    # transform: W_0 = weight, W_{k+1} = T(W_k, B_k).
    chain = [weight]
    for b in blocks[:-1]:
        chain.append(ops.bat_transform(chain[-1], b))
    gw = g2.to(acc).t() @ x2.to(acc)
    for k in range(len(blocks) - 1, -1, -1):
        if needs_blocks[k]:
            grad_blocks[k] = ops.bat_block_grad(gw, chain[k].to(acc), blocks[k].shape[1]).to(blocks[k].dtype)
        if k > 0 or needs_w:
            gw = ops.bat_weight_grad(gw, blocks[k].to(acc))
    if needs_w:
        grad_w = gw.to(weight.dtype)
    return grad_w, grad_blocks


def needs_list(flag, n):
    return [flag] * n if isinstance(flag, bool) else list(flag)


def _bat_linear_backward(ctx, grad):
    x, weight, *blocks = ctx.saved_tensors
    needs_x, needs_w, needs_bias = ctx.needs_input_grad[:3]
    needs_blocks = needs_list(ctx.needs_input_grad[3], len(blocks))
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = grad_w = grad_bias = None
    grad_blocks = [None] * len(blocks)
    if needs_x:
        # W' recomputed as in forward (the last transform rounds to x's dtype).
        grad_x = ops.bat_input_grad(g2, weight, list(blocks), ctx.half_products).reshape(x.shape)
    if needs_w or any(needs_blocks):
        grad_w, grad_blocks = _bat_param_grads(g2, x2, weight, blocks, needs_w, needs_blocks, ctx.half_products)
    if needs_bias:
        grad_bias = g2.sum(0).to(ctx.bias_dtype)
    # A trailing argument left at its default (half_products) is not an input to the graph.
    return (grad_x, grad_w, grad_bias, grad_blocks, None)[: len(ctx.needs_input_grad)]


register_autograd("bat_linear", _bat_linear_backward, _bat_linear_setup)


# ---------------------------------------------------------------- bat_input_grad


@torch.library.register_fake(LIB + "bat_input_grad")
def _(grad, weight, blocks, half_products=False):
    op = "bat_input_grad"
    torch._check(len(blocks) > 0, lambda: f"miss_ext.{op}: argument 'blocks' must hold at least one (out_features / r, r, r) block")
    check_float(op, "grad", grad)
    check_float(op, "weight", weight)
    check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    same_device(op, grad=grad, weight=weight)
    torch._check(
        grad.dim() >= 1 and grad.shape[-1] == weight.shape[0],
        lambda: f"miss_ext.{op}: argument 'grad' must end in out_features = {weight.shape[0]} (got shape {list(grad.shape)})",
    )
    for b in blocks:
        _check_bat(op, "weight", weight, b)
        torch._check(holds(grad.dtype, b.dtype), lambda: f"miss_ext.{op}: every block (got {cpp_dtype(b.dtype)}) must have grad's dtype ({cpp_dtype(grad.dtype)}) or a wider float that holds it (mixed precision: W' is formed in the block's precision and rounded once to grad's dtype); cast grad or the blocks")
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _bat_input_grad_setup(ctx, inputs, output):
    grad, weight, blocks, half_products = inputs
    ctx.half_products = half_products
    ctx.save_for_backward(grad, weight, *blocks)


def _bat_input_grad_backward(ctx, up):
    # out = G W': dG = U W'^T (bat_linear of U), and dL/dW' = G^T U as in bat_linear's backward.
    grad, weight, *blocks = ctx.saved_tensors
    needs_g, needs_w = ctx.needs_input_grad[:2]
    needs_blocks = needs_list(ctx.needs_input_grad[2], len(blocks))
    u2 = up.reshape(-1, up.shape[-1])
    g2 = grad.reshape(-1, grad.shape[-1])
    d_grad = d_w = None
    d_blocks = [None] * len(blocks)
    if needs_g:
        d_grad = ops.bat_linear(u2, weight, None, list(blocks), ctx.half_products).reshape(grad.shape)
    if needs_w or any(needs_blocks):
        d_w, d_blocks = _bat_param_grads(g2, u2, weight, blocks, needs_w, needs_blocks, ctx.half_products)
    return (d_grad, d_w, d_blocks, None)[: len(ctx.needs_input_grad)]


register_autograd("bat_input_grad", _bat_input_grad_backward, _bat_input_grad_setup)


# ---------------------------------------------------------------- bat_unmerge


@torch.library.register_fake(LIB + "bat_unmerge")
def _(weight, block):
    _check_bat("bat_unmerge", "weight", weight, block)
    return weight.new_empty(weight.shape)


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
    grad_w = z.to(up.dtype) if needs(ctx, 0) else None
    grad_b = None
    if needs(ctx, 1):
        grad_b = (-ops.bat_block_grad(z, x.to(acc), r)).to(block.dtype)
    return grad_w, grad_b


register_autograd("bat_unmerge", _bat_unmerge_backward, _bat_unmerge_setup)
