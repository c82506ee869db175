"""PEFT integration: run PEFT's own MiSS layers on the miss_ext kernels, and load PEFT MiSS
checkpoints into models built with :func:`miss_ext.inject`.

``patch()`` swaps the compute methods of ``peft.tuners.miss.layer.MissLinear`` (``forward``,
``merge``, ``unmerge``, ``get_delta_weight``, ``get_delta_weight_miss``) for versions on
:mod:`miss_ext.functional`. It patches the class, so layers created before and after the call
are both accelerated; everything else (configs, ``get_peft_model``, saving, loading, adapter
switching) stays PEFT's. ``unpatch()`` restores PEFT's methods; ``patched()`` does both.

The patch also adds what PEFT lacks for MiSS: mixed-adapter batches. ``PeftModel.forward`` and
``generate`` take ``adapter_names=[...]`` (one adapter per sample, ``"__base__"`` for the base)
through a ``MissModel._enable_peft_forward_hooks`` like LoraModel's, and each MiSS layer's
forward takes it (see :mod:`miss_ext.serving`). Unpatched, PEFT drops ``adapter_names`` for MiSS.

What the patched layers keep from PEFT: ``miss_dropout`` (the ``nn.Dropout``'s ``p`` and its
training flag), ``merged_adapters``, ``_disable_adapters``, ``active_adapters``,
``get_base_weight``/``set_base_weight`` (so quantized bases merge through their backend),
``_cast_input_dtype`` and the quantization checks. Two deliberate differences, both only
where PEFT itself fails or silently diverges: each adapter's variant is read from its block's
shape rather than the layer-wide ``miss_fn`` (PEFT raises shape errors when variants are mixed
on a layer; the two agree everywhere else), and dropout masks come from miss_ext's
counter-based generator rather than ``nn.Dropout``'s (same distribution, different draws).

The patched methods hand the layer to the same core MissLinear runs on (miss_ext._core_forward,
_core_mixed, _core_merge) through its view (miss_ext._core_view.PeftLayerView). PEFT is imported
only inside these functions: ``import miss_ext.peft`` alone does not need it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn

from . import _core_forward, _core_merge, _core_mixed
from . import functional as MF
from ._core_variants import check_bat_precision
from ._core_view import PEFT_SETTINGS, PeftLayerView
from .saving import load_adapter
from .serving import check_model_names, register_hooks

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
# MissModel gets the hook PEFT's LoraModel has for ``adapter_names``; PEFT's MissModel has none.
_HOOKS = "_enable_peft_forward_hooks"
_ABSENT = object()
_MODEL_ORIGINALS: dict[str, Any] = {}
# The BAT compute mode of patched layers (see miss_ext._core_variants.BAT_PRECISIONS) and whether
# the patch is on; the views of PEFT's layers read them.
_SETTINGS = PEFT_SETTINGS


def _peft_miss_linear():
    from peft.tuners.miss.layer import MissLinear

    return MissLinear


def _peft_miss_model():
    from peft.tuners.miss.model import MissModel

    return MissModel


# ---------------------------------------------------------------- replacement methods


def _forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is not None:
        return _core_mixed.forward(PeftLayerView(self), x, adapter_names, args, kwargs)
    return _core_forward.forward(PeftLayerView(self), x, args, kwargs)


@contextlib.contextmanager
def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
    """What PEFT's MissModel lacks (LoraModel has it): ``adapter_names`` given to
    ``PeftModel.forward``/``generate`` reaches every MiSS layer through forward pre-hooks, after
    PEFT's model-level checks (inference only, known adapters, beam search repeats the names;
    an encoder keeps the unrepeated names)."""
    from peft.tuners.miss.layer import MissLayer

    adapter_names = kwargs.pop("adapter_names", None)
    if adapter_names is None:
        yield
        return
    layers = [m for m in self.modules() if isinstance(m, MissLayer)]
    known = {a for m in layers for a in m.miss_block}
    num_beams = kwargs.get("num_beams", None)
    fn = "PeftModel.forward"
    names = check_model_names(fn, adapter_names, known, self.training, num_beams)
    handles = register_hooks(layers, names)
    get_encoder = getattr(self.model, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    if len(names) != len(adapter_names) and encoder is not None and encoder is not self.model:
        # Registered after the others, so these hooks have the last word on the encoder's layers.
        original = check_model_names(fn, adapter_names, known, self.training)
        handles += register_hooks([m for m in encoder.modules() if isinstance(m, MissLayer)], original)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
    from peft.tuners.tuners_utils import check_adapters_to_merge

    names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.miss_block]
    if names:
        _core_merge.merge(PeftLayerView(self), names, safe_merge)


def _unmerge(self) -> None:
    _core_merge.unmerge(PeftLayerView(self))


def _get_delta_weight(self, adapter, orig_weight, reverse: bool = False) -> torch.Tensor:
    """PEFT's BAT helper: the delta ``W B + B`` or, with ``reverse``, the unmerged weight."""
    block = self.miss_block[adapter]
    if reverse:
        return MF.bat_unmerge(orig_weight.detach(), block.detach()).to(block.dtype)
    return _core_merge.delta_weight(orig_weight, block, "bat")


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
    model_cls = _peft_miss_model()
    _MODEL_ORIGINALS[_HOOKS] = model_cls.__dict__.get(_HOOKS, _ABSENT)
    setattr(model_cls, _HOOKS, _enable_peft_forward_hooks)
    _SETTINGS["patched"] = True


def unpatch() -> None:
    """Restore PEFT's own methods (idempotent)."""
    _SETTINGS["bat_precision"] = "base"
    if not _ORIGINALS:
        return
    cls = _peft_miss_linear()
    for name, fn in _ORIGINALS.items():
        setattr(cls, name, fn)
    _ORIGINALS.clear()
    model_cls = _peft_miss_model()
    for name, fn in _MODEL_ORIGINALS.items():
        if fn is _ABSENT:
            delattr(model_cls, name)
        else:
            setattr(model_cls, name, fn)
    _MODEL_ORIGINALS.clear()
    _SETTINGS["patched"] = False


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
    return load_adapter(model, path, adapter_name, into_existing=True)
