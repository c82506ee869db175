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

The per-layer computation is miss_ext._core_mixed; this module is the model-level switch.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterable, Optional, Sequence

from torch import nn

from ._core_mixed import (  # noqa: F401  (BASE, ModelNames, check_names: the names' rules, importable from here)
    BASE,
    ModelNames,
    check_inference,
    check_known,
    check_names,
)
from ._core_view import view_of
from .inject import adapter_layers

__all__ = ["BASE", "mixed_batch", "cache_bat_weights", "bat_cache_bytes"]


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
    check_inference(fn, training)
    check_known(fn, names, known, "model")
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
    layers = [m for _, m in adapter_layers(model)]
    if not layers:
        raise ValueError(f"mixed_batch: {type(model).__name__} has no MiSS layer; build one with miss_ext.inject")
    if not all(view_of(m).takes_adapter_names for m in layers):
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
    layers = [m for _, m in adapter_layers(model)]
    if not layers:
        raise ValueError(f"cache_bat_weights: {type(model).__name__} has no MiSS layer")
    for m in layers:
        m._bat_weight_cache = {} if enabled else None


def bat_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the BAT ``W'`` caches of ``model``'s MiSS layers."""
    total = 0
    for _, m in adapter_layers(model):
        for entry in (getattr(m, "_bat_weight_cache", None) or {}).values():
            total += entry[3].numel() * entry[3].element_size()
    return total
