"""Serving many MiSS adapters at once: mixed-adapter batches (docs/MATH.md section 12).

Each sample of a batch (the first dimension of the input) names its own adapter, or
``"__base__"`` for the base model alone, as PEFT's LoRA ``adapter_names`` does:

* layer level: ``MissLinear(...)(x, adapter_names=[...])`` (and PEFT's MiSS layers under
  :func:`miss_ext.peft.patch`);
* model level: ``with miss_ext.mixed_batch(model, names): model(...)`` / ``model.generate(...)``
  for :func:`miss_ext.inject` models; ``PeftModel.forward(..., adapter_names=names)`` and
  ``generate(..., adapter_names=names)`` for PEFT models under the patch.

A sample gets what the layer gives it with its adapter alone (up to float rounding of sums
taken in another order), whatever the other samples use. Standard and mini adapters of one
``r`` (and block dtype) go through one block-sum pass over the batch and one gathered product
(``torch.ops.miss_ext.miss_gathered_product``), whatever their number. BAT adapters are
nonlinear in the weight: their samples are grouped per adapter and each group runs through its
transformed weight ``W'``, which costs one transform of the weight per BAT adapter and forward
unless :func:`cache_bat_weights` keeps ``W'`` (one weight-sized tensor per BAT adapter and
layer).

Inference only: a module in training mode refuses ``adapter_names``, as PEFT does; merged
adapters too (unmerge first). With adapters disabled the base layer alone runs.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from . import functional as MF
from ._ops_common import holds
from .layer import autocast_dtype, bat_output, plain_linear

__all__ = ["BASE", "mixed_batch", "cache_bat_weights", "bat_cache_bytes"]

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
    _check_inference(fn, training)
    if not isinstance(names, ModelNames):
        _check_known(fn, names, known, "layer")


def _check_inference(fn: str, training: bool) -> None:
    if training:
        raise ValueError(
            f"{fn}: Cannot pass `adapter_names` when the model is in training mode (mixed-adapter batches are "
            f"for inference); call model.eval() first."
        )


def _check_known(fn: str, names: Sequence[str], known: Iterable[str], what: str) -> None:
    """Every name is one of ``known`` or ``"__base__"``; ``what`` is "layer" or "model"."""
    known = set(known)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise ValueError(
            f"{fn}: Trying to infer with non-existing adapter(s): {', '.join(unknown)} (this {what} has "
            f"{sorted(known)}; '{BASE}' selects the base {what} alone)"
        )


# ---------------------------------------------------------------- the layer computation


@dataclass
class LayerView:
    """What the mixed-batch forward needs from a MiSS layer (miss_ext's or PEFT's)."""

    blocks: Mapping[str, torch.Tensor]
    variant: Callable[[str], str]
    base: Callable[[torch.Tensor], torch.Tensor]  # the base layer (with its extra args bound)
    weight: Callable[[], torch.Tensor]  # the real base weight (BAT only)
    bias: Optional[torch.Tensor]
    bat_precision: str
    cast: Callable[[torch.Tensor, torch.dtype], torch.Tensor]
    cache: Optional[dict]  # the BAT W' cache, or None when off
    linear: Optional[nn.Linear] = None  # the base when it is exactly F.linear(x, W, b)


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


def _additive(view: LayerView, x: torch.Tensor, names: Sequence[str], adapters: Sequence[str]) -> torch.Tensor:
    """The base layer on every sample plus, per sample, its standard/mini adapter's term: one
    block sum and one gathered product per (r, block dtype), however many adapters share it."""
    groups: dict = {}
    for a in adapters:
        block = view.blocks[a]
        groups.setdefault((block.shape[0], block.dtype), []).append(a)
    lin = view.linear
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
        out = view.base(x)
    for (_, bdt), group in groups.items():
        # x in a dtype the blocks hold, as the single-adapter path casts it (PEFT's rule).
        xi = x if holds(x.dtype, bdt) else view.cast(x, bdt)
        index = _index(names, group, x.device)
        index = index.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
        out = MF.gathered_forward(xi, out, [view.blocks[a] for a in group], index)
    return out


def _bat(view: LayerView, x: torch.Tensor, name: str) -> torch.Tensor:
    """``x W'^T + b`` for BAT adapter ``name`` alone, from the cache when it holds ``W'``."""
    block = view.blocks[name]
    cache, weight = view.cache, view.weight()
    # A cached W' is a constant: where a gradient must reach the block or the weight, recompute.
    if cache is None or (torch.is_grad_enabled() and (block.requires_grad or weight.requires_grad)):
        return bat_output(x, weight, view.bias, [block], view.bat_precision)
    # The compute dtype bat_output picks (miss_ext.layer.bat_output).
    dtype = autocast_dtype(x)
    if dtype is None:
        dtype = torch.promote_types(x.dtype, weight.dtype)
        if view.bat_precision != "base":
            dtype = torch.promote_types(weight.dtype, block.dtype)
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
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if torch.amp.is_autocast_available(weight.device.type):
            stack.enter_context(torch.autocast(weight.device.type, enabled=False))
        b = block if holds(dtype, block.dtype) else block.to(dtype)
        w_prime = MF.bat_transform(weight, b, dtype)
    cache[name] = (weakref.ref(weight), weakref.ref(block), stamp, w_prime)
    return w_prime


def mixed_forward(view: LayerView, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """The mixed-adapter batch through one layer: every sample with its own adapter (names the
    layer lacks, and ``"__base__"``, run the base alone). Checks are the caller's."""
    present = [a for a in dict.fromkeys(names) if a in view.blocks]
    bat = [a for a in present if view.variant(a) == "bat"]
    additive = [a for a in present if view.variant(a) != "bat"]
    if not bat:
        return _additive(view, x, names, additive)
    pieces, rows = [], []
    rest = [i for i, n in enumerate(names) if n not in bat]
    if rest:
        idx = _samples(names, set(names) - set(bat), x.device)
        sub = [names[i] for i in rest]
        pieces.append(_additive(view, x.index_select(0, idx), sub, additive))
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


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


def miss_linear_view(layer, args, kwargs) -> LayerView:
    """The view of a :class:`miss_ext.MissLinear`."""
    base_layer = layer.base_layer
    return LayerView(
        blocks=layer.miss_block,
        variant=layer.miss_variant.__getitem__,
        base=lambda x: base_layer(x, *args, **kwargs),
        weight=layer.base_weight,
        bias=getattr(base_layer, "bias", None),
        bat_precision=layer.bat_precision,
        cast=_cast,
        cache=getattr(layer, "_bat_weight_cache", None),
        linear=base_layer if plain_linear(base_layer, args, kwargs) else None,
    )


def layer_forward(layer, x: torch.Tensor, adapter_names, args, kwargs) -> torch.Tensor:
    """``MissLinear.forward(x, adapter_names=...)``."""
    fn = "MissLinear.forward"
    names = adapter_names if isinstance(adapter_names, ModelNames) else check_names(fn, adapter_names)
    check_layer_call(fn, x, names, layer.miss_block.keys(), layer.merged, layer.training)
    previous_dtype = x.dtype
    if layer.disable_adapters:
        return layer.base_layer(x, *args, **kwargs).to(previous_dtype)
    return mixed_forward(miss_linear_view(layer, args, kwargs), x, names).to(previous_dtype)


# ---------------------------------------------------------------- model level


def _hook(module, args, kwargs, names):
    kwargs["adapter_names"] = names
    return args, kwargs


def register_hooks(layers: Iterable[nn.Module], names: ModelNames) -> list:
    return [m.register_forward_pre_hook(partial(_hook, names=names), with_kwargs=True) for m in layers]


def check_model_names(fn: str, adapter_names, known: Iterable[str], training: bool, num_beams: Optional[int] = None) -> ModelNames:
    """The model-level checks (PEFT's ``_enable_peft_forward_hooks``): inference only, every name
    an adapter of some layer or ``"__base__"``; with beam search each name is repeated per beam."""
    names = check_names(fn, adapter_names)
    _check_inference(fn, training)
    _check_known(fn, names, known, "model")
    if isinstance(num_beams, int) and num_beams > 1:
        names = [n for n in names for _ in range(num_beams)]
    return ModelNames(names)


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], num_beams: int = 1):
    """``with miss_ext.mixed_batch(model, ["a", "b", "__base__"]): model(...)`` runs sample ``i``
    of every forward (and of ``model.generate(...)``) with adapter ``adapter_names[i]`` alone on
    every MissLinear of ``model`` (a model made with :func:`miss_ext.inject`); ``"__base__"``
    runs the base model. Beam search expands each sample ``num_beams`` times: pass the same
    ``num_beams`` here. The model must be in eval mode; no adapter may be merged.

    Layers that lack one of the named adapters run those samples through their base layer, as
    in PEFT; a name that no layer has raises. PEFT models use
    ``PeftModel.forward/generate(..., adapter_names=...)`` under :func:`miss_ext.peft.patch`."""
    from .inject import adapter_layers
    from .layer import MissLinear

    layers = [m for _, m in adapter_layers(model)]
    if not layers:
        raise ValueError(f"mixed_batch: {type(model).__name__} has no MiSS layer; build one with miss_ext.inject")
    peft_layers = [m for m in layers if not isinstance(m, MissLinear)]
    if peft_layers:
        from . import peft as mp

        if not mp.is_patched():
            raise ValueError(
                "mixed_batch: the model has PEFT MiSS layers, which take adapter_names only under "
                "miss_ext.peft.patch(); call it first (or pass adapter_names to the PeftModel's forward/generate)"
            )
    known = {a for m in layers for a in m.miss_block}
    names = check_model_names("mixed_batch", adapter_names, known, model.training, num_beams)
    handles = register_hooks(layers, names)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- the BAT W' cache


def cache_bat_weights(model: nn.Module, enabled: bool = True) -> None:
    """Keeps (``enabled``) or drops the transformed weight ``W'`` of every BAT adapter on every
    MiSS layer of ``model`` (a MissLinear, an injected model, or a PEFT model under the patch)
    for mixed-adapter batches. Memory: one tensor of the base weight's shape per BAT adapter and
    layer, in the compute dtype (``bat_cache_bytes`` tells); it fills on first use. Entries are
    recomputed when the weight or the block changes (merging, loading, an optimizer step) and
    bypassed when gradients are wanted. Off by default."""
    from .inject import adapter_layers

    layers = [m for _, m in adapter_layers(model)]
    if not layers:
        raise ValueError(f"cache_bat_weights: {type(model).__name__} has no MiSS layer")
    for m in layers:
        m._bat_weight_cache = {} if enabled else None


def bat_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the BAT ``W'`` caches of ``model``'s MiSS layers."""
    from .inject import adapter_layers

    total = 0
    for _, m in adapter_layers(model):
        for entry in (getattr(m, "_bat_weight_cache", None) or {}).values():
            total += entry[3].numel() * entry[3].element_size()
    return total
