"""Errors of one layer case: miss_ext and PEFT against ``miss_ext.reference`` evaluated in float64
on the same (rounded) values, and miss_ext against PEFT. For each of the output ``y``,
``dL/dx`` and ``dL/dblock`` the error is ``max|a - b| / max|b|`` (scale-free, so one threshold
serves every shape); a case's error is the largest of the three.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

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
    from miss_ext import reference as R

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


def errors(setup: LayerSetup) -> Dict[str, float]:
    ours = run_module(setup, setup.modules["ours"])
    peft = run_module(setup, setup.modules["peft"])
    ref = run_reference(setup)
    out = {}
    for t in TENSORS:
        out[f"err_ref_{t}"] = rel_err(ours[t], ref[t])
        out[f"err_peft_{t}"] = rel_err(ours[t], peft[t])
        out[f"peft_err_ref_{t}"] = rel_err(peft[t], ref[t])
    out["err_ref"] = max(out[f"err_ref_{t}"] for t in TENSORS)
    out["err_peft"] = max(out[f"err_peft_{t}"] for t in TENSORS)
    out["peft_err_ref"] = max(out[f"peft_err_ref_{t}"] for t in TENSORS)
    return out
