"""The training path under autocast (``Trainer(bf16=True)``; docs/MATH.md section 11.4): a bf16 or
fp32 model with fp32 blocks, standard and mini MiSS on one fused op per direction, PEFT's
roundings in backward and, in forward, one rounding fewer; ``miss_linear(round_base=True)``, the
op's switch for PEFT's forward bits.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import miss_ext
from miss_ext import reference as R
from conftest import DEVICES

peft = pytest.importorskip("peft")
from peft import MissConfig  # noqa: E402
from peft.tuners.miss.layer import MissLinear as PeftMissLinear  # noqa: E402

from _models import INIT  # noqa: E402


def layer_pair(variant, in_f, out_f, r, mini_r, dtype, device="cpu", bias=True):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    ours = miss_ext.MissLinear(base, r=r, mini_r=mini_r, init_weights=INIT[variant])
    cfg = MissConfig(r=r, mini_r=mini_r, init_weights=INIT[variant])
    theirs = PeftMissLinear(copy.deepcopy(base), "default", config=cfg, r=r)
    block = 0.05 * torch.randn(ours.miss_block["default"].shape)
    for layer in (ours, theirs):
        layer.miss_block["default"].data = block.clone()
    return ours.to(device), theirs.to(device)


def float64_parts(layer, x):
    """The layer PEFT computes under bf16 autocast, in float64 on the same bf16 operands (x, W, b
    and the block rounded to bf16 as autocast rounds them; the term from the bf16 block sum, as
    both compute it): x W^T, the bias, the tiled term S D, and the whole output."""
    base = layer.base_layer
    d = lambda t: t.detach().bfloat16().double()
    block = d(layer.miss_block["default"])
    xd = d(x)
    s = R.blocksum(xd, block.shape[0]).bfloat16().double()
    term = s @ R.mini_block_expand(block, base.out_features)  # the block itself for standard
    bias = torch.zeros(base.out_features, dtype=torch.float64) if base.bias is None else d(base.bias)
    xw = xd @ d(base.weight).T
    return xw, bias, term, xw + bias + term


def assert_one_rounding_fewer(y, y_p, layer, x):
    """Our fused forward, y = round(x W^T + round(b + T)), against PEFT's round(round(x W^T + b) +
    round(T)) (docs/MATH.md 11.4): no further from float64 than PEFT's (in norm), and elementwise
    apart from PEFT's by at most the sum of both sides' rounding bounds."""
    xw, bias, term, exact = float64_parts(layer, x)
    y, y_p = y.double(), y_p.double()
    err, err_p = (y - exact).norm().item(), (y_p - exact).norm().item()
    assert err <= err_p, (err, err_p)
    u = torch.finfo(torch.bfloat16).eps / 2
    ours = (bias + term).abs() + term.abs() + y.abs()  # mini rounds its untiled product too
    peft = (xw + bias).abs() + term.abs() + y_p.abs()
    bound = u * (ours + peft) * (1 + 1e-3)
    assert ((y - y_p).abs() <= bound).all(), ((y - y_p).abs() - bound).max()


def autocast_step(layer, x, g):
    xi = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = layer(xi)
    y.backward(g)
    return y.detach(), xi.grad, layer.miss_block["default"].grad


def ulps(a, b):
    def line(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)
    return (line(a) - line(b)).abs()


def assert_same_roundings(got, want, max_frac=2e-3):
    """PEFT's bits, but where the order of fp32 additions inside a GEMM decides a rounding: one
    unit in the last place, or one rounding of the term where a sum cancels."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    d = ulps(got, want)
    eps = torch.finfo(torch.bfloat16).eps
    one_rounding = (got.double() - want.double()).abs() <= eps * want.double().abs().max()
    assert ((d <= 1) | one_rounding).all(), (d.max(), (got.double() - want.double()).abs().max())
    assert (d > 0).float().mean().item() <= max_frac


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["standard", "mini"])
@pytest.mark.parametrize("in_f,out_f,r,mini_r", [(64, 48, 8, 12), (70, 48, 8, 12), (512, 256, 64, 64)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_autocast_matches_peft(variant, model_dtype, in_f, out_f, r, mini_r, bias, device):
    """Backward gives PEFT's roundings; forward too where x is fp32 (unfused), and where x is in
    the autocast dtype (fused) one rounding fewer: within one rounding of PEFT's output, and no
    further from the float64 value of the same layer than PEFT's (docs/MATH.md 11.4)."""
    ours, theirs = layer_pair(variant, in_f, out_f, r, mini_r, model_dtype, device, bias)
    x = torch.randn(2, 33, in_f).to(device, model_dtype)
    g = torch.randn(2, 33, out_f).to(device, model_dtype)
    (y, dx, db), (y_p, dx_p, db_p) = autocast_step(ours, x, g), autocast_step(theirs, x, g)
    assert y.dtype == y_p.dtype == model_dtype and dx.dtype == dx_p.dtype == model_dtype
    assert db.dtype == db_p.dtype == torch.float32
    if model_dtype == torch.float32:
        assert_same_roundings(y.bfloat16(), y_p.bfloat16())
    else:
        assert_one_rounding_fewer(y, y_p, theirs, x)
    if model_dtype == torch.bfloat16 or variant == "standard":
        assert_same_roundings(dx.bfloat16(), dx_p.bfloat16())
    else:  # an fp32 model's mini layer runs unfused (section 11.4); PEFT repeats D before its product
        assert ((dx - dx_p).abs().max() / dx_p.abs().max()).item() <= 1e-2
    if variant == "standard":  # dL/dD: PEFT's bf16 product, cast to fp32
        assert_same_roundings(db.bfloat16(), db_p.bfloat16())
        assert torch.equal(db.bfloat16().float(), db)
    else:  # fp32 sums over the output tiles, rounded once, where PEFT rounds each tile's product
        assert ((db - db_p).abs().max() / db_p.abs().max()).item() <= 1e-2


class CountMissOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "miss_ext":
            self.calls.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", ["standard", "mini"])
def test_one_fused_op_per_direction(variant):
    """The base GEMM and the adapter run in one op forward; backward hands dL/dx over whole (the
    tiled gradient added into G W by one kernel), never a separate tile of dS for autograd to add."""
    ours, _ = layer_pair(variant, 64, 48, 8, 12, torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    with CountMissOps() as fwd, torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    with CountMissOps() as bwd:
        y.sum().backward()
    assert fwd.calls == ["miss_linear"]
    # mini sums G over its output tiles first (the block-sum kernel)
    assert bwd.calls == (["tile_add"] if variant == "standard" else ["blocksum", "tile_add"])


@pytest.mark.parametrize("device", DEVICES)
def test_round_base_op_rounds_like_peft(device):
    torch.manual_seed(1)
    bf = torch.bfloat16
    x, w, b = (torch.randn(7, 40), torch.randn(24, 40), torch.randn(24))
    x, w, b = (t.to(device, bf) for t in (x, w, b))
    for block in (torch.randn(8, 24), torch.randn(8, 6)):  # standard, mini
        block = block.to(device, bf)
        y, s = torch.ops.miss_ext.miss_linear(x, w, b, block, 0.0, None, True)
        term = (s @ block).repeat(1, 24 // block.shape[1])
        want = torch.nn.functional.linear(x, w, b) + term
        assert s.dtype == bf and torch.equal(s, torch.ops.miss_ext.blocksum(x, 8))
        assert torch.equal(y, want)
        fused, _ = torch.ops.miss_ext.miss_linear(x, w, b, block, 0.0, None, False)
        assert not torch.equal(fused, want)  # the flag really changes the roundings


def test_round_base_opcheck_and_gradcheck():
    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        args = (torch.randn(5, 16, dtype=dtype, requires_grad=True), torch.randn(12, 16, dtype=dtype),
                torch.randn(12, dtype=dtype), torch.randn(4, 12, dtype=dtype, requires_grad=True), 0.0, None, True)
        torch.library.opcheck(torch.ops.miss_ext.miss_linear, args)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 16, dtype=torch.float64)
    for block in (torch.randn(4, 12, dtype=torch.float64, requires_grad=True),
                  torch.randn(4, 6, dtype=torch.float64, requires_grad=True)):
        assert torch.autograd.gradcheck(
            lambda x, blk: torch.ops.miss_ext.miss_linear(x, w, None, blk, 0.0, None, True)[0], (x, block))


@pytest.mark.parametrize("optimizer", ["fused", "foreach", "for-loop"])
def test_trains_like_peft_over_steps(optimizer):
    """Every step sees the block the optimizer left, whatever updated it: torch's fused AdamW (the
    Trainer's default) changes parameters in place without moving their version counters, so a
    copy cached on the version would go stale. Each step's output stays within the roundings
    that differ of PEFT's, against the block before the step."""
    ours, theirs = layer_pair("standard", 64, 48, 8, 12, torch.bfloat16)
    kw = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[optimizer]
    opts = [torch.optim.AdamW([m.miss_block["default"]], lr=1e-2, **kw) for m in (ours, theirs)]
    torch.manual_seed(4)
    for _ in range(4):
        x, g = torch.randn(9, 64, dtype=torch.bfloat16), torch.randn(9, 48, dtype=torch.bfloat16)
        outs, before = [], copy.deepcopy(theirs)
        for m, opt in zip((ours, theirs), opts):
            outs.append(autocast_step(m, x, g))
            opt.step()
            opt.zero_grad()
        assert_one_rounding_fewer(outs[0][0], outs[1][0], before, x)
    torch.testing.assert_close(ours.miss_block["default"], theirs.miss_block["default"], rtol=0, atol=1e-6)
