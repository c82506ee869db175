"""Determinism and threads (issue #6).

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

ops = torch.ops.miss_ext
SEED = torch.tensor([12345], dtype=torch.int64)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _inputs(dtype):
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(
        x=rnd(1024, 300),  # row grain 2^16 / 300 = 218 rows: 5 tasks
        s=rnd(1024, 7),
        w=rnd(128, 1280),  # BAT, r = 16: 8 slabs x 3 chunks of 512 rows
        b=rnd(8, 16, 16) * 0.05,
        g=rnd(128, 1280),
        blk=rnd(16, 32),  # mini block for the (128, 1280) weight
    )


KERNELS = {
    "blocksum": lambda t: ops.blocksum(t["x"], 13),
    "blocksum_dropout": lambda t: ops.blocksum_dropout(t["x"], 13, 0.3, SEED),
    "tile": lambda t: ops.tile(t["s"], 300),
    "tile_dropout": lambda t: ops.tile_dropout(t["s"], 300, 0.3, SEED),
    "tile_add": lambda t: ops.tile_add(t["x"], t["s"]),
    "bat_transform": lambda t: ops.bat_transform(t["w"], t["b"]),
    "bat_block_grad": lambda t: ops.bat_block_grad(t["g"], t["w"], 16),
    "bat_weight_grad": lambda t: ops.bat_weight_grad(t["g"], t["b"]),
    "bat_unmerge": lambda t: ops.bat_unmerge(t["w"], t["b"]),
    "miss_merge": lambda t: ops.miss_merge(t["w"], t["blk"], -1.0),
    "bat_io_block_grad": lambda t: ops.bat_io_block_grad(t["x"][:, :128].contiguous(), t["x"][:, :160].contiguous(),
                                                         t["w"][:, :160].contiguous(), 16),
    "miss_add_product": lambda t: ops.miss_add_product(t["x"][:, :32].contiguous(), t["s"][:, :4].float(),
                                                       t["blk"][:4].float()),
    "miss_block_grads": lambda t: torch.cat([o.flatten() for o in ops.miss_block_grads(
        t["x"][:, :32].contiguous(), t["s"][:, :4].float(), t["blk"][:4].float())]),
    "bat_transform-mixed": lambda t: ops.bat_transform(t["w"], t["b"].float(), t["w"].dtype),
}

# Ops that end in the frozen layer's vendor GEMM: (op, the shapes (m, k, n) of that GEMM).
COMPOSITES = {
    "bat_linear": (lambda t: ops.bat_linear(t["x"].new_ones(64, 1280), t["w"], None, [t["b"]]), (64, 1280, 128)),
    "miss_linear": (lambda t: torch.cat([o.flatten() for o in ops.miss_linear(t["g"][:, :300].contiguous(), t["x"][:128], None, t["blk"], 0.3, SEED)]),
                    (128, 300, 1024)),
}


def _runs(fn, t):
    torch.set_num_threads(2)
    first, again = fn(t), fn(t)
    torch.set_num_threads(1)
    return first, again, fn(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernels_bit_identical_runs_and_threads(name, dtype, restore_threads):
    first, again, single = _runs(KERNELS[name], _inputs(dtype))
    assert torch.equal(first, again), f"{name}: two runs differ"
    assert torch.equal(first, single), f"{name}: 1 thread and 2 threads differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(COMPOSITES))
def test_layer_ops_bit_identical_runs_and_threads_as_vendor_gemm(name, dtype, restore_threads):
    fn, (m, k, n) = COMPOSITES[name]
    first, again, single = _runs(fn, _inputs(dtype))
    assert torch.equal(first, again), f"{name}: two runs differ"
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(*s, generator=g).to(dtype) for s in ((m, k), (k, n)))
    plain = _runs(lambda _: a @ b, None)
    if torch.equal(plain[0], plain[2]):
        assert torch.equal(first, single), f"{name}: 1 thread and 2 threads differ (torch.mm of its shape does not)"


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
