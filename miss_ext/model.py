"""Whole-model merging for models built with :func:`miss_ext.inject`: merge/unmerge every
layer, merge and unload, unload. Saving and loading in PEFT's file format are in
:mod:`miss_ext.saving`; adapter switching (``set_adapter``, ``adapters_disabled``) in
:mod:`miss_ext.inject`.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

from torch import nn

from .inject import checked_layers, miss_layers
from .layer import MissLinear

__all__ = [
    "merge_adapters",
    "unmerge_adapters",
    "merge_and_unload",
    "unload",
]


def _names(adapter_names: Union[None, str, Iterable[str]]) -> Optional[list[str]]:
    if adapter_names is None:
        return None
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def merge_adapters(model: nn.Module, adapter_names=None, safe_merge: bool = False) -> nn.Module:
    """Merges ``adapter_names`` (default: each layer's active adapters) into every base weight.

    Each layer merges atomically (a failed ``safe_merge`` leaves that layer's weight as it was)
    and a merged layer computes what it did unmerged, so an error part-way leaves a model that
    still gives the same outputs."""
    names = _names(adapter_names)
    for _, layer in checked_layers(model, names):
        here = None if names is None else [n for n in names if n in layer.miss_block]
        if here == []:
            continue
        layer.merge(safe_merge=safe_merge, adapter_names=here)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Takes every merged adapter out of every base weight (BAT: an fp32 solve per block row)."""
    for _, layer in checked_layers(model, None):
        if layer.merged:
            layer.unmerge()
    return model


def _replace_with_base(model: nn.Module, layers: list[tuple[str, MissLinear]]) -> nn.Module:
    for name, layer in layers:
        if not name:
            return layer.base_layer  # the model is itself one MissLinear
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return model


def merge_and_unload(model: nn.Module, adapter_names=None, safe_merge: bool = False) -> nn.Module:
    """The plain model with ``adapter_names`` (default: the active ones) merged into its weights,
    every MissLinear replaced by its base layer (PEFT's ``merge_and_unload``). Adapters not
    merged are dropped. Base parameters stay frozen, as ``inject`` left them. Merging happens in
    place, so ``model`` is changed as well; the return value is the model to use (the base
    layer itself when ``model`` is one MissLinear)."""
    merge_adapters(model, adapter_names, safe_merge)
    return _replace_with_base(model, miss_layers(model))


def unload(model: nn.Module) -> nn.Module:
    """The original model: merged adapters are unmerged first, then every MissLinear is replaced
    by its base layer and every adapter dropped (PEFT's ``unload``, which instead keeps merged
    weights as they are)."""
    unmerge_adapters(model)
    return _replace_with_base(model, miss_layers(model))
