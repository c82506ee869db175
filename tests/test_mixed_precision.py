"""Mixed precision (docs/MATH.md section 11): a bfloat16/float16 model with float32 adapter blocks,
what PEFT's get_peft_model builds by default.

* standard and mini give PEFT's numbers: the base output rounded in the base dtype plus the fp32
  term rounded once, and PEFT's roundings in backward. Results are bit-equal except where the
  order of fp32 additions decides a rounding (at most one unit in the last place, rarely);
* BAT by default runs the GEMMs in the base dtype on W' formed in fp32 and rounded once: its output
  error against float64 stays within 2.5x that of the frozen base-dtype layer; dL/dB is fp32-exact;
* BAT with bat_precision="promote" is PEFT's own fp32 promotion;
* nothing input-sized (x in fp32) or weight-sized is kept for backward.
"""

import copy

import pytest
import torch
from torch import nn

import miss_ext
import miss_ext.peft as mp
from miss_ext import functional as MF

peft = pytest.importorskip("peft")
from peft import MissConfig  # noqa: E402
from peft.tuners.miss.layer import MissLinear as PeftMissLinear  # noqa: E402

HALF = [torch.bfloat16, torch.float16]
from _models import INIT  # noqa: E402


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Units in the last place between two half-type tensors of the same dtype (finite values):
    the distance of their bit patterns on the monotone integer line."""
    def line(t):
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)
    return (line(a) - line(b)).abs()


def make_pair(variant, in_f, out_f, r, mini_r, dtype, scale=0.05, precision="base"):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).to(dtype)
    ours = miss_ext.MissLinear(base, r=r, mini_r=mini_r, init_weights=INIT[variant], bat_precision=precision)
    theirs = PeftMissLinear(copy.deepcopy(base), "default", config=MissConfig(r=r, mini_r=mini_r, init_weights=INIT[variant]), r=r)
    block = scale * torch.randn(ours.miss_block["default"].shape)
    for layer in (ours, theirs):
        layer.miss_block["default"].data = block.clone()  # float32, as get_peft_model leaves it
    assert ours.miss_block["default"].dtype == torch.float32
    return ours, theirs


def run(layer, x, g):
    xi = x.clone().requires_grad_()
    y = layer(xi)
    y.backward(g)
    return y.detach(), xi.grad, layer.miss_block["default"].grad


def assert_peft_bits(got, want, max_frac=2e-3):
    """Equal bits, except a few elements where the order of fp32 additions decides a rounding:
    one unit in the last place apart, or, where a sum with a rounded term cancels, apart by one
    rounding of that term, at most eps * max |want| (PEFT rounds the adapter's input gradient to
    the half type before adding it, so a last-bit difference in fp32 can flip that rounding)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    d = ulp_distance(got, want)
    eps = torch.finfo(want.dtype).eps
    one_rounding = (got.double() - want.double()).abs() <= eps * want.double().abs().max()
    assert ((d <= 1) | one_rounding).all(), (d.max(), (got.double() - want.double()).abs().max())
    assert (d > 0).float().mean().item() <= max_frac


SHAPES = [  # (in, out, r, mini_r): small odd ones, in % r != 0, and ones on the bf16 micro-kernel paths
    (64, 48, 8, 12),
    (70, 48, 8, 12),
    (256, 128, 16, 32),
    (512, 256, 64, 64),
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("variant", ["standard", "mini"])
@pytest.mark.parametrize("in_f,out_f,r,mini_r", SHAPES)
def test_standard_and_mini_give_peft_numbers(variant, dtype, in_f, out_f, r, mini_r):
    ours, theirs = make_pair(variant, in_f, out_f, r, mini_r, dtype)
    x = torch.randn(3, 37, in_f, dtype=dtype)
    g = torch.randn(3, 37, out_f, dtype=dtype)
    (y, dx, dd), (y_p, dx_p, dd_p) = run(ours, x, g), run(theirs, x, g)
    assert y.dtype == dtype and dx.dtype == dtype and dd.dtype == torch.float32
    assert_peft_bits(y, y_p)
    assert_peft_bits(dx, dx_p)
    # dL/dblock in fp32: the same sums in another order.
    assert ((dd - dd_p).abs().max() / dd_p.abs().max()).item() < 2e-6


@pytest.mark.parametrize("variant", ["standard", "mini"])
def test_functional_forms_give_peft_numbers(variant):
    """miss_forward / mini_forward on any base output: the same rounding as PEFT's layer."""
    dtype = torch.bfloat16
    x = torch.randn(40, 96, dtype=dtype)
    base_out = torch.randn(40, 64, dtype=dtype)
    block = 0.05 * torch.randn(16, 64 if variant == "standard" else 16)
    xp = nn.functional.pad(x.float(), (0, 0)).reshape(40, 6, 16).sum(1)
    term = xp @ (block if variant == "standard" else block.repeat(1, 4))
    want = (base_out + term).to(dtype)
    fn = MF.miss_forward if variant == "standard" else MF.mini_forward
    got = fn(x, base_out, block)
    assert_peft_bits(got, want)


def test_fused_layer_keeps_no_input_sized_tensor():
    """Mixed standard/mini keep the N x r block sum, BAT nothing beyond x, weight and blocks."""
    dtype = torch.bfloat16
    for variant in ("standard", "mini", "bat"):
        ours, _ = make_pair(variant, 256, 128, 16, 32, dtype)
        x = torch.randn(64, 256, dtype=dtype, requires_grad=True)
        known = {t.untyped_storage().data_ptr() for t in [x, *ours.parameters()]}
        kept = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in known:
                kept.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ours(x)
        limit = 64 * 16 * 4 if variant != "bat" else 0  # the fp32 block sum S, N x r
        assert sum(kept) <= limit, (variant, kept)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("in_f,out_f,r,n", [(64, 48, 8, 33), (256, 128, 16, 64), (512, 256, 64, 64), (1024, 512, 128, 96)])
@pytest.mark.parametrize("size", [0.3, 1.0, 3.0])
def test_bat_default_error_bound(dtype, in_f, out_f, r, n, size):
    """Output error against float64 within 2.5x the frozen base-dtype layer's on the same input,
    scaled by |W'| / |W| when the adapter grows the weight (docs/MATH.md section 11); dL/dB
    fp32-exact. `size` sets the block so that |W' - W| is about size * |W|."""
    ours, _ = make_pair("bat", in_f, out_f, r, 1, dtype)
    w, bias = ours.base_layer.weight, ours.base_layer.bias
    blk = ours.miss_block["default"]
    blk.data = torch.randn(blk.shape) * size * w.float().std()
    x = torch.randn(n, in_f, dtype=dtype)
    g = torch.randn(n, out_f, dtype=dtype)
    y, _, db = run(ours, x, g)
    assert y.dtype == dtype
    w64, b64 = w.double().detach(), blk.double().detach().requires_grad_()
    w4 = w64.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)
    wp = (w4 + w4 @ b64 + b64).permute(1, 2, 0, 3).reshape(out_f, in_f)
    y64 = x.double() @ wp.t() + bias.double()
    y64.backward(g.double())
    frozen = nn.functional.linear(x, w, bias).double() - (x.double() @ w64.t() + bias.double())
    growth = max(1.0, (wp.norm() / w64.norm()).item())
    err = (y.double() - y64.detach()).norm() / frozen.norm()
    assert err <= 2.5 * growth, (err.item(), growth)
    if size <= 1.0:
        assert err <= 2.5
    assert ((db.double() - b64.grad).abs().max() / b64.grad.abs().max()).item() < 1e-5


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("in_f,out_f,r", [(64, 48, 8), (512, 256, 64)])
def test_bat_promote_is_peft(dtype, in_f, out_f, r):
    ours, theirs = make_pair("bat", in_f, out_f, r, 1, dtype, precision="promote")
    x = torch.randn(2, 19, in_f, dtype=dtype)
    g = torch.randn(2, 19, out_f, dtype=dtype)
    (y, dx, db), (y_p, dx_p, db_p) = run(ours, x, g), run(theirs, x, g)
    assert_peft_bits(y, y_p)
    assert_peft_bits(dx, dx_p)
    assert ((db - db_p).abs().max() / db_p.abs().max()).item() < 1e-5


def test_bat_precision_switch_everywhere():
    with pytest.raises(ValueError, match="bat_precision"):
        miss_ext.MissLinear(nn.Linear(8, 8), r=4, init_weights="bat", bat_precision="fp32")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).to(torch.bfloat16)
    miss_ext.inject(model, ["0", "2"], r=16, init_weights="bat", bat_precision="promote")
    assert {m.bat_precision for _, m in miss_ext.inject.__globals__["miss_layers"](model)} == {"promote"}
    with pytest.raises(ValueError, match="bat_precision"):
        miss_ext.inject(copy.deepcopy(model), ["0"], r=16, adapter_name="b", bat_precision="nope")

    # The PEFT patch: "promote" reproduces unpatched PEFT; "base" does not (bf16 GEMMs).
    _, theirs = make_pair("bat", 256, 128, 16, 1, torch.bfloat16)
    x = torch.randn(30, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        want = theirs(x)
        with mp.patched(bat_precision="promote"):
            promoted = theirs(x)
            with mp.patched():  # an outer patch keeps its setting
                pass
            assert mp._SETTINGS["bat_precision"] == "promote"
        with mp.patched():
            fast = theirs(x)
    assert not mp.is_patched()
    assert_peft_bits(promoted, want)
    assert not torch.equal(fast, want)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_autocast_matches_peft(variant):
    """Trainer(bf16=True): an fp32 model and fp32 blocks under CPU autocast; both layers return
    x's dtype (fp32) holding bf16 values."""
    ours, theirs = make_pair(variant, 256, 128, 16, 32, torch.float32)
    x = torch.randn(50, 256)
    g = torch.randn(50, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y, dx, dd), (y_p, dx_p, dd_p) = run(ours, x, g), run(theirs, x, g)
    assert y.dtype == y_p.dtype == torch.float32
    assert torch.equal(y.bfloat16().float(), y)  # bf16 values
    if variant != "bat":
        assert_peft_bits(y.bfloat16(), y_p.bfloat16())
        assert ((dd - dd_p).abs().max() / dd_p.abs().max()).item() < 2e-2
    else:
        # PEFT rounds W B and B to bf16 before forming W' under autocast; we form W' in fp32.
        assert ((y - y_p).abs().max() / y_p.abs().max()).item() < 2e-2
        assert ((dd - dd_p).abs().max() / dd_p.abs().max()).item() < 5e-2

