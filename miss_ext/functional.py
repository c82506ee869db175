"""Differentiable MiSS building blocks on the miss_ext kernels.

Shapes: ``x`` is ``(..., in_features)``; ``base_out`` is the frozen layer's output
``(..., out_features)``. Every function is autograd- and torch.compile-friendly (each call is
a registered operator or an aten op). The math is docs/MATH.md.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks
from ._ops_common import eager_ops as ops
from ._ops_common import holds

__all__ = [
    "dropout_seed",
    "blocksum",
    "tile",
    "miss_forward",
    "mini_forward",
    "miss_linear",
    "bat_transform",
    "bat_linear",
    "bat_unmerge",
    "miss_merge",
    "miss_delta_weight",
    "gathered_forward",
]


def dropout_seed(generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A fresh 64-bit dropout seed (a CPU int64 tensor of one element) drawn from ``generator``
    or torch's default CPU generator, so ``torch.manual_seed`` makes dropout reproducible."""
    return torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, generator=generator)


def blocksum(
    x: torch.Tensor,
    r: int,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``S[..., c] = sum_j dropout(x)[..., j*r + c]`` with ``x`` zero-padded to a multiple of r.

    Dropout (when ``training`` and ``dropout_p > 0``) is fused: its mask is a function of
    ``seed`` and the element index, regenerated in backward instead of stored. ``dtype`` (x's
    dtype by default) may be a wider float: a bfloat16 ``x`` is then summed straight into
    float32, never copied.
    """
    _checks.dropout_p("miss_ext.blocksum", dropout_p)
    if training and dropout_p > 0.0:
        if seed is None:
            seed = dropout_seed()
        return ops.blocksum_dropout(x, r, float(dropout_p), seed, dtype)
    return ops.blocksum(x, r, dtype)


def tile(s: torch.Tensor, features: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``out[..., k] = s[..., k % r]`` for ``k < features``: the adjoint of :func:`blocksum`;
    ``dtype`` (s's by default) may be narrower, the values rounded once to it."""
    return ops.tile(s, features, dtype)


def _block_precision(x: torch.Tensor, block: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the block sum of ``x`` is taken in: the block's, when it holds x's (a bfloat16
    x with a float32 block: the mixed-precision layer), else x's own (the caller promotes)."""
    return block.dtype if holds(x.dtype, block.dtype) else None


def _autocast_on(t: torch.Tensor) -> bool:
    return t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type)


def miss_forward(
    x: torch.Tensor,
    base_out: torch.Tensor,
    block: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Standard MiSS: ``base_out + blocksum_r(dropout(x)) @ block`` with ``block`` ``(r, out)``.

    Mixed precision (docs/MATH.md): with a float32 ``block`` and a bfloat16/float16 ``x`` and
    ``base_out``, the block sum and the product are taken in float32 and the sum rounded once to
    ``base_out``'s dtype, which is PEFT's result after its final cast. Under autocast the product
    runs in the autocast dtype, as PEFT's does. Other dtype pairs are promoted as in PEFT (cast
    the result back yourself)."""
    _checks.additive("miss_ext.miss_forward", x, base_out, block, dropout_p, mini=False)
    r, out_features = block.shape
    s = blocksum(x, r, dropout_p, training, seed, _block_precision(x, block))
    lead = base_out.shape[:-1]
    if _autocast_on(x):
        return base_out + s @ block
    if base_out.dtype == block.dtype == s.dtype:
        # One fused GEMM + accumulate into a copy of base_out.
        y = torch.addmm(base_out.reshape(-1, out_features), s.reshape(-1, r), block)
        return y.view(*lead, out_features)
    if s.dtype == block.dtype and holds(base_out.dtype, block.dtype):
        return ops.miss_add_product(base_out, s, block)
    return base_out + s @ block


def mini_forward(
    x: torch.Tensor,
    base_out: torch.Tensor,
    block: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """mini MiSS: ``base_out + tile_out(blocksum_r(dropout(x)) @ block)`` with ``block``
    ``(r, mini_r)``; the ``(r, out)`` repeated block is never materialised, and the backward
    block-sums the output gradient over the ``out / mini_r`` tiles with the same kernel."""
    _checks.additive("miss_ext.mini_forward", x, base_out, block, dropout_p, mini=True)
    r, m = block.shape
    out_features = base_out.shape[-1]
    small = blocksum(x, r, dropout_p, training, seed, _block_precision(x, block)) @ block
    # Decided on `small`, not `block`: under autocast the product may come out in another dtype.
    # A wider `small` (float32 block, half-type base) is added and rounded once, as PEFT's sum
    # after its final cast.
    if holds(base_out.dtype, small.dtype):
        return ops.tile_add(base_out, small)
    return base_out + ops.tile(small, out_features)


def miss_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    block: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: Optional[torch.Tensor] = None,
    round_base: bool = False,
) -> torch.Tensor:
    """A frozen ``nn.Linear`` fused with its standard (``block`` ``(r, out)``) or mini
    (``block`` ``(r, mini_r)``) adapter: ``x W^T + b + tile_out(blocksum_r(dropout(x)) @ block)``.

    Same numbers as ``miss_forward``/``mini_forward`` on ``F.linear(x, weight, bias)``, with fewer
    passes: the frozen GEMM accumulates into the adapter term in forward and into the adapter's
    input gradient in backward. Autograd keeps the ``N x r`` block sum, not ``x`` (unless the
    weight trains). ``x`` and ``weight`` share a dtype; ``block`` has it too or is wider (a float32
    block on a bfloat16 layer: the mixed-precision path, PEFT's rounding, docs/MATH.md).

    ``round_base``, with a block of x's dtype: the base output and the term are each rounded to
    that dtype before their sum, PEFT's order of roundings (what autocast gives PEFT), instead of
    the GEMM accumulating into the term (docs/MATH.md section 11.4)."""
    _checks.dropout_p("miss_ext.miss_linear", dropout_p)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = dropout_seed()
    return ops.miss_linear(x, weight, bias, block, p, seed, round_base)[0]


def bat_transform(weight: torch.Tensor, block: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """BAT weight transform ``W'_ij = W_ij (I + B_i) + B_i`` with ``block`` ``(out/r, r, r)``;
    computed in ``block``'s dtype and rounded once to ``dtype`` (default: the block's)."""
    return ops.bat_transform(weight, block, dtype)


def bat_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    blocks: torch.Tensor | Sequence[torch.Tensor],
    half_products: bool = False,
) -> torch.Tensor:
    """``x W'^T + bias`` where ``W'`` is ``weight`` after each BAT block's transform in turn.

    Backward recomputes ``W'`` instead of saving it: autograd keeps ``x``, the weight and the
    blocks only. Both GEMMs run in ``x``'s dtype. The blocks have ``x``'s dtype or a wider one: a
    float32 block with a bfloat16 ``x`` forms ``W'`` in float32 from the stored weight and rounds
    it once to bfloat16, and dL/dB is accumulated in float32 from ``x`` and dL/dy (docs/MATH.md,
    mixed precision). The weight and bias may be of any float dtype.

    ``half_products=True`` permits the products that form ``W'`` and ``dL/dB`` to take their
    fp32 operands (the block, ``dL/dW'``) rounded to ``x``'s half type, the precision autocast gives
    PEFT's layer; the result keeps docs/MATH.md section 11.4's bound (a faster path on CPUs with bf16
    matrix units; elsewhere the products stay fp32)."""
    blocks = _checks.blocks_list("miss_ext.bat_linear", blocks)
    return ops.bat_linear(x, weight, bias, blocks, bool(half_products))


def bat_unmerge(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bat_transform`: ``(W' - B_i)(I + B_i)^-1`` per block row, by an fp32
    (fp64 for double) linear solve. Raises if some ``I + B_i`` is singular."""
    return ops.bat_unmerge(weight, block)


def miss_merge(weight: torch.Tensor, block: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``weight + alpha * dW`` for a standard ``(r, out)`` or mini ``(r, mini_r)`` block, with
    ``dW[o, k] = block[k % r, o % mini_r]``; computed in fp32 and rounded once to the weight's
    dtype. ``alpha = -1`` unmerges. Returns a new tensor."""
    return ops.miss_merge(weight, block, float(alpha))


def miss_delta_weight(block: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense ``dW`` (``out x in``) of a standard or mini block, in ``block``'s dtype."""
    zeros = torch.zeros(out_features, in_features, dtype=block.dtype, device=block.device)
    return miss_merge(zeros, block, 1.0)


def gathered_forward(
    x: torch.Tensor,
    base_out: torch.Tensor,
    blocks: Sequence[torch.Tensor],
    index: torch.Tensor,
) -> torch.Tensor:
    """Mixed-adapter batches (serving): ``base_out`` plus, on each row, the term of its own
    standard (``(r, out)``) or mini (``(r, mini_r)``) block: ``blocks[index[...]]``, with
    ``index`` of x's leading shape (int64; ``-1`` leaves the row as ``base_out``). All blocks
    share ``r`` and a dtype. One block-sum pass over ``x``, then one gathered product
    (``miss_gathered_product``), the sum rounded once to ``base_out``'s dtype; a row gives what
    :func:`miss_forward` / :func:`mini_forward` give it with its block alone (no dropout: this
    is inference). docs/MATH.md section 12."""
    blocks = _checks.blocks_list("miss_ext.gathered_forward", blocks)
    if not blocks:
        raise ValueError("miss_ext.gathered_forward: argument 'blocks' must hold at least one block")
    for i, b in enumerate(blocks):
        _checks.additive("miss_ext.gathered_forward", x, base_out, b, 0.0, mini=b.dim() == 2 and b.shape[1] != base_out.shape[-1])
    bdt = blocks[0].dtype
    # The product's precision: the blocks', widened to hold base_out's dtype when narrower.
    cdt = bdt if holds(base_out.dtype, bdt) else torch.promote_types(base_out.dtype, bdt)
    xi = x if holds(x.dtype, cdt) else x.to(cdt)
    s = ops.blocksum(xi, blocks[0].shape[0], cdt if holds(xi.dtype, cdt) else None)
    if s.dtype != cdt:
        s = s.to(cdt)
    blocks = [b if b.dtype == cdt else b.to(cdt) for b in blocks]
    return ops.miss_gathered_product(base_out, s, blocks, index)
