"""The forward of a MiSS layer with its active adapters: the one path that MissLinear and the
patched PEFT layers both run (docs/MATH.md section 5)::

    y = x W'^T + b + sum over active standard/mini adapters of their terms

``W'`` is the base weight after every active BAT adapter's transform, in the order of the active
list. One function per direction, each replaceable on its own: :func:`bat_output` (the BAT
layer), :func:`additive_output` (the frozen layer plus the standard/mini terms).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from . import _checks
from . import functional as MF
from ._ops_common import holds


def forward(view, x: torch.Tensor, args, kwargs) -> torch.Tensor:
    """``view``'s layer (see miss_ext._core_view) on ``x``; ``args``/``kwargs`` go to its base."""
    terms = view.active_terms()
    _checks.layer_input(view.fn, x, view.in_features, [block for block, _, _ in terms])
    previous_dtype = x.dtype
    if view.disabled and view.merged:
        view.unmerge()  # only reachable if merge() was called while disabled (PEFT does this too)
    if view.disabled or view.merged:
        return view.base_layer(x, *args, **kwargs).to(previous_dtype)
    bat = [block for block, variant, _ in terms if variant == "bat"]
    base_out = None
    if bat:
        view.check_bat()
        base_out = bat_output(x, view.base_weight(), view.bias, bat, view.bat_precision)
        terms = [t for t in terms if t[1] != "bat"]
    out = additive_output(view, x, terms, args, kwargs, base_out)
    return out if out.dtype == previous_dtype else out.to(previous_dtype)


def additive_output(
    view,
    x: torch.Tensor,
    terms: Sequence[tuple[torch.Tensor, str, float]],
    args=(),
    kwargs=None,
    base_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``base_out`` (default: the base layer on ``x``) plus the standard/mini ``terms`` (block,
    variant, dropout p already 0 outside training).

    Without a given ``base_out``, when the base is a plain ``nn.Linear`` and the dtypes allow it
    (:func:`fused_output`), the first adapter runs fused with the base GEMM (``miss_linear``):
    same numbers, fewer passes over the activations, only the ``N x r`` block sum kept for
    backward. ``x`` is cast to a block's
    dtype only when that dtype cannot hold x's values; a wider block sums x into its own
    precision directly (the same values as the cast, without the copy)."""
    kwargs = kwargs or {}
    if base_out is None:
        linear = view.linear(args, kwargs) if terms else None
        if linear is not None:
            base_out = fused_output(linear, x, terms[0])
        if base_out is None:
            base_out = view.base(x, args, kwargs)
        else:
            terms = terms[1:]
    for block, variant, p in terms:
        xi = x if holds(x.dtype, block.dtype) else view.cast(x, block.dtype)
        # A dropout seed is drawn from torch's default generator only when dropout is live, so
        # torch.manual_seed replays it.
        term = MF.mini_forward if variant == "mini" else MF.miss_forward
        base_out = term(xi, base_out, block, p, True)
    return base_out


def fused_output(linear: torch.nn.Linear, x: torch.Tensor, term) -> Optional[torch.Tensor]:
    """The frozen ``linear`` fused with one standard/mini ``term`` (block, variant, dropout p) in
    ``miss_linear``: one op per direction, its backward handing over the whole ``dL/dx``; None
    where the dtypes call for the unfused path.

    Without autocast: x in the weight's dtype and a block that holds it (PEFT's numbers). Under
    autocast, for x in the autocast dtype: the weight and the block enter in that dtype, as
    autocast casts them for PEFT; the frozen GEMM accumulates into the rounded term, one rounding
    of y fewer than PEFT's (mini with a bias: PEFT's roundings), and backward keeps PEFT's
    roundings (docs/MATH.md 11.4). An x in fp32 under autocast stays unfused: PEFT adds its two
    input gradients in fp32.

    The block is cast on every call, as autocast does: a copy kept across calls would need to
    know when the block changed, and torch's fused AdamW (the Trainer's default) updates it in
    place without moving its version counter."""
    block, _, p = term
    dtype = autocast_dtype(x)
    if dtype is None:
        if x.dtype != linear.weight.dtype or not holds(x.dtype, block.dtype):
            return None
        return MF.miss_linear(x, linear.weight, linear.bias, block, p, True)
    if x.dtype != dtype:
        return None
    # mini with a bias would round (tiled term + bias) on its own: as many roundings as PEFT's,
    # grouped differently, so it takes PEFT's order instead (Llama-style layers have no bias).
    peft_order = linear.bias is not None and block.shape[-1] != linear.out_features
    with autocast_off(x.device.type):
        return MF.miss_linear(
            x, linear.weight.to(dtype), linear.bias, block.to(dtype), p, True, round_base=peft_order
        )


def bat_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    blocks: Sequence[torch.Tensor],
    precision: str = "base",
) -> torch.Tensor:
    """``x W'^T + b`` for BAT blocks composed in order, in the compute dtype :func:`bat_dtype`
    picks. Blocks narrower than the compute dtype are cast up."""
    dtype = bat_dtype(x, weight, blocks, precision)
    # Under autocast PEFT's products take the block and dL/dW' rounded to the autocast dtype, so
    # ours may too (docs/MATH.md section 11.4): one bf16 piece instead of two or three.
    half_products = autocast_dtype(x) is not None
    x = x.to(dtype)
    blocks = [b if holds(dtype, b.dtype) else b.to(dtype) for b in blocks]
    # The BAT kernels call aten GEMMs internally; a live autocast would recast those and break
    # the kernels' dtype contract, so the op runs with autocast off (the dtype is chosen above).
    with autocast_off(x.device.type):
        return MF.bat_linear(x, weight, bias, blocks, half_products)


def bat_dtype(x: torch.Tensor, weight: torch.Tensor, blocks: Sequence[torch.Tensor], precision: str) -> torch.dtype:
    """The dtype BAT's GEMMs run in (see miss_ext._core_variants.BAT_PRECISIONS): "base" runs
    them in the dtype of x and the base weight (bf16 for a bf16 model), with ``W'`` formed in the
    blocks' precision and rounded once; "promote" is PEFT's own promotion of the weight's and the
    blocks' dtypes (fp32 GEMMs for fp32 blocks). Under autocast, like any linear layer, the
    autocast dtype (the op is not autocast-aware, so the choice is explicit here)."""
    dtype = autocast_dtype(x)
    if dtype is None:
        dtype = torch.promote_types(x.dtype, weight.dtype) if precision == "base" else weight.dtype
        if precision != "base":
            for b in blocks:
                dtype = torch.promote_types(dtype, b.dtype)
    return dtype


_AUTOCAST_AVAILABLE = {}  # device type -> torch.amp.is_autocast_available (asked once per type)


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    available = _AUTOCAST_AVAILABLE.get(device_type)
    if available is None:
        available = _AUTOCAST_AVAILABLE[device_type] = torch.amp.is_autocast_available(device_type)
    # Devices without autocast (meta) raise on the query itself; nothing can be autocast there.
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or nothing on a device without autocast
    (meta), where even a disabled autocast context raises."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
