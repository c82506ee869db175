"""The frozen input gradient ``G @ W`` of standard and mini MiSS on a CPU where torch emulates the
half type's GEMM (no oneDNN kernel for it, e.g. AVX2 only): there it runs as an fp32 product of
the exact upcast operands, rounded once. Both branches run here, whatever this CPU has: the
choice is switched through ``miss_ext._ops_common._EMULATED``."""

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
    ours = _ops_common.frozen_input_grad(grad, weight)
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
    assert torch.equal(_ops_common.frozen_input_grad(grad, weight), grad @ weight)
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
    ours = _ops_common.frozen_input_grad(grad, weight)
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
         str(HERE / "test_emulated_half_gemm.py") + "::test_bat_input_grad_in_slabs"],
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
