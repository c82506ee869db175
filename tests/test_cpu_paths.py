"""The CPU kernels have two paths for the mixed-precision products: oneDNN's bf16 micro-kernel
(AMX / AVX512-BF16 machines) and fp32 GEMMs on converted chunks (every other CPU, and float16).
Both must pass the mixed-precision tests; the micro-kernel path is switched off with
MISS_EXT_CPU_BRGEMM=0 (read once per process, hence the subprocess), and the workspace cache of
large temporaries with MISS_EXT_CPU_WORKSPACE=0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import miss_ext

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("env", [{"MISS_EXT_CPU_BRGEMM": "0"}, {"MISS_EXT_CPU_WORKSPACE": "0"}],
                         ids=["fp32-fallback", "no-workspace-cache"])
def test_mixed_precision_suite_on_the_other_paths(env):
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(HERE / "test_mixed_precision.py")],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_both_paths_agree_on_the_block_gradient():
    """The micro-kernel path (pieces) and the fp32 path give dL/dB within fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(300, 256, generator=g).bfloat16()
    x = torch.randn(300, 512, generator=g).bfloat16()
    w = (0.05 * torch.randn(256, 512, generator=g)).bfloat16()
    ours = torch.ops.miss_ext.bat_io_block_grad(grad, x, w, 64)
    code = ("import torch, miss_ext, sys; g = torch.Generator().manual_seed(0);"
            "grad = torch.randn(300, 256, generator=g).bfloat16(); x = torch.randn(300, 512, generator=g).bfloat16();"
            "w = (0.05 * torch.randn(256, 512, generator=g)).bfloat16();"
            "torch.save(torch.ops.miss_ext.bat_io_block_grad(grad, x, w, 64), sys.argv[1])")
    out = HERE / "_fallback_block_grad.pt"
    try:
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, timeout=300,
                       env={**os.environ, "MISS_EXT_CPU_BRGEMM": "0"})
        other = torch.load(out)
    finally:
        out.unlink(missing_ok=True)
    assert ((ours - other).abs().max() / other.abs().max()).item() < 1e-6


def test_empty_cache_releases_the_workspace():
    w = torch.randn(1024, 1024).bfloat16()
    b = 0.01 * torch.randn(16, 64, 64)
    for _ in range(2):
        torch.ops.miss_ext.bat_transform(w, b, torch.bfloat16)  # a 2 MB temporary, returned to the cache
    assert miss_ext._C.cpu_workspace_cached_bytes() > 0
    assert miss_ext.empty_cache() > 0
    assert miss_ext._C.cpu_workspace_cached_bytes() == 0


@pytest.mark.parametrize("n,out_f,r", [(1, 16, 8), (37, 80, 8), (300, 256, 24), (129, 192, 64), (65, 48, 40),
                                       (33, 64, 72)])
def test_block_grads_on_bf16_grad_match_float64(n, out_f, r):
    """miss_block_grads with a bf16 G (the micro-kernel path where it runs: odd token counts, a
    narrow last panel, r not a multiple of the panel; r = 40 and 72, where D's second piece starts
    inside one packed panel and ends in the next, of another width) against float64: dL/dD to fp32 accuracy
    (three pieces of S), dL/dS to 2^-16 (two pieces of D; the caller rounds it to bf16)."""
    g = torch.Generator().manual_seed(n + out_f + r)
    grad = torch.randn(n, out_f, generator=g).bfloat16()
    s = torch.randn(n, r, generator=g) * torch.logspace(-3, 3, r)  # pieces across magnitudes
    block = 0.05 * torch.randn(r, out_f, generator=g)
    gb, gs = torch.ops.miss_ext.miss_block_grads(grad, s, block)
    want_b = s.double().t() @ grad.double()
    want_s = grad.double() @ block.double().t()
    assert ((gb.double() - want_b).abs().max() / want_b.abs().max()).item() < 2e-6
    assert ((gs.double() - want_s).abs().max() / want_s.abs().max()).item() < 3e-5


def _bf16_half_ulp(t: torch.Tensor) -> torch.Tensor:
    """Half a bf16 unit in the last place of each value of float64 ``t`` (normal range)."""
    e = torch.floor(torch.log2(t.abs().clamp_min(1e-30)))
    return torch.exp2(e - 8)


@pytest.mark.parametrize("n,out_f,r", [(1, 16, 8), (65, 40, 24), (300, 256, 64), (129, 520, 64), (70, 300, 72),
                                       (512, 1024, 64)])
def test_add_product_on_bf16_base_is_rounded_once(n, out_f, r):
    """miss_add_product (bf16 base, fp32 S and D: the forward of the users' configuration without
    autocast) on every path: the fp32 micro-kernel where build_info says cpu_brgemm_fp32 (column
    panels of 256 and their tails, odd row counts), aten's fp32 GEMM elsewhere. The product keeps
    fp32 accuracy and the sum is rounded to bf16 once: within half a bf16 ulp of the float64 result
    (plus the fp32 product's own rounding)."""
    g = torch.Generator().manual_seed(n + out_f + r)
    base = torch.randn(n, out_f, generator=g).bfloat16()
    s = torch.randn(n, r, generator=g)
    block = 0.05 * torch.randn(r, out_f, generator=g)
    y = torch.ops.miss_ext.miss_add_product(base, s, block)
    want = base.double() + s.double() @ block.double()
    fp32_bound = 1e-6 * (s.double().abs() @ block.double().abs())
    err = (y.double() - want).abs()
    assert (err <= _bf16_half_ulp(want) * (1 + 1e-6) + fp32_bound).all(), err.max().item()


@pytest.mark.parametrize("n,out_f,in_f,r", [(300, 256, 512, 64), (37, 64, 192, 16), (129, 256, 384, 128),
                                            (64, 96, 160, 32)])
def test_io_block_grad_in_fp32_matches_float64(n, out_f, in_f, r):
    """bat_io_block_grad with fp32 accuracy (no autocast) from bf16 G, x and W, on whichever path
    runs here (one fp32 micro-kernel product on AVX512-BF16 CPUs, three bf16 pieces on AMX, fp32
    GEMMs elsewhere): r = 16 shares a packed panel between slabs, r = 128 spans two, odd token
    counts pad K. Against float64 (W + I)^T (G^T x) summed over blocks, to fp32 accuracy."""
    g = torch.Generator().manual_seed(n + in_f + r)
    grad = torch.randn(n, out_f, generator=g).bfloat16()
    x = torch.randn(n, in_f, generator=g).bfloat16()
    w = (0.05 * torch.randn(out_f, in_f, generator=g)).bfloat16()
    ours = torch.ops.miss_ext.bat_io_block_grad(grad, x, w, r)
    gw = grad.double().t() @ x.double()
    want = torch.ops.miss_ext.bat_block_grad(gw, w.double(), r)
    assert ours.dtype == torch.float32
    assert ((ours.double() - want).abs().max() / want.abs().max()).item() < 2e-6
