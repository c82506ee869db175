"""Determinism and threads (issue #6). The per-op calls come from the per-op case table
(tests/_op_cases.py, ``threads``).

* Every CPU kernel gives bit-identical results run to run, and with 1 vs 2 intra-op threads
  (torch.set_num_threads; restored after). Inputs are sized so the work really is split across
  threads (blocksum/tile/merge: several row grains; BAT: several 512-row chunks per slab).
* The fused layer ops (bat_linear, miss_linear) end in the vendor GEMM of the frozen layer, whose
  bits MKL lets depend on the thread count for long reductions (it splits K across threads on
  Intel CPUs, as plain torch.mm does): they must be bit-identical run to run, and across thread
  counts whenever a plain torch.mm of their GEMM's shape is.
* Several Python threads running forward and backward on shared MissLinear layers at the same
  time get bit-identical results to each one running alone.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import miss_ext

from _op_cases import params, thread_inputs


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _runs(fn, t):
    torch.set_num_threads(2)
    first, again = fn(t), fn(t)
    torch.set_num_threads(1)
    return first, again, fn(t)


def _kernel_params(vendor_gemm):
    return [p for p in params("threads") if (p.values[1].vendor_gemm is not None) == vendor_gemm]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,case", _kernel_params(False))
def test_kernels_bit_identical_runs_and_threads(op, case, dtype, restore_threads):
    first, again, single = _runs(case.run, thread_inputs(dtype))
    assert torch.equal(first, again), f"{case.id}: two runs differ"
    assert torch.equal(first, single), f"{case.id}: 1 thread and 2 threads differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,case", _kernel_params(True))
def test_layer_ops_bit_identical_runs_and_threads_as_vendor_gemm(op, case, dtype, restore_threads):
    (m, k, n) = case.vendor_gemm
    first, again, single = _runs(case.run, thread_inputs(dtype))
    assert torch.equal(first, again), f"{case.id}: two runs differ"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (k, n)))
    plain = _runs(lambda _: a @ b, None)
    if torch.equal(plain[0], plain[2]):
        assert torch.equal(first, single), f"{case.id}: 1 thread and 2 threads differ (torch.mm of its shape does not)"


def _layers():
    torch.manual_seed(0)
    layers = {}
    for variant, kw in (("standard", dict(init_weights=False)), ("mini", dict(init_weights="mini", mini_r=8)),
                        ("bat", dict(init_weights="bat"))):
        layer = miss_ext.MissLinear(nn.Linear(96, 64), r=8, **kw)
        with torch.no_grad():
            for blk in layer.miss_block.values():
                blk.copy_(torch.randn_like(blk) * 0.1)
        layers[variant] = layer
    return layers


def _step(layer, x):
    """Forward and backward without touching shared .grad fields."""
    y = layer(x)
    gx, gb = torch.autograd.grad((y * y).sum(), [x, layer.miss_block["default"]])
    return y.detach(), gx, gb


def test_layer_forward_backward_bit_identical_threads(restore_threads):
    """The whole MissLinear step (aten GEMMs included) is bit-identical run to run and between
    1 and 2 intra-op threads."""
    layers = _layers()
    x = torch.randn(33, 96, requires_grad=True)
    for variant, layer in layers.items():
        torch.set_num_threads(2)
        a = _step(layer, x)
        b = _step(layer, x)
        torch.set_num_threads(1)
        c = _step(layer, x)
        for k, (u, v, w) in enumerate(zip(a, b, c)):
            assert torch.equal(u, v), f"{variant}: output {k} differs run to run"
            assert torch.equal(u, w), f"{variant}: output {k} differs between 1 and 2 threads"


def test_python_threads_share_layers():
    """4 Python threads x 5 iterations, each running forward+backward of every variant on
    the same layer objects, give what each input gives alone."""
    layers = _layers()
    n_threads, iters = 4, 5
    inputs = [torch.randn(17 + i, 96, requires_grad=True) for i in range(n_threads)]
    alone = {(i, v): _step(layer, inputs[i]) for i in range(n_threads) for v, layer in layers.items()}
    errors, mismatches = [], []
    barrier = threading.Barrier(n_threads)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(iters):
                for v, layer in layers.items():
                    got = _step(layer, inputs[i])
                    if not all(torch.equal(a, b) for a, b in zip(got, alone[(i, v)])):
                        mismatches.append((i, v))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a worker thread hung"
    assert not errors, errors
    assert not mismatches, f"results differ from running alone: {sorted(set(mismatches))}"
