"""Bad input, nothing lost (issues #6 and #10): the operators and the functional API (layers,
models and the PEFT patch: tests/test_bad_input_layers.py).

A table of bad calls (integer/bool tensors, mismatched dtypes and devices, wrong ranks, r <= 0,
r > in_features, BAT/mini shapes that do not divide, meta tensors, ...). Each must raise an error
whose message names the argument and the rule, and afterwards every input tensor must be
bit-for-bit what it was before (NaN payloads included: the comparison is on the raw bytes).

Device mismatch is tested against the "meta" device on every machine, and against CUDA when a
CUDA build and device are present (skipped with a reason otherwise).

Operators: the cases live in the per-op case table (tests/_op_cases.py, ``bad``); each runs on
the real kernel (raises, message holds the needles, inputs unchanged), on the fake kernel under
FakeTensorMode and on meta tensors, which must raise the very same message.

Functional API (once silent wrong answers, issue #10 part 4): each call must raise an error that
names the argument (and the fix). Mixed float dtypes (half activations with fp32 blocks) are a
supported setup, never an error here: only shapes, devices, non-float dtypes and names are
checked.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from miss_ext import _checks
from miss_ext import functional as MF

from _op_cases import OPS, params
from _snapshots import check_fails_unchanged
from conftest import HAS_CUDA

ops = torch.ops.miss_ext
SEED = torch.tensor([7], dtype=torch.int64)

# ---------------------------------------------------------------- operators (tests/_op_cases.py)


def _message(call, inputs):
    with pytest.raises(Exception) as info:
        call(*inputs)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("op,case", params("bad"))
def test_bad_op_call(op, case):
    inputs = case.make()
    assert all(isinstance(t, torch.Tensor) for t in inputs)
    check_fails_unchanged(case.call, inputs, case.exc, case.needles)


def _fake_params(flag):
    return [p for p in params("bad") if getattr(p.values[1], flag)]


@pytest.mark.parametrize("op,case", _fake_params("fake"))
def test_bad_op_call_fake_kernel_same_message(op, case):
    """Shape inference applies the same rules as the real kernel with the same words, so a bad
    call is rejected already when traced (torch.compile, FakeTensor), as it would be when run."""
    inputs = case.make()
    real = _message(case.call, inputs)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(t) for t in inputs]
    with mode:
        fake = _message(case.call, fakes)
    assert fake == real


@pytest.mark.parametrize("op,case", [p for p in _fake_params("fake") if p.values[1].meta])
def test_bad_op_call_meta_tensors_same_message(op, case):
    inputs = case.make()
    real = _message(case.call, inputs)
    assert _message(case.call, [t.to("meta") for t in inputs]) == real


def test_every_fake_free_case_is_a_fault_in_the_values():
    """Only a fault a fake kernel cannot see (one in the values) may skip the fake check."""
    for name, cases in OPS.items():
        for case in cases.bad:
            if not case.fake:
                inputs = case.make()
                mode = FakeTensorMode(allow_non_fake_inputs=True)
                fakes = [mode.from_tensor(t) for t in inputs]
                with mode:
                    case.call(*fakes)  # accepted: the shapes and dtypes are fine


# ---------------------------------------------------------------- devices


OTHER_DEVICES = [
    "meta",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="a CPU/CUDA mismatch needs a CUDA build and device")),
]


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("op,case", params("bad_device"))
def test_device_mismatch(op, case, other):
    inputs = case.make(other)
    assert all(isinstance(t, torch.Tensor) for t in inputs)
    check_fails_unchanged(case.call, inputs, RuntimeError, [*case.names, "must be on the same device", other])


def test_device_mismatch_names_both_arguments():
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(RuntimeError, match="'weight' .* and 'block' .* same device"):
        ops.bat_transform(torch.randn(8, 8), torch.zeros(2, 4, 4, device=other))
    with pytest.raises(RuntimeError, match="'base' .* and 's' .* same device"):
        ops.tile_add(torch.randn(2, 8), torch.zeros(2, 4, device=other))
    with pytest.raises(RuntimeError, match="same device"):
        ops.miss_merge(torch.randn(8, 8), torch.zeros(2, 8, device=other), 1.0)


def test_meta_tensors_valid_calls_infer_shapes():
    """Valid calls on meta tensors work (shape inference) and produce meta outputs."""
    x = torch.ones(3, 5, 7, device="meta")
    assert ops.blocksum(x, 3).shape == (3, 5, 3) and ops.blocksum(x, 3).is_meta
    assert ops.tile(torch.ones(3, 2, device="meta"), 7).shape == (3, 7)
    w, b = torch.ones(8, 12, device="meta"), torch.ones(2, 4, 4, device="meta")
    assert ops.bat_transform(w, b).shape == (8, 12)
    assert ops.bat_linear(torch.ones(5, 12, device="meta"), w, None, [b]).shape == (5, 8)
    assert ops.miss_merge(w, torch.ones(4, 2, device="meta"), 1.0).shape == (8, 12)


# ---------------------------------------------------------------- functional API

r = torch.randn


def i64(*shape):
    return torch.ones(*shape, dtype=torch.int64)


# (id, inputs factory, call(*inputs), exception, substrings the message must contain)
FUNCTIONAL_CASES = [
    # The case from the issue: base_out (2, 32) broadcast against a (16, 64) block gave (2, 64).
    ("miss_forward-base_out-narrower", lambda: [r(2, 64), r(2, 32), r(16, 64)], MF.miss_forward,
     ValueError, ["miss_ext.miss_forward", "'block'", "(r, out_features)", "base_out.shape[-1] = 32", "(16, 64)"]),
    ("miss_forward-block-narrower", lambda: [r(2, 64), r(2, 64), r(16, 32)], MF.miss_forward,
     ValueError, ["'block'", "base_out.shape[-1] = 64", "mini_forward"]),
    ("miss_forward-block-3d", lambda: [r(2, 64), r(2, 64), r(2, 16, 64)], MF.miss_forward,
     ValueError, ["'block'", "must be 2-D", "(r, out_features)"]),
    ("miss_forward-block-no-rows", lambda: [r(2, 64), r(2, 64), r(0, 64)], MF.miss_forward,
     ValueError, ["'block'", "at least one row"]),
    ("miss_forward-lead-mismatch", lambda: [r(3, 64), r(2, 64), r(16, 64)], MF.miss_forward,
     ValueError, ["'x' (3, 64)", "'base_out' (2, 64)", "same leading dimensions"]),
    # Same element count, different shapes: once silently flattened and accepted.
    ("miss_forward-lead-flattened", lambda: [r(2, 3, 64), r(6, 64), r(16, 64)], MF.miss_forward,
     ValueError, ["'x' (2, 3, 64)", "'base_out' (6, 64)", "same leading dimensions"]),
    ("miss_forward-lead-broadcast", lambda: [r(1, 64), r(4, 64), r(16, 64)], MF.miss_forward,
     ValueError, ["same leading dimensions"]),
    ("miss_forward-int-x", lambda: [i64(2, 64), r(2, 64), r(16, 64)], MF.miss_forward,
     TypeError, ["'x'", "must be float32, float64, bfloat16 or float16", "int64"]),
    # An integer base_out was promoted to float silently.
    ("miss_forward-int-base_out", lambda: [r(2, 64), i64(2, 64), r(16, 64)], MF.miss_forward,
     TypeError, ["'base_out'", "must be float32"]),
    ("miss_forward-int-block", lambda: [r(2, 64), r(2, 64), i64(16, 64)], MF.miss_forward,
     TypeError, ["'block'", "must be float32"]),
    ("miss_forward-bool-x", lambda: [torch.ones(2, 64, dtype=torch.bool), r(2, 64), r(16, 64)], MF.miss_forward,
     TypeError, ["'x'", "bool"]),
    ("miss_forward-scalar-base_out", lambda: [r(2, 64), torch.tensor(1.0), r(16, 64)], MF.miss_forward,
     ValueError, ["'base_out'", "at least 1 dimension"]),
    ("miss_forward-x-not-tensor", lambda: [[1.0] * 64, r(2, 64), r(16, 64)], MF.miss_forward,
     TypeError, ["'x'", "must be a torch.Tensor", "list"]),
    # A block on another device once ran (meta) without a word.
    ("miss_forward-block-device", lambda: [r(2, 64), r(2, 64), r(16, 64, device="meta")], MF.miss_forward,
     ValueError, ["'x' (on cpu)", "'block' (on meta)", "same device"]),
    ("miss_forward-base_out-device", lambda: [r(2, 64), r(2, 64, device="meta"), r(16, 64)], MF.miss_forward,
     ValueError, ["'base_out' (on meta)", "same device"]),
    # A negative or NaN dropout probability meant "no dropout".
    ("miss_forward-p-negative", lambda: [r(2, 64), r(2, 64), r(16, 64)], lambda x, b, d: MF.miss_forward(x, b, d, -0.5),
     ValueError, ["'dropout_p'", "[0, 1]", "-0.5"]),
    ("miss_forward-p-nan", lambda: [r(2, 64), r(2, 64), r(16, 64)], lambda x, b, d: MF.miss_forward(x, b, d, float("nan")),
     ValueError, ["'dropout_p'", "[0, 1]"]),
    ("miss_forward-p-above-1", lambda: [r(2, 64), r(2, 64), r(16, 64)], lambda x, b, d: MF.miss_forward(x, b, d, 1.5),
     ValueError, ["'dropout_p'", "[0, 1]"]),
    ("miss_forward-p-not-number", lambda: [r(2, 64), r(2, 64), r(16, 64)], lambda x, b, d: MF.miss_forward(x, b, d, "0.1"),
     TypeError, ["'dropout_p'", "must be a number"]),
    ("mini_forward-lead-mismatch", lambda: [r(3, 64), r(2, 64), r(16, 8)], MF.mini_forward,
     ValueError, ["miss_ext.mini_forward", "'x' (3, 64)", "'base_out' (2, 64)", "same leading dimensions"]),
    ("mini_forward-lead-flattened", lambda: [r(2, 3, 64), r(6, 64), r(16, 8)], MF.mini_forward,
     ValueError, ["same leading dimensions"]),
    ("mini_forward-block-3d", lambda: [r(2, 64), r(2, 64), r(2, 16, 8)], MF.mini_forward,
     ValueError, ["'block'", "must be 2-D", "(r, mini_r)"]),
    ("mini_forward-indivisible", lambda: [r(2, 64), r(2, 60), r(16, 8)], MF.mini_forward,
     ValueError, ["out_features (60)", "divisible by mini_r (8)"]),
    ("mini_forward-indivisible-small", lambda: [torch.randn(2, 8), torch.randn(2, 6), torch.randn(4, 4)], MF.mini_forward,
     ValueError, ["out_features (6)", "divisible by", "mini_r (4)"]),
    ("mini_forward-mini_r-0", lambda: [r(2, 64), r(2, 64), r(16, 0)], MF.mini_forward,
     ValueError, ["divisible by mini_r (0)"]),
    ("mini_forward-int-block", lambda: [r(2, 64), r(2, 64), torch.ones(16, 8, dtype=torch.int32)], MF.mini_forward,
     TypeError, ["'block'", "must be float32"]),
    ("mini_forward-int-base_out", lambda: [r(2, 64), torch.ones(2, 64, dtype=torch.int32), r(16, 8)], MF.mini_forward,
     TypeError, ["'base_out'", "must be float32"]),
    ("mini_forward-block-device", lambda: [r(2, 64), r(2, 64), r(16, 8, device="meta")], MF.mini_forward,
     ValueError, ["'block' (on meta)", "same device"]),
    ("mini_forward-p-negative", lambda: [r(2, 64), r(2, 64), r(16, 8)], lambda x, b, d: MF.mini_forward(x, b, d, -1.0),
     ValueError, ["'dropout_p'"]),
    ("blocksum-p-negative", lambda: [r(2, 8)], lambda x: MF.blocksum(x, 4, -0.5),
     ValueError, ["miss_ext.blocksum", "'dropout_p'"]),
    ("miss_linear-p-negative", lambda: [r(2, 64), r(32, 64), r(16, 32)], lambda x, w, b: MF.miss_linear(x, w, None, b, -0.5),
     ValueError, ["miss_ext.miss_linear", "'dropout_p'"]),
    # Invalid even when dropout is off (training=False): a bad argument is a bad argument.
    ("miss_linear-p-negative-eval", lambda: [r(2, 64), r(32, 64), r(16, 32)],
     lambda x, w, b: MF.miss_linear(x, w, None, b, -0.5, training=False), ValueError, ["'dropout_p'"]),
    ("bat_linear-blocks-none", lambda: [r(2, 8), r(8, 8)], lambda x, w: MF.bat_linear(x, w, None, None),
     TypeError, ["miss_ext.bat_linear", "'blocks'", "NoneType"]),
    ("bat_linear-blocks-item", lambda: [r(2, 8), r(8, 8)], lambda x, w: MF.bat_linear(x, w, None, [torch.zeros(2, 4, 4), 0.5]),
     TypeError, ["'blocks[1]'", "torch.Tensor"]),
    # The operator itself: a negative p in the fused linear meant "no dropout".
    ("op-miss_linear-p-negative", lambda: [r(2, 64), r(32, 64), r(16, 32)], lambda x, w, b: ops.miss_linear(x, w, None, b, -0.5, None),
     RuntimeError, ["miss_ext.miss_linear", "argument 'p'", "[0, 1]"]),
    ("op-miss_linear-p-nan", lambda: [r(2, 64), r(32, 64), r(16, 32)], lambda x, w, b: ops.miss_linear(x, w, None, b, float("nan"), SEED),
     RuntimeError, ["argument 'p'", "[0, 1]"]),
    ("op-miss_linear-p-negative-meta", lambda: [r(2, 64, device="meta"), r(32, 64, device="meta"), r(16, 32, device="meta")],
     lambda x, w, b: ops.miss_linear(x, w, None, b, -0.5, None), RuntimeError, ["argument 'p'", "[0, 1]"]),
]


@pytest.mark.parametrize("make,call,exc,needles", [c[1:] for c in FUNCTIONAL_CASES], ids=[c[0] for c in FUNCTIONAL_CASES])
def test_bad_functional_call(make, call, exc, needles):
    check_fails_unchanged(call, make(), exc, needles)


@pytest.mark.parametrize("fn,block", [(MF.miss_forward, (16, 64)), (MF.mini_forward, (16, 8))])
@pytest.mark.parametrize("xd,bd", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                   (torch.float32, torch.float64), (torch.bfloat16, torch.float64)])
def test_checks_allow_mixed_float_dtypes(fn, block, xd, bd):
    """The argument checks never reject a mix of float dtypes (issue #9 makes it a feature):
    they pass for half activations with fp32/fp64 blocks, in any combination."""
    name = "miss_ext." + fn.__name__
    for base_dtype in (xd, bd):
        _checks.additive(name, r(2, 3, 64, dtype=xd), r(2, 3, 64, dtype=base_dtype), r(*block, dtype=bd), 0.1,
                         mini=fn is MF.mini_forward)


def test_valid_edge_cases_still_accepted():
    """What the checks must not reject: empty leading dims, in % r != 0, r > in (zero padding,
    as the math defines it), p = 0 and p = 1."""
    for x, base, blk, p in [
        (r(0, 10), r(0, 12), r(4, 12), 0.0),
        (r(2, 0, 10), r(2, 0, 12), r(4, 12), 0.5),
        (r(3, 10), r(3, 12), r(4, 12), 1.0),
        (r(3, 2), r(3, 12), r(4, 12), 0.0),
    ]:
        y = MF.miss_forward(x, base, blk, p)
        assert y.shape == base.shape
        y = MF.mini_forward(x, base, blk[:, :6], p)
        assert y.shape == base.shape


def test_mini_forward_indivisible():
    with pytest.raises(ValueError, match="divisible by mini_r"):
        MF.mini_forward(torch.randn(2, 8), torch.randn(2, 6), torch.randn(4, 4))
