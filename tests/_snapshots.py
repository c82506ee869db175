"""Snapshots and checks for the bad-input tests: a bad call must raise an error naming the
argument and the rule, and leave every input tensor (and every parameter, buffer and adapter
setting of a layer) bit-for-bit as it was, NaN payloads included (the comparison is on the raw
bytes)."""

from __future__ import annotations

import copy

import pytest
import torch

import miss_ext


def _bytes(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.numel() else t.to(torch.uint8)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, device and bytes (so NaN == NaN with the same payload)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_meta:
        return True
    return torch.equal(_bytes(a), _bytes(b))


def snapshot_tensors(tensors):
    return [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in tensors]


def layer_state(layer: miss_ext.MissLinear):
    return dict(
        state=copy.deepcopy(layer.state_dict(keep_vars=False)),
        merged=list(layer.merged_adapters),
        active=list(layer.active_adapters),
        variant=dict(layer.miss_variant),
        r=dict(layer.miss_r),
        mini_r=dict(layer.miss_mini_r),
        dropout=dict(layer.miss_dropout_p),
        grad=[(n, p.requires_grad) for n, p in layer.named_parameters()],
        disabled=layer.disable_adapters,
    )


def assert_layer_unchanged(layer, before):
    after = layer_state(layer)
    assert list(after["state"]) == list(before["state"]), "state_dict keys changed"
    for k, v in before["state"].items():
        assert bit_equal(after["state"][k], v), f"{k} changed"
    # The state dict survives torch.equal as well (NaN-aware: NaN positions equal, rest equal).
    for k, v in before["state"].items():
        w = after["state"][k]
        if not v.is_meta and v.is_floating_point():
            assert torch.equal(v.isnan(), w.isnan()) and torch.equal(v.nan_to_num(), w.nan_to_num()), k
    for key in ("merged", "active", "variant", "r", "mini_r", "dropout", "grad", "disabled"):
        assert after[key] == before[key], f"{key}: {before[key]} -> {after[key]}"


def check_raises(call, exc, needles):
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message: {msg}"
    return msg


def check_fails_unchanged(fn, inputs, exc, needles):
    """``fn(*inputs)`` raises ``exc`` naming ``needles``, and every input tensor keeps its bits."""
    before = snapshot_tensors(inputs)
    check_raises(lambda: fn(*inputs), exc, needles)
    for a, b in zip(inputs, before):
        if isinstance(a, torch.Tensor):
            assert bit_equal(a, b), "an input tensor was modified by a failing call"
