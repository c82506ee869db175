"""PEFT integration: run PEFT's own MiSS layers on the miss_ext kernels, and load PEFT MiSS
checkpoints into models built with :func:`miss_ext.inject`.

``patch()`` swaps the compute methods of ``peft.tuners.miss.layer.MissLinear`` (``forward``,
``merge``, ``unmerge``, ``get_delta_weight``, ``get_delta_weight_miss``) for versions on
:mod:`miss_ext.functional`. It patches the class, so layers created before and after the call
are both accelerated; everything else (configs, ``get_peft_model``, saving, loading, adapter
switching) stays PEFT's. ``unpatch()`` restores PEFT's methods; ``patched()`` does both.

What the patched layers keep from PEFT: ``miss_dropout`` (the ``nn.Dropout``'s ``p`` and its
training flag), ``merged_adapters``, ``_disable_adapters``, ``active_adapters``,
``get_base_weight``/``set_base_weight`` (so quantized bases merge through their backend),
``_cast_input_dtype`` and the quantization checks. Two deliberate differences, both only
where PEFT itself fails or silently diverges: each adapter's variant is read from its block's
shape rather than the layer-wide ``miss_fn`` (PEFT raises shape errors when variants are mixed
on a layer; the two agree everywhere else), and dropout masks come from miss_ext's
counter-based generator rather than ``nn.Dropout``'s (same distribution, different draws).

PEFT is imported only inside these functions: ``import miss_ext.peft`` alone does not need it.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
from torch import nn

from . import _checks
from .layer import (
    MissLinear,
    additive_output,
    apply_steps,
    bat_output,
    check_bat_precision,
    delta_weight,
    merge_steps,
    unmerge_steps,
    variant_of_block,
)
from . import functional as MF

__all__ = [
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "to_miss_ext_state_dict",
    "load_peft_adapter",
]

_METHODS = ("forward", "merge", "unmerge", "get_delta_weight", "get_delta_weight_miss")
_ORIGINALS: dict[str, Any] = {}
# The BAT compute mode of patched layers (see miss_ext.layer.BAT_PRECISIONS); set by patch().
_SETTINGS = {"bat_precision": "base"}


def _peft_miss_linear():
    from peft.tuners.miss.layer import MissLinear

    return MissLinear


def _variant(layer, name: str) -> str:
    return variant_of_block(layer.miss_block[name], layer.out_features)


def _dropout_p(layer, name: str) -> float:
    """The adapter's live dropout probability: its nn.Dropout's p in training, else 0."""
    module = layer.miss_dropout[name] if name in layer.miss_dropout else None
    if isinstance(module, nn.Dropout) and module.training:
        return float(module.p)
    return 0.0


# ---------------------------------------------------------------- replacement methods


def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # PEFT casts x to the adapters' dtype and the result back: an integer x must not get that far.
    blocks = [self.miss_block[a] for a in self.active_adapters if a in self.miss_block]
    _checks.layer_input(f"miss_ext.peft {type(self).__name__}", x, self.in_features, blocks)
    previous_dtype = x.dtype
    if self.disable_adapters:
        if self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
    elif self.merged:
        result = self.base_layer(x, *args, **kwargs)
    else:
        active = [a for a in self.active_adapters if a in self.miss_block]
        variants = [_variant(self, a) for a in active]
        bat = [a for a, v in zip(active, variants) if v == "bat"]
        base_out = None
        if bat:
            backend = self.quantization_backend
            if backend is not None and not backend.supports_merge:
                raise ValueError(
                    "Using MiSS with `init_weights='bat'` is not supported because quantization backend "
                    f"{backend.backend_name} does not support dequantization. Use a different "
                    "quantization backend or a different MiSS initialization method."
                )
            # get_base_weight is detached (`.data`), so, as in PEFT, no gradient reaches the base.
            bias = self.get_base_layer().bias
            base_out = bat_output(
                x, self.get_base_weight(), bias, [self.miss_block[a] for a in bat], _SETTINGS["bat_precision"]
            )
        elif self.quantization_backend is not None:
            base_out = self.quantization_backend.maybe_clone_base_result(self.base_layer(x, *args, **kwargs))
        terms = [(self.miss_block[a], v, _dropout_p(self, a)) for a, v in zip(active, variants) if v != "bat"]
        result = additive_output(
            self.base_layer, x, terms, args, kwargs, cast=self._cast_input_dtype, base_out=base_out
        )
    return result.to(previous_dtype)


def _merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
    from peft.tuners.tuners_utils import check_adapters_to_merge

    names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.miss_block]
    if not names:
        return
    merged = [(a, _variant(self, a)) for a in self.merged_adapters if a in self.miss_block]
    steps, order = merge_steps(merged, [(a, _variant(self, a)) for a in names])
    # Out of place, then set: a failed safe merge leaves the base weight as it was.
    new = apply_steps(self.get_base_weight(), steps, self.miss_block, check_finite=safe_merge)
    self.set_base_weight(new)
    self.merged_adapters = order


def _unmerge(self) -> None:
    if not self.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    merged = [(a, _variant(self, a)) for a in self.merged_adapters if a in self.miss_block]
    new = apply_steps(self.get_base_weight(), unmerge_steps(merged), self.miss_block)
    self.set_base_weight(new)
    self.merged_adapters = []


def _get_delta_weight(self, adapter, orig_weight, reverse: bool = False) -> torch.Tensor:
    """PEFT's BAT helper: the delta ``W B + B`` or, with ``reverse``, the unmerged weight."""
    block = self.miss_block[adapter]
    if reverse:
        return MF.bat_unmerge(orig_weight.detach(), block.detach()).to(block.dtype)
    return delta_weight(orig_weight, block, "bat")


def _get_delta_weight_miss(self, adapter, orig_weight, reverse: bool = False) -> torch.Tensor:
    """PEFT's standard/mini helper: the *full* weight ``W +- dW`` (not mutating ``orig_weight``)."""
    return MF.miss_merge(orig_weight, self.miss_block[adapter], -1.0 if reverse else 1.0)


_REPLACEMENTS = {
    "forward": _forward,
    "merge": _merge,
    "unmerge": _unmerge,
    "get_delta_weight": _get_delta_weight,
    "get_delta_weight_miss": _get_delta_weight_miss,
}


# ---------------------------------------------------------------- switches


def is_patched() -> bool:
    return bool(_ORIGINALS)


def patch(bat_precision: str = "base") -> None:
    """Make every PEFT MiSS layer run on miss_ext (idempotent).

    ``bat_precision`` picks how BAT adapters with fp32 blocks compute on a bf16/fp16 model:
    ``"base"`` (default, fast: GEMMs in the base dtype on ``W'`` formed in fp32 and rounded once)
    or ``"promote"`` (PEFT's own promotion to fp32 GEMMs, exact and slow); see
    :class:`miss_ext.MissLinear`. Calling ``patch`` again changes it."""
    _SETTINGS["bat_precision"] = check_bat_precision(bat_precision)
    if _ORIGINALS:
        return
    cls = _peft_miss_linear()
    for name in _METHODS:
        _ORIGINALS[name] = cls.__dict__[name]
    for name in _METHODS:
        setattr(cls, name, _REPLACEMENTS[name])


def unpatch() -> None:
    """Restore PEFT's own methods (idempotent)."""
    _SETTINGS["bat_precision"] = "base"
    if not _ORIGINALS:
        return
    cls = _peft_miss_linear()
    for name, fn in _ORIGINALS.items():
        setattr(cls, name, fn)
    _ORIGINALS.clear()


@contextlib.contextmanager
def patched(bat_precision: str = "base"):
    """``with miss_ext.peft.patched(): ...``; leaves an outer ``patch()`` in force (and restores
    its ``bat_precision``)."""
    was, before = is_patched(), _SETTINGS["bat_precision"]
    patch(bat_precision)
    try:
        yield
    finally:
        if not was:
            unpatch()
        else:
            _SETTINGS["bat_precision"] = before


# ---------------------------------------------------------------- checkpoints


def to_miss_ext_state_dict(
    state_dict: dict, adapter_name: str = "default", prefix: str = "base_model.model."
) -> dict:
    """Keys of a saved PEFT MiSS adapter -> keys of the same model injected by miss_ext.

    PEFT saves ``base_model.model.<path>.miss_block`` (the adapter name dropped); miss_ext's
    parameter is ``<path>.miss_block.<adapter_name>``."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            key = key[len(prefix):]
        if key.endswith(".miss_block"):
            key = f"{key}.{adapter_name}"
        out[key] = value
    return out


def load_peft_adapter(model: nn.Module, path: str, adapter_name: str = "default") -> nn.Module:
    """:func:`miss_ext.load_adapter` with ``into_existing=True``: injects the adapter that PEFT's
    ``save_pretrained`` wrote to ``path`` into ``model`` and loads its blocks, strictly; if every
    target already has adapter ``adapter_name`` (injected before, e.g. on the meta device and
    then materialised with ``to_empty``) with the checkpoint's shapes, the blocks are loaded into
    it instead. A model whose targets are still on the meta device is refused."""
    from .model import load_adapter

    return load_adapter(model, path, adapter_name, into_existing=True)
