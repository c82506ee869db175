"""Kernel parity on every kernel path, from the per-op case table (tests/_op_cases.py,
``parity``): on CUDA the CUDA kernels against the CPU kernels (the sweep bench/gpu_check.sh
runs on a GPU machine), on the CPU the kernels against the float64 reference on the same
(already rounded) inputs. Shapes reach the split, wide-column, vector, WMMA and fallback
paths, in every dtype and the mixed-precision pairs (a bf16/fp16 base with fp32 blocks).

A result passes when its shape is right, its largest error is within ``TOL[dtype]`` times
``max(1, largest |expected|)``, and it is finite exactly where the expected result is.
The split paths must also be bit-identical run to run.
"""

import pytest
import torch

import _op_reference as REF
from _op_cases import params
from conftest import DEVICES

ops = torch.ops.miss_ext
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _on(device, args):
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def mismatch(got, want, tol_dtype, exact=False):
    """Why ``got`` is not ``want`` within the tolerance of ``tol_dtype``, or None."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if exact:
        return None if torch.equal(got, want.to(got.dtype)) else f"differs in {(got != want).sum().item()} places"
    if got.numel() == 0:
        return None
    got, want = got.double(), want.double()
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return "non-finite values differ"
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    if not err <= TOL[tol_dtype] * scale:
        return f"max abs err {err:.3g} (scale {scale:.3g}, tolerance {TOL[tol_dtype] * scale:.3g})"
    return None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,case", params("parity"))
def test_parity(device, op, case):
    failures = []
    for dtype in case.dtypes:
        torch.manual_seed(0)
        args = case.make(dtype)
        if device == "cpu":
            got, want = case.run(ops, *args), case.run(REF, *args)
        else:
            got, want = case.run(ops, *_on(device, args)), case.run(ops, *args)
        why = mismatch(got, want, case.tol_dtype(dtype), case.exact)
        if why:
            failures.append(f"{op} {case.id} {dtype}: {why}")
    assert not failures, "\n".join(failures)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# The split and partial paths, which combine partial results in some order.
SPLIT_PATHS = {
    "blocksum-split": lambda d: ops.blocksum(torch.randn(2, 60000, generator=_gen(1)).to(d), 16),
    "bat_block_grad-split": lambda d: ops.bat_block_grad(
        torch.randn(64, 8192, generator=_gen(2)).to(d), torch.randn(64, 8192, generator=_gen(3)).to(d), 64),
    "bat_block_grad-bf16-wmma": lambda d: ops.bat_block_grad(
        torch.randn(256, 8192, generator=_gen(2)).bfloat16().to(d), torch.randn(256, 8192, generator=_gen(3)).bfloat16().to(d), 128),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SPLIT_PATHS))
def test_split_paths_bit_identical_run_to_run(device, name):
    a, b = SPLIT_PATHS[name](device), SPLIT_PATHS[name](device)
    assert torch.equal(a, b)


def test_mismatch_catches_what_it_must():
    """The comparison itself: a wrong shape, a large error, a lost Inf and a one-bit mask
    difference are reported; a rounding-sized error is not."""
    want = torch.randn(4, 5, dtype=torch.float64)
    assert mismatch(want[:3], want, torch.float32)
    assert mismatch(want + 1e-3, want, torch.float32)
    assert mismatch(want + 1e-6, want, torch.float32) is None
    inf = want.clone()
    inf[0, 0] = float("inf")
    assert mismatch(want, inf, torch.float32)
    flipped = want.clone()
    flipped[1, 1] = torch.nextafter(flipped[1, 1], torch.tensor(10.0, dtype=torch.float64))
    assert mismatch(flipped, want, torch.float64, exact=True)
    assert mismatch(want.clone(), want, torch.float64, exact=True) is None
