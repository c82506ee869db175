"""Bad input, nothing lost (issues #6 and #10): layers, models and the patched PEFT layer (the
operators and the functional API: tests/test_bad_input.py).

A table of bad calls per level (wrong ranks, r <= 0, r > in_features, BAT/mini shapes that do
not divide, meta models, a base without `weight` for BAT, NaN/Inf in a safe merge, a singular
I + B_i in a BAT unmerge, unknown adapter names, ...). Each must raise an error whose message
names the argument and the rule (and the fix), and afterwards every input, every parameter and
buffer of the layer or model and its adapter bookkeeping must be bit-for-bit what it was before
(NaN payloads included: the comparison is on the raw bytes). Mixed float dtypes (half
activations with fp32 blocks) are a supported setup, never an error here.

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
import miss_ext.peft as mp
from miss_ext import functional as MF
from miss_ext import reference as ref
from miss_ext.inject import miss_layers, set_adapter

from _snapshots import assert_layer_unchanged, bit_equal, check_raises, layer_state
from conftest import INIT_RANDOM

ops = torch.ops.miss_ext
SEED = torch.tensor([7], dtype=torch.int64)
r = torch.randn


def i64(*shape):
    return torch.ones(*shape, dtype=torch.int64)


# ---------------------------------------------------------------- layers


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
    init_weights = INIT_RANDOM[init]
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


CONSTRUCTOR_ERRORS = [
    (dict(r=0), ValueError, "`r` must be a positive integer"),
    (dict(r=-2), ValueError, "`r` must be a positive integer"),
    (dict(r=20), ValueError, "less than or equal to in_features"),
    (dict(r=3, init_weights="bat"), ValueError, "divisible by r"),
    (dict(r=4, init_weights="mini", mini_r=5), ValueError, "divisible by mini_r"),
    (dict(r=4, init_weights="mini", mini_r=0), ValueError, "`mini_r` must be a positive integer"),
    (dict(r=4, init_weights="lora"), ValueError, "init_weights must be"),
]


@pytest.mark.parametrize("kwargs,exc,needle", CONSTRUCTOR_ERRORS)
def test_layer_shape_rules(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        miss_ext.MissLinear(nn.Linear(16, 12), **kwargs)


def test_bat_needs_real_weight():
    class LinearLike(nn.Module):
        in_features, out_features = 8, 8

        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="real 2-D `weight`"):
        miss_ext.MissLinear(LinearLike(), r=4, init_weights="bat")
    # The standard variant treats the base as a black box, so it works.
    layer = miss_ext.MissLinear(LinearLike(), r=4)
    assert layer(torch.randn(2, 8)).shape == (2, 8)


def test_not_linear_like():
    with pytest.raises(TypeError, match="in_features"):
        miss_ext.MissLinear(nn.ReLU(), r=4)


# ---------------------------------------------------------------- layers, every variant


def _square_layer(init="standard", in_f=8, out_f=8, r=4, **kw):
    torch.manual_seed(0)
    init_weights = INIT_RANDOM[init]
    layer = miss_ext.MissLinear(nn.Linear(in_f, out_f), r=r, init_weights=init_weights, mini_r=4, **kw)
    with torch.no_grad():
        for blk in layer.miss_block.values():
            blk.copy_(torch.randn_like(blk) * 0.1)
    return layer


def _state(layer):
    # The keys too: a bad name once left a key in miss_block without a parameter behind it.
    return dict(layer_state(layer), keys=list(layer.miss_block.keys()))


VARIANT_LAYER_CASES = []
for _v in ("standard", "mini", "bat"):
    VARIANT_LAYER_CASES += [
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


@pytest.mark.parametrize("variant,call,exc,needles", [c[1:] for c in VARIANT_LAYER_CASES], ids=[c[0] for c in VARIANT_LAYER_CASES])
def test_bad_layer_call_per_variant_changes_nothing(variant, call, exc, needles):
    layer = _square_layer(variant)
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
    layer = _square_layer()
    x = r(3, 8)
    layer.set_adapter([])
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.set_adapter("default")
    assert not torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("variant", ["standard", "bat"])
def test_repeated_name_in_merge_merges_once(variant):
    """Merging an adapter is idempotent (a merged one is skipped), so a repeated name merges it
    once instead of applying it twice."""
    layer = _square_layer(variant)
    x = r(3, 8)
    want = layer(x)
    layer.merge(adapter_names=["default", "default"])
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_mixed_float_layer_is_not_rejected():
    """A bf16 base and input with fp32 blocks (what get_peft_model makes of a bf16 model) is a
    dtype mix, never an argument error."""
    for v in ("standard", "mini", "bat"):
        layer = _square_layer(v)
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
