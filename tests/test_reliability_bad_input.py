"""Bad input, nothing lost (issue #6).

A table of bad calls (integer/bool tensors, mismatched dtypes and devices, wrong ranks, r <= 0,
r > in_features, BAT/mini shapes that do not divide, meta tensors, merging a meta model, a base
without `weight` for BAT, NaN/Inf in a safe merge, a singular I + B_i in a BAT unmerge, ...). Each must raise an
error whose message names the argument and the rule, and afterwards every input tensor, and
every parameter and buffer of the layer (and its adapter bookkeeping), must be bit-for-bit
what it was before (NaN payloads included: the comparison is on the raw bytes).

Device mismatch is tested against the "meta" device on every machine, and against CUDA when a
CUDA build and device are present (skipped with a reason otherwise).

NaN/Inf in an ordinary forward (and backward) propagate exactly as in the reference: the
isnan/isinf masks of the output and of the gradients must match, nothing silently zeroed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import miss_ext
from miss_ext import functional as MF
from miss_ext import reference as ref

from conftest import HAS_CUDA

ops = torch.ops.miss_ext
SEED = torch.tensor([7], dtype=torch.int64)


# ---------------------------------------------------------------- snapshots


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


# ---------------------------------------------------------------- operator table

# (id, inputs factory, call(*inputs), exception, substrings the message must contain)
W8, B2 = (lambda: torch.randn(8, 8)), (lambda: torch.randn(2, 4, 4) * 0.1)
W12 = lambda: torch.randn(12, 8)  # noqa: E731

OP_CASES = [
    # integer or bool tensors
    ("blocksum-int", lambda: [torch.arange(16).reshape(2, 8)], lambda x: ops.blocksum(x, 4),
     RuntimeError, ["miss_ext.blocksum", "'x'", "must be float32, float64, bfloat16 or float16", "Long"]),
    ("blocksum-bool", lambda: [torch.ones(2, 8, dtype=torch.bool)], lambda x: ops.blocksum(x, 4),
     RuntimeError, ["'x'", "must be float32", "Bool"]),
    ("blocksum_dropout-int", lambda: [torch.ones(2, 8, dtype=torch.int32)], lambda x: ops.blocksum_dropout(x, 4, 0.5, SEED),
     RuntimeError, ["'x'", "must be float32"]),
    ("tile-int", lambda: [torch.ones(2, 4, dtype=torch.int64)], lambda s: ops.tile(s, 8),
     RuntimeError, ["miss_ext.tile", "'s'", "must be float32"]),
    ("tile_add-bool", lambda: [torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 4)], ops.tile_add,
     RuntimeError, ["'base'", "must be float32"]),
    ("bat_transform-int-block", lambda: [W8(), torch.zeros(2, 4, 4, dtype=torch.int32)], ops.bat_transform,
     RuntimeError, ["'block'", "must be float32"]),
    ("bat_block_grad-int", lambda: [torch.ones(8, 8, dtype=torch.int16), W8()], lambda g, w: ops.bat_block_grad(g, w, 4),
     RuntimeError, ["'grad'", "must be float32"]),
    ("bat_weight_grad-bool", lambda: [W8(), torch.zeros(2, 4, 4, dtype=torch.bool)], ops.bat_weight_grad,
     RuntimeError, ["'block'", "must be float32"]),
    ("bat_linear-int-x", lambda: [torch.ones(2, 8, dtype=torch.int32), W8(), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
     RuntimeError, ["'x'", "must be float32"]),
    ("bat_unmerge-int", lambda: [torch.ones(8, 8, dtype=torch.int64), B2()], ops.bat_unmerge,
     RuntimeError, ["'weight'", "must be float32"]),
    ("miss_merge-int-block", lambda: [W8(), torch.ones(2, 8, dtype=torch.int64)], lambda w, b: ops.miss_merge(w, b, 1.0),
     RuntimeError, ["'block'", "must be float32"]),
    # mismatched dtypes
    # mismatched dtypes: the block side may be wider than the activation side (mixed
    # precision), never narrower
    ("tile_add-dtypes", lambda: [torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 4)], ops.tile_add,
     RuntimeError, ["'s'", "base's dtype", "wider float"]),
    ("bat_linear-dtypes", lambda: [torch.randn(2, 8, dtype=torch.float64), W8(), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
     RuntimeError, ["every block", "x's dtype", "wider float"]),
    # wrong ranks
    ("blocksum-scalar", lambda: [torch.tensor(1.0)], lambda x: ops.blocksum(x, 1),
     RuntimeError, ["'x'", "at least 1 dimension"]),
    ("tile-scalar", lambda: [torch.tensor(1.0)], lambda s: ops.tile(s, 4),
     RuntimeError, ["'s'", "at least 1 dimension"]),
    ("tile_add-ranks", lambda: [torch.randn(2, 3, 8), torch.randn(6, 4)], ops.tile_add,
     RuntimeError, ["'base'", "'s'", "same leading dimensions"]),
    ("bat_transform-1d-weight", lambda: [torch.randn(8), B2()], ops.bat_transform,
     RuntimeError, ["'weight'", "must be 2-D"]),
    ("bat_transform-2d-block", lambda: [W8(), torch.randn(4, 4)], ops.bat_transform,
     RuntimeError, ["'block'", "must be 3-D"]),
    ("bat_block_grad-3d", lambda: [torch.randn(2, 8, 8), torch.randn(2, 8, 8)], lambda g, w: ops.bat_block_grad(g, w, 4),
     RuntimeError, ["'grad'", "must be 2-D"]),
    ("bat_linear-3d-weight", lambda: [torch.randn(2, 8), torch.randn(1, 8, 8), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
     RuntimeError, ["'weight'", "must be 2-D"]),
    ("miss_merge-3d-block", lambda: [W8(), torch.randn(2, 4, 4)], lambda w, b: ops.miss_merge(w, b, 1.0),
     RuntimeError, ["'block'", "must be 2-D"]),
    ("miss_merge-1d-weight", lambda: [torch.randn(8), torch.randn(2, 8)], lambda w, b: ops.miss_merge(w, b, 1.0),
     RuntimeError, ["'weight'", "must be 2-D"]),
    # r <= 0
    ("blocksum-r0", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum(x, 0),
     RuntimeError, ["'r'", "must be a positive integer", "got 0"]),
    ("blocksum-rneg", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum(x, -4),
     RuntimeError, ["'r'", "must be a positive integer", "got -4"]),
    ("blocksum_dropout-r0", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum_dropout(x, 0, 0.5, SEED),
     RuntimeError, ["'r'", "must be a positive integer"]),
    ("tile-r0", lambda: [torch.randn(2, 0)], lambda s: ops.tile(s, 8),
     RuntimeError, ["'s'", "non-empty last dimension"]),
    ("tile-features-neg", lambda: [torch.randn(2, 4)], lambda s: ops.tile(s, -1),
     RuntimeError, ["'features'", "must be >= 0"]),
    ("bat_block_grad-r0", lambda: [W8(), W8()], lambda g, w: ops.bat_block_grad(g, w, 0),
     RuntimeError, ["'r'", "must be a positive integer"]),
    ("bat_transform-r0", lambda: [torch.randn(0, 8), torch.randn(0, 0, 0)], ops.bat_transform,
     RuntimeError, ["'block.shape[1]'", "must be a positive integer"]),
    ("miss_merge-r0", lambda: [W8(), torch.randn(0, 8)], lambda w, b: ops.miss_merge(w, b, 1.0),
     RuntimeError, ["'block.shape[0]'", "must be a positive integer"]),
    # BAT / mini shapes that do not divide
    ("bat_transform-in-indivisible", lambda: [torch.randn(8, 10), B2()], ops.bat_transform,
     RuntimeError, ["divisible by r", "r = 4"]),
    ("bat_transform-out-indivisible", lambda: [torch.randn(6, 8), torch.randn(1, 4, 4)], ops.bat_transform,
     RuntimeError, ["divisible by r"]),
    ("bat_transform-nonsquare", lambda: [W8(), torch.randn(2, 4, 2)], ops.bat_transform,
     RuntimeError, ["'block'", "square r x r"]),
    ("bat_transform-nblocks", lambda: [W8(), torch.randn(4, 4, 4)], ops.bat_transform,
     RuntimeError, ["'block'", "out_features / r = 2", "got 4"]),
    ("bat_block_grad-indivisible", lambda: [torch.randn(8, 6), torch.randn(8, 6)], lambda g, w: ops.bat_block_grad(g, w, 4),
     RuntimeError, ["divisible by r"]),
    ("bat_block_grad-shapes", lambda: [W8(), torch.randn(8, 4)], lambda g, w: ops.bat_block_grad(g, w, 4),
     RuntimeError, ["'grad'", "'weight'", "same shape"]),
    ("bat_weight_grad-indivisible", lambda: [torch.randn(8, 6), B2()], ops.bat_weight_grad,
     RuntimeError, ["divisible by r"]),
    ("bat_unmerge-indivisible", lambda: [torch.randn(8, 6), B2()], ops.bat_unmerge,
     RuntimeError, ["divisible by r"]),
    ("bat_linear-x-features", lambda: [torch.randn(2, 6), W8(), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
     RuntimeError, ["'x'", "must end in in_features = 8"]),
    ("bat_linear-bias", lambda: [torch.randn(2, 8), W8(), torch.randn(4), B2()], lambda x, w, bias, b: ops.bat_linear(x, w, bias, [b]),
     RuntimeError, ["'bias'", "(out_features,)"]),
    ("bat_linear-no-blocks", lambda: [torch.randn(2, 8), W8()], lambda x, w: ops.bat_linear(x, w, None, []),
     RuntimeError, ["'blocks'", "at least one"]),
    ("miss_merge-mini-indivisible", lambda: [W8(), torch.randn(2, 3)], lambda w, b: ops.miss_merge(w, b, 1.0),
     RuntimeError, ["out_features (8)", "divisible by block.shape[1] (3"]),
    ("mini_forward-indivisible", lambda: [torch.randn(2, 8), torch.randn(2, 6), torch.randn(4, 4)], MF.mini_forward,
     ValueError, ["out_features (6)", "divisible by", "mini_r (4)"]),
    # dropout arguments
    ("blocksum_dropout-p", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum_dropout(x, 4, 1.5, SEED),
     RuntimeError, ["'p'", "must be in [0, 1]"]),
    ("blocksum_dropout-p-neg", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum_dropout(x, 4, -0.1, SEED),
     RuntimeError, ["'p'", "must be in [0, 1]"]),
    ("tile_dropout-seed", lambda: [torch.randn(2, 4)], lambda s: ops.tile_dropout(s, 8, 0.5, torch.tensor([1.0])),
     RuntimeError, ["'seed'", "CPU int64 tensor with one element"]),
    ("blocksum_dropout-seed-2", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum_dropout(x, 4, 0.5, torch.tensor([1, 2])),
     RuntimeError, ["'seed'", "one element"]),
    # the fused frozen linear + standard/mini adapter
    ("miss_linear-int-x", lambda: [torch.ones(2, 8, dtype=torch.int32), W12(), torch.randn(4, 12)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), RuntimeError, ["miss_ext.miss_linear", "'x'", "must be float32"]),
    ("miss_linear-dtypes", lambda: [torch.randn(2, 8, dtype=torch.float64), W12(), torch.randn(4, 12)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), RuntimeError, ["'x'", "'weight'", "must have the same dtype"]),
    ("miss_linear-block-dtype", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12, dtype=torch.bfloat16)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), RuntimeError, ["'block'", "x's dtype", "wider float"]),
    ("miss_linear-x-features", lambda: [torch.randn(2, 6), W12(), torch.randn(4, 12)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), RuntimeError, ["'x'", "must end in in_features = 8"]),
    ("miss_linear-3d-block", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12, 1)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), RuntimeError, ["'block'", "must be 2-D"]),
    ("miss_linear-r0", lambda: [torch.randn(2, 8), W12(), torch.randn(0, 12)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), RuntimeError, ["'block.shape[0]'", "must be a positive integer"]),
    ("miss_linear-mini-indivisible", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 5)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), RuntimeError, ["out_features (12)", "divisible by block.shape[1] (5"]),
    ("miss_linear-bias", lambda: [torch.randn(2, 8), W12(), torch.randn(3), torch.randn(4, 12)],
     lambda x, w, bias, b: ops.miss_linear(x, w, bias, b, 0.0, None), RuntimeError, ["'bias'", "(out_features,)"]),
    ("miss_linear-no-seed", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.5, None), RuntimeError, ["'seed'", "required when p > 0"]),
    ("miss_linear-p", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 1.5, SEED), RuntimeError, ["'p'", "must be in [0, 1]"]),
    # singular I + B_i in a BAT unmerge
    ("bat_unmerge-singular", lambda: [W8(), torch.stack([torch.zeros(4, 4), -torch.eye(4)])], ops.bat_unmerge,
     RuntimeError, ["miss_ext.bat_unmerge", "I + B_i is singular", "block row(s) i = 1", "'block'"]),
    ("bat_unmerge-singular-rank1", lambda: [W8(), torch.stack([-torch.ones(4, 4) / 4, -torch.ones(4, 4) / 4])],
     ops.bat_unmerge, RuntimeError, ["singular", "'block'"]),
]


@pytest.mark.parametrize("make,call,exc,needles", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_bad_op_call(make, call, exc, needles):
    inputs = make()
    assert all(isinstance(t, torch.Tensor) for t in inputs)
    check_fails_unchanged(call, inputs, exc, needles)


# ---------------------------------------------------------------- devices

# Two-tensor ops and the argument names their device check must print.
DEVICE_CASES = [
    ("tile_add", lambda d: [torch.randn(2, 8), torch.randn(2, 4, device=d)], ops.tile_add, ["'base'", "'s'"]),
    ("bat_transform", lambda d: [W8(), B2().to(d)], ops.bat_transform, ["'weight'", "'block'"]),
    ("bat_block_grad", lambda d: [W8(), W8().to(d)], lambda g, w: ops.bat_block_grad(g, w, 4), ["'grad'", "'weight'"]),
    ("bat_weight_grad", lambda d: [W8(), B2().to(d)], ops.bat_weight_grad, ["'grad'", "'block'"]),
    ("bat_linear-weight", lambda d: [torch.randn(2, 8), W8().to(d), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]), ["'x'", "'weight'"]),
    ("bat_linear-block", lambda d: [torch.randn(2, 8), W8(), B2().to(d)], lambda x, w, b: ops.bat_linear(x, w, None, [b]), ["'block"]),
    ("bat_unmerge", lambda d: [W8(), B2().to(d)], ops.bat_unmerge, ["'weight'", "'block'"]),
    ("miss_merge", lambda d: [W8(), torch.randn(2, 8, device=d)], lambda w, b: ops.miss_merge(w, b, 1.0), ["'weight'", "'block'"]),
    ("miss_linear-weight", lambda d: [torch.randn(2, 8), W12().to(d), torch.randn(4, 12)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'x'", "'weight'"]),
    ("miss_linear-block", lambda d: [torch.randn(2, 8), W12(), torch.randn(4, 12, device=d)],
     lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'x'", "'block'"]),
]
OTHER_DEVICES = [
    "meta",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="a CPU/CUDA mismatch needs a CUDA build and device")),
]


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("make,call,names", [c[1:] for c in DEVICE_CASES], ids=[c[0] for c in DEVICE_CASES])
def test_device_mismatch(make, call, names, other):
    inputs = make(other)
    assert all(isinstance(t, torch.Tensor) for t in inputs)
    check_fails_unchanged(call, inputs, RuntimeError, [*names, "must be on the same device", other])


# Meta tensors: shape inference must apply the same rules as the real kernels, so a bad call is
# rejected already when traced (torch.compile, FakeTensor) instead of at run time or never.
META_CASES = [
    ("blocksum-int", lambda: ops.blocksum(torch.ones(2, 8, dtype=torch.int32, device="meta"), 4), ["'x'", "float32"]),
    ("blocksum-r0", lambda: ops.blocksum(torch.ones(2, 8, device="meta"), 0), ["'r'", "positive"]),
    ("tile-neg", lambda: ops.tile(torch.ones(2, 4, device="meta"), -1), ["'features'", ">= 0"]),
    ("bat_transform-indivisible", lambda: ops.bat_transform(torch.ones(8, 10, device="meta"), torch.ones(2, 4, 4, device="meta")), ["divisible by r"]),
    ("miss_merge-indivisible", lambda: ops.miss_merge(torch.ones(8, 8, device="meta"), torch.ones(2, 3, device="meta"), 1.0), ["divisible by block.shape[1]"]),
    ("tile_add-dtypes", lambda: ops.tile_add(torch.ones(2, 8, device="meta", dtype=torch.float64), torch.ones(2, 4, device="meta")), ["base's dtype", "wider float"]),
    ("miss_linear-features", lambda: ops.miss_linear(torch.ones(2, 6, device="meta"), torch.ones(12, 8, device="meta"), None,
                                                     torch.ones(4, 12, device="meta"), 0.0, None), ["'x'", "in_features = 8"]),
    ("bat_unmerge-int", lambda: ops.bat_unmerge(torch.ones(8, 8, dtype=torch.int64, device="meta"), torch.ones(2, 4, 4, device="meta")), ["'weight'", "float32"]),
]


@pytest.mark.parametrize("call,needles", [c[1:] for c in META_CASES], ids=[c[0] for c in META_CASES])
def test_meta_tensors_follow_the_rules(call, needles):
    check_raises(call, RuntimeError, needles)


def test_meta_tensors_valid_calls_infer_shapes():
    """Valid calls on meta tensors work (shape inference) and produce meta outputs."""
    x = torch.ones(3, 5, 7, device="meta")
    assert ops.blocksum(x, 3).shape == (3, 5, 3) and ops.blocksum(x, 3).is_meta
    assert ops.tile(torch.ones(3, 2, device="meta"), 7).shape == (3, 7)
    w, b = torch.ones(8, 12, device="meta"), torch.ones(2, 4, 4, device="meta")
    assert ops.bat_transform(w, b).shape == (8, 12)
    assert ops.bat_linear(torch.ones(5, 12, device="meta"), w, None, [b]).shape == (5, 8)
    assert ops.miss_merge(w, torch.ones(4, 2, device="meta"), 1.0).shape == (8, 12)


# ---------------------------------------------------------------- layer table


class LinearLike(nn.Module):
    """A linear-like module without a `weight` (e.g. a quantized or functional base)."""

    def __init__(self, in_f=8, out_f=8):
        super().__init__()
        self.in_features, self.out_features = in_f, out_f
        self.register_buffer("packed", torch.randn(out_f, in_f))

    def forward(self, x):
        return x @ self.packed.t()


def _layer(init="standard", in_f=8, out_f=12, r=4, base=None, **kw):
    torch.manual_seed(0)
    base = base if base is not None else nn.Linear(in_f, out_f)
    init_weights = {"standard": False, "mini": "mini", "bat": "bat"}[init]
    layer = miss_ext.MissLinear(base, r=r, init_weights=init_weights, **kw)
    with torch.no_grad():
        for blk in layer.miss_block.values():
            blk.copy_(torch.randn_like(blk) * 0.1)
    return layer


def _poison(value, where=(0,)):
    def go(layer, name="default"):
        with torch.no_grad():
            layer.miss_block[name].view(-1)[list(where)] = value
    return go


def _singular_bat(layer):
    with torch.no_grad():
        blk = layer.miss_block["default"]
        blk.zero_()
        blk[1] = -torch.eye(blk.shape[1])  # I + B_1 = 0
    layer.merge()  # finite: W'_1j = -I


def _other_merged_default_poisoned(layer):
    """A second adapter is already merged (so the weight is not the original one) and the
    default adapter's block holds a NaN."""
    layer.update_layer("other", 2, init_weights=False)
    layer.set_adapter(["default", "other"])
    layer.merge(adapter_names=["other"])
    _poison(float("nan"))(layer)


# (id, layer factory, setup(layer) before the snapshot, bad call(layer), exception, substrings)
LAYER_CASES = [
    ("r0", _layer, None, lambda l: l.update_layer("b", 0), ValueError, ["`r`", "positive integer", "got 0"]),
    ("r-neg", _layer, None, lambda l: l.update_layer("b", -2), ValueError, ["`r`", "positive integer"]),
    ("r-float", _layer, None, lambda l: l.update_layer("b", 2.0), ValueError, ["`r`", "positive integer"]),
    ("r>in", _layer, None, lambda l: l.update_layer("b", 9), ValueError, ["`r` (9)", "less than or equal to in_features (8)"]),
    ("bat-indivisible-in", lambda: _layer(in_f=12, out_f=8), None, lambda l: l.update_layer("b", 8, init_weights="bat"),
     ValueError, ["BAT", "in_features (12)", "divisible by r (8)"]),
    ("bat-indivisible-out", lambda: _layer(out_f=10), None, lambda l: l.update_layer("b", 4, init_weights="bat"),
     ValueError, ["BAT", "out_features (10)", "divisible by r (4)"]),
    ("mini-indivisible", _layer, None, lambda l: l.update_layer("b", 4, mini_r=5, init_weights="mini"),
     ValueError, ["mini", "out_features (12)", "divisible by mini_r (5)"]),
    ("mini_r0", _layer, None, lambda l: l.update_layer("b", 4, mini_r=0, init_weights="mini"),
     ValueError, ["`mini_r`", "positive integer"]),
    ("dropout>1", _layer, None, lambda l: l.update_layer("b", 4, miss_dropout=1.5), ValueError, ["`miss_dropout`", "[0, 1]"]),
    ("init-unknown", _layer, None, lambda l: l.update_layer("b", 4, init_weights="lora"), ValueError, ["init_weights must be"]),
    ("add-existing", _layer, None, lambda l: l.add_adapter("default", 4), ValueError, ["'default'", "already exists"]),
    ("bat-without-weight", lambda: _layer(base=LinearLike()), None, lambda l: l.update_layer("b", 4, init_weights="bat"),
     TypeError, ["BAT", "real 2-D `weight`", "LinearLike"]),
    ("merge-without-weight", lambda: _layer(base=LinearLike()), None, lambda l: l.merge(),
     TypeError, ["real 2-D `weight`", "LinearLike"]),
    # A meta weight is fine for BAT (shapes only), but merging needs values (issue #13).
    ("merge-meta-weight", lambda: _layer("bat", base=nn.Linear(8, 12, device="meta")), None,
     lambda l: l.merge(), RuntimeError, ["meta device", "to_empty"]),
    ("unmerge-meta-weight", _layer, lambda l: (l.merge(), l.to("meta")), lambda l: l.unmerge(),
     RuntimeError, ["meta device"]),
    ("bat-forward-features", lambda: _layer("bat"), None, lambda l: l(torch.randn(3, 6)),
     ValueError, ["MissLinear", "'x'", "must end in in_features = 8"]),
    ("merge-unknown", _layer, None, lambda l: l.merge(adapter_names=["nope"]), ValueError, ["unknown adapter", "nope"]),
    ("merge-str", _layer, None, lambda l: l.merge(adapter_names="default"), TypeError, ["adapter_names", "list"]),
    ("delete-unknown", _layer, None, lambda l: l.delete_adapter("nope"), ValueError, ["'nope'"]),
    ("delete-merged", _layer, lambda l: l.merge(), lambda l: l.delete_adapter("default"), ValueError, ["merged", "unmerge()"]),
    ("replace-merged", _layer, lambda l: l.merge(), lambda l: l.update_layer("default", 2), ValueError, ["merged", "unmerge()"]),
]
# NaN or Inf in a safe merge, every variant; and with another adapter already merged.
for _variant in ("standard", "mini", "bat"):
    for _val, _tag in ((float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")):
        LAYER_CASES.append((
            f"safe-merge-{_variant}-{_tag}", (lambda v=_variant: _layer(v, mini_r=4) if v == "mini" else _layer(v)),
            _poison(_val), lambda l: l.merge(safe_merge=True), ValueError, ["NaNs detected", "'default'", "unchanged"],
        ))
LAYER_CASES += [
    ("safe-merge-after-merged", _layer, _other_merged_default_poisoned, lambda l: l.merge(safe_merge=True, adapter_names=["default"]),
     ValueError, ["NaNs detected", "'default'"]),
    ("safe-merge-bf16", lambda: _layer().to(torch.bfloat16), _poison(float("nan"), (3, 5)), lambda l: l.merge(safe_merge=True),
     ValueError, ["NaNs detected"]),
    ("unmerge-singular-bat", lambda: _layer("bat"), _singular_bat, lambda l: l.unmerge(),
     RuntimeError, ["I + B_i is singular", "block row(s) i = 1", "cannot be unmerged"]),
]


@pytest.mark.parametrize("make,setup,call,exc,needles", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES])
def test_bad_layer_call_changes_nothing(make, setup, call, exc, needles):
    layer = make()
    if setup is not None:
        setup(layer)
    before = layer_state(layer)
    check_raises(lambda: call(layer), exc, needles)
    assert_layer_unchanged(layer, before)


def test_failed_safe_merge_then_good_merge_still_works():
    """After a refused safe merge the layer is fully usable: fixing the block and merging gives
    the same output as the unmerged layer."""
    layer = _layer("mini", mini_r=4)
    x = torch.randn(5, 8)
    _poison(float("nan"))(layer)
    with pytest.raises(ValueError):
        layer.merge(safe_merge=True)
    with torch.no_grad():
        layer.miss_block["default"].nan_to_num_(0.0)
    expected = layer(x)
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- NaN / Inf propagation


def _poisoned_input(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    flat = x.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=g)[:3]
    flat[idx[0]] = float("nan")
    flat[idx[1]] = float("inf")
    flat[idx[2]] = float("-inf")
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("variant,in_f,out_f,r,mini_r,p", [
    ("standard", 10, 12, 4, None, 0.0),  # in % r != 0
    ("standard", 8, 12, 4, None, 0.5),  # dropout: a dropped NaN/Inf still gives NaN (x * 0)
    ("mini", 8, 12, 4, 3, 0.0),
    ("mini", 9, 12, 3, 4, 0.3),
    ("bat", 8, 12, 4, None, 0.0),
])
@pytest.mark.parametrize("poison", ["x", "block"])
def test_nan_inf_propagate_like_reference(variant, in_f, out_f, r, mini_r, p, dtype, poison):
    base = nn.Linear(in_f, out_f, dtype=dtype)
    layer = _layer(variant, in_f=in_f, out_f=out_f, r=r, base=base, **({"mini_r": mini_r} if mini_r else {}), miss_dropout=p)
    layer.to(dtype).train()
    if poison == "x":
        x = _poisoned_input((2, 3, in_f), dtype, 1)
    else:
        x = torch.randn(2, 3, in_f, dtype=dtype)
        with torch.no_grad():
            blk = layer.miss_block["default"].view(-1)
            blk[1] = float("nan")
            blk[-1] = float("inf")
    x.requires_grad_(True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    seed = MF.dropout_seed() if p > 0 and variant != "bat" else None

    xr = x.detach().double().requires_grad_(True)
    blk = layer.miss_block["default"].detach().double().requires_grad_(True)
    w, b = base.weight.detach().double(), base.bias.detach().double()
    if variant == "bat":
        yr = ref.bat_linear(xr, w, b, [blk])
    elif variant == "mini":
        yr = ref.mini_forward(xr, F.linear(xr, w, b), blk, p, seed)
    else:
        yr = ref.miss_forward(xr, F.linear(xr, w, b), blk, p, seed)
    assert (yr.isnan() | yr.isinf()).any(), "the case must actually produce non-finite values"
    assert torch.equal(y.isnan(), yr.isnan()), "NaN positions differ from the reference"
    assert torch.equal(y.isinf(), yr.isinf()), "Inf positions differ from the reference"
    assert torch.equal(y.isinf() & (y > 0), yr.isinf() & (yr > 0)), "Inf signs differ"
    # Backward: the same non-finite positions in every gradient. Only the positions: the mini
    # backward sums G over the out/mini_r tiles before multiplying (docs/MATH.md section 2), where the
    # reference multiplies each tile first, and with infinities that reassociation may turn
    # (+inf) + (-inf) = NaN into a single inf or back. Standard and BAT match NaN for NaN.
    g = torch.randn(y.shape, dtype=dtype)
    gx, gb = torch.autograd.grad(y, [x, layer.miss_block["default"]], g)
    gxr, gbr = torch.autograd.grad(yr, [xr, blk], g.double())
    for name, k, r_ in (("x", gx, gxr), ("block", gb, gbr)):
        assert torch.equal(k.isfinite(), r_.isfinite()), f"grad {name}: non-finite positions differ"
        if variant != "mini":
            assert torch.equal(k.isnan(), r_.isnan()), f"grad {name}: NaN positions differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_inf_in_ops_propagate(dtype):
    """Each op on its own: no silent zeroing of NaN/Inf."""
    x = _poisoned_input((4, 11), dtype, 2)
    x64 = x.double()
    pairs = [
        (ops.blocksum(x, 3), ref.blocksum(x64, 3)),
        (ops.blocksum_dropout(x, 3, 0.5, SEED), ref.blocksum_dropout(x64, 3, 0.5, SEED)),
        (ops.tile(x, 25), ref.tile(x64, 25)),
        (ops.tile_dropout(x, 25, 0.5, SEED), ref.tile_dropout(x64, 25, 0.5, SEED)),
        (ops.tile_add(x, x[:, :3].contiguous()), ref.tile_add(x64, x64[:, :3])),
    ]
    w = _poisoned_input((8, 12), dtype, 3)
    blk = torch.randn(2, 4, 4, dtype=dtype) * 0.1
    mblk = torch.randn(4, 8)
    pairs += [
        (ops.bat_transform(w, blk), ref.bat_transform(w.double(), blk.double())),
        (ops.bat_block_grad(w, w, 4), ref.bat_block_grad(w.double(), w.double(), 4)),
        (ops.bat_weight_grad(w, blk), ref.bat_weight_grad(w.double(), blk.double())),
        (ops.miss_merge(w, mblk, 1.0), ref.miss_merge(w, mblk)),
    ]
    for k, (got, exp) in enumerate(pairs):
        assert (exp.isnan() | exp.isinf()).any(), k
        assert torch.equal(got.isnan(), exp.isnan()), f"pair {k}: NaN positions"
        assert torch.equal(got.isinf(), exp.isinf()), f"pair {k}: Inf positions"
