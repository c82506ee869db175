"""No silent wrong answer on any public entry point (issue #10, part 4).

Each call below once returned a wrong result, ignored an argument, corrupted adapter state, or
failed deep inside aten with a message naming no argument. Each must now raise an error that
names the argument (and the fix), and leave every input, parameter and adapter setting as it
was. Same table style as test_reliability_bad_input.py, whose snapshot helpers are reused.

Mixed float dtypes (half activations with fp32 blocks) are a supported setup, never an error
here: only shapes, devices, non-float dtypes and names are checked.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import miss_ext
import miss_ext.peft as mp
from miss_ext import _checks
from miss_ext import functional as MF
from miss_ext.inject import miss_layers, set_adapter

from test_reliability_bad_input import assert_layer_unchanged, bit_equal, check_fails_unchanged, check_raises, layer_state

ops = torch.ops.miss_ext
SEED = torch.tensor([7], dtype=torch.int64)
r = torch.randn


def i64(*shape):
    return torch.ones(*shape, dtype=torch.int64)


# ---------------------------------------------------------------- functional API

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


# ---------------------------------------------------------------- MissLinear


def _layer(init="standard", in_f=8, out_f=8, r=4, **kw):
    torch.manual_seed(0)
    init_weights = {"standard": False, "mini": "mini", "bat": "bat"}[init]
    layer = miss_ext.MissLinear(nn.Linear(in_f, out_f), r=r, init_weights=init_weights, mini_r=4, **kw)
    with torch.no_grad():
        for blk in layer.miss_block.values():
            blk.copy_(torch.randn_like(blk) * 0.1)
    return layer


def _state(layer):
    # The keys too: a bad name once left a key in miss_block without a parameter behind it.
    return dict(layer_state(layer), keys=list(layer.miss_block.keys()))


LAYER_CASES = []
for _v in ("standard", "mini", "bat"):
    LAYER_CASES += [
        # The case: accepted, and then the layer silently ran its base only.
        (f"{_v}-set_adapter-unknown", _v, lambda l: l.set_adapter("nope"),
         ValueError, ["MissLinear.set_adapter", "['nope']", "not found on this layer", "['default', 'other']"]),
        (f"{_v}-set_adapter-unknown-in-list", _v, lambda l: l.set_adapter(["default", "typo"]),
         ValueError, ["['typo']", "not found"]),
        # A repeated name applied the adapter twice.
        (f"{_v}-set_adapter-repeated", _v, lambda l: l.set_adapter(["default", "default"]),
         ValueError, ["['default']", "more than once"]),
        (f"{_v}-set_adapter-none", _v, lambda l: l.set_adapter(None), TypeError, ["string or a list of strings"]),
        (f"{_v}-set_adapter-int", _v, lambda l: l.set_adapter([1]), TypeError, ["must be strings", "[1]"]),
        # An integer input: BAT returned an integer tensor, standard/mini a raw aten error.
        (f"{_v}-int-input", _v, lambda l: l(i64(2, 8)), TypeError, ["MissLinear", "'x'", "must be float32", "int64"]),
        (f"{_v}-bool-input", _v, lambda l: l(torch.ones(2, 8, dtype=torch.bool)), TypeError, ["'x'", "bool"]),
        (f"{_v}-x-features", _v, lambda l: l(r(2, 6)), ValueError, ["MissLinear", "'x'", "must end in in_features = 8", "(2, 6)"]),
        (f"{_v}-x-scalar", _v, lambda l: l(torch.tensor(1.0)), ValueError, ["'x'", "in_features = 8"]),
        (f"{_v}-x-device", _v, lambda l: l(r(2, 8, device="meta")), ValueError, ["'x' is on meta", "adapters are on cpu", ".to(device)"]),
        (f"{_v}-get_delta_weight-unknown", _v, lambda l: l.get_delta_weight("nope"), ValueError, ["get_delta_weight", "['nope']"]),
        # Bad names once raised from inside nn.ParameterDict after it had recorded the key.
        (f"{_v}-name-dot", _v, lambda l: l.update_layer("a.b", 4), ValueError, ["adapter_name", "without '.'", "'a.b'"]),
        (f"{_v}-name-empty", _v, lambda l: l.update_layer("", 4), ValueError, ["adapter_name", "non-empty"]),
        (f"{_v}-name-int", _v, lambda l: l.update_layer(3, 4), ValueError, ["adapter_name", "got 3"]),
        (f"{_v}-name-attribute", _v, lambda l: l.add_adapter("training", 4), ValueError, ["'training'", "clashes"]),
        (f"{_v}-merge-unknown", _v, lambda l: l.merge(adapter_names=["default", "nope"]), ValueError, ["unknown adapter", "nope"]),
    ]


@pytest.mark.parametrize("variant,call,exc,needles", [c[1:] for c in LAYER_CASES], ids=[c[0] for c in LAYER_CASES])
def test_bad_layer_call_changes_nothing(variant, call, exc, needles):
    layer = _layer(variant)
    layer.add_adapter("other", 4, init_weights="bat" if variant == "bat" else False)
    before = _state(layer)
    x = r(3, 8)
    y = layer(x)
    check_raises(lambda: call(layer), exc, needles)
    assert_layer_unchanged(layer, before)
    assert _state(layer)["keys"] == before["keys"]
    assert torch.equal(layer(x), y), "the layer computes something else after the failed call"


def test_empty_adapter_list_is_explicit_base_only():
    """An empty list activates nothing, on purpose: the base alone (PEFT allows it too)."""
    layer = _layer()
    x = r(3, 8)
    layer.set_adapter([])
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.set_adapter("default")
    assert not torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("variant", ["standard", "bat"])
def test_repeated_name_in_merge_merges_once(variant):
    """Merging an adapter is idempotent (a merged one is skipped), so a repeated name merges it
    once instead of applying it twice."""
    layer = _layer(variant)
    x = r(3, 8)
    want = layer(x)
    layer.merge(adapter_names=["default", "default"])
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_mixed_float_layer_is_not_rejected():
    """A bf16 base and input with fp32 blocks (what get_peft_model makes of a bf16 model) is a
    dtype mix, never an argument error."""
    for v in ("standard", "mini", "bat"):
        layer = _layer(v)
        layer.base_layer.to(torch.bfloat16)
        y = layer(r(3, 8).bfloat16())
        assert y.dtype == torch.bfloat16 and y.shape == (3, 8)


# ---------------------------------------------------------------- inject and the model level


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.v = nn.Linear(8, 8)

    def forward(self, x):
        return self.v(self.act(self.q(x)))


def _model_state(model):
    return dict(
        sd={k: v.clone() for k, v in model.state_dict().items()},
        modules=[(n, type(m).__name__) for n, m in model.named_modules()],
        grad=[(n, p.requires_grad) for n, p in model.named_parameters()],
        active=[(n, layer.active_adapters) for n, layer in miss_layers(model)],
    )


def _assert_model_unchanged(model, before):
    after = _model_state(model)
    assert after["modules"] == before["modules"] and after["grad"] == before["grad"] and after["active"] == before["active"]
    assert after["sd"].keys() == before["sd"].keys()
    for k, v in before["sd"].items():
        assert bit_equal(after["sd"][k], v), k


def _injected():
    model = miss_ext.inject(Net(), ["q"], r=4, init_weights=False)
    miss_ext.inject(model, ["q", "v"], r=4, init_weights="bat", adapter_name="b")
    return model


MODEL_CASES = [
    ("inject-name-dot", Net, lambda m: miss_ext.inject(m, ["q"], r=4, adapter_name="a.b"), ValueError, ["adapter_name", "'a.b'"]),
    ("inject-name-dot-existing", _injected, lambda m: miss_ext.inject(m, ["q"], r=4, adapter_name="x.y"), ValueError, ["'x.y'"]),
    ("inject-name-attribute", Net, lambda m: miss_ext.inject(m, ["q"], r=4, adapter_name="to"), ValueError, ["'to'", "clashes"]),
    ("inject-targets-int", Net, lambda m: miss_ext.inject(m, 5, r=4), TypeError, ["target_modules", "got 5"]),
    ("inject-targets-mixed", Net, lambda m: miss_ext.inject(m, ["q", 3], r=4), TypeError, ["target_modules", "['q', 3]"]),
    ("inject-targets-none", Net, lambda m: miss_ext.inject(m, None, r=4), TypeError, ["target_modules", "None"]),
    ("set_adapter-unknown", _injected, lambda m: set_adapter(m, ["default", "nope"]), ValueError, ["['nope']", "not found in the model"]),
    ("set_adapter-repeated", _injected, lambda m: set_adapter(m, ["b", "default", "b"]), ValueError, ["['b']", "more than once"]),
    ("set_adapter-int", _injected, lambda m: set_adapter(m, [0]), TypeError, ["must be strings"]),
    ("forward-int", _injected, lambda m: m(i64(2, 8)), TypeError, ["'x'", "must be float32"]),
]


@pytest.mark.parametrize("make,call,exc,needles", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_call_changes_nothing(make, call, exc, needles):
    model = make()
    before = _model_state(model)
    check_raises(lambda: call(model), exc, needles)
    _assert_model_unchanged(model, before)


def test_set_adapter_on_a_model_skips_layers_without_the_adapter():
    """An adapter that only some layers have is still valid model-wide (as in PEFT)."""
    model = _injected()
    set_adapter(model, ["b", "default"])
    layers = dict(miss_layers(model))
    assert layers["q"].active_adapters == ["b", "default"] and layers["v"].active_adapters == ["b", "default"]
    with torch.no_grad():
        for layer in layers.values():
            for blk in layer.miss_block.values():
                blk.normal_(0, 0.05)
    model(r(2, 8)).sum()  # v runs only its BAT adapter


# ---------------------------------------------------------------- the PEFT patch


@pytest.fixture
def peft_model():
    from peft import MissConfig, get_peft_model

    def make(init):
        torch.manual_seed(0)
        return get_peft_model(nn.Sequential(nn.Linear(8, 8)), MissConfig(r=4, init_weights=init, target_modules=["0"]))

    mp.patch()
    yield make
    mp.unpatch()


PATCH_CASES = [
    # Unpatched PEFT BAT casts an integer x to float and the result back to integers.
    ("int-input", lambda m: m(i64(2, 8)), TypeError, ["miss_ext.peft MissLinear", "'x'", "must be float32"]),
    ("x-features", lambda m: m(r(2, 6)), ValueError, ["'x'", "must end in in_features = 8"]),
    ("x-device", lambda m: m(r(2, 8, device="meta")), ValueError, ["'x' is on meta"]),
]


@pytest.mark.parametrize("init", [True, "mini", "bat"])
@pytest.mark.parametrize("call,exc,needles", [c[1:] for c in PATCH_CASES], ids=[c[0] for c in PATCH_CASES])
def test_bad_call_on_patched_peft_layer(peft_model, init, call, exc, needles):
    model = peft_model(init)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_raises(lambda: call(model), exc, needles)
    after = model.state_dict()
    assert all(bit_equal(after[k], v) for k, v in before.items())
    assert copy.copy(model.base_model.model[0].merged_adapters) == []
