"""Saving and loading adapters in PEFT's file format (``adapter_model.safetensors`` +
``adapter_config.json``), for models built with :func:`miss_ext.inject`:
``peft.PeftModel.from_pretrained`` loads what :func:`save_adapter` writes and
:func:`load_adapter` loads what PEFT's ``save_pretrained`` writes. PEFT is never imported here.
:mod:`miss_ext.export` writes LoRA adapters with the same writer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from torch import nn

from ._core_variants import INIT_WEIGHTS, block_shape, check_adapter_shape, variant_of
from ._keys import module_of_peft_key, peft_key
from .inject import checked_layers, find_targets, inject, miss_layers
from .layer import MissLinear

__all__ = ["save_adapter", "load_adapter", "write_adapter", "target_modules", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def _adapter_settings(layers: list[tuple[str, MissLinear]], adapter_name: str) -> dict:
    """The one (r, mini_r, variant, dropout) that every layer with ``adapter_name`` shares:
    PEFT's config holds one of each."""
    seen = {}
    for name, layer in layers:
        variant = layer.miss_variant[adapter_name]
        key = (layer.miss_r[adapter_name], layer.miss_mini_r[adapter_name] if variant == "mini" else 1,
               variant, layer.miss_dropout_p[adapter_name])
        seen.setdefault(key, []).append(name)
    if len(seen) > 1:
        described = "; ".join(f"r={r}, mini_r={m}, {v}, dropout={p}: {names[:3]}" for (r, m, v, p), names in seen.items())
        raise ValueError(
            f"adapter {adapter_name!r} has different settings on different layers ({described}); "
            f"PEFT's adapter_config.json holds one r, mini_r, variant and dropout per adapter"
        )
    (r, mini_r, variant, p), = seen
    return {"r": r, "mini_r": mini_r, "init_weights": INIT_WEIGHTS[variant], "miss_dropout": p}


def save_adapter(model: nn.Module, path: str, adapter_name: str = "default", task_type: Optional[str] = None) -> None:
    """Writes adapter ``adapter_name`` of an injected ``model`` to directory ``path`` in PEFT's
    format: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.miss_block``) and
    ``adapter_config.json`` (a ``MissConfig`` whose ``target_modules`` are the adapted modules'
    full names). Load it with :func:`load_adapter` or ``PeftModel.from_pretrained(model, path)``
    on the plain model. Blocks are saved as they are, merged or not."""
    layers = [(n, m) for n, m in checked_layers(model, None) if adapter_name in m.miss_block]
    if not layers:
        known = sorted({a for _, m in miss_layers(model) for a in m.miss_block})
        raise ValueError(f"adapter {adapter_name!r} not found in the model (has {known})")
    if any(not n for n, _ in layers):
        raise ValueError("save_adapter needs the model that contains the MissLinear layers, not a MissLinear itself")
    config = {
        "peft_type": "MISS",
        **_adapter_settings(layers, adapter_name),
        "target_modules": target_modules(model, [n for n, _ in layers]),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none",
        "modules_to_save": None,
        "task_type": task_type,
        "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "revision": None,
    }
    tensors = {peft_key(n): m.miss_block[adapter_name].detach().cpu().contiguous() for n, m in layers}
    write_adapter(path, tensors, config)


def write_adapter(path: str, tensors: dict, config: dict) -> None:
    """``tensors`` and ``config`` as PEFT writes an adapter: ``adapter_model.safetensors`` and
    ``adapter_config.json`` in directory ``path``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_weights(path: str) -> dict:
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    legacy = os.path.join(path, _LEGACY_WEIGHTS_NAME)
    if os.path.exists(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {_LEGACY_WEIGHTS_NAME}")


def _read_config(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not an adapter saved by PEFT or miss_ext")
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "MISS":
        raise ValueError(f"{path} holds a {cfg.get('peft_type')} adapter, not MiSS")
    unsupported = {k: cfg.get(k) for k in ("exclude_modules", "layers_to_transform", "modules_to_save") if cfg.get(k)}
    if cfg.get("bias", "none") != "none":
        unsupported["bias"] = cfg["bias"]
    if unsupported:
        raise NotImplementedError(f"load_adapter does not handle these MissConfig options: {unsupported}")
    return cfg


def _exactly(names: list[str]) -> str:
    """A target_modules regex that selects exactly ``names`` (a list also selects dotted suffixes)."""
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def target_modules(model: nn.Module, names: list[str]):
    """``names`` as PEFT's ``target_modules``: the list itself, unless some module not in it ends
    in ``.<name>`` (a list entry would select it too); then an exact regex."""
    chosen = set(names)
    others = [n for n, _ in model.named_modules() if n and n not in chosen]
    if any(o.endswith("." + n) for o in others for n in names):
        return _exactly(sorted(names))
    return sorted(names)


def load_adapter(
    model: nn.Module,
    path: str,
    adapter_name: str = "default",
    is_trainable: bool = True,
    into_existing: bool = False,
) -> nn.Module:
    """Adds adapter ``adapter_name`` from directory ``path`` (saved by PEFT's ``save_pretrained``
    or :func:`save_adapter`) to ``model``: a plain model (the one PEFT wrapped) or one already
    injected. The adapter is injected with the saved config, then its blocks are loaded.

    Strict: every saved block must have a target module with its shape and every target a
    saved block; anything else raises before the model is touched. As with :func:`inject`, the
    adapter is active if the model had no MiSS adapter yet (else add it to ``set_adapter``);
    ``is_trainable=False`` freezes its blocks. Returns ``model``.

    An adapter of that name already on a target raises, unless ``into_existing`` and every target
    has it with the saved shapes: the blocks are then loaded into it (a model injected on the
    meta device and materialised with ``to_empty``). Targets still on the meta device are
    refused: loaded values would be dropped there."""
    cfg = _read_config(path)
    weights = _read_weights(path)
    blocks, unknown = {}, []
    for key, value in weights.items():
        module = module_of_peft_key(key)
        (unknown.append(key) if module is None else blocks.__setitem__(module, value))
    if unknown:
        raise ValueError(
            f"{path}: keys {unknown[:5]} are not MiSS blocks in PEFT's format "
            f"('base_model.model.<module>.miss_block'); nothing was loaded"
        )
    if not cfg.get("target_modules"):
        raise ValueError(f"{path}/{CONFIG_NAME} names no target_modules; nothing was loaded")
    targets = find_targets(model, cfg["target_modules"])
    if set(blocks) != set(targets):
        raise ValueError(
            f"{path} does not match the model: saved blocks without a target module "
            f"{sorted(set(blocks) - set(targets))[:5]}, target modules without a saved block "
            f"{sorted(set(targets) - set(blocks))[:5]}; nothing was loaded"
        )
    meta = [t for t in targets if any(p.is_meta for p in model.get_submodule(t).parameters())]
    if meta:
        raise ValueError(
            f"{meta[0]} is on the meta device, where loaded values would be dropped; materialise the "
            f"model first (model.to_empty(device=...) and load the base weights); nothing was loaded"
        )
    existing = [isinstance(model.get_submodule(t), MissLinear) and adapter_name in model.get_submodule(t).miss_block
                for t in targets]
    if into_existing and all(existing):
        wrong = [(t, tuple(model.get_submodule(t).miss_block[adapter_name].shape), tuple(blocks[t].shape))
                 for t in targets if model.get_submodule(t).miss_block[adapter_name].shape != blocks[t].shape]
        if wrong:
            raise ValueError(f"adapter {adapter_name!r} exists with other shapes than in {path}: "
                             f"(module, model, checkpoint) {wrong[:3]}; nothing was loaded")
        _copy_blocks(model, targets, blocks, adapter_name, is_trainable)
        return model
    r, init = cfg["r"], cfg.get("init_weights", True)
    mini_r = cfg.get("mini_r", 1)
    variant = variant_of(init)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, MissLinear) and adapter_name in module.miss_block:
            raise ValueError(f"{name}: adapter {adapter_name!r} already exists; pass another adapter_name")
        if not isinstance(module, (nn.Linear, MissLinear)):
            continue  # inject names the problem
        in_f, out_f = module.in_features, module.out_features
        check_adapter_shape(in_f, out_f, r, mini_r, variant)
        want = block_shape(in_f, out_f, r, mini_r, variant)
        if tuple(blocks[name].shape) != want:
            raise ValueError(
                f"{path}: the block of {name} has shape {tuple(blocks[name].shape)}, but r={r}, "
                f"mini_r={mini_r}, init_weights={init!r} on a {in_f} -> {out_f} layer needs {want}; "
                f"nothing was loaded"
            )
    inject(model, _exactly(targets), r=r, mini_r=mini_r, init_weights=init,
           miss_dropout=cfg.get("miss_dropout", 0.0), adapter_name=adapter_name)
    _copy_blocks(model, targets, blocks, adapter_name, is_trainable)
    return model


def _copy_blocks(model: nn.Module, targets: list[str], blocks: dict, adapter_name: str, is_trainable: bool) -> None:
    with torch.no_grad():
        for name in targets:
            block = model.get_submodule(name).miss_block[adapter_name]
            block.copy_(blocks[name])
            if not is_trainable:
                block.requires_grad_(False)
