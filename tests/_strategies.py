"""Hypothesis profiles and strategies shared by the property-based operator tests (tests/test_ops_properties.py).

Profiles (select with the environment variable ``MISS_EXT_HYPOTHESIS_PROFILE``):

* ``ci`` (default): few, derandomized examples per test so the suite is fast and reproducible.
* ``thorough``: many random examples (``MISS_EXT_HYPOTHESIS_PROFILE=thorough pytest ...``).

Tests write ``@settings(max_examples=examples(N), deadline=None)``: ``N`` is the ci count and
the thorough profile multiplies it by ``THOROUGH_FACTOR``.
"""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True, suppress_health_check=_HEALTH
)
settings.register_profile("thorough", deadline=None, print_blob=True, suppress_health_check=_HEALTH)

PROFILE = os.environ.get("MISS_EXT_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "thorough"):
    raise ValueError(f"MISS_EXT_HYPOTHESIS_PROFILE must be 'ci' or 'thorough' (got {PROFILE!r})")
settings.load_profile(PROFILE)

THOROUGH_FACTOR = 20


def examples(ci_count: int) -> int:
    """Examples per test: ``ci_count`` in the ci profile, ``THOROUGH_FACTOR`` times more otherwise."""
    return ci_count if PROFILE == "ci" else ci_count * THOROUGH_FACTOR


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Power-of-two magnitudes of generated values, per dtype: large and tiny, but such that
# products of two values and sums of a few hundred of them stay finite and normal.
MAG_EXP = {
    torch.float64: (-60, 60),
    torch.float32: (-30, 30),
    torch.bfloat16: (-30, 30),
    torch.float16: (-5, 3),
}

# Interesting feature counts: 1, small, primes, powers of two and their neighbours.
FEATURES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 11, 12, 13, 16, 17, 24, 31, 32, 37, 48, 64, 97])
TOKENS = st.sampled_from([0, 1, 2, 3, 5, 8, 13, 33])
LEAD = st.sampled_from([(), (2,), (1, 3), (2, 0), (3, 2)])  # extra leading batch dims
LAYOUTS = ["contiguous", "transposed", "sliced", "strided", "expanded"]


@st.composite
def magnitudes(draw, dtype):
    lo, hi = MAG_EXP[dtype]
    return 2.0 ** draw(st.sampled_from([0, 0, lo, hi, lo // 2, hi // 2]))


def make_tensor(shape, dtype, scale=1.0, layout="contiguous", seed=0, device="cpu"):
    """A tensor of ``shape`` on ``device`` with N(0, scale^2) values (drawn on the CPU from
    ``seed``, so every device sees the same values), laid out as ``layout``: contiguous;
    transposed (last two dims swapped in memory); sliced (a column window of a wider tensor);
    strided (every other column of a wider tensor); expanded (all rows one broadcast row, zero
    row stride). The layout view is taken on ``device``."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)

    def draw(*s):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    if layout == "expanded" and len(shape) >= 2:
        return draw(shape[-1]).expand(shape)
    if layout == "transposed" and len(shape) >= 2:
        return draw(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    if layout == "sliced" and len(shape) >= 1:
        return draw(*shape[:-1], shape[-1] + 3)[..., 1 : 1 + shape[-1]]
    if layout == "strided" and len(shape) >= 1:
        return draw(*shape[:-1], 2 * shape[-1])[..., ::2]
    return draw(*shape)
