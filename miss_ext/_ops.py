"""Fake (meta) kernels and autograd formulas of the torch.ops.miss_ext operators.

Every backward is built from registered operators only (ours and aten's), so
torch.compile(fullgraph=True) traces forward and backward without a graph break.
Formulas: docs/MATH.md sections 1-4, 6 and 9.
"""

import torch

ops = torch.ops.miss_ext
_LIB = "miss_ext::"


def _needs(ctx, i):
    return ctx.needs_input_grad[i]


# ---------------------------------------------------------------- fake kernels
# The fakes apply the argument rules of csrc/ops_front.cpp with the same messages, so meta
# tensors, FakeTensor and torch.compile tracing reject exactly what the real kernels reject.

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Dtypes as the C++ checks print them (c10::ScalarType names), so both kernels' messages agree.
_CPP_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half",
                    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
                    torch.bool: "Bool"}


def _dt(dtype):
    return _CPP_DTYPE_NAMES.get(dtype, str(dtype))



def _check_float(op, name, t):
    torch._check(
        t.dtype in _FLOATS,
        lambda: f"miss_ext.{op}: argument '{name}' must be float32, float64, bfloat16 or float16 "
        f"(got {_dt(t.dtype)}); cast it with .float() or .to(dtype)",
    )


def _check_rank(op, name, r):
    torch._check(r > 0, lambda: f"miss_ext.{op}: argument '{name}' (the block size r) must be a positive integer (got {r})")


def _check_dim(op, name, t, dim, shape):
    torch._check(
        t.dim() == dim,
        lambda: f"miss_ext.{op}: argument '{name}' must be {dim}-D with shape {shape} (got {t.dim()}-D shape {list(t.shape)})",
    )


def _same_dtype(op, name_a, a, name_b, b):
    torch._check(
        a.dtype == b.dtype,
        lambda: f"miss_ext.{op}: arguments '{name_a}' ({_dt(a.dtype)}) and '{name_b}' ({_dt(b.dtype)}) must have "
        f"the same dtype; cast one with .to(dtype)",
    )


def _same_device(op, **tensors):
    (first_name, first), *rest = [(k, v) for k, v in tensors.items() if v is not None]
    for name, t in rest:
        torch._check(
            t.device == first.device,
            lambda: f"miss_ext.{op}: arguments '{first_name}' (on {first.device}) and '{name}' "
            f"(on {t.device}) must be on the same device; move one with .to(device)",
        )


def _check_features_last(op, name, t, what):
    torch._check(t.dim() >= 1, lambda: f"miss_ext.{op}: argument '{name}' must have at least 1 dimension ({what} last), got a scalar")


def _check_dropout(op, p, seed):
    torch._check(0.0 <= p <= 1.0, lambda: f"miss_ext.{op}: argument 'p' (the dropout probability) must be in [0, 1] (got {p:g})")
    torch._check(
        seed.device.type == "cpu" and seed.dtype == torch.int64 and seed.numel() == 1,
        lambda: f"miss_ext.{op}: argument 'seed' must be a CPU int64 tensor with one element (got {seed.type()} of shape {list(seed.shape)}); "
        "draw one with miss_ext.functional.dropout_seed()",
    )


_WIDER = {torch.bfloat16: (torch.float32, torch.float64), torch.float16: (torch.float32, torch.float64),
          torch.float32: (torch.float64,), torch.float64: ()}


def holds(narrow, wide):
    """Whether dtype ``wide`` holds every value of ``narrow`` (csrc/ops_front.cpp ``holds``)."""
    return wide == narrow or wide in _WIDER.get(narrow, ())


def _widened(op, from_name, from_dtype, dtype):
    if dtype is None:
        return from_dtype
    torch._check(
        holds(from_dtype, dtype),
        lambda: f"miss_ext.{op}: argument 'dtype' ({_dt(dtype)}) must be {from_name}'s dtype ({_dt(from_dtype)}) or a "
        f"wider float (float32 or float64) that holds it",
    )
    return dtype


def _narrowed(op, s, dtype):
    if dtype is None:
        return s.dtype
    torch._check(
        dtype in _FLOATS and holds(dtype, s.dtype),
        lambda: f"miss_ext.{op}: argument 'dtype' ({_dt(dtype)}) must be s's dtype ({_dt(s.dtype)}) or a narrower float "
        "that s's dtype holds (the tiled term is rounded once to it)",
    )
    return dtype


def _check_holds(op, x_name, x, block):
    torch._check(
        holds(x.dtype, block.dtype),
        lambda: f"miss_ext.{op}: argument 'block' ({_dt(block.dtype)}) must have {x_name}'s dtype ({_dt(x.dtype)}) or a "
        "wider float that holds it (a float32 block on a bfloat16 base is the mixed-precision layer); cast one of them",
    )


def _check_bias(op, bias, out_f):
    """The optional bias of a linear op (csrc/ops_front.cpp checked_bias)."""
    if bias is None:
        return
    _check_float(op, "bias", bias)
    torch._check(
        bias.dim() == 1 and bias.shape[0] == out_f,
        lambda: f"miss_ext.{op}: argument 'bias' must have shape (out_features,) = ({out_f},) (got {list(bias.shape)})",
    )


def _check_bat(op, weight_name, weight, block):
    """The BAT shape rules; returns r."""
    _check_float(op, weight_name, weight)
    _check_float(op, "block", block)
    _same_device(op, **{weight_name: weight, "block": block})
    _check_dim(op, weight_name, weight, 2, "(out_features, in_features)")
    _check_dim(op, "block", block, 3, "(out_features / r, r, r)")
    r = block.shape[1]
    _check_rank(op, "block.shape[1]", r)
    torch._check(block.shape[2] == r, lambda: f"miss_ext.{op}: argument 'block' must have shape (out_features / r, r, r) with square r x r blocks (got {list(block.shape)})")
    torch._check(
        weight.shape[0] % r == 0 and weight.shape[1] % r == 0,
        lambda: f"miss_ext.{op}: BAT needs in_features and out_features divisible by r so the weight splits "
        f"into r x r blocks (got {weight_name} shape {list(weight.shape)}, r = {r}); choose r dividing both",
    )
    torch._check(block.shape[0] == weight.shape[0] // r, lambda: f"miss_ext.{op}: argument 'block' must have out_features / r = {weight.shape[0] // r} blocks along dim 0 (got {block.shape[0]})")
    return r


def _blocksum_fake(op, x, r, dtype=None):
    _check_float(op, "x", x)
    out_dtype = _widened(op, "x", x.dtype, dtype)
    _check_features_last(op, "x", x, "features")
    _check_rank(op, "r", r)
    return x.new_empty((*x.shape[:-1], r), dtype=out_dtype)


def _tile_fake(op, s, features, dtype=None):
    _check_float(op, "s", s)
    out_dtype = _narrowed(op, s, dtype)
    _check_features_last(op, "s", s, "block")
    torch._check(s.shape[-1] > 0, lambda: f"miss_ext.{op}: argument 's' must have a non-empty last dimension (the block size r)")
    torch._check(features >= 0, lambda: f"miss_ext.{op}: argument 'features' must be >= 0 (got {features})")
    return s.new_empty((*s.shape[:-1], features), dtype=out_dtype)


@torch.library.register_fake(_LIB + "blocksum")
def _(x, r, dtype=None):
    return _blocksum_fake("blocksum", x, r, dtype)


@torch.library.register_fake(_LIB + "blocksum_dropout")
def _(x, r, p, seed, dtype=None):
    _check_float("blocksum_dropout", "x", x)
    _check_dropout("blocksum_dropout", p, seed)
    return _blocksum_fake("blocksum_dropout", x, r, dtype)


@torch.library.register_fake(_LIB + "tile")
def _(s, features, dtype=None):
    return _tile_fake("tile", s, features, dtype)


@torch.library.register_fake(_LIB + "tile_dropout")
def _(s, features, p, seed, dtype=None):
    _check_float("tile_dropout", "s", s)
    _check_dropout("tile_dropout", p, seed)
    return _tile_fake("tile_dropout", s, features, dtype)


@torch.library.register_fake(_LIB + "tile_add")
def _(base, s):
    op = "tile_add"
    _check_float(op, "base", base)
    _check_float(op, "s", s)
    _same_device(op, base=base, s=s)
    torch._check(
        holds(base.dtype, s.dtype),
        lambda: f"miss_ext.{op}: argument 's' ({_dt(s.dtype)}) must have base's dtype ({_dt(base.dtype)}) or a wider float "
        "that holds it (the sum is rounded once to base's dtype)",
    )
    torch._check(
        base.dim() >= 1 and base.dim() == s.dim() and base.shape[:-1] == s.shape[:-1],
        lambda: f"miss_ext.{op}: arguments 'base' {list(base.shape)} and 's' {list(s.shape)} must have the same leading dimensions (only the last may differ)",
    )
    _tile_fake(op, s, base.shape[-1])
    return base.new_empty(base.shape)


@torch.library.register_fake(_LIB + "bat_transform")
def _(weight, block, dtype=None):
    _check_bat("bat_transform", "weight", weight, block)
    torch._check(dtype is None or dtype in _FLOATS, lambda: f"miss_ext.bat_transform: argument 'dtype' must be float32, float64, bfloat16 or float16 (got {_dt(dtype)})")
    return weight.new_empty(weight.shape, dtype=dtype or block.dtype)


@torch.library.register_fake(_LIB + "bat_input_grad")
def _(grad, weight, blocks):
    op = "bat_input_grad"
    torch._check(len(blocks) > 0, lambda: f"miss_ext.{op}: argument 'blocks' must hold at least one (out_features / r, r, r) block")
    _check_float(op, "grad", grad)
    _check_float(op, "weight", weight)
    _check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    _same_device(op, grad=grad, weight=weight)
    torch._check(
        grad.dim() >= 1 and grad.shape[-1] == weight.shape[0],
        lambda: f"miss_ext.{op}: argument 'grad' must end in out_features = {weight.shape[0]} (got shape {list(grad.shape)})",
    )
    for b in blocks:
        _check_bat(op, "weight", weight, b)
        torch._check(holds(grad.dtype, b.dtype), lambda: f"miss_ext.{op}: every block (got {_dt(b.dtype)}) must have grad's dtype ({_dt(grad.dtype)}) or a wider float that holds it (mixed precision: W' is formed in the block's precision and rounded once to grad's dtype); cast grad or the blocks")
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


@torch.library.register_fake(_LIB + "bat_io_block_grad")
def _(grad, x, weight, r, dtype=None):
    op = "bat_io_block_grad"
    for name, t in (("grad", grad), ("x", x), ("weight", weight)):
        _check_float(op, name, t)
    _same_device(op, grad=grad, x=x, weight=weight)
    _same_dtype(op, "grad", grad, "x", x)
    _check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    _check_rank(op, "r", r)
    out_f, in_f = weight.shape
    torch._check(out_f % r == 0 and in_f % r == 0, lambda: f"miss_ext.{op}: BAT needs in_features and out_features divisible by r (got weight shape {list(weight.shape)}, r = {r})")
    torch._check(grad.dim() >= 1 and grad.shape[-1] == out_f, lambda: f"miss_ext.{op}: argument 'grad' must end in out_features = {out_f} (got shape {list(grad.shape)})")
    torch._check(
        x.dim() == grad.dim() and x.shape[-1] == in_f and x.shape[:-1] == grad.shape[:-1],
        lambda: f"miss_ext.{op}: argument 'x' must have grad's leading dimensions and end in in_features = {in_f} (got x {list(x.shape)}, grad {list(grad.shape)})",
    )
    acc = dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    torch._check(acc in (torch.float32, torch.float64) and holds(x.dtype, acc), lambda: f"miss_ext.{op}: argument 'dtype' (the accumulation dtype) must be float32 or float64 and hold x's dtype (got {_dt(acc)} for x of {_dt(x.dtype)})")
    return grad.new_empty((out_f // r, r, r), dtype=acc)


@torch.library.register_fake(_LIB + "bat_block_grad")
def _(grad, weight, r):
    op = "bat_block_grad"
    _check_float(op, "grad", grad)
    _check_float(op, "weight", weight)
    _same_device(op, grad=grad, weight=weight)
    _check_dim(op, "grad", grad, 2, "(out_features, in_features)")
    _check_rank(op, "r", r)
    torch._check(grad.shape == weight.shape, lambda: f"miss_ext.{op}: arguments 'grad' {list(grad.shape)} and 'weight' {list(weight.shape)} must have the same shape")
    torch._check(grad.shape[0] % r == 0 and grad.shape[1] % r == 0, lambda: f"miss_ext.{op}: BAT needs in_features and out_features divisible by r (got shape {list(grad.shape)}, r = {r})")
    return grad.new_empty((grad.shape[0] // r, r, r))


@torch.library.register_fake(_LIB + "bat_weight_grad")
def _(grad, block):
    _check_bat("bat_weight_grad", "grad", grad, block)
    return grad.new_empty(grad.shape)


@torch.library.register_fake(_LIB + "bat_linear")
def _(x, weight, bias, blocks):
    op = "bat_linear"
    torch._check(len(blocks) > 0, lambda: f"miss_ext.{op}: argument 'blocks' must hold at least one (out_features / r, r, r) block")
    _check_float(op, "x", x)
    _check_float(op, "weight", weight)
    _check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    _same_device(op, x=x, weight=weight, bias=bias)
    torch._check(
        x.dim() >= 1 and x.shape[-1] == weight.shape[1],
        lambda: f"miss_ext.{op}: argument 'x' must end in in_features = {weight.shape[1]} (got shape {list(x.shape)})",
    )
    for b in blocks:
        _check_bat(op, "weight", weight, b)
        torch._check(
            holds(x.dtype, b.dtype),
            lambda: f"miss_ext.{op}: every block (got {_dt(b.dtype)}) must have x's dtype ({_dt(x.dtype)}) or a wider float that "
            "holds it (mixed precision: W' is formed in the block's precision and rounded once to x's dtype); cast x or the blocks",
        )
    _check_bias(op, bias, weight.shape[0])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(_LIB + "bat_unmerge")
def _(weight, block):
    _check_bat("bat_unmerge", "weight", weight, block)
    return weight.new_empty(weight.shape)


@torch.library.register_fake(_LIB + "miss_linear")
def _(x, weight, bias, block, p, seed):
    op = "miss_linear"
    for name, t in (("x", x), ("weight", weight), ("block", block)):
        _check_float(op, name, t)
    _check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    _check_dim(op, "block", block, 2, "(r, out_features) or, for mini, (r, mini_r)")
    torch._check(0.0 <= p <= 1.0, lambda: f"miss_ext.{op}: argument 'p' (the dropout probability) must be in [0, 1] (got {p:g})")
    _same_device(op, x=x, weight=weight, block=block, bias=bias)
    _same_dtype(op, "x", x, "weight", weight)
    _check_holds(op, "x", x, block)
    out_f, in_f = weight.shape
    r, m = block.shape
    torch._check(x.dim() >= 1 and x.shape[-1] == in_f, lambda: f"miss_ext.{op}: argument 'x' must end in in_features = {in_f} (got shape {list(x.shape)})")
    _check_rank(op, "block.shape[0]", r)
    torch._check(m > 0 and out_f % m == 0, lambda: f"miss_ext.{op}: out_features ({out_f}) must be divisible by block.shape[1] ({m}; out_features for standard MiSS, mini_r for mini)")
    if p > 0:
        torch._check(seed is not None, lambda: f"miss_ext.{op}: argument 'seed' is required when p > 0")
        _check_dropout(op, p, seed)
    _check_bias(op, bias, out_f)
    return x.new_empty((*x.shape[:-1], out_f)), x.new_empty((*x.shape[:-1], r), dtype=block.dtype)


def _check_product(op, a_name, a, s, block):
    for name, t in ((a_name, a), ("s", s), ("block", block)):
        _check_float(op, name, t)
    _same_device(op, **{a_name: a, "s": s, "block": block})
    _same_dtype(op, "s", s, "block", block)
    _check_holds(op, a_name, a, block)
    _check_dim(op, "block", block, 2, "(r, out_features)")
    torch._check(
        a.dim() >= 1 and a.dim() == s.dim() and a.shape[:-1] == s.shape[:-1],
        lambda: f"miss_ext.{op}: arguments '{a_name}' {list(a.shape)} and 's' {list(s.shape)} must have the same leading dimensions",
    )
    torch._check(
        s.shape[-1] == block.shape[0] and a.shape[-1] == block.shape[1],
        lambda: f"miss_ext.{op}: argument 'block' must have shape (s.shape[-1], {a_name}.shape[-1]) = ({s.shape[-1]}, {a.shape[-1]}) (got {list(block.shape)})",
    )


@torch.library.register_fake(_LIB + "miss_add_product")
def _(base, s, block):
    _check_product("miss_add_product", "base", base, s, block)
    return base.new_empty(base.shape)


@torch.library.register_fake(_LIB + "miss_block_grads")
def _(grad, s, block):
    _check_product("miss_block_grads", "grad", grad, s, block)
    return block.new_empty(block.shape), s.new_empty(s.shape)


@torch.library.register_fake(_LIB + "miss_merge")
def _(weight, block, alpha):
    op = "miss_merge"
    _check_float(op, "weight", weight)
    _check_float(op, "block", block)
    _same_device(op, weight=weight, block=block)
    _check_dim(op, "weight", weight, 2, "(out_features, in_features)")
    _check_dim(op, "block", block, 2, "(r, out_features) or, for mini, (r, mini_r)")
    _check_rank(op, "block.shape[0]", block.shape[0])
    m = block.shape[1]
    torch._check(
        m > 0 and weight.shape[0] % m == 0,
        lambda: f"miss_ext.{op}: out_features ({weight.shape[0]}) must be divisible by block.shape[1] ({m}; out_features for standard MiSS, mini_r for mini)",
    )
    return weight.new_empty(weight.shape)


@torch.library.register_fake(_LIB + "miss_gathered_product")
def _(base, s, blocks, index):
    op = "miss_gathered_product"
    _check_float(op, "base", base)
    _check_float(op, "s", s)
    torch._check(len(blocks) > 0, lambda: f"miss_ext.{op}: argument 'blocks' must hold at least one (r, out_features) or (r, mini_r) block")
    _same_device(op, base=base, s=s)
    torch._check(
        base.dim() >= 1 and base.dim() == s.dim() and base.shape[:-1] == s.shape[:-1],
        lambda: f"miss_ext.{op}: arguments 'base' {list(base.shape)} and 's' {list(s.shape)} must have the same "
        "leading dimensions (one block-sum row per output row)",
    )
    r, out_f = s.shape[-1], base.shape[-1]
    _check_rank(op, "s.shape[-1]", r)
    for k, b in enumerate(blocks):
        _check_float(op, "blocks[k]", b)
        _same_device(op, base=base, **{"blocks[k]": b})
        _same_dtype(op, "s", s, "blocks[k]", b)
        _check_dim(op, "blocks[k]", b, 2, "(r, out_features) or, for mini, (r, mini_r)")
        torch._check(b.shape[0] == r, lambda: f"miss_ext.{op}: blocks[{k}] has {b.shape[0]} rows but s has r = {r} columns; blocks of one call share r (call once per r)")
        torch._check(
            b.shape[1] > 0 and out_f % b.shape[1] == 0,
            lambda: f"miss_ext.{op}: out_features ({out_f}) must be divisible by blocks[{k}].shape[1] ({b.shape[1]}; out_features for standard MiSS, mini_r for mini)",
        )
    _check_holds(op, "base", base, blocks[0])
    torch._check(index.dtype == torch.int64, lambda: f"miss_ext.{op}: argument 'index' must be an int64 tensor (got {_dt(index.dtype)}); build it with torch.tensor(..., dtype=torch.int64)")
    _same_device(op, base=base, index=index)
    torch._check(
        index.shape == base.shape[:-1],
        lambda: f"miss_ext.{op}: argument 'index' must have base's leading shape {tuple(base.shape[:-1])} (one adapter per output row), got {list(index.shape)}",
    )
    return base.new_empty(base.shape)


# ---------------------------------------------------------------- block sum family


def _blocksum_setup(ctx, inputs, output):
    ctx.features, ctx.x_dtype = inputs[0].shape[-1], inputs[0].dtype


def _blocksum_backward(ctx, grad):
    # The tiled gradient is rounded to x's dtype, as a cast of x to the wider dtype would do.
    return ops.tile(grad, ctx.features, ctx.x_dtype), None, None


torch.library.register_autograd(_LIB + "blocksum", _blocksum_backward, setup_context=_blocksum_setup)


def _blocksum_dropout_setup(ctx, inputs, output):
    x, _, p, seed = inputs[:4]
    ctx.features, ctx.p, ctx.x_dtype = x.shape[-1], p, x.dtype
    ctx.save_for_backward(seed)


def _blocksum_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return ops.tile_dropout(grad, ctx.features, ctx.p, seed, ctx.x_dtype), None, None, None, None


torch.library.register_autograd(
    _LIB + "blocksum_dropout", _blocksum_dropout_backward, setup_context=_blocksum_dropout_setup
)


def _tile_setup(ctx, inputs, output):
    ctx.r, ctx.s_dtype = inputs[0].shape[-1], inputs[0].dtype


def _tile_backward(ctx, grad):
    # tile cuts its repeats to `features` columns; zero-padded blocksum is exactly its adjoint.
    return ops.blocksum(grad, ctx.r, ctx.s_dtype), None, None


torch.library.register_autograd(_LIB + "tile", _tile_backward, setup_context=_tile_setup)


def _tile_dropout_setup(ctx, inputs, output):
    s, _, p, seed = inputs[:4]
    ctx.r, ctx.p, ctx.s_dtype = s.shape[-1], p, s.dtype
    ctx.save_for_backward(seed)


def _tile_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return ops.blocksum_dropout(grad, ctx.r, ctx.p, seed, ctx.s_dtype), None, None, None, None


torch.library.register_autograd(
    _LIB + "tile_dropout", _tile_dropout_backward, setup_context=_tile_dropout_setup
)


def _tile_add_setup(ctx, inputs, output):
    ctx.r, ctx.s_dtype = inputs[1].shape[-1], inputs[1].dtype


def _tile_add_backward(ctx, grad):
    grad_s = ops.blocksum(grad, ctx.r, ctx.s_dtype) if _needs(ctx, 1) else None
    return grad, grad_s


torch.library.register_autograd(_LIB + "tile_add", _tile_add_backward, setup_context=_tile_add_setup)


# ---------------------------------------------------------------- BAT


def _slabs(t, r):
    """Copy-free layout: (out, in) -> (out/r, in, r); slab i stacks the rows of every W_ij."""
    return t.reshape(t.shape[0] // r, t.shape[1], r)


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
    if _needs(ctx, 1):
        grad_b = ops.bat_block_grad(g, weight.to(acc), block.shape[1])
    if _needs(ctx, 0):
        grad_w = ops.bat_weight_grad(g, block).to(weight.dtype)
    return grad_w, grad_b, None


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


def _bat_io_block_grad_setup(ctx, inputs, output):
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
    if _needs(ctx, 0) or _needs(ctx, 1):
        m = ops.bat_transform(w, up) - w
        if _needs(ctx, 0):
            d_grad = (x2 @ m.t()).reshape(grad.shape).to(grad.dtype)
        if _needs(ctx, 1):
            d_x = (g2 @ m).reshape(x.shape).to(x.dtype)
    if _needs(ctx, 2):
        gw = g2.t() @ x2
        d_weight = (ops.bat_weight_grad(gw, up) - gw).to(weight.dtype)
    return d_grad, d_x, d_weight, None, None


torch.library.register_autograd(
    _LIB + "bat_io_block_grad", _bat_io_block_grad_backward, setup_context=_bat_io_block_grad_setup
)


def _bat_input_grad_setup(ctx, inputs, output):
    grad, weight, blocks = inputs
    ctx.save_for_backward(grad, weight, *blocks)


def _bat_input_grad_backward(ctx, up):
    # out = G W': dG = U W'^T (bat_linear of U), and dL/dW' = G^T U as in bat_linear's backward.
    grad, weight, *blocks = ctx.saved_tensors
    needs_g, needs_w = ctx.needs_input_grad[:2]
    needs_blocks = _needs_list(ctx.needs_input_grad[2], len(blocks))
    u2 = up.reshape(-1, up.shape[-1])
    g2 = grad.reshape(-1, grad.shape[-1])
    d_grad = d_w = None
    d_blocks = [None] * len(blocks)
    if needs_g:
        d_grad = ops.bat_linear(u2, weight, None, list(blocks)).reshape(grad.shape)
    if needs_w or any(needs_blocks):
        d_w, d_blocks = _bat_param_grads(g2, u2, weight, blocks, needs_w, needs_blocks)
    return d_grad, d_w, d_blocks


torch.library.register_autograd(
    _LIB + "bat_input_grad", _bat_input_grad_backward, setup_context=_bat_input_grad_setup
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
    # beyond the weight itself (docs/MATH.md section 3).
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, weight, *blocks)


def _acc_dtype(x, blocks):
    """The precision of BAT's block gradients: float64 when x or a block is, else float32."""
    return torch.float64 if torch.float64 in (x.dtype, *(b.dtype for b in blocks)) else torch.float32


def _bat_param_grads(g2, x2, weight, blocks, needs_w, needs_blocks):
    """(dL/dweight, [dL/dB...]) of ``g2 W'`` or ``x2 W'^T`` given ``Gw = g2^T x2`` = dL/dW' of the
    last transform, in the blocks' precision."""
    acc = _acc_dtype(x2, blocks)
    grad_w = None
    grad_blocks = [None] * len(blocks)
    if len(blocks) == 1 and not needs_w:
        # One adapter (the usual case): dL/dB from the two factors in fp32, Gw never formed.
        if needs_blocks[0]:
            grad_blocks[0] = ops.bat_io_block_grad(g2, x2, weight, blocks[0].shape[1], acc).to(blocks[0].dtype)
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


def _needs_list(flag, n):
    return [flag] * n if isinstance(flag, bool) else list(flag)


def _bat_linear_backward(ctx, grad):
    x, weight, *blocks = ctx.saved_tensors
    needs_x, needs_w, needs_bias = ctx.needs_input_grad[:3]
    needs_blocks = _needs_list(ctx.needs_input_grad[3], len(blocks))
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = grad_w = grad_bias = None
    grad_blocks = [None] * len(blocks)
    if needs_x:
        # W' recomputed as in forward (the last transform rounds to x's dtype).
        grad_x = ops.bat_input_grad(g2, weight, list(blocks)).reshape(x.shape)
    if needs_w or any(needs_blocks):
        grad_w, grad_blocks = _bat_param_grads(g2, x2, weight, blocks, needs_w, needs_blocks)
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


# ---------------------------------------------------------------- fused standard / mini linear


def _miss_linear_setup(ctx, inputs, output):
    x, weight, bias, block, p, seed = inputs
    ctx.p, ctx.in_features = p, x.shape[-1]
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # S (N x r) replaces x for the block gradient; x itself is kept only when the base weight
    # trains (its gradient needs x, exactly as a trainable nn.Linear keeps it).
    keep_x = x if ctx.needs_input_grad[1] else None
    ctx.save_for_backward(output[1], weight, block, seed, keep_x)


def _miss_linear_backward(ctx, grad_y, grad_s):
    s, weight, block, seed, x = ctx.saved_tensors
    r, m = block.shape
    out_f = weight.shape[0]
    g2 = grad_y.reshape(-1, out_f)
    s2 = s.reshape(-1, r)
    mixed = block.dtype != weight.dtype  # a float32 block on a half-type base (x has weight's dtype)
    need_x, need_block = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x = grad_w = grad_bias = grad_block = d_s = None
    if need_x or need_block:
        if mixed and m == out_f:
            # One pass over G gives both products in the block's precision.
            grad_block, d_s = ops.miss_block_grads(g2, s2, block)
        else:
            # mini: the output tiles share Dm, so their gradients sum first (the same block-sum
            # kernel, into the block's precision).
            gs = g2 if m == out_f else ops.blocksum(g2, m, block.dtype)
            if need_block:
                grad_block = s2.t() @ gs
            if need_x:
                d_s = gs @ block.t()
    if need_x:
        if grad_s is not None:
            d_s = d_s + grad_s.reshape(-1, r)
        half = g2.dtype in (torch.bfloat16, torch.float16)
        if ctx.p == 0 and (mixed or half):
            # Mixed: PEFT's rounding, the block-precision term rounded to x's dtype, then added to
            # the frozen GEMM's gradient. Equal half types: measured on CPU (oneDNN), a half-type
            # GEMM with beta = 1 costs more than a plain GEMM plus one fused pass.
            grad_x = ops.tile_add(g2 @ weight, d_s.to(g2.dtype))
        elif mixed:
            grad_x = g2 @ weight + ops.tile_dropout(d_s, ctx.in_features, ctx.p, seed, g2.dtype)
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
    return grad_x, grad_w, grad_bias, grad_block, None, None


torch.library.register_autograd(
    _LIB + "miss_linear", _miss_linear_backward, setup_context=_miss_linear_setup
)


def _miss_add_product_setup(ctx, inputs, output):
    base, s, block = inputs
    ctx.save_for_backward(s, block)


def _miss_add_product_backward(ctx, up):
    s, block = ctx.saved_tensors
    grad_block = grad_s = None
    if _needs(ctx, 1) or _needs(ctx, 2):
        grad_block, grad_s = ops.miss_block_grads(up, s, block)
    return (up if _needs(ctx, 0) else None), grad_s, grad_block


torch.library.register_autograd(
    _LIB + "miss_add_product", _miss_add_product_backward, setup_context=_miss_add_product_setup
)


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
    if _needs(ctx, 0):
        d = torch.zeros_like(g2)
        if up_block is not None:
            d = d + s2 @ up_block
        if us is not None:
            d = d + us @ block
        d_grad = d.reshape(grad.shape).to(grad.dtype)
    if _needs(ctx, 1):
        d_s = (g2 @ up_block.t()).reshape(s.shape) if up_block is not None else torch.zeros_like(s)
    if _needs(ctx, 2):
        d_block = us.t() @ g2 if us is not None else torch.zeros_like(block)
    return d_grad, d_s, d_block


torch.library.register_autograd(
    _LIB + "miss_block_grads", _miss_block_grads_backward, setup_context=_miss_block_grads_setup
)


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


torch.library.register_autograd(
    _LIB + "miss_gathered_product", _miss_gathered_product_backward, setup_context=_miss_gathered_product_setup
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
