"""Export a MiSS adapter as a PEFT LoRA adapter, for PEFT and for LoRA serving engines
(docs/MATH.md section 12.3).

Standard and mini MiSS are rank-``r`` LoRA exactly: the block sum is ``x @ F`` with the 0/1
folding matrix ``F[k, c] = [k % r == c]`` (``in % r != 0`` included: the zero padding has no
row), so ``lora_A = F^T`` (``r x in``), ``lora_B`` = the block transposed (``out x r``; mini:
``Dm`` tiled over the ``out / mini_r`` output tiles) and ``lora_alpha = r`` (scale 1).
BAT's delta ``W' - W`` is full-rank in general: it goes through a truncated SVD at a requested
rank or energy, and the error is reported per module.

Works on models made with :func:`miss_ext.inject` and on PEFT models (``PeftModel`` or the model
it wraps) with MiSS adapters; PEFT itself is not needed to export.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn

from . import functional as MF
from ._core_view import view_of
from ._keys import PEFT_PREFIX as PREFIX
from .inject import adapter_layers
from .saving import target_modules, write_adapter

__all__ = ["export_lora"]


def _root(model: nn.Module) -> nn.Module:
    """The model whose module names a saved adapter uses: a PeftModel's wrapped model."""
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        return model.get_base_model()
    return model


def folding_matrix(r: int, in_features: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """``lora_A`` of a standard/mini adapter: ``A[c, k] = 1`` if ``k % r == c`` (``r x in``)."""
    k = torch.arange(in_features, device=device)
    return (k.unsqueeze(0) % r == torch.arange(r, device=device).unsqueeze(1)).to(dtype)


def _exact_pair(block: torch.Tensor, out_f: int, in_f: int):
    r, m = block.shape
    b = block.detach().t()  # (m, r)
    if m != out_f:
        b = b.repeat(out_f // m, 1)  # mini: D[c, o] = Dm[c, o % m]
    return folding_matrix(r, in_f, block.dtype, block.device), b.contiguous()


def _svd_pair(weight: torch.Tensor, block: torch.Tensor, rank: Optional[int], energy: Optional[float]):
    """(A, B, report) of BAT's delta ``W' - W`` truncated to the requested rank/energy."""
    weight = weight.detach()
    acc = torch.float64 if torch.float64 in (weight.dtype, block.dtype) else torch.float32
    w = weight.to(acc)
    delta = MF.bat_transform(w, block.detach().to(acc)) - w
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    power = s.double().pow(2)
    total = power.sum().item()
    full = s.numel()
    k = full
    if energy is not None:
        if total > 0:
            kept = torch.cumsum(power, 0) / total
            k = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1
        else:
            k = 1
    if rank is not None:
        k = min(k, rank)
    k = max(1, min(k, full))
    root = s[:k].sqrt()
    b = u[:, :k] * root  # (out, k)
    a = root.unsqueeze(1) * vh[:k]  # (k, in)
    resid = (delta.double() - b.double() @ a.double()).norm().item()
    dnorm = delta.double().norm().item()
    report = {
        "variant": "bat",
        "rank": k,
        "exact": k == full,
        "energy": (power[:k].sum().item() / total) if total > 0 else 1.0,
        "rel_error": resid / dnorm if dnorm > 0 else 0.0,
        "rel_error_weight": resid / max(w.double().norm().item(), 1e-300),
    }
    return a.to(block.dtype), b.to(block.dtype), report


def export_lora(
    model: nn.Module,
    path: str,
    adapter_name: str = "default",
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    task_type: Optional[str] = None,
) -> dict:
    """Writes MiSS adapter ``adapter_name`` of ``model`` to directory ``path`` as a PEFT LoRA
    adapter (``adapter_model.safetensors`` + ``adapter_config.json``): load it with
    ``PeftModel.from_pretrained(base_model, path)`` or a LoRA serving engine.

    Standard and mini layers are exact (rank ``r``, ``lora_alpha = r``). BAT layers need
    ``rank`` (a cap on the rank) and/or ``energy`` (the smallest rank whose singular values keep
    this share of ``||W' - W||_F^2``); their rank-``k`` SVD factors are written, and with
    different ranks per layer ``rank_pattern``/``alpha_pattern`` keep every scale at 1.
    ``dtype`` casts the saved factors (default: the blocks' dtype).

    Returns a report: ``{"modules": {name: {"variant", "rank", "exact", "energy", "rel_error",
    "rel_error_weight"}}, "max_rel_error": ..., "r": ..., "path": path}`` where ``rel_error`` is
    ``||dW - B A||_F / ||dW||_F`` (0 for standard/mini) and ``rel_error_weight`` the same residual
    over ``||W||_F``. Nothing is written if a check fails."""
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"export_lora: rank must be a positive integer (got {rank!r})")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < float(energy) <= 1.0):
        raise ValueError(f"export_lora: energy must be in (0, 1] (got {energy!r})")
    root = _root(model)
    layers = [(n, m) for n, m in adapter_layers(root) if adapter_name in m.miss_block]
    if not layers:
        known = sorted({a for _, m in adapter_layers(root) for a in m.miss_block})
        raise ValueError(f"export_lora: adapter {adapter_name!r} not found in the model (has {known})")
    if any(not n for n, _ in layers):
        raise ValueError("export_lora needs the model that contains the MiSS layers, not a layer itself")
    for name, layer in layers:
        variant = view_of(layer).variant(adapter_name)
        if variant == "bat":
            if rank is None and energy is None:
                raise ValueError(
                    f"export_lora: {name} holds a BAT adapter, whose delta W' - W is not low-rank; pass "
                    f"rank=... and/or energy=... for its truncated SVD"
                )
            if layer.merged_adapters:
                raise ValueError(
                    f"export_lora: {name} has merged adapters {list(layer.merged_adapters)}; BAT's delta depends "
                    f"on the unmerged base weight: unmerge first"
                )
        if layer.miss_block[adapter_name].is_meta:
            raise ValueError(f"export_lora: {name} is on the meta device; materialise the model first")

    tensors, report, ranks = {}, {}, {}
    for name, layer in layers:
        view = view_of(layer)
        block = layer.miss_block[adapter_name]
        variant = view.variant(adapter_name)
        with torch.no_grad():
            if variant == "bat":
                a, b, info = _svd_pair(view.base_weight(), block, rank, energy)
            else:
                a, b = _exact_pair(block, layer.out_features, layer.in_features)
                info = {"variant": variant, "rank": block.shape[0], "exact": True, "energy": 1.0,
                        "rel_error": 0.0, "rel_error_weight": 0.0}
        save_dtype = dtype or block.dtype
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(save_dtype).cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(save_dtype).cpu().contiguous()
        report[name] = info
        ranks[name] = info["rank"]

    counts: dict = {}
    for k in ranks.values():
        counts[k] = counts.get(k, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(n): k for n, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "lora_dropout": 0.0,
        "target_modules": target_modules(root, [n for n, _ in layers]),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(root, "config", None), "_name_or_path", None) or None,
        "revision": None,
    }
    write_adapter(path, tensors, config)
    errors = [v["rel_error"] for v in report.values()]
    return {
        "modules": report,
        "max_rel_error": max(errors) if errors else 0.0,
        "r": r,
        "path": path,
    }
