"""The half-type GEMMs of a MiSS step on a CPU where torch emulates them (no oneDNN kernel for the
type, e.g. AVX2 only): there each runs as an fp32 product of the exact upcast operands, rounded
once (docs/MATH.md 11.5). Both branches run here, whatever this CPU has: Python's choice is
switched through ``miss_ext._ops_common._EMULATED``, the C++ ops' through MISS_EXT_CPU_HALF_GEMM
in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext import _ops_common

HERE = Path(__file__).resolve().parent


@pytest.fixture(params=[True, False], ids=["emulated", "native"])
def emulated(request, monkeypatch):
    monkeypatch.setattr(_ops_common, "_EMULATED", {torch.bfloat16: request.param, torch.float16: request.param})
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_frozen_input_grad_is_one_rounding_of_the_exact_product(emulated, dtype):
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(37, 96, generator=g).to(dtype)
    weight = torch.randn(96, 40, generator=g).to(dtype)
    ours = _ops_common.half_mm(grad, weight)
    exact = grad.double() @ weight.double()
    assert ours.dtype == dtype and ours.shape == exact.shape
    # One rounding of an fp32 sum: within one half-type ulp of the exact value (plus fp32's own
    # accumulation error, far below it).
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((ours.double() - exact).abs() <= ulp * 1.01 + 1e-6 * exact.abs().max()).all()
    if emulated:
        assert torch.equal(ours, torch.mm(grad.float(), weight.float()).to(dtype))


def test_fp32_and_cuda_like_inputs_keep_torch_gemm(monkeypatch):
    monkeypatch.setattr(_ops_common, "_EMULATED", {torch.bfloat16: True, torch.float16: True})
    grad, weight = torch.randn(5, 8), torch.randn(8, 3)
    assert torch.equal(_ops_common.half_mm(grad, weight), grad @ weight)
    assert not _ops_common.emulated_half_gemm(torch.empty(1, device="meta", dtype=torch.bfloat16))


@pytest.mark.parametrize("variant", ["standard", "mini"])
@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "autocast"])
def test_layer_input_gradient_on_both_branches(emulated, variant, autocast):
    """bf16 base, fp32 block (get_peft_model's layer), with and without autocast: dL/dx within
    bf16 rounding of float64's on either branch."""
    torch.manual_seed(0)
    base = nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False)
    kw = dict(mini_r=12, init_weights="mini") if variant == "mini" else dict(init_weights=False)
    layer = miss_ext.MissLinear(base, r=8, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.backward(gy)
    block = next(p for p in layer.parameters() if p.requires_grad)
    xd = x.detach().double().requires_grad_(True)
    term = miss_ext.reference.mini_forward if variant == "mini" else miss_ext.reference.miss_forward
    yd = term(xd, xd @ base.weight.double().t(), block.detach().double())
    yd.backward(gy.double())
    err = (x.grad.double() - xd.grad).abs().max() / xd.grad.abs().max()
    assert err < 1e-2, err


def test_slabs_give_the_unslabbed_bits(monkeypatch):
    monkeypatch.setattr(_ops_common, "_EMULATED", {torch.bfloat16: True, torch.float16: True})
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(9, 40, generator=g).bfloat16()
    weight = torch.randn(40, 70, generator=g).bfloat16()
    monkeypatch.setattr(_ops_common, "_UPCAST_ELEMS", 40 * 16)  # slabs of 16 columns, the last 6
    ours = _ops_common.half_mm(grad, weight)
    # Each slab is its own fp32 GEMM over the whole reduction, rounded once.
    for c0 in range(0, 70, 16):
        want = torch.mm(grad.float(), weight[:, c0 : c0 + 16].float()).to(torch.bfloat16)
        assert torch.equal(ours[:, c0 : c0 + 16], want), c0


@pytest.mark.parametrize("force", ["upcast", "aten"])
def test_mixed_precision_suite_on_both_half_gemms(force):
    """BAT's input gradient (bat_input_grad, C++) and the standard/mini one (Python) take the
    choice from MISS_EXT_CPU_HALF_GEMM, read once per process, hence the subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(HERE / "test_mixed_precision.py"), str(HERE / "test_autocast.py"),
         str(HERE / "test_emulated_half_gemm.py") + "::test_bat_input_grad_in_slabs",
         str(HERE / "test_emulated_half_gemm.py") + "::test_forward_gemms_in_slabs"],
        env={**os.environ, "MISS_EXT_CPU_HALF_GEMM": force}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bat_input_grad_in_slabs():
    """bat_input_grad's G W' at a weight wider than one upcast slab (1024 x 4160: slabs of 4096
    and 64 columns). Upcast (forced in the subprocess above, or this CPU's choice): each slab is
    one fp32 GEMM rounded once; aten's: within bf16 rounding of the same product."""
    g = torch.Generator().manual_seed(2)
    weight = (0.03 * torch.randn(1024, 4160, generator=g)).bfloat16()
    block = 0.1 * torch.randn(1024 // 64, 64, 64, generator=g)
    grad = torch.randn(6, 1024, generator=g).bfloat16()
    ours = torch.ops.miss_ext.bat_input_grad(grad, weight, [block])
    w_prime = torch.ops.miss_ext.bat_transform(weight, block, torch.bfloat16)
    g32 = grad.float()
    if os.environ.get("MISS_EXT_CPU_HALF_GEMM") == "upcast":
        for c0, c1 in ((0, 4096), (4096, 4160)):
            want = torch.mm(g32, w_prime[:, c0:c1].float()).to(torch.bfloat16)
            assert torch.equal(ours[:, c0:c1], want), c0
    exact = grad.double() @ w_prime.double()
    assert ((ours.double() - exact).abs() <= 1.01 * 2**-8 * exact.abs() + 1e-6 * exact.abs().max()).all()


@pytest.mark.parametrize("config", ["bf16-base-fp32-block", "bf16-block", "bat"])
def test_forward_gemms_in_slabs(config):
    """The forward's base GEMM at a weight wider than one upcast slab (1024 x 4160 read as W^T:
    slabs of 4096 and 64 columns): x W^T + b (fp32 blocks: miss_linear's mixed path; BAT:
    bat_linear on W'), or y = S D + b, then y += x W^T (a bf16 block: the equal-dtype path).
    Zero blocks make the output the base product alone, so where the GEMM is upcast (forced in
    the subprocess above, or this CPU's choice) every slab must be its own fp32 GEMM rounded
    once; either way the output is within bf16 rounding of the exact product."""
    g = torch.Generator().manual_seed(3)
    base = nn.Linear(1024, 4160).bfloat16().requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(0.03 * torch.randn(4160, 1024, generator=g))
        base.bias.copy_(torch.randn(4160, generator=g))
    layer = miss_ext.MissLinear(base, r=64, init_weights="bat" if config == "bat" else True)
    if config == "bf16-block":
        layer.to(torch.bfloat16)
    assert all(p.abs().max() == 0 for p in layer.miss_block.values())
    x = torch.randn(6, 1024, generator=g).bfloat16()
    with torch.no_grad():
        y = layer(x)
    x32, w_t, b32 = x.float(), base.weight.t(), base.bias.float()
    if _ops_common.emulated_half_gemm(x):
        for c0, c1 in ((0, 4096), (4096, 4160)):
            if config == "bf16-block":  # y starts as round(S D + b) = b, then gains x W^T
                want = torch.addmm(b32[c0:c1].expand(6, c1 - c0), x32, w_t[:, c0:c1].float())
            else:
                want = torch.addmm(b32[c0:c1], x32, w_t[:, c0:c1].float())
            assert torch.equal(y[:, c0:c1], want.bfloat16()), c0
    exact = x.double() @ w_t.double() + base.bias.double()
    assert ((y.double() - exact).abs() <= 1.01 * 2**-8 * exact.abs() + 1e-6 * exact.abs().max()).all()
