"""Fused dropout: reproducible from a seed, the same mask in backward, the right keep rate,
and the documented counter-based generator (Philox4x32-10, known-answer vectors)."""

import math

import pytest
import torch

from miss_ext import functional as MF
from miss_ext import reference as R

from conftest import DEVICES

ops = torch.ops.miss_ext


def test_philox_known_answers():
    """Random123's published Philox4x32-10 vectors (counter 0, key 0) pin the generator that
    both the C++ kernels and the reference implement."""
    words = R.philox4x32_10(0, torch.zeros(1, dtype=torch.int64))[0].tolist()
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_mask_matches_reference_mask(device):
    """ones through tile_dropout expose the kernel's mask: it equals the reference's bit for bit."""
    seed = torch.tensor([-4242424242424242], dtype=torch.int64)
    p = 0.37
    out = ops.tile_dropout(torch.ones(33, 1, device=device), 29, p, seed)
    keep = R.dropout_mask(seed, (33, 29), p).to(device)
    assert torch.equal(out != 0, keep)
    torch.testing.assert_close(out[keep], torch.full_like(out[keep], 1 / (1 - p)))


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_output(device):
    x = torch.randn(4, 9, 64, device=device)
    seed = MF.dropout_seed()
    a = ops.blocksum_dropout(x, 16, 0.5, seed)
    b = ops.blocksum_dropout(x, 16, 0.5, seed)
    assert torch.equal(a, b)
    other = ops.blocksum_dropout(x, 16, 0.5, seed + 1)
    assert not torch.equal(a, other)
    torch.manual_seed(3)
    s1 = MF.dropout_seed()
    torch.manual_seed(3)
    assert torch.equal(s1, MF.dropout_seed())  # torch.manual_seed controls the seed


@pytest.mark.parametrize("device", DEVICES)
def test_p_zero_equals_no_dropout(device):
    x = torch.randn(3, 5, 40, device=device)
    seed = MF.dropout_seed()
    assert torch.equal(ops.blocksum_dropout(x, 8, 0.0, seed), ops.blocksum(x, 8))
    d = torch.randn(8, 12, device=device)
    base = torch.randn(3, 5, 12, device=device)
    assert torch.equal(MF.miss_forward(x, base, d, 0.0, True), MF.miss_forward(x, base, d))
    assert torch.equal(MF.miss_forward(x, base, d, 0.5, False), MF.miss_forward(x, base, d))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_statistical_bounds(device, p):
    n = 200_000
    out = ops.tile_dropout(torch.ones(n, 1, device=device), 1, p, MF.dropout_seed())
    kept = (out != 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept - (1 - p)) < 6 * sigma  # false alarm odds ~1e-9
    assert out.sum().item() / n == pytest.approx(1.0, abs=6 * sigma / (1 - p))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_uses_forward_mask(device):
    x = torch.randn(6, 48, device=device, requires_grad=True)
    seed = MF.dropout_seed()
    p = 0.4
    s = ops.blocksum_dropout(x, 16, p, seed)
    s.backward(torch.ones_like(s))
    keep = R.dropout_mask(seed, (6, 48), p).to(device)
    torch.testing.assert_close(x.grad, keep.float() / (1 - p))
    # And forward is the block sum of the same masked, scaled input.
    torch.testing.assert_close(s, R.blocksum(x.detach() * keep / (1 - p), 16))


def test_p_one_drops_everything():
    x = torch.randn(3, 8)
    assert torch.equal(ops.blocksum_dropout(x, 4, 1.0, MF.dropout_seed()), torch.zeros(3, 4))
