"""float64 formulas with the signatures of the ``torch.ops.miss_ext`` operators, built from
miss_ext.reference: the reference side of the per-op case table (tests/_op_cases.py).

Each takes the operator's own arguments (``dtype`` arguments, which only choose the kernel's
rounding, are ignored) and computes in float64 on the very same (already rounded) inputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from miss_ext import reference as R


def _d(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def blocksum(x, r, dtype=None):
    return R.blocksum(_d(x), r)


@functools.lru_cache(maxsize=8)
def _keep(seed: int, shape: tuple, p: float) -> torch.Tensor:
    # The Philox mask costs far more than the op; parity cases reuse one per shape in every dtype.
    return R.dropout_mask(seed, shape, p)


def _dropout(x, p, seed):
    """miss_ext.reference.apply_dropout with the mask cached."""
    if p <= 0.0:
        return x
    keep = _keep(int(seed.item()), tuple(x.shape), p).to(x.device)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return x * keep.to(x.dtype) * scale


def blocksum_dropout(x, r, p, seed, dtype=None):
    return R.blocksum(_dropout(_d(x), p, seed), r)


def tile(s, features, dtype=None):
    return R.tile(_d(s), features)


def tile_dropout(s, features, p, seed, dtype=None):
    return _dropout(R.tile(_d(s), features), p, seed)


def tile_add(base, s):
    return R.tile_add(_d(base), _d(s))


def bat_transform(weight, block, dtype=None):
    return R.bat_transform(_d(weight), _d(block))


def bat_block_grad(grad, weight, r):
    return R.bat_block_grad(_d(grad), _d(weight), r)


def bat_weight_grad(grad, block):
    return R.bat_weight_grad(_d(grad), _d(block))


def _transformed(weight, blocks):
    w = _d(weight)
    for b in blocks:
        w = R.bat_transform(w, _d(b))
    return w


def bat_input_grad(grad, weight, blocks):
    return _d(grad) @ _transformed(weight, blocks)


def bat_io_block_grad(grad, x, weight, r, dtype=None):
    g = _d(grad).reshape(-1, grad.shape[-1])
    return R.bat_block_grad(g.t() @ _d(x).reshape(-1, x.shape[-1]), _d(weight), r)


def bat_linear(x, weight, bias, blocks):
    return R.bat_linear(_d(x), _d(weight), _d(bias), [_d(b) for b in blocks])


def bat_unmerge(weight, block):
    return R.bat_unmerge(_d(weight), _d(block))


def miss_linear(x, weight, bias, block, p, seed, round_base=False):
    # round_base changes only where the half-type kernel rounds; in float64 the math is the same.
    x, block = _d(x), _d(block)
    s = R.blocksum(_dropout(x, p, seed), block.shape[0])
    y = F.linear(x, _d(weight), _d(bias))
    return y + R.tile(s @ block, y.shape[-1]), s


def miss_add_product(base, s, block):
    return _d(base) + R.tile(_d(s) @ _d(block), base.shape[-1])


def miss_block_grads(grad, s, block):
    """(dL/dblock, dL/ds) of ``tile(s @ block, out)``: the tile's adjoint sums the output
    gradient over the out / m copies of the block first."""
    g = R.blocksum(_d(grad), block.shape[1])
    s2 = _d(s).reshape(-1, s.shape[-1])
    return s2.t() @ g.reshape(-1, g.shape[-1]), g @ _d(block).t()


def miss_merge(weight, block, alpha):
    return R.miss_merge(_d(weight), _d(block), alpha)


def miss_gathered_product(base, s, blocks, index):
    out = _d(base).clone()
    for i, b in enumerate(blocks):
        rows = index == i
        out[rows] += R.tile(_d(s)[rows] @ _d(b), base.shape[-1])
    return out
