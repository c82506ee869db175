"""The layer-benchmark suites: which (variant, dtype, shape) cases run, and their defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

VARIANTS = ("standard", "mini", "bat")
INIT_WEIGHTS = {"standard": True, "mini": "mini", "bat": "bat"}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Shape:
    tokens: int
    in_features: int
    out_features: int
    r: int
    mini_r: int

    def label(self) -> str:
        return f"{self.tokens}x{self.in_features}x{self.out_features}"


@dataclass(frozen=True)
class Case:
    variant: str
    dtype: torch.dtype
    shape: Shape

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def label(self) -> str:
        return f"{self.variant}/{self.dtype_name}/{self.shape.label()}/r{self.shape.r}"

    def skip_reason(self) -> Optional[str]:
        """Why PEFT/docs/MATH.md section 7 forbids this case, or None when it is valid."""
        s = self.shape
        if s.r > s.in_features:
            return "r > in_features"
        if self.variant == "bat" and (s.in_features % s.r or s.out_features % s.r):
            return "bat needs in and out divisible by r"
        if self.variant == "mini" and s.out_features % s.mini_r:
            return "mini needs out divisible by mini_r"
        return None


@dataclass(frozen=True)
class Suite:
    name: str
    shapes: tuple
    repeats: int
    warmup: int
    dtypes: tuple = ("float32", "bfloat16")


def _llm_shapes(tokens: int = 1024) -> tuple:
    dims = ((4096, 4096), (4096, 11008), (11008, 4096))
    return tuple(Shape(tokens, i, o, r, 64) for (i, o) in dims for r in (16, 64, 128))


SUITES = {
    # The default: 1024 tokens, in = out = 2048, r = mini_r = 64. A couple of minutes on CPU.
    "default": Suite("default", (Shape(1024, 2048, 2048, 64, 64),), repeats=10, warmup=2),
    # LLM projection shapes (Llama-7B-like q/k/v/o, up/gate and down), r = 16, 64, 128. Long.
    "llm": Suite("llm", _llm_shapes(), repeats=5, warmup=1),
    # A few seconds: tiny non-square shape, for CI (tests/test_bench_smoke.py).
    "smoke": Suite("smoke", (Shape(64, 128, 96, 16, 16),), repeats=2, warmup=1),
}


def parse_shape(text: str) -> Shape:
    """``N,in,out,r[,mini_r]`` (mini_r defaults to r)."""
    parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) not in (4, 5):
        raise ValueError(f"--shape wants N,in,out,r[,mini_r] (got {text!r})")
    if len(parts) == 4:
        parts.append(parts[3])
    return Shape(*parts)


def parse_dtypes(names: Iterable[str]) -> list:
    out = []
    for n in names:
        key = n.strip().lower()
        if key not in DTYPES:
            raise ValueError(f"unknown dtype {n!r}; choose from {sorted(DTYPES)}")
        out.append(DTYPES[key])
    return out


def build_cases(shapes, dtypes, variants) -> tuple[list, list]:
    """All valid cases (shape-major, then dtype, then variant) and the skipped ones with reasons."""
    cases, skipped = [], []
    for shape in shapes:
        for dtype in dtypes:
            for variant in variants:
                if variant not in VARIANTS:
                    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
                c = Case(variant, dtype, shape)
                why = c.skip_reason()
                (skipped if why else cases).append((c, why) if why else c)
    return cases, skipped
