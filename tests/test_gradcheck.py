"""float64 gradcheck of every operator and every variant's functional form.

Cases cover leading batch dims, in % r != 0, r = 1, r = in, non-contiguous inputs,
out % mini_r, requires-grad on every non-empty subset of inputs, and BAT with the base
weight trainable.
"""

import itertools

import pytest
import torch
from torch.autograd import gradcheck

from miss_ext import functional as MF

from conftest import DEVICES

ops = torch.ops.miss_ext
f64 = torch.float64


def _rand(*shape, device, scale=1.0):
    return (scale * torch.randn(*shape, dtype=f64, device=device)).requires_grad_()


def _check(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=False)


def _subsets(n):
    """Every non-empty subset of n input positions."""
    return [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]


def _with_grad_on(tensors, subset):
    return [t.detach().requires_grad_(i in subset) for i, t in enumerate(tensors)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,r", [((3, 8), 4), ((2, 3, 10), 4), ((4, 5), 1), ((3, 6), 6), ((2, 5), 8)])
def test_blocksum_tile(device, shape, r):
    x = _rand(*shape, device=device)
    _check(lambda t: ops.blocksum(t, r), (x,))
    s = _rand(*shape[:-1], r, device=device)
    _check(lambda t: ops.tile(t, shape[-1]), (s,))
    base = _rand(*shape, device=device)
    _check(lambda b, t: ops.tile_add(b, t), (base, s))


@pytest.mark.parametrize("device", DEVICES)
def test_blocksum_noncontiguous(device):
    x = torch.randn(10, 6, dtype=f64, device=device).t().requires_grad_()  # (6, 10), stride (1, 6)
    _check(lambda t: ops.blocksum(t, 4), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_dropout_ops(device, p):
    seed = torch.tensor([12345], dtype=torch.int64)
    x = _rand(3, 2, 10, device=device)
    _check(lambda t: ops.blocksum_dropout(t, 4, p, seed), (x,))
    s = _rand(3, 2, 4, device=device)
    _check(lambda t: ops.tile_dropout(t, 10, p, seed), (s,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_f,in_f,r", [(8, 12, 4), (6, 6, 1), (4, 4, 4)])
def test_bat_transform_and_grads(device, out_f, in_f, r):
    w = _rand(out_f, in_f, device=device)
    b = _rand(out_f // r, r, r, device=device, scale=0.3)
    g = _rand(out_f, in_f, device=device)
    for subset in _subsets(2):
        _check(lambda w_, b_: ops.bat_transform(w_, b_), _with_grad_on([w, b], subset))
        _check(lambda g_, w_: ops.bat_block_grad(g_, w_, r), _with_grad_on([g, w], subset))
        _check(lambda g_, b_: ops.bat_weight_grad(g_, b_), _with_grad_on([g, b], subset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,out_f,in_f,r", [((5,), 8, 12, 4), ((2, 3), 4, 4, 4), ((4,), 6, 3, 3)])
def test_bat_io_block_grad(device, lead, out_f, in_f, r):
    g = _rand(*lead, out_f, device=device)
    x = _rand(*lead, in_f, device=device)
    w = _rand(out_f, in_f, device=device)
    for subset in _subsets(3):
        _check(lambda g_, x_, w_: ops.bat_io_block_grad(g_, x_, w_, r), _with_grad_on([g, x, w], subset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,out_f,in_f,r", [((5,), 8, 12, 4), ((2, 3), 4, 4, 4), ((4,), 6, 3, 3)])
def test_bat_input_grad(device, lead, out_f, in_f, r):
    g = _rand(*lead, out_f, device=device)
    w = _rand(out_f, in_f, device=device)
    b = _rand(out_f // r, r, r, device=device, scale=0.3)
    for subset in _subsets(3):
        _check(lambda g_, w_, b_: ops.bat_input_grad(g_, w_, [b_]), _with_grad_on([g, w, b], subset))
    b2 = _rand(out_f // r, r, r, device=device, scale=0.3)
    _check(lambda g_, p, q: ops.bat_input_grad(g_, w.detach(), [p, q]), (g, b, b2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,r,out_f", [((5,), 4, 8), ((2, 3), 3, 5), ((4,), 1, 2)])
def test_miss_product_ops(device, lead, r, out_f):
    base = _rand(*lead, out_f, device=device)
    s = _rand(*lead, r, device=device)
    block = _rand(r, out_f, device=device)
    grad = _rand(*lead, out_f, device=device)
    for subset in _subsets(3):
        _check(lambda a, b, c: ops.miss_add_product(a, b, c), _with_grad_on([base, s, block], subset))
        _check(lambda a, b, c: ops.miss_block_grads(a, b, c), _with_grad_on([grad, s, block], subset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_f,in_f,r", [(8, 12, 4), (4, 4, 4), (6, 3, 3)])
def test_bat_unmerge(device, out_f, in_f, r):
    w = _rand(out_f, in_f, device=device)
    b = _rand(out_f // r, r, r, device=device, scale=0.2)
    for subset in _subsets(2):
        _check(lambda w_, b_: ops.bat_unmerge(w_, b_), _with_grad_on([w, b], subset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_f,in_f,r,m", [(8, 12, 4, 8), (8, 10, 4, 8), (6, 5, 5, 3), (4, 4, 1, 4)])
def test_miss_merge(device, out_f, in_f, r, m):
    w = _rand(out_f, in_f, device=device)
    block = _rand(r, m, device=device)
    for alpha in (1.0, -1.0):
        for subset in _subsets(2):
            _check(lambda w_, b_: ops.miss_merge(w_, b_, alpha), _with_grad_on([w, block], subset))


# ---------------------------------------------------------------- variants, end to end


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,in_f,out_f,r", [((3,), 8, 6, 4), ((2, 3), 10, 6, 4), ((4,), 5, 3, 1), ((2,), 6, 4, 6)])
def test_standard_variant(device, lead, in_f, out_f, r):
    x = _rand(*lead, in_f, device=device)
    base_out = _rand(*lead, out_f, device=device)
    block = _rand(r, out_f, device=device)
    for subset in _subsets(3):
        _check(lambda a, b, c: MF.miss_forward(a, b, c), _with_grad_on([x, base_out, block], subset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,in_f,out_f,r,m", [((3,), 8, 6, 4, 3), ((2, 2), 10, 8, 4, 2), ((4,), 5, 6, 5, 6), ((2,), 7, 4, 1, 1)])
def test_mini_variant(device, lead, in_f, out_f, r, m):
    x = _rand(*lead, in_f, device=device)
    base_out = _rand(*lead, out_f, device=device)
    block = _rand(r, m, device=device)
    for subset in _subsets(3):
        _check(lambda a, b, c: MF.mini_forward(a, b, c), _with_grad_on([x, base_out, block], subset))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.25])
def test_dropout_variants(device, p):
    seed = torch.tensor([7], dtype=torch.int64)
    x = _rand(2, 3, 10, device=device)
    base_out = _rand(2, 3, 8, device=device)
    d, dm = _rand(4, 8, device=device), _rand(4, 2, device=device)
    _check(lambda a, b, c: MF.miss_forward(a, b, c, p, True, seed), (x, base_out, d))
    _check(lambda a, b, c: MF.mini_forward(a, b, c, p, True, seed), (x, base_out, dm))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,in_f,out_f,r", [((3,), 8, 8, 4), ((2, 2), 6, 9, 3), ((2,), 4, 4, 4), ((3,), 4, 2, 1)])
def test_bat_variant(device, lead, in_f, out_f, r):
    """Every subset of (x, weight, bias, block) requiring grad: weight = trainable base weight."""
    x = _rand(*lead, in_f, device=device)
    w = _rand(out_f, in_f, device=device)
    bias = _rand(out_f, device=device)
    b = _rand(out_f // r, r, r, device=device, scale=0.3)
    for subset in _subsets(4):
        _check(lambda a, w_, c, b_: MF.bat_linear(a, w_, c, b_), _with_grad_on([x, w, bias, b], subset))
    _check(lambda a, b_: MF.bat_linear(a, w.detach(), None, b_), (x, b))


@pytest.mark.parametrize("device", DEVICES)
def test_bat_variant_chain_of_adapters(device):
    x = _rand(2, 8, device=device)
    w = _rand(8, 8, device=device)
    b1 = _rand(2, 4, 4, device=device, scale=0.3)
    b2 = _rand(4, 2, 2, device=device, scale=0.3)
    _check(lambda a, w_, p, q: MF.bat_linear(a, w_, None, [p, q]), (x, w, b1, b2))
    _check(lambda a, q: MF.bat_linear(a, w.detach(), None, [b1.detach(), q]), (x, b2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,in_f,out_f,r,m", [((3,), 8, 6, 4, 6), ((2, 2), 10, 8, 4, 2), ((2,), 5, 6, 5, 6), ((3,), 7, 4, 1, 1)])
def test_fused_linear(device, lead, in_f, out_f, r, m):
    """miss_linear: standard (m = out) and mini, every subset of (x, weight, bias, block)."""
    x = _rand(*lead, in_f, device=device)
    w = _rand(out_f, in_f, device=device)
    bias = _rand(out_f, device=device)
    block = _rand(r, m, device=device)
    for subset in _subsets(4):
        _check(lambda a, w_, c, b_: MF.miss_linear(a, w_, c, b_), _with_grad_on([x, w, bias, block], subset))
    seed = torch.tensor([3], dtype=torch.int64)
    _check(lambda a, b_: MF.miss_linear(a, w.detach(), None, b_, 0.3, True, seed), (x, block))
