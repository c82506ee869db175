"""float64 gradcheck of every operator (the per-op case table, tests/_op_cases.py) and every
variant's functional form.

Cases cover leading batch dims, in % r != 0, r = 1, r = in, non-contiguous inputs,
out % mini_r, requires-grad on every non-empty subset of inputs, and BAT with the base
weight trainable.
"""

import pytest
import torch
from torch.autograd import gradcheck

from miss_ext import functional as MF

from _op_cases import params, rand64 as _rand, subsets as _subsets, with_grad_on as _with_grad_on
from conftest import DEVICES

ops = torch.ops.miss_ext


def _check(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,case", params("gradcheck"))
def test_op(device, op, case):
    checks = case.make(device)
    assert checks
    for fn, inputs in checks:
        _check(fn, inputs)


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
