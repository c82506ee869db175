"""The layer-benchmark suites: which (variant, dtype, shape) cases run, and their defaults.

A dtype spec is one dtype (``bfloat16``: base, activations and adapter blocks all in it) or
``A+B``: base weight, input and output in ``A``, adapter blocks in ``B`` (``bfloat16+float32`` is
what PEFT's ``get_peft_model`` and ``miss_ext.MissLinear`` build on a bf16 model by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from miss_ext.layer import INIT_WEIGHTS  # noqa: F401  (the package's variant table, for bench's modules)

VARIANTS = ("standard", "mini", "bat")
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


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class DtypeSpec:
    """``base``: the frozen layer's weight, x, the output and the upstream gradient;
    ``block``: the adapter blocks (the same as ``base`` unless mixed)."""

    base: torch.dtype
    block: torch.dtype

    @property
    def mixed(self) -> bool:
        return self.block != self.base

    @property
    def name(self) -> str:
        return f"{dtype_str(self.base)}+{dtype_str(self.block)}" if self.mixed else dtype_str(self.base)


@dataclass(frozen=True)
class Case:
    variant: str
    dtype: torch.dtype  # the base dtype: weight, x, output, grad_out
    shape: Shape
    block_dtype: Optional[torch.dtype] = None  # None: the same as dtype

    @property
    def block(self) -> torch.dtype:
        return self.dtype if self.block_dtype is None else self.block_dtype

    @property
    def spec(self) -> DtypeSpec:
        return DtypeSpec(self.dtype, self.block)

    @property
    def mixed(self) -> bool:
        return self.spec.mixed

    @property
    def dtype_name(self) -> str:
        return self.spec.name

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
    # The configuration users run first (bf16 model, fp32 blocks), then the equal-dtype ones.
    dtypes: tuple = ("bfloat16+float32", "float32", "bfloat16")


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


def _one_dtype(name: str, spec: str) -> torch.dtype:
    key = name.strip().lower()
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name.strip()!r} in {spec!r}; choose from {sorted(DTYPES)} "
                         f"or A+B (base/activations in A, adapter blocks in B, e.g. bfloat16+float32)")
    return DTYPES[key]


def parse_dtype_spec(text: str) -> DtypeSpec:
    """``A`` or ``A+B`` (short names too: ``bf16+fp32``). The blocks must hold every value of the
    base dtype (a float32 block on a bfloat16 base, not the reverse): a narrower block would
    round the adapter's input, which no MiSS implementation does on purpose."""
    parts = text.split("+")
    if len(parts) > 2 or not all(p.strip() for p in parts):
        raise ValueError(f"dtype spec {text!r}: want A or A+B (e.g. bfloat16 or bfloat16+float32)")
    base = _one_dtype(parts[0], text)
    block = _one_dtype(parts[1], text) if len(parts) == 2 else base
    if torch.promote_types(base, block) != block:
        raise ValueError(
            f"dtype spec {text!r}: the adapter blocks ({dtype_str(block)}) must be at least as wide as the "
            f"base ({dtype_str(base)}); write base+block, e.g. bfloat16+float32")
    return DtypeSpec(base, block)


def parse_dtypes(names: Iterable[str]) -> list:
    """Dtype specs, each once, in the order given."""
    out = []
    for n in names:
        spec = parse_dtype_spec(n)
        if spec not in out:
            out.append(spec)
    return out


def build_cases(shapes, dtypes, variants) -> tuple[list, list]:
    """All valid cases (shape-major, then dtype, then variant) and the skipped ones with reasons."""
    cases, skipped = [], []
    for shape in shapes:
        for spec in dtypes:
            if isinstance(spec, torch.dtype):
                spec = DtypeSpec(spec, spec)
            for variant in variants:
                if variant not in VARIANTS:
                    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
                c = Case(variant, spec.base, shape, spec.block if spec.mixed else None)
                why = c.skip_reason()
                (skipped if why else cases).append((c, why) if why else c)
    return cases, skipped
