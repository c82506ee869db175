"""The eager autograd path (miss_ext._ops_common.call): the functional wrappers run each op through
a lean autograd.Function of the registered formulas, and its backward below autograd. It must give
the registered path's numbers bit for bit, be the path actually taken in eager mode, keep double
backward, and step aside where torch.compile, functorch or fake tensors need the op itself."""

import os
import subprocess
import sys

import pytest
import torch

import miss_ext
import miss_ext.functional as MF
from bench.overhead_bench import graph_node_names
from miss_ext import _ops_common



def _case(name, dtype=torch.float32, block_dtype=torch.float32, autocast=False):
    g = torch.Generator().manual_seed(0)
    n, i, o, r = 6, 32, 24, 8
    x = torch.randn(n, i, generator=g).to(dtype).requires_grad_()
    w = torch.randn(o, i, generator=g).to(dtype)
    b = torch.randn(o, generator=g).to(dtype)
    seed = torch.tensor([1234])
    extra = []  # further leaves whose gradients are compared
    if name == "miss_linear":
        blk = torch.randn(r, o, generator=g).to(block_dtype).requires_grad_()
        fn = lambda: MF.miss_linear(x, w, b, blk, 0.0, True)  # noqa: E731
    elif name == "miss_linear_trainable_base":  # the weight and bias train (x is then kept), x not
        blk = torch.randn(r, o, generator=g).to(block_dtype).requires_grad_()
        x.requires_grad_(False)
        w.requires_grad_()
        b.requires_grad_()
        extra = [w, b]
        fn = lambda: MF.miss_linear(x, w, b, blk, 0.0, True)  # noqa: E731
    elif name == "miss_linear_mini_dropout":
        blk = torch.randn(r, 4, generator=g).to(block_dtype).requires_grad_()
        fn = lambda: MF.miss_linear(x, w, None, blk, 0.25, True, seed)  # noqa: E731
    elif name == "miss_forward":
        blk = torch.randn(r, o, generator=g).to(block_dtype).requires_grad_()
        base = (x.detach() @ w.t()).requires_grad_()
        fn = lambda: MF.miss_forward(x, base, blk, 0.0, True)  # noqa: E731
    elif name == "mini_forward":
        blk = torch.randn(r, 4, generator=g).to(block_dtype).requires_grad_()
        base = (x.detach() @ w.t()).requires_grad_()
        fn = lambda: MF.mini_forward(x, base, blk, 0.0, True)  # noqa: E731
    elif name == "blocksum_dropout":
        blk = torch.zeros(1, requires_grad=True)
        fn = lambda: MF.blocksum(x, r, 0.5, True, seed) * 2.0  # noqa: E731
    elif name == "bat_transform":
        blk = (torch.randn(o // r, r, r, generator=g) * 0.1).to(block_dtype).requires_grad_()
        wt = w.detach().clone().requires_grad_()
        x = wt
        fn = lambda: MF.bat_transform(wt, blk)  # noqa: E731
    elif name in ("bat_linear", "bat_linear_chain"):
        blocks = [(torch.randn(o // r, r, r, generator=g) * 0.1).to(block_dtype).requires_grad_()
                  for _ in range(2 if name == "bat_linear_chain" else 1)]
        blk = blocks[-1]
        extra = blocks[:-1]
        fn = lambda: MF.bat_linear(x, w, b, blocks, autocast)  # noqa: E731
    else:
        raise AssertionError(name)

    def run():
        for t in (x, blk, *extra):
            t.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = fn()
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
        y.backward(gy)
        return y.grad_fn, [y.detach(), x.grad, blk.grad] + [t.grad for t in extra]

    return run


CASES = [
    ("miss_linear", torch.float32, torch.float32, False),
    ("miss_linear", torch.bfloat16, torch.float32, False),
    ("miss_linear", torch.bfloat16, torch.float32, True),
    ("miss_linear", torch.float64, torch.float64, False),
    ("miss_linear_trainable_base", torch.float32, torch.float32, False),
    ("miss_linear_mini_dropout", torch.float32, torch.float32, False),
    ("miss_forward", torch.float32, torch.float32, False),
    ("miss_forward", torch.bfloat16, torch.float32, False),
    ("mini_forward", torch.bfloat16, torch.float32, False),
    ("blocksum_dropout", torch.float32, torch.float32, False),
    ("bat_transform", torch.float32, torch.float32, False),
    ("bat_linear", torch.float32, torch.float32, False),
    ("bat_linear", torch.bfloat16, torch.float32, False),
    ("bat_linear_chain", torch.float64, torch.float64, False),
]


@pytest.mark.parametrize("name,dtype,block_dtype,autocast", CASES)
def test_eager_path_matches_registered_bit_for_bit(name, dtype, block_dtype, autocast, monkeypatch):
    fast_fn, fast = _case(name, dtype, block_dtype, autocast)()
    monkeypatch.setitem(_ops_common.EAGER_AUTOGRAD, "enabled", False)
    slow_fn, slow = _case(name, dtype, block_dtype, autocast)()
    # The path taken: our lean Function in eager mode, torch.library's generated one when off.
    assert any("MissExt_" in n for n in graph_node_names(fast_fn))
    assert not any("MissExt_" in n for n in graph_node_names(slow_fn))
    assert any("GeneratedBackwardFor_miss_ext" in n for n in graph_node_names(slow_fn))
    for a, b in zip(fast, slow):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


def test_layer_step_takes_eager_path():
    layer = miss_ext.MissLinear(torch.nn.Linear(32, 32, bias=False), r=8, init_weights=False)
    y = layer(torch.randn(4, 32, requires_grad=True))
    assert type(y.grad_fn).__name__ == "MissExt_miss_linearBackward"


def test_double_backward_on_eager_path():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, generator=g)
    blk = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    y = MF.miss_linear(x, w, None, blk, 0.0, True)
    assert type(y.grad_fn).__name__ == "MissExt_miss_linearBackward"
    assert torch.autograd.gradgradcheck(lambda a, c: MF.miss_linear(a, w, None, c, 0.0, True), (x, blk))


def test_no_grad_call_builds_no_graph_and_matches():
    x = torch.randn(4, 16)
    w = torch.randn(8, 16)
    blk = torch.randn(4, 8, requires_grad=True)
    with torch.no_grad():
        y = MF.miss_linear(x, w, None, blk, 0.0, True)
    assert y.grad_fn is None and not y.requires_grad
    assert torch.equal(y, torch.ops.miss_ext.miss_linear(x, w, None, blk.detach(), 0.0, None, False)[0])


def test_functorch_transforms_get_the_registered_op():
    # Inside a functorch transform the call defers to the op (whatever torch.library does there).
    seen = []

    def f(c):
        seen.append(_ops_common._eager_context())
        return c.square().sum()

    torch.func.grad(f)(torch.randn(3))
    assert seen == [False]
    assert _ops_common._eager_context()


def test_fake_tensors_fall_back_to_registered_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(4, 16, requires_grad=True)
        y = MF.miss_linear(x, torch.randn(8, 16), None, torch.randn(4, 8, requires_grad=True), 0.0, True)
        assert y.shape == (4, 8)
        assert "MissExt_" not in type(y.grad_fn).__name__


def test_every_op_has_an_eager_path():
    names = {o for o in dir(torch.ops.miss_ext) if isinstance(getattr(torch.ops.miss_ext, o), torch._ops.OpOverloadPacket)}
    assert names and names == set(_ops_common._EAGER)
