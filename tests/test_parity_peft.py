"""MissLinear against PEFT's MissLinear (the oracle) and miss_ext.reference, every variant,
float32 and bfloat16, random non-zero blocks: outputs, input gradients, block gradients."""

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext import reference as R

peft = pytest.importorskip("peft")
from peft import MissConfig  # noqa: E402
from peft.tuners.miss.layer import MissLinear as PeftMissLinear  # noqa: E402

# Largest error allowed, relative to the largest magnitude of the PEFT value.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}

# (variant, in, out, r, mini_r)
CASES = [
    ("standard", 64, 48, 8, 1),
    ("standard", 70, 48, 8, 1),  # in % r != 0: zero padding
    ("mini", 64, 48, 8, 12),
    ("bat", 64, 48, 8, 1),
    ("bat", 32, 32, 32, 1),  # r = in
]


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-30)).item()


def make_pair(variant, in_f, out_f, r, mini_r, dtype):
    base = nn.Linear(in_f, out_f).to(dtype)
    init = {"standard": True, "mini": "mini", "bat": "bat"}[variant]
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
@pytest.mark.parametrize("variant,in_f,out_f,r,mini_r", CASES)
def test_forward_and_grads_match_peft(variant, in_f, out_f, r, mini_r, dtype):
    ours, theirs = make_pair(variant, in_f, out_f, r, mini_r, dtype)
    x = torch.randn(3, 5, in_f, dtype=dtype)
    results = {}
    for name, layer in (("ours", ours), ("peft", theirs)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(5))
        y.backward(g)
        results[name] = (y.detach(), xi.grad, layer.miss_block["default"].grad)
    tol = REL_TOL[dtype]
    errors = [rel_err(a, b) for a, b in zip(results["ours"], results["peft"])]
    print(f"\n{variant} {dtype} in={in_f} out={out_f} r={r}: rel err out/dx/dblock = {errors}")
    assert results["ours"][0].dtype == x.dtype
    for what, err in zip(("output", "input grad", "block grad"), errors):
        assert err < tol, f"{what}: relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("variant,in_f,out_f,r,mini_r", CASES)
def test_module_matches_reference(variant, in_f, out_f, r, mini_r):
    ours, _ = make_pair(variant, in_f, out_f, r, mini_r, torch.float64)
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
    ours, theirs = make_pair(variant, 64, 48, 8, 12, torch.float32)
    ours_sd = {k: v.shape for k, v in ours.state_dict().items()}
    theirs_sd = {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours_sd == theirs_sd
    # ... so PEFT's state dict loads into ours key for key.
    ours.load_state_dict(theirs.state_dict(), strict=True)
