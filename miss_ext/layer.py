"""``MissLinear``: a frozen linear layer with MiSS adapters on the miss_ext kernels.

Parameter names and shapes follow PEFT's ``MissLinear`` (``base_layer.*``,
``miss_block.<adapter>``), as in a live PEFT model's ``state_dict()``. PEFT's saved adapter files
drop the adapter name (``...miss_block``): :func:`miss_ext.load_adapter` loads them, and
``load_state_dict`` given such keys raises rather than silently loading nothing.

Unlike PEFT, the variant is stored per adapter, so standard, mini and BAT adapters can share
a layer. With several active adapters the layer computes (docs/MATH.md section 5)::

    y = x W'^T + b + sum over active standard/mini adapters of their terms

where ``W'`` is the base weight after every active BAT adapter's transform, in the order of
``active_adapters``. Merging keeps that meaning (miss_ext._core_merge). The computation itself
is the core's (forward, mixed batches, merging), shared with PEFT's layers under
:mod:`miss_ext.peft`; this module holds the adapters' bookkeeping.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from . import _checks, _core_forward, _core_merge, _core_mixed
from . import functional as MF
from ._core_variants import (  # noqa: F401  (VARIANTS, INIT_WEIGHTS, BAT_PRECISIONS: the table, importable from here too)
    BAT_PRECISIONS,
    INIT_WEIGHTS,
    VARIANTS,
    InitWeights,
    adapter_dtype,
    check_adapter_shape,
    check_bat_precision,
    check_dropout,
    features_of,
    init_block_,
    new_block,
    real_weight,
    variant_of,
)
from ._core_view import MissLinearView
from ._keys import reject_peft_keys


class MissLinear(nn.Module):
    """A frozen ``base_layer`` plus MiSS adapters.

    Args:
        base_layer: any module with ``in_features``/``out_features`` (called as a black box for
            the standard and mini variants); BAT and merging also need a real ``weight``.
        r: block size.
        mini_r: width of the shared block for ``init_weights="mini"`` (``None``: PEFT's default, 1).
        init_weights: ``True`` (standard, zeros), ``False`` (standard, random), ``"bat"``, ``"mini"``.
        miss_dropout: dropout on the adapter branch's input (standard and mini only, as in PEFT).
        adapter_name: name of the first adapter, which is active and trainable.
        bat_precision: how BAT adapters compute when their blocks are wider than the base (fp32
            blocks on a bf16/fp16 model): ``"base"`` (default) runs the GEMMs in the base dtype on
            ``W'`` formed in fp32 and rounded once (fast; the error bound is in docs/MATH.md);
            ``"promote"`` reproduces PEFT's promotion to fp32 GEMMs exactly (slow).

    New blocks take the base weight's device and are fp32 (fp64 on an fp64 base), as with
    PEFT's ``get_peft_model``; ``.to()`` them for other dtypes. On a meta base (a model built
    under ``torch.device("meta")``) the blocks are meta too; after ``to_empty`` call
    :meth:`reset_parameters` (or load them) since ``to_empty`` leaves them uninitialised.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 64,
        mini_r: Optional[int] = None,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
        adapter_name: str = "default",
        bat_precision: str = "base",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = features_of(base_layer)
        self.bat_precision = check_bat_precision(bat_precision)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.miss_block = nn.ParameterDict()
        self.register_load_state_dict_pre_hook(reject_peft_keys)  # PEFT file keys never match
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_dropout_p: dict[str, float] = {}
        self.miss_variant: dict[str, str] = {}
        self.miss_init_weights: dict[str, InitWeights] = {}
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self.update_layer(adapter_name, r, mini_r, init_weights, miss_dropout)

    # ------------------------------------------------------------ adapters

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        mini_r: Optional[int] = None,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
        inference_mode: bool = False,
    ) -> None:
        """Adds (or replaces) adapter ``adapter_name``; every check runs before any change.
        As in PEFT the adapter is trainable only if it is active."""
        _checks.adapter_name(adapter_name)
        variant = variant_of(init_weights)
        mini_r = 1 if mini_r is None else mini_r
        check_adapter_shape(self.in_features, self.out_features, r, mini_r, variant)
        p = check_dropout(miss_dropout)
        if variant == "bat":
            real_weight(self.base_layer)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before replacing it")
        w = getattr(self.base_layer, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else None
        block = new_block(
            self.in_features, self.out_features, r, mini_r, init_weights, adapter_dtype(self.base_layer), device
        )
        self.miss_block[adapter_name] = nn.Parameter(block)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_dropout_p[adapter_name] = p
        self.miss_variant[adapter_name] = variant
        self.miss_init_weights[adapter_name] = init_weights
        self._set_active(self.active_adapters, inference_mode=inference_mode)

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        mini_r: Optional[int] = None,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
    ) -> None:
        """Like :meth:`update_layer`, but refuses to replace an existing adapter."""
        if adapter_name in self.miss_block:
            raise ValueError(f"adapter {adapter_name!r} already exists; use update_layer() to replace it")
        self.update_layer(adapter_name, r, mini_r, init_weights, miss_dropout)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    def set_adapter(self, adapter_names: Union[str, Iterable[str]], inference_mode: bool = False) -> None:
        """Activates ``adapter_names`` (in this order: it is the BAT composition order) and, as
        PEFT does, makes exactly those trainable unless ``inference_mode``. Every name must be an
        adapter of this layer, listed once; an empty list activates none (the base alone)."""
        names = _checks.adapter_names(
            "MissLinear.set_adapter", adapter_names, self.miss_block.keys(), "on this layer"
        )
        self._set_active(names, inference_mode)

    def _set_active(self, names: list[str], inference_mode: bool = False) -> None:
        """Unchecked ``set_adapter``: in a model, the active list may name adapters that other
        layers have and this one lacks (as in PEFT; forward skips them)."""
        for key, block in self.miss_block.items():
            block.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.miss_block:
            raise ValueError(f"no adapter {adapter_name!r} on this layer (has {list(self.miss_block)})")
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"adapter {adapter_name!r} is merged into the base weight; unmerge() before deleting it"
            )
        for d in (self.miss_block, self.miss_r, self.miss_mini_r, self.miss_dropout_p, self.miss_variant, self.miss_init_weights):
            del d[adapter_name]
        active = [a for a in self._active_adapter if a != adapter_name]
        if not active and adapter_name in self._active_adapter and len(self.miss_block):
            active = [sorted(self.miss_block)[0]]  # PEFT's choice: deterministic across layers
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {active[0]}.")
        self._set_active(active)

    def reset_parameters(self, adapter_names: Optional[Iterable[str]] = None) -> None:
        """Re-applies the documented init of ``adapter_names`` (default: every adapter) in place:
        zeros, or PEFT's random init for ``init_weights=False``. The parameters stay the same
        objects (FSDP2 shards and optimizers keep them); the base layer is not touched.

        This is the step after ``model.to_empty(device=...)``, which leaves every tensor
        uninitialised; loops that call ``reset_parameters()`` on each module (as FSDP's meta
        init does) reach it. Refused while an adapter to reset is merged."""
        if adapter_names is None:
            names = list(self.miss_block)
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.miss_block]
        if unknown:
            raise ValueError(f"cannot reset unknown adapter(s) {unknown} (has {list(self.miss_block)})")
        merged = [n for n in names if n in self.merged_adapters]
        if merged:
            raise ValueError(f"adapter(s) {merged} are merged into the base weight; unmerge() before resetting them")
        for n in names:
            init_block_(self.miss_block[n], self.miss_init_weights[n])

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch; disabling unmerges first, so the base layer alone is what runs."""
        if enabled:
            self._set_active(self.active_adapters)
            self._disable_adapters = False
        else:
            if self.merged:
                self.unmerge()
            for block in self.miss_block.values():
                block.requires_grad_(False)
            self._disable_adapters = True

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with layer.disable_adapter(): ...`` runs the base layer alone, then restores."""
        was_disabled = self._disable_adapters
        grads = {k: b.requires_grad for k, b in self.miss_block.items()}
        self.enable_adapters(False)
        try:
            yield self
        finally:
            self._disable_adapters = was_disabled
            for k, b in self.miss_block.items():
                b.requires_grad_(grads.get(k, False))

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def base_weight(self) -> torch.Tensor:
        return real_weight(self.base_layer)

    # ------------------------------------------------------------ merging

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merges ``adapter_names`` (default: the active ones not yet merged) into the base weight
        (docs/MATH.md section 6). The new weight is computed out of place and copied in only when
        every step succeeded, so a failed safe merge leaves the weight bit-for-bit unchanged."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = MissLinearView(self).active() if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.miss_block]
        if unknown:
            raise ValueError(f"cannot merge unknown adapter(s) {unknown} (has {list(self.miss_block)})")
        # Merging is idempotent per adapter (merged ones are skipped), so a repeated name merges once.
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            if self.merged:
                warnings.warn("All adapters are already merged, nothing to do.")
            return
        _core_merge.merge(MissLinearView(self), names, safe_merge)

    def unmerge(self) -> None:
        """Takes every merged adapter out, last merged first. A singular BAT ``I + B_i`` raises
        and leaves the weight and ``merged_adapters`` as they were."""
        _core_merge.unmerge(MissLinearView(self))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``dW`` that merging ``adapter_name`` alone adds to the current base weight
        (for BAT it depends on that weight: ``W B_i + B_i`` per block)."""
        _checks.adapter_names("MissLinear.get_delta_weight", adapter_name, self.miss_block.keys(), "on this layer")
        block = self.miss_block[adapter_name]
        variant = self.miss_variant[adapter_name]
        if variant == "bat":
            return _core_merge.delta_weight(self.base_weight(), block, variant)
        return MF.miss_delta_weight(block, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs) -> torch.Tensor:
        """``adapter_names`` (inference only): one adapter name per sample (the first dim of
        ``x``), ``"__base__"`` for the base layer alone; see :mod:`miss_ext.serving`."""
        if adapter_names is not None:
            return _core_mixed.forward(MissLinearView(self), x, adapter_names, args, kwargs)
        return _core_forward.forward(MissLinearView(self), x, args, kwargs)

    def extra_repr(self) -> str:
        parts = [
            f"{n}: {self.miss_variant[n]} r={self.miss_r[n]}"
            + (f" mini_r={self.miss_mini_r[n]}" if self.miss_variant[n] == "mini" else "")
            + (f" dropout={self.miss_dropout_p[n]}" if self.miss_dropout_p[n] else "")
            for n in self.miss_block
        ]
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{'; '.join(parts)}]"
