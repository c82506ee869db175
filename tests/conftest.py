"""Shared test fixtures: devices, per-dtype tolerances, seeded random inputs."""

import logging

import pytest
import torch

# peft imports torchao and bitsandbytes when they are installed (the test extra has both), and
# on every import they log WARNING lines about optional native pieces this machine lacks
# ("Failed to load ...", torch's pytree deprecation notes for torchao's enums). Not ours, not
# actionable, and repeated in every failure report's captured log: kept below ERROR.
for _name in ("torchao", "bitsandbytes", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

import miss_ext  # noqa: F401  (loads torch.ops.miss_ext)

from miss_ext.layer import INIT_WEIGHTS  # noqa: E402  (the one variant -> init_weights table)

# INIT_WEIGHTS with standard's block drawn at random (init_weights=False): a nonzero term from the
# first call, for tests that compare outputs before any training.
INIT_RANDOM = {**INIT_WEIGHTS, "standard": False}

HAS_CUDA = torch.cuda.is_available() and miss_ext.build_info()["cuda"]

# Devices every kernel test runs on; CUDA cases skip (never pass) without a GPU build + device.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")],
    ),
]

# Absolute/relative tolerances per dtype, for outputs of O(1) magnitude computed from sums of
# up to a few thousand O(1) terms. Half types accumulate in fp32 but round inputs and outputs.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
    torch.float16: dict(atol=1e-2, rtol=5e-3),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    """Tolerance for ``dtype``, with atol scaled for outputs of magnitude ``scale``."""
    t = TOLERANCES[dtype]
    return dict(atol=t["atol"] * scale, rtol=t["rtol"])


def assert_close(actual, expected, dtype=None, scale: float = 1.0, msg: str = ""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, **tol(dtype, scale), msg=msg or None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
