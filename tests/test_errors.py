"""Bad input: each raises an error whose message names the argument and the rule."""

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext import functional as MF

ops = torch.ops.miss_ext
seed = torch.tensor([1], dtype=torch.int64)

OP_ERRORS = [
    # (call, substrings the message must contain)
    (lambda: ops.blocksum(torch.randn(4, 8), 0), ["'r'", "positive"]),
    (lambda: ops.blocksum(torch.randn(4, 8), -3), ["'r'", "positive"]),
    (lambda: ops.blocksum(torch.arange(8), 4), ["'x'", "float32"]),
    (lambda: ops.blocksum(torch.ones(8, dtype=torch.bool), 4), ["'x'", "float32"]),
    (lambda: ops.blocksum(torch.tensor(1.0), 4), ["'x'", "at least 1 dimension"]),
    (lambda: ops.blocksum_dropout(torch.randn(4, 8), 4, 1.5, seed), ["'p'", "[0, 1]"]),
    (lambda: ops.blocksum_dropout(torch.randn(4, 8), 4, 0.5, torch.tensor([1.0])), ["'seed'", "int64"]),
    (lambda: ops.blocksum_dropout(torch.randn(4, 8), 4, 0.5, torch.tensor([1, 2])), ["'seed'", "one element"]),
    (lambda: ops.tile(torch.randn(4, 0), 8), ["'s'", "non-empty"]),
    (lambda: ops.tile(torch.randn(4, 2), -1), ["'features'", ">= 0"]),
    # s may be wider than base (mixed precision), never narrower.
    (lambda: ops.tile_add(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 2)), ["'s'", "base's dtype", "wider"]),
    (lambda: ops.blocksum(torch.randn(4, 8), 4, torch.bfloat16), ["'dtype'", "wider"]),
    (lambda: ops.tile(torch.randn(4, 2, dtype=torch.bfloat16), 8, torch.float32), ["'dtype'", "narrower"]),
    (lambda: ops.tile_add(torch.randn(4, 8), torch.randn(3, 2)), ["leading dimensions"]),
    (lambda: ops.bat_transform(torch.randn(8, 10), torch.randn(2, 4, 4)), ["divisible by r"]),
    (lambda: ops.bat_transform(torch.randn(8, 8), torch.randn(2, 4, 3)), ["'block'", "r x r"]),
    (lambda: ops.bat_transform(torch.randn(8, 8), torch.randn(3, 4, 4)), ["'block'", "out_features / r"]),
    (lambda: ops.bat_transform(torch.randn(8), torch.randn(2, 4, 4)), ["'weight'", "2-D"]),
    (lambda: ops.bat_transform(torch.randn(8, 8), torch.randn(4, 4)), ["'block'", "3-D"]),
    (lambda: ops.bat_transform(torch.randn(8, 8).int(), torch.randn(2, 4, 4)), ["'weight'", "float32"]),
    (lambda: ops.bat_block_grad(torch.randn(8, 8), torch.randn(8, 4), 4), ["'grad'", "'weight'", "same shape"]),
    (lambda: ops.bat_linear(torch.randn(2, 8), torch.randn(8, 8), None, []), ["'blocks'", "at least one"]),
    (lambda: ops.bat_linear(torch.randn(2, 6), torch.randn(8, 8), None, [torch.zeros(2, 4, 4)]), ["'x'", "in_features"]),
    (lambda: ops.bat_linear(torch.randn(2, 8).double(), torch.randn(8, 8), None, [torch.zeros(2, 4, 4)]), ["block", "x's dtype", "wider"]),
    (lambda: ops.miss_linear(torch.randn(2, 8), torch.randn(8, 8), None, torch.zeros(4, 8, dtype=torch.bfloat16), 0.0, None), ["'block'", "x's dtype"]),
    (lambda: ops.bat_io_block_grad(torch.randn(3, 8), torch.randn(3, 8), torch.randn(8, 8), 3), ["divisible by r"]),
    (lambda: ops.bat_io_block_grad(torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 8), 4), ["'x'", "leading dimensions"]),
    (lambda: ops.miss_add_product(torch.randn(3, 8), torch.randn(3, 4), torch.randn(4, 6)), ["'block'", "shape"]),
    (lambda: ops.miss_block_grads(torch.randn(3, 8), torch.randn(3, 4).double(), torch.randn(4, 8)), ["'s'", "'block'", "same dtype"]),
    (lambda: ops.bat_linear(torch.randn(2, 8), torch.randn(8, 8), torch.randn(4), [torch.zeros(2, 4, 4)]), ["'bias'", "(out_features,)"]),
    (lambda: ops.bat_unmerge(torch.randn(8, 8), -torch.eye(4).expand(2, 4, 4)), ["singular", "block row"]),
    (lambda: ops.miss_merge(torch.randn(8, 8), torch.randn(2, 3), 1.0), ["divisible by block.shape[1]"]),
    (lambda: ops.miss_merge(torch.randn(8, 8), torch.randn(0, 8), 1.0), ["'block.shape[0]'", "positive"]),
]


@pytest.mark.parametrize("call,needles", OP_ERRORS, ids=[f"case{i}" for i in range(len(OP_ERRORS))])
def test_op_error_messages(call, needles):
    with pytest.raises(RuntimeError) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_device_mismatch_names_both_arguments():
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(RuntimeError, match="'weight' .* and 'block' .* same device"):
        ops.bat_transform(torch.randn(8, 8), torch.zeros(2, 4, 4, device=other))
    with pytest.raises(RuntimeError, match="'base' .* and 's' .* same device"):
        ops.tile_add(torch.randn(2, 8), torch.zeros(2, 4, device=other))
    with pytest.raises(RuntimeError, match="same device"):
        ops.miss_merge(torch.randn(8, 8), torch.zeros(2, 8, device=other), 1.0)


def test_mini_forward_indivisible():
    with pytest.raises(ValueError, match="divisible by mini_r"):
        MF.mini_forward(torch.randn(2, 8), torch.randn(2, 6), torch.randn(4, 4))


LAYER_ERRORS = [
    (dict(r=0), ValueError, "`r` must be a positive integer"),
    (dict(r=-2), ValueError, "`r` must be a positive integer"),
    (dict(r=20), ValueError, "less than or equal to in_features"),
    (dict(r=3, init_weights="bat"), ValueError, "divisible by r"),
    (dict(r=4, init_weights="mini", mini_r=5), ValueError, "divisible by mini_r"),
    (dict(r=4, init_weights="mini", mini_r=0), ValueError, "`mini_r` must be a positive integer"),
    (dict(r=4, init_weights="lora"), ValueError, "init_weights must be"),
]


@pytest.mark.parametrize("kwargs,exc,needle", LAYER_ERRORS)
def test_layer_shape_rules(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        miss_ext.MissLinear(nn.Linear(16, 12), **kwargs)


def test_bat_needs_real_weight():
    class LinearLike(nn.Module):
        in_features, out_features = 8, 8

        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="real 2-D `weight`"):
        miss_ext.MissLinear(LinearLike(), r=4, init_weights="bat")
    # The standard variant treats the base as a black box, so it works.
    layer = miss_ext.MissLinear(LinearLike(), r=4)
    assert layer(torch.randn(2, 8)).shape == (2, 8)


def test_not_linear_like():
    with pytest.raises(TypeError, match="in_features"):
        miss_ext.MissLinear(nn.ReLU(), r=4)
