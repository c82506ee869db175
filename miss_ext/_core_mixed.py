"""Mixed-adapter batches through one MiSS layer (docs/MATH.md section 12): each sample (the first
dimension of ``x``) with its own adapter, ``"__base__"`` for the base layer alone; the one path
that MissLinear and the patched PEFT layers both run. The model-level switch is
:mod:`miss_ext.serving`.

A sample gets what the layer gives it with its adapter alone (up to float rounding of sums taken
in another order). Standard and mini adapters of one ``r`` (and block dtype) go through one
block-sum pass and one gathered product, whatever their number; BAT adapters are nonlinear in the
weight, so their samples are grouped per adapter, each group through its own ``W'`` (cached when
the layer's BAT cache is on).
"""

from __future__ import annotations

import weakref
from typing import Iterable, Sequence

import torch

from . import _checks
from . import functional as MF
from ._core_forward import autocast_dtype, autocast_off, bat_dtype, bat_output
from ._ops_common import holds

BASE = "__base__"


class ModelNames(tuple):
    """The ``adapter_names`` a model-level call hands to each layer. It was checked against the
    whole model, so a layer that lacks one of the adapters runs those samples through its base
    layer alone (PEFT's rule); a plain list given to a layer directly must name its adapters.
    Also memoizes the per-sample index tensors that every layer with the same adapters shares."""

    def __new__(cls, names: Iterable[str]):
        self = super().__new__(cls, names)
        self.memo = {}
        return self


# ---------------------------------------------------------------- checks


def check_names(fn: str, adapter_names) -> list[str]:
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            f"{fn}: adapter_names must be a list with one adapter name per sample (or '{BASE}'), got "
            f"{type(adapter_names).__name__}"
        )
    bad = [n for n in adapter_names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{fn}: adapter_names must be strings (got {bad[:3]!r})")
    return list(adapter_names)


def check_layer_call(fn: str, x: torch.Tensor, names: Sequence[str], known: Iterable[str], merged: bool, training: bool) -> None:
    """PEFT's ``_check_forward_args`` for mixed batches, plus what PEFT checks at model level."""
    if x.dim() < 2:
        raise ValueError(
            f"{fn}: adapter_names needs a batched input (samples first, features last); got shape {tuple(x.shape)}"
        )
    if len(names) != x.shape[0]:
        raise ValueError(
            f"{fn}: Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(names)} and {x.shape[0]} respectively."
        )
    if merged:
        raise ValueError(
            f"{fn}: Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
        )
    check_inference(fn, training)
    if not isinstance(names, ModelNames):
        check_known(fn, names, known, "layer")


def check_inference(fn: str, training: bool) -> None:
    if training:
        raise ValueError(
            f"{fn}: Cannot pass `adapter_names` when the model is in training mode (mixed-adapter batches are "
            f"for inference); call model.eval() first."
        )


def check_known(fn: str, names: Sequence[str], known: Iterable[str], what: str) -> None:
    """Every name is one of ``known`` or ``"__base__"``; ``what`` is "layer" or "model"."""
    known = set(known)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"{fn}: Trying to infer with non-existing adapter(s): {', '.join(unknown)} (this {what} has "
            f"{sorted(known)}; '{BASE}' selects the base {what} alone)"
        )


# ---------------------------------------------------------------- the layer computation

# ---------------------------------------------------------------- the layer computation


def _index(names: Sequence[str], group: Sequence[str], device) -> torch.Tensor:
    """(samples,) int64: each sample's position in ``group``, -1 when its adapter is not in it."""
    key = ("index", tuple(group), str(device))
    memo = getattr(names, "memo", None)
    if memo is not None and key in memo:
        return memo[key]
    pos = {a: i for i, a in enumerate(group)}
    index = torch.tensor([pos.get(n, -1) for n in names], dtype=torch.int64, device=device)
    if memo is not None:
        memo[key] = index
    return index


def _samples(names: Sequence[str], wanted, device) -> torch.Tensor:
    key = ("samples", tuple(sorted(wanted)), str(device))
    memo = getattr(names, "memo", None)
    if memo is not None and key in memo:
        return memo[key]
    rows = torch.tensor([i for i, n in enumerate(names) if n in wanted], dtype=torch.int64, device=device)
    if memo is not None:
        memo[key] = rows
    return rows


def _additive(view, x: torch.Tensor, names: Sequence[str], adapters: Sequence[str], args, kwargs) -> torch.Tensor:
    """The base layer on every sample plus, per sample, its standard/mini adapter's term: one
    block sum and one gathered product per (r, block dtype), however many adapters share it."""
    groups: dict = {}
    for a in adapters:
        block = view.blocks[a]
        groups.setdefault((block.shape[0], block.dtype), []).append(a)
    lin = view.linear(args, kwargs)
    fused = None
    if lin is not None and autocast_dtype(x) is None and x.dtype == lin.weight.dtype:
        # Equal dtypes: a group's term goes first, on top of the bias, and the frozen GEMM
        # accumulates into it (beta = 1), as miss_linear does for one adapter: no extra pass.
        fused = next((k for k in groups if k[1] == x.dtype), None)
    if fused is not None:
        out_f = lin.weight.shape[0]
        row = lin.bias if lin.bias is not None else x.new_zeros(out_f)
        base = row.to(x.dtype).expand(*x.shape[:-1], out_f)
        index = _index(names, groups[fused], x.device)
        index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        out = MF.gathered_forward(x, base, [view.blocks[a] for a in groups.pop(fused)], index)
        out.view(-1, out_f).addmm_(x.reshape(-1, x.shape[-1]), lin.weight.t())
    else:
        out = view.base(x, args, kwargs)
    for (_, bdt), group in groups.items():
        # x in a dtype the blocks hold, as the single-adapter path casts it (PEFT's rule).
        xi = x if holds(x.dtype, bdt) else view.cast(x, bdt)
        index = _index(names, group, x.device)
        index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        out = MF.gathered_forward(xi, out, [view.blocks[a] for a in group], index)
    return out


def _bat(view, x: torch.Tensor, name: str) -> torch.Tensor:
    """``x W'^T + b`` for BAT adapter ``name`` alone, from the cache when it holds ``W'``."""
    block = view.blocks[name]
    cache, weight = view.cache, view.base_weight()
    # A cached W' is a constant: where a gradient must reach the block or the weight, recompute.
    if cache is None or (torch.is_grad_enabled() and (block.requires_grad or weight.requires_grad)):
        return bat_output(x, weight, view.bias, [block], view.bat_precision)
    dtype = bat_dtype(x, weight, [block], view.bat_precision)
    w_prime = _cached_transform(cache, name, weight, block, dtype)
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    if view.bias is None:
        y = x2 @ w_prime.t()
    else:
        y = torch.addmm(view.bias.to(dtype), x2, w_prime.t())  # bat_linear's own GEMM
    return y.view(*x.shape[:-1], w_prime.shape[0])


def _cached_transform(cache: dict, name: str, weight: torch.Tensor, block: torch.Tensor, dtype) -> torch.Tensor:
    """W' of adapter ``name`` in ``dtype``, recomputed when the weight or the block changed (in
    place, e.g. a merge or a load: their version counters move) or is another tensor."""
    hit = cache.get(name)
    stamp = (weight._version, block._version, dtype, weight.device)
    if hit is not None:
        weight_ref, block_ref, old_stamp, w_prime = hit
        if weight_ref() is weight and block_ref() is block and old_stamp == stamp:
            return w_prime
    with torch.no_grad(), autocast_off(weight.device.type):
        b = block if holds(dtype, block.dtype) else block.to(dtype)
        w_prime = MF.bat_transform(weight, b, dtype)
    cache[name] = (weakref.ref(weight), weakref.ref(block), stamp, w_prime)
    return w_prime


def forward(view, x: torch.Tensor, adapter_names, args, kwargs) -> torch.Tensor:
    """``view``'s layer (see miss_ext._core_view) on a mixed-adapter batch: ``adapter_names`` has
    one adapter name per sample; names the layer lacks (given by a model-level call) and
    ``"__base__"`` run the base layer alone. Inference only; no adapter may be merged."""
    _checks.layer_input(view.fn, x, view.in_features, view.blocks.values())
    fn = view.mixed_fn
    names = adapter_names if isinstance(adapter_names, ModelNames) else check_names(fn, adapter_names)
    check_layer_call(fn, x, names, view.blocks.keys(), view.merged, view.layer.training)
    previous_dtype = x.dtype
    if view.disabled:
        return view.base_layer(x, *args, **kwargs).to(previous_dtype)
    return _mixed(view, x, names, args, kwargs).to(previous_dtype)


def _mixed(view, x: torch.Tensor, names: Sequence[str], args, kwargs) -> torch.Tensor:
    present = [a for a in dict.fromkeys(names) if a in view.blocks]
    bat = [a for a in present if view.variant(a) == "bat"]
    additive = [a for a in present if view.variant(a) != "bat"]
    if not bat:
        return _additive(view, x, names, additive, args, kwargs)
    view.check_bat()
    pieces, rows = [], []
    rest = [i for i, n in enumerate(names) if n not in bat]
    if rest:
        idx = _samples(names, set(names) - set(bat), x.device)
        sub = [names[i] for i in rest]
        pieces.append(_additive(view, x.index_select(0, idx), sub, additive, args, kwargs))
        rows.append(idx)
    for a in bat:
        idx = _samples(names, {a}, x.device)
        pieces.append(_bat(view, x.index_select(0, idx), a))
        rows.append(idx)
    dtype = pieces[0].dtype
    for p in pieces[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    stacked = torch.cat([p.to(dtype) for p in pieces])
    order = torch.cat(rows)
    return stacked.index_select(0, torch.argsort(order))

