"""Put MiSS adapters into a model: ``inject`` wraps the targeted ``nn.Linear`` modules in
:class:`~miss_ext.MissLinear` and freezes everything else, choosing targets as PEFT does, so a
``MissConfig``'s ``target_modules`` means the same here. Also model-wide adapter switches and
parameter counts."""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterable, Optional, Union

from torch import nn

from . import _checks
from ._core_variants import (
    InitWeights,
    check_adapter_shape,
    check_bat_precision,
    check_dropout,
    init_block_,
    real_weight,
    variant_of,
)
from ._core_view import view_of
from ._keys import BLOCK, refuse_peft_key
from .layer import MissLinear

Targets = Union[str, Iterable[str]]
ALL_LINEAR = "all-linear"

__all__ = [
    "inject",
    "find_targets",
    "miss_layers",
    "set_adapter",
    "adapters_disabled",
    "trainable_parameters",
    "print_trainable_parameters",
    "reset_adapter_parameters",
    "to_injected_state_dict",
]


def miss_layers(model: nn.Module) -> list[tuple[str, MissLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MissLinear)]


def checked_layers(model: nn.Module, names: Optional[list[str]]) -> list[tuple[str, MissLinear]]:
    """The MissLinear layers of ``model``; raises when it has none or when one of ``names``
    (None: no check) is on no layer."""
    layers = miss_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MissLinear layer; build one with miss_ext.inject")
    if names is not None:
        known = {a for _, layer in layers for a in layer.miss_block}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"adapter(s) {missing} not found in the model (has {sorted(known)})")
    return layers


def _inside_miss_layer(model: nn.Module) -> set[str]:
    """Names of modules inside a MissLinear (its base layer): never targets themselves."""
    inner = set()
    for prefix, layer in miss_layers(model):
        inner.update(f"{prefix}.{sub}" if prefix else sub for sub, _ in layer.named_modules() if sub)
    return inner


def _output_head(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def find_targets(model: nn.Module, target_modules: Targets) -> list[str]:
    """Module names that ``target_modules`` selects, PEFT's way: a string is a regex that must
    match the whole name; a list matches a name exactly or as a dotted suffix; ``"all-linear"``
    is every linear layer except the output head (``get_output_embeddings()``)."""
    if not isinstance(target_modules, str):
        given = target_modules
        try:
            target_modules = list(target_modules)
        except TypeError:
            target_modules = [None]
        if not all(isinstance(k, str) for k in target_modules):
            raise TypeError(
                f"target_modules must be a regex string, 'all-linear' or a list of module names (got {given!r})"
            )
    inner = _inside_miss_layer(model)
    names = [n for n, _ in model.named_modules() if n and n not in inner]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head(model)
        return [
            n for n in names
            if isinstance(model.get_submodule(n), (nn.Linear, MissLinear)) and n != head
        ]
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return [n for n in names if pattern.fullmatch(n)]
    keys = list(target_modules)
    return [n for n in names if n in keys or any(n.endswith("." + k) for k in keys)]


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def inject(
    model: nn.Module,
    target_modules: Targets,
    r: int,
    mini_r: Optional[int] = None,
    init_weights: InitWeights = True,
    miss_dropout: float = 0.0,
    adapter_name: str = "default",
    bat_precision: Optional[str] = None,
) -> nn.Module:
    """Adds adapter ``adapter_name`` to every ``nn.Linear`` that ``target_modules`` selects (a
    layer that is already a MissLinear gets the adapter added) and freezes every non-adapter
    parameter. Every target is checked before the model is touched, so a bad shape or target
    raises with the model unchanged. Returns ``model``.

    As in PEFT, the first adapter is active and trainable; an adapter added to a model that
    already has MiSS adapters is added inactive (frozen): switch with :func:`set_adapter`.

    ``bat_precision`` ("base" or "promote", see :class:`~miss_ext.MissLinear`) is set on every
    targeted layer; ``None`` leaves existing layers as they are and gives new ones "base".
    """
    _checks.adapter_name(adapter_name)
    variant = variant_of(init_weights)
    if bat_precision is not None:
        check_bat_precision(bat_precision)
    check_dropout(miss_dropout)
    mini_r_ = 1 if mini_r is None else mini_r
    targets = find_targets(model, target_modules)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
            f"a list matches names exactly or by '.'-suffix, a string is a full-match regex"
        )
    existing = miss_layers(model)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, MissLinear):
            in_f, out_f, base = module.in_features, module.out_features, module.base_layer
            if adapter_name in module.miss_block:
                raise ValueError(f"{name}: adapter {adapter_name!r} already exists")
        elif isinstance(module, nn.Linear):
            in_f, out_f, base = module.in_features, module.out_features, module
        else:
            raise TypeError(
                f"target {name!r} ({type(module).__name__}) matched {target_modules!r} but is not an "
                f"nn.Linear; MiSS only adapts linear layers"
            )
        try:
            check_adapter_shape(in_f, out_f, r, mini_r_, variant)
            if variant == "bat":
                real_weight(base)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None

    active = existing[0][1].active_adapters if existing else [adapter_name]
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, MissLinear):
            module.update_layer(adapter_name, r, mini_r_, init_weights, miss_dropout)
            if bat_precision is not None:
                module.bat_precision = bat_precision
        else:
            parent, child = _split(model, name)
            layer = MissLinear(module, r, mini_r_, init_weights, miss_dropout, adapter_name,
                               bat_precision=bat_precision or "base")
            layer._set_active(active)
            setattr(parent, child, layer)

    for pname, p in model.named_parameters():
        if ".miss_block." not in f".{pname}":
            p.requires_grad_(False)
    guard_model(model)  # PEFT-format keys given to model.load_state_dict raise, not load nothing
    return model


def _reject_peft_keys_of_model(module, state_dict, prefix, *rest) -> None:
    """load_state_dict pre-hook of a model that holds MissLinear layers: any key
    ``[<anything>.]<path of a MissLinear>.miss_block`` (PEFT's saved files put
    ``base_model.model.`` in front) would match nothing (miss_ext._keys)."""
    suffix = "." + BLOCK
    candidates = [k[len(prefix) : -len(suffix)] for k in state_dict if k.startswith(prefix) and k.endswith(suffix)]
    if not candidates:
        return
    layers = [n for n, _ in miss_layers(module) if n]
    for path in candidates:
        for name in layers:
            if path == name or path.endswith("." + name):
                refuse_peft_key(prefix + path + suffix, prefix + name + suffix)


def guard_model(model: nn.Module) -> None:
    """Registers :func:`_reject_peft_keys_of_model` on ``model`` once."""
    if not getattr(model, "_miss_ext_peft_key_guard", False):
        model.register_load_state_dict_pre_hook(_reject_peft_keys_of_model)
        model._miss_ext_peft_key_guard = True


def set_adapter(model: nn.Module, adapter_names: Union[str, Iterable[str]], inference_mode: bool = False) -> None:
    """Activates ``adapter_names`` on every MissLinear (and makes them the trainable ones).
    Each name must be an adapter of the model (a layer lacking it skips it), listed once."""
    layers = miss_layers(model)
    known = sorted({a for _, layer in layers for a in layer.miss_block})
    names = _checks.adapter_names("set_adapter(model)", adapter_names, known, "in the model")
    for _, layer in layers:
        layer._set_active(names, inference_mode=inference_mode)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with adapters_disabled(model): ...`` runs every base layer alone (merged adapters are
    unmerged first), then re-enables what was enabled."""
    with contextlib.ExitStack() as stack:
        for _, layer in miss_layers(model):
            stack.enter_context(layer.disable_adapter())
        yield model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's ``get_nb_trainable_parameters``."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


# ---------------------------------------------------------------- big-model flows (meta device)


def _peft_miss_layer_type():
    """PEFT's MiSS layer class if PEFT's MiSS is loaded (a model cannot hold its layers
    otherwise), so this module never imports PEFT."""
    module = sys.modules.get("peft.tuners.miss.layer")
    return getattr(module, "MissLayer", None)


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every MiSS layer in ``model``: miss_ext's MissLinear and PEFT's."""
    kinds = (MissLinear,) + tuple(t for t in (_peft_miss_layer_type(),) if t is not None)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def reset_adapter_parameters(model: nn.Module, adapter_names: Optional[Iterable[str]] = None) -> nn.Module:
    """Re-applies the documented init (zeros; PEFT's random init for ``init_weights=False``) to
    the MiSS blocks of ``adapter_names`` (default: all) in every MiSS layer of ``model``, in
    place, for miss_ext's MissLinear and PEFT's MiSS layers alike (for PEFT pass the PeftModel,
    whose ``peft_config`` says each adapter's init). Base weights are not touched.

    The step after ``model.to_empty(device=...)`` on a model whose adapters were added on the
    meta device and are not loaded from a checkpoint: ``to_empty`` leaves every tensor
    uninitialised. Parameters keep their identity, so it works on FSDP2-sharded models. Every
    layer is checked first (unknown or merged adapters raise) so a refusal changes nothing."""
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    names = None if names is None else list(names)
    layers = adapter_layers(model)
    if names is not None:
        known = {a for _, layer in layers for a in layer.miss_block}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"adapter(s) {missing} not found in the model (has {sorted(known)})")
    plan = []
    for lname, layer in layers:
        todo = [a for a in layer.miss_block if names is None or a in names]
        merged = [a for a in todo if a in layer.merged_adapters]
        if merged:
            raise ValueError(f"{lname}: adapter(s) {merged} are merged into the base weight; unmerge before resetting them")
        plan.append((layer, todo))
    for layer, todo in plan:
        view = view_of(layer)
        for a in todo:
            init_block_(layer.miss_block[a], view.init_weights(a, model))
    return model


def to_injected_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """A state dict of the plain model (e.g. the base checkpoint) with the keys of every base
    layer that is now wrapped renamed into the wrapper: ``<layer>.weight`` becomes
    ``<layer>.base_layer.weight`` for each MiSS layer (miss_ext's or PEFT's) of ``model``.
    Other keys, and keys already in that form, are kept; the tensors are not copied.

    For loading base weights after adapters were added (on the meta device, before
    ``fully_shard``), e.g. ``model.load_state_dict(to_injected_state_dict(model, sd),
    strict=False)`` or torch.distributed.checkpoint's ``set_model_state_dict``. For a PeftModel
    pass ``peft_model.get_base_model()`` and load into that."""
    layers = {n for n, _ in adapter_layers(model)}
    out = {}
    for key, value in state_dict.items():
        prefix, rest = key, ""
        while prefix and prefix not in layers:
            prefix, _, last = prefix.rpartition(".")
            rest = f"{last}.{rest}" if rest else last
        if prefix and rest and not rest.startswith(("base_layer.", "miss_block.")):
            key = f"{prefix}.base_layer.{rest}"
        out[key] = value
    return out
