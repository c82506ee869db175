"""miss_ext.MissLinear as a module: PEFT parity of every variant (forward, input and block
gradients, several adapters, mixed dtypes, autocast, dropout), the adapter API, and the mixed
standard + mini + BAT layer that PEFT cannot hold, against a reference written from docs/MATH.md."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import miss_ext
from miss_ext import functional as MF
from miss_ext import reference as R

from conftest import assert_close

from peft import MissConfig  # noqa: E402
from peft.tuners.miss.layer import MissLinear as PeftMissLinear  # noqa: E402

from conftest import INIT_RANDOM as INIT  # noqa: E402
# (variant, in, out, r, mini_r): in % r != 0 only where the variant allows it.
CASES = [
    ("standard", 64, 48, 8, 1),
    ("standard", 70, 48, 16, 1),
    ("mini", 64, 48, 8, 12),
    ("mini", 70, 48, 16, 6),
    ("bat", 64, 48, 8, 1),
    ("bat", 32, 32, 32, 1),
]


def block_scale(variant):
    # BAT multiplies W by I + B: keep B small so outputs stay O(1) like the other variants.
    return 0.05 if variant == "bat" else 0.3


def make_pair(variant, in_f, out_f, r, mini_r, dtype, adapter_dtype=None, dropout=0.0, names=("default",), device="cpu"):
    """Our layer and PEFT's, same base weights, same random non-zero blocks in ``adapter_dtype``."""
    adapter_dtype = adapter_dtype or dtype
    base = nn.Linear(in_f, out_f).to(dtype)
    cfg = MissConfig(r=r, mini_r=mini_r, init_weights=INIT[variant], miss_dropout=dropout)
    theirs = PeftMissLinear(nn.Linear(in_f, out_f).to(dtype), names[0], config=cfg, r=r)
    theirs.base_layer.load_state_dict(base.state_dict())
    ours = miss_ext.MissLinear(base, r=r, mini_r=mini_r, init_weights=INIT[variant], miss_dropout=dropout, adapter_name=names[0])
    for name in names[1:]:
        theirs.update_layer(name, r, config=cfg)
        ours.update_layer(name, r, mini_r, INIT[variant], dropout)
    for name in names:
        block = block_scale(variant) * torch.randn_like(ours.miss_block[name], dtype=torch.float32)
        theirs.miss_block[name] = nn.Parameter(block.to(adapter_dtype))
        ours.miss_block[name] = nn.Parameter(block.to(adapter_dtype))
    theirs.set_adapter(list(names))
    ours.set_adapter(list(names))
    return ours.to(device), theirs.to(device)


def run(layer, x, grad_seed=7):
    """Output, input gradient and block gradients for a fixed random output gradient."""
    xi = x.detach().clone().requires_grad_()
    y = layer(xi)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    y.backward(g)
    blocks = {n: p.grad for n, p in layer.miss_block.items()}
    return y.detach(), xi.grad, blocks


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def compare(ours, theirs, x, dtype, label=""):
    """Asserts ours == PEFT within the dtype tolerance; returns the largest relative errors
    (max |ours - PEFT| / max |PEFT|) of the output and of the gradients."""
    yo, gxo, gbo = run(ours, x)
    yt, gxt, gbt = run(theirs, x)
    assert yo.dtype == x.dtype == yt.dtype
    assert_close(yo, yt, dtype=dtype, msg=f"{label} forward")
    assert_close(gxo, gxt, dtype=dtype, msg=f"{label} input grad")
    grad_errs = [rel_err(gxo, gxt)]
    for name in gbt:
        # Block gradients sum over N * in / r (BAT: N * in) products: scale the tolerance.
        scale = max(1.0, gbt[name].float().abs().max().item())
        assert_close(gbo[name], gbt[name], dtype=dtype, scale=scale, msg=f"{label} block grad {name}")
        grad_errs.append(rel_err(gbo[name], gbt[name]))
    return rel_err(yo, yt), max(grad_errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,in_f,out_f,r,mini_r", CASES)
def test_matches_peft(variant, in_f, out_f, r, mini_r, dtype, device):
    ours, theirs = make_pair(variant, in_f, out_f, r, mini_r, dtype, device=device)
    compare(ours, theirs, torch.randn(2, 5, in_f, dtype=dtype, device=device), dtype, variant)


@pytest.mark.parametrize("variant,in_f,out_f,r,mini_r", [CASES[1], CASES[3], CASES[4]])
def test_several_active_adapters_match_peft(variant, in_f, out_f, r, mini_r):
    """Additive adapters add their terms; BAT adapters compose in order, as PEFT does."""
    ours, theirs = make_pair(variant, in_f, out_f, r, mini_r, torch.float32, names=("a", "b", "c"))
    compare(ours, theirs, torch.randn(6, in_f), torch.float32, variant)
    # The order of BAT adapters is their composition order: both follow active_adapters.
    ours.set_adapter(["c", "a"])
    theirs.set_adapter(["c", "a"])
    compare(ours, theirs, torch.randn(6, in_f), torch.float32, variant)


@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_mixed_dtypes_match_peft(variant, base_dtype, adapter_dtype):
    """The adapter branch runs in the adapter's dtype; the output comes back in the input's."""
    _, in_f, out_f, r, mini_r = {c[0]: c for c in CASES}[variant]
    ours, theirs = make_pair(variant, in_f, out_f, r, mini_r, base_dtype, adapter_dtype)
    # The base is called with x as given, so x has the base's dtype (BAT, which casts, could
    # take either; PEFT fails on the others too).
    compare(ours, theirs, torch.randn(3, in_f, dtype=base_dtype), torch.bfloat16, variant)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_autocast_bf16(variant):
    """Under CPU autocast every variant runs forward and backward, matches PEFT under the same
    autocast, and hands our kernels tensors of one dtype (they would raise otherwise)."""
    _, in_f, out_f, r, mini_r = {c[0]: c for c in CASES}[variant]
    ours, theirs = make_pair(variant, in_f, out_f, r, mini_r, torch.float32)
    x = torch.randn(4, in_f)
    outs = {}
    for name, layer in (("ours", ours), ("peft", theirs)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().pow(2).sum().backward()
        outs[name] = (y, xi.grad, layer.miss_block["default"].grad)
    assert outs["ours"][0].dtype == outs["peft"][0].dtype
    for a, b in zip(outs["ours"], outs["peft"]):
        assert_close(a, b, dtype=torch.bfloat16, scale=max(1.0, b.float().abs().max().item()))


def mixed_layer(dtype=torch.float64, in_f=48, out_f=32, r=8, device="cpu"):
    base = nn.Linear(in_f, out_f).to(dtype)
    layer = miss_ext.MissLinear(base, r=r, init_weights=False, adapter_name="std")
    layer.update_layer("bat1", r, init_weights="bat")
    layer.update_layer("mini", 6, mini_r=8, init_weights="mini")
    layer.update_layer("bat2", r, init_weights="bat")
    layer.to(dtype)
    with torch.no_grad():
        for name, p in layer.miss_block.items():
            p.copy_((0.05 if "bat" in name else 0.3) * torch.randn_like(p))
    layer.set_adapter(["std", "bat1", "mini", "bat2"])
    return layer.to(device)


def spec_forward(x, layer, names):
    """docs/MATH.md section 5, written out: y = x W'^T + b + additive terms, W' = BAT adapters in order."""
    w, b = layer.base_layer.weight, layer.base_layer.bias
    bats = [layer.miss_block[n] for n in names if layer.miss_variant[n] == "bat"]
    y = R.bat_linear(x, w, b, bats) if bats else F.linear(x, w, b)
    for n in names:
        v, block = layer.miss_variant[n], layer.miss_block[n]
        if v == "standard":
            y = R.miss_forward(x, y, block)
        elif v == "mini":
            y = R.mini_forward(x, y, block)
    return y


def test_mixed_variants_on_one_layer_match_spec(device):
    """Standard, mini and two BAT adapters active on one layer (PEFT fails with shape errors
    here): output and every gradient equal the docs/MATH.md formula, in fp64."""
    layer = mixed_layer(device=device)
    names = layer.active_adapters
    x = torch.randn(5, 48, dtype=torch.float64, device=device, requires_grad=True)
    y = layer(x)
    blocks = [layer.miss_block[n] for n in names]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *blocks], g)
    ref = spec_forward(x, layer, names)
    want = torch.autograd.grad(ref, [x, *blocks], g)
    assert_close(y, ref)
    for a, b in zip(got, want):
        assert_close(a, b)
    # Every variant really contributes: dropping any adapter changes the output.
    for n in names:
        layer.set_adapter([m for m in names if m != n])
        assert not torch.allclose(layer(x), y)


def test_black_box_base_standard_and_mini():
    """Standard and mini call the base as a black box (e.g. a quantized layer with no weight)."""

    class Opaque(nn.Module):
        in_features, out_features = 16, 12

        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(16, 12)

        def forward(self, x):
            return self.inner(x)

    base = Opaque()
    layer = miss_ext.MissLinear(base, r=4, init_weights=False)
    layer.update_layer("m", 4, mini_r=3, init_weights="mini")
    layer.set_adapter(["default", "m"])
    x = torch.randn(3, 16)
    want = R.mini_forward(x, R.miss_forward(x, base(x), layer.miss_block["default"]), layer.miss_block["m"])
    assert_close(layer(x), want)
    with pytest.raises(TypeError, match="real 2-D `weight`"):
        layer.update_layer("b", 4, init_weights="bat")
    assert set(layer.miss_block) == {"default", "m"}


def test_base_is_frozen_and_keys_match_peft():
    ours, theirs = make_pair("mini", 64, 48, 8, 12, torch.float32)
    assert not any(p.requires_grad for p in ours.base_layer.parameters())
    assert ours.miss_block["default"].requires_grad
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_default_blocks_like_get_peft_model():
    """Zero init (the layer starts as the base), fp32 blocks on a bf16 base, PEFT's shapes."""
    base = nn.Linear(24, 16).to(torch.bfloat16)
    x = torch.randn(2, 24, dtype=torch.bfloat16)
    for init, shape in ((True, (8, 16)), ("mini", (8, 4)), ("bat", (2, 8, 8))):
        layer = miss_ext.MissLinear(base, r=8, mini_r=4, init_weights=init)
        block = layer.miss_block["default"]
        assert block.shape == shape and block.dtype == torch.float32 and not block.any()
        assert torch.equal(layer(x), base(x)) or init == "bat"
        assert_close(layer(x), base(x), dtype=torch.bfloat16)


def test_adapter_api():
    layer = miss_ext.MissLinear(nn.Linear(16, 16), r=4, init_weights=False)
    layer.add_adapter("b", 4, init_weights="bat")
    # As in PEFT, an added adapter is inactive and frozen until activated.
    assert layer.active_adapters == ["default"] and not layer.miss_block["b"].requires_grad
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("b", 4)
    layer.set_adapter(["default", "b"])
    assert layer.miss_block["b"].requires_grad and layer.miss_block["default"].requires_grad
    layer.set_adapter("b", inference_mode=True)
    assert not any(p.requires_grad for p in layer.miss_block.values())
    layer.set_adapter(["default", "b"])
    layer.delete_adapter("b")
    assert layer.active_adapters == ["default"]
    layer.add_adapter("b", 4, init_weights="bat")
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        layer.delete_adapter("default")  # PEFT's rule: the first remaining adapter takes over
    assert layer.active_adapters == ["b"] and layer.miss_block["b"].requires_grad
    layer.delete_adapter("b")
    assert layer.active_adapters == [] and len(layer.miss_block) == 0
    x = torch.randn(2, 16)
    assert torch.equal(layer(x), layer.base_layer(x))
    with pytest.raises(ValueError, match="no adapter"):
        layer.delete_adapter("nope")


def test_disable_adapters_flag_and_context():
    layer = mixed_layer(torch.float32)
    x = torch.randn(4, 48)
    y = layer(x)
    before = {k: p.requires_grad for k, p in layer.miss_block.items()}
    with layer.disable_adapter():
        assert layer.disable_adapters
        assert torch.equal(layer(x), layer.base_layer(x))
        assert not any(p.requires_grad for p in layer.miss_block.values())
    assert not layer.disable_adapters
    assert {k: p.requires_grad for k, p in layer.miss_block.items()} == before
    assert torch.equal(layer(x), y)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.enable_adapters(True)
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_dropout_train_and_eval(variant, device):
    """Eval mode (and p = 0 in training) equals PEFT exactly; training mode equals the
    reference with the same dropout seed (our mask is counter-based, not nn.Dropout's).
    PEFT never applies dropout to BAT."""
    _, in_f, out_f, r, mini_r = {c[0]: c for c in CASES}[variant]
    ours, theirs = make_pair(variant, in_f, out_f, r, mini_r, torch.float32, dropout=0.5, device=device)
    x = torch.randn(8, in_f, device=device)
    ours.eval(), theirs.eval()
    compare(ours, theirs, x, torch.float32, f"{variant} eval")
    ours.train()
    torch.manual_seed(11)
    y = ours(x)
    torch.manual_seed(11)
    seed = MF.dropout_seed()
    block = ours.miss_block["default"]
    base_out = ours.base_layer(x)
    if variant == "bat":
        want = R.bat_linear(x, ours.base_layer.weight, ours.base_layer.bias, block)
    else:
        fn = R.mini_forward if variant == "mini" else R.miss_forward
        want = fn(x, base_out, block, 0.5, seed)
        ours.eval()
        assert not torch.allclose(y, ours(x))  # dropout is live in training mode
    assert_close(y, want)
    p0, t0 = make_pair(variant, in_f, out_f, r, mini_r, torch.float32, dropout=0.0, device=device)
    compare(p0.train(), t0.train(), x, torch.float32, f"{variant} train p=0")


def test_bat_trains_base_weight_when_unfrozen():
    """docs/MATH.md section 3: dL/dW flows only if the base weight requires grad."""
    layer = mixed_layer(torch.float64)
    layer.set_adapter(["bat1", "bat2"])
    w = layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(3, 48, dtype=torch.float64)
    (gw,) = torch.autograd.grad(layer(x).sum(), [w])
    (want,) = torch.autograd.grad(spec_forward(x, layer, ["bat1", "bat2"]).sum(), [w])
    assert_close(gw, want)


def test_report_parity_errors():
    """Largest relative error max|ours - PEFT| / max|PEFT| per variant, forward and gradients
    (input and block), fp32 and bf16; run with -s to see the table."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for variant in ("standard", "mini", "bat"):
            fwd = grad = 0.0
            for case in [c for c in CASES if c[0] == variant]:
                ours, theirs = make_pair(*case, dtype)
                f, g = compare(ours, theirs, torch.randn(4, 8, case[1], dtype=dtype), dtype)
                fwd, grad = max(fwd, f), max(grad, g)
            rows.append(f"{variant:8s} {str(dtype):15s} forward {fwd:.3g}  grad {grad:.3g}")
    print("\nPEFT parity (max relative error):\n" + "\n".join(rows))


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(r=49), "must be less than or equal to in_features"),
        (dict(r=0), "`r` must be a positive integer"),
        (dict(r=5, init_weights="bat"), "BAT .* divisible by r"),
        (dict(r=4, init_weights="mini", mini_r=5), "mini .* divisible by mini_r"),
        (dict(r=4, miss_dropout=1.5), "miss_dropout"),
        (dict(r=4, init_weights="lora"), "init_weights must be"),
    ],
)
def test_bad_adapter_leaves_layer_unchanged(kwargs, needle):
    """docs/MATH.md section 7: the rule is named, and the layer is exactly as before."""
    layer = mixed_layer(torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    meta = (dict(layer.miss_r), dict(layer.miss_variant), layer.active_adapters)
    grads = {k: p.requires_grad for k, p in layer.miss_block.items()}
    with pytest.raises(ValueError, match=needle):
        layer.update_layer("new", **kwargs)
    assert layer.state_dict().keys() == state.keys()
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in state.items())
    assert (dict(layer.miss_r), dict(layer.miss_variant), layer.active_adapters) == meta
    assert {k: p.requires_grad for k, p in layer.miss_block.items()} == grads


# ---------------------------------------------------------------- PEFT as the oracle, relative errors
# Random non-zero blocks, float32 and bfloat16: outputs, input gradients, block gradients, each
# within a relative bound of PEFT's value, and the module against miss_ext.reference.

# Largest error allowed, relative to the largest magnitude of the PEFT value.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

# (variant, in, out, r, mini_r)
ORACLE_CASES = [
    ("standard", 64, 48, 8, 1),
    ("standard", 70, 48, 8, 1),  # in % r != 0: zero padding
    ("mini", 64, 48, 8, 12),
    ("bat", 64, 48, 8, 1),
    ("bat", 32, 32, 32, 1),  # r = in
]


def rel_err_max(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def make_oracle_pair(variant, in_f, out_f, r, mini_r, dtype):
    base = nn.Linear(in_f, out_f).to(dtype)
    init = miss_ext.layer.INIT_WEIGHTS[variant]
    ours = miss_ext.MissLinear(base, r=r, mini_r=mini_r, init_weights=init)
    cfg = MissConfig(r=r, mini_r=mini_r, init_weights=init)
    theirs = PeftMissLinear(nn.Linear(in_f, out_f).to(dtype), "default", config=cfg, r=r)
    theirs.base_layer.load_state_dict(base.state_dict())
    with torch.no_grad():
        scale = 0.05 if variant == "bat" else 0.5
        block = scale * torch.randn_like(ours.miss_block["default"], dtype=torch.float32)
        ours.miss_block["default"].copy_(block)
        theirs.miss_block["default"].data = block.to(dtype)
        ours.miss_block["default"].data = block.to(dtype)
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant,in_f,out_f,r,mini_r", ORACLE_CASES)
def test_forward_and_grads_match_peft(variant, in_f, out_f, r, mini_r, dtype):
    ours, theirs = make_oracle_pair(variant, in_f, out_f, r, mini_r, dtype)
    x = torch.randn(3, 5, in_f, dtype=dtype)
    results = {}
    for name, layer in (("ours", ours), ("peft", theirs)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(5))
        y.backward(g)
        results[name] = (y.detach(), xi.grad, layer.miss_block["default"].grad)
    tol = REL_TOL[dtype]
    errors = [rel_err_max(a, b) for a, b in zip(results["ours"], results["peft"])]
    print(f"\n{variant} {dtype} in={in_f} out={out_f} r={r}: rel err out/dx/dblock = {errors}")
    assert results["ours"][0].dtype == x.dtype
    for what, err in zip(("output", "input grad", "block grad"), errors):
        assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("variant,in_f,out_f,r,mini_r", ORACLE_CASES)
def test_module_matches_reference(variant, in_f, out_f, r, mini_r):
    ours, _ = make_oracle_pair(variant, in_f, out_f, r, mini_r, torch.float64)
    x = torch.randn(4, in_f, dtype=torch.float64)
    block = ours.miss_block["default"]
    w, b = ours.base_layer.weight, ours.base_layer.bias
    if variant == "bat":
        ref = R.bat_linear(x, w, b, block)
    elif variant == "mini":
        ref = R.mini_forward(x, nn.functional.linear(x, w, b), block)
    else:
        ref = R.miss_forward(x, nn.functional.linear(x, w, b), block)
    torch.testing.assert_close(ours(x), ref)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_parameter_names_and_shapes_match_peft(variant):
    ours, theirs = make_oracle_pair(variant, 64, 48, 8, 12, torch.float32)
    ours_sd = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_sd = {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours_sd == theirs_sd
    # ... so PEFT's state dict loads into ours key for key.
    ours.load_state_dict(theirs.state_dict(), strict=True)
