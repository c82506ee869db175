"""Errors of one layer case: miss_ext and PEFT against ``miss_ext.reference`` evaluated in float64
on the same (rounded) values, and miss_ext against PEFT. For each of the output ``y``,
``dL/dx`` and ``dL/dblock`` the error is ``max|a - b| / max|b|`` (scale-free, so one threshold
serves every shape); a case's error is the largest of the three.

The reference takes the values each contestant computes with (x and the weight rounded to the
base dtype, the block in its own dtype, all exactly representable in float64), so in a mixed
case (``bfloat16+float32``) it measures only what the layer's arithmetic adds.

``err_frozen`` is the numeric contract of docs/MATH.md section 11 for the output:
``||y - y_64|| / ||y_frozen - y_frozen64||`` (Frobenius norms), the layer's error against the
float64 reference relative to that of the frozen base layer (``nn.Linear`` in the base dtype,
weight ``W``) on the same x against its own float64 evaluation. 1 means "as accurate as the frozen
layer". A rounding error scales with the value rounded, so an adapter that makes the output larger
than the frozen layer's raises the ratio by as much: ``y_growth = ||y_64|| / ||y_frozen64||`` is
recorded beside it, and for BAT ``w_growth = ||W'|| / ||W||``. The contract for BAT's default
mixed mode (W' rounded once to the base dtype) is ``err_frozen <= 2.5 * max(1, w_growth)``.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from miss_ext import reference as R

from .contestants import LayerSetup

TENSORS = ("y", "gx", "gblock")


def run_module(setup: LayerSetup, module) -> Dict[str, torch.Tensor]:
    x = setup.x
    x.grad = None
    block = module.miss_block["default"]
    block.grad = None
    y = module(x)
    y.backward(setup.grad_out)
    res = {"y": y.detach().clone(), "gx": x.grad.detach().clone(), "gblock": block.grad.detach().clone()}
    x.grad = None
    block.grad = None
    return res


def run_reference(setup: LayerSetup, dtype=torch.float64) -> Dict[str, torch.Tensor]:
    x = setup.x.detach().to(dtype).requires_grad_(True)
    w = setup.base.weight.detach().to(dtype)
    b = setup.base.bias.detach().to(dtype) if setup.base.bias is not None else None
    block = setup.block.detach().to(dtype).requires_grad_(True)
    v = setup.case.variant
    if v == "bat":
        y = R.bat_linear(x, w, b, block)
    else:
        base_out = F.linear(x, w, b)
        y = (R.mini_forward if v == "mini" else R.miss_forward)(x, base_out, block)
    y.backward(setup.grad_out.detach().to(dtype))
    return {"y": y.detach(), "gx": x.grad, "gblock": block.grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    if a64.shape != b64.shape:
        return math.inf
    if a64.numel() == 0:
        return 0.0
    if not torch.isfinite(a64).all():
        return math.inf
    scale = b64.abs().max().item()
    diff = (a64 - b64).abs().max().item()
    return diff / scale if scale > 0 else diff


def frozen_outputs(setup: LayerSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y_frozen, y_frozen64)``: the frozen base layer on x, in its dtype and in float64."""
    x = setup.x.detach()
    with torch.no_grad():
        y = setup.base(x)
        b = setup.base.bias.detach().double() if setup.base.bias is not None else None
        y64 = F.linear(x.double(), setup.base.weight.detach().double(), b)
    return y, y64


def weight_growth(setup: LayerSetup) -> float:
    """BAT: ``||W'|| / ||W||`` in float64, W' the transformed weight; NaN for the other variants."""
    if setup.case.variant != "bat":
        return math.nan
    w = setup.base.weight.detach().double()
    return (R.bat_transform(w, setup.block.detach().double()).norm() / w.norm()).item()


def err_over_frozen(y: torch.Tensor, y64: torch.Tensor, frozen_norm: float) -> float:
    """NaN when the frozen layer is exact (a float64 case): no scale to compare with."""
    num = (y.detach().double() - y64.double()).norm().item()
    if not math.isfinite(num):
        return math.inf
    return num / frozen_norm if frozen_norm > 0 else math.nan


def errors(setup: LayerSetup) -> Dict[str, float]:
    ours = run_module(setup, setup.modules["ours"])
    peft = run_module(setup, setup.modules["peft"])
    ref = run_reference(setup)
    y_frozen, y_frozen64 = frozen_outputs(setup)
    frozen = (y_frozen.double() - y_frozen64).norm().item()
    out = {
        "err_frozen": err_over_frozen(ours["y"], ref["y"], frozen),
        "peft_err_frozen": err_over_frozen(peft["y"], ref["y"], frozen),
        "y_growth": (ref["y"].norm() / y_frozen64.norm()).item(),
        "w_growth": weight_growth(setup),
    }
    for t in TENSORS:
        out[f"err_ref_{t}"] = rel_err(ours[t], ref[t])
        out[f"err_peft_{t}"] = rel_err(ours[t], peft[t])
        out[f"peft_err_ref_{t}"] = rel_err(peft[t], ref[t])
    out["err_ref"] = max(out[f"err_ref_{t}"] for t in TENSORS)
    out["err_peft"] = max(out[f"err_peft_{t}"] for t in TENSORS)
    out["peft_err_ref"] = max(out[f"peft_err_ref_{t}"] for t in TENSORS)
    return out
