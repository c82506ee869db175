"""BAT under autocast (``Trainer(bf16=True)``; docs/MATH.md section 11.4): PEFT's products take the
fp32 block and dL/dW' rounded to bf16, so ours may too (``half_products``, one bf16 piece on the
CPU's matrix units instead of two or three). Checked against float64 on the same operands: output,
input gradient and block gradient no further from it than PEFT's, on the fast path and off it.
"""

import pytest
import torch

import miss_ext
from miss_ext import reference as R
from test_autocast import autocast_step, layer_pair

peft = pytest.importorskip("peft")

ops = torch.ops.miss_ext
# Where the CPU's bf16 micro-kernels run (r a multiple of 16), half_products takes a faster path.
FAST_PATH = miss_ext.build_info().get("cpu_brgemm_status") == "active"


def float64_step(layer, x, g):
    """y, dL/dx and dL/dB of the layer in float64 on the bf16 operands and the fp32 block."""
    base = layer.base_layer
    w = base.weight.detach().double()
    block = layer.miss_block["default"].detach().double().requires_grad_()
    xi = x.double().requires_grad_()
    y = R.bat_linear(xi, w, None if base.bias is None else base.bias.detach().double(), block)
    y.backward(g.double())
    return y.detach(), xi.grad, block.grad


def errors(got, exact):
    return [(a.double() - b).norm().item() / b.norm().item() for a, b in zip(got, exact)]


@pytest.mark.parametrize("in_f,out_f,r,n", [(256, 128, 16, 64), (512, 256, 64, 96), (96, 64, 8, 33)])
@pytest.mark.parametrize("size", [0.05, 0.5])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_no_further_from_float64_than_peft(in_f, out_f, r, n, size, bias):
    ours, theirs = layer_pair("bat", in_f, out_f, r, 1, torch.bfloat16, bias=bias)
    block = size * torch.randn(ours.miss_block["default"].shape)
    for layer in (ours, theirs):
        layer.miss_block["default"].data = block.clone()
    x = torch.randn(n, in_f, dtype=torch.bfloat16)
    g = torch.randn(n, out_f, dtype=torch.bfloat16)
    exact = float64_step(ours, x, g)
    mine, peft_errs = errors(autocast_step(ours, x, g), exact), errors(autocast_step(theirs, x, g), exact)
    # y and dL/dx share the final bf16 rounding with PEFT, so their errors sit close; 1% is the
    # spread of that shared rounding across seeds, far below the gap a worse W' would open.
    for name, e, e_p in zip(("y", "dx", "dB"), mine, peft_errs):
        assert e <= 1.01 * e_p, (name, e, e_p)
    assert mine[2] < 1e-2  # dL/dB: fp32 accumulation of one bf16 rounding of dL/dW'


@pytest.mark.skipif(not FAST_PATH, reason="the one-piece path needs the CPU's bf16 micro-kernels")
def test_half_products_take_the_one_piece_path():
    """The flag reaches the kernels: on the fast path the results move (B and dL/dW' enter as one
    bf16 piece), within the bound of the rounding they model."""
    torch.manual_seed(1)
    w = torch.randn(128, 256, dtype=torch.bfloat16)
    b = 0.3 * torch.randn(128 // 16, 16, 16)
    x = torch.randn(40, 256, dtype=torch.bfloat16)
    g = torch.randn(40, 128, dtype=torch.bfloat16)
    u = torch.finfo(torch.bfloat16).eps / 2
    for exact_fn, half_fn in (
        (lambda: ops.bat_linear(x, w, None, [b]), lambda: ops.bat_linear(x, w, None, [b], True)),
        (lambda: ops.bat_input_grad(g, w, [b]), lambda: ops.bat_input_grad(g, w, [b], True)),
    ):
        full, half = exact_fn().double(), half_fn().double()
        assert not torch.equal(full, half)
        assert (full - half).norm() <= 4 * u * full.norm()
    full = ops.bat_io_block_grad(g, x, w, 16, torch.float32)
    half = ops.bat_io_block_grad(g, x, w, 16, torch.float32, True)
    assert not torch.equal(full, half)
    assert (full - half).norm() <= 2 * u * full.norm()


def test_half_products_changes_nothing_without_a_half_type():
    """float32 operands: nothing to round to, the flag is a no-op."""
    w, b = torch.randn(64, 32), 0.1 * torch.randn(4, 16, 16)
    x, g = torch.randn(8, 32), torch.randn(8, 64)
    assert torch.equal(ops.bat_linear(x, w, None, [b]), ops.bat_linear(x, w, None, [b], True))
    assert torch.equal(ops.bat_input_grad(g, w, [b]), ops.bat_input_grad(g, w, [b], True))
    assert torch.equal(ops.bat_io_block_grad(g, x, w, 16), ops.bat_io_block_grad(g, x, w, 16, None, True))
