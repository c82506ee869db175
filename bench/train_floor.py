"""The model-level floor of a MiSS training step: the frozen model's step plus the work each
adapted linear layer cannot avoid, timed on this machine in the same rounds as the rows it sits
beside (one round of its parts after each round of steps: FloorParts).

For one adapted ``nn.Linear`` with N tokens (batch x seq), ``in`` and ``out`` features, block
size r, the floor of standard MiSS adds to the frozen layer's forward and backward:

* the block sum: one read of x (``N x in``), timed as the faster of aten's ``x.sum(0)`` and
  miss_ext's ``blocksum`` (a pure pass);
* three ``N x r x out`` products: the forward term ``s D``, ``dL/dD = s^T G`` and
  ``dL/ds = G D^T``. Under autocast each is a bf16 GEMM (what autocast makes of them). Without
  autocast they must keep fp32 accuracy (the blocks are fp32 on a bf16 model): each costs the
  cheaper of aten's fp32 GEMM and ``pieces x its flops`` at the rate of the layer's own bf16 GEMM
  (``N x in x out``), with 6, 3 and 2 pieces, or 2 where an fp32 product runs at half the bf16
  rate (AVX512-BF16 without AMX; bench/floor.py's fp32_units, docs/MATH.md section 11.3);
* the tiled-gradient add: one pass (read and write) over ``dL/dx`` (``N x in``).

and, once per step, the optimizer: gradient clipping (when the run clips) and the AdamW step
over every adapted layer's block (``r x out``; mini ``r x mini_r``), fp32 as ``get_peft_model``
leaves them, with the run's own optimizer settings. The frozen step has no optimizer; a step
that trains the blocks cannot skip theirs.

Mini's products are ``N x r x mini_r`` (counted the same way; they are small) and its ``dL/dD``
needs G folded to ``N x mini_r`` first: one more read, of G (``N x out``), by the faster reader.
Adding the forward term into y is not counted: a GEMM with an accumulating epilogue does it.

BAT's floor is GEMM-bound. Its block gradient needs ``G^T x`` (``out x in``: the flops of the
frozen forward GEMM), timed as the cheaper of aten's bf16 product and the frozen bf16 GEMM; and
``W' = W (I + B) + B`` is formed in forward and again in backward (nothing weight-sized is kept):
each time one pass over W plus ``2 r in out`` flops at the frozen GEMM's rate, and the
contraction of ``G^T x`` to the block gradient another ``2 r in out``. Without autocast the
flops count 2 (transform) and 3 (contraction; 2 where an fp32 product runs at half the bf16
rate) bf16 pieces for fp32 accuracy (docs/MATH.md section 11.3; as ``python -m bench floor``),
under autocast one.

The floor's step time is the frozen model's measured step (median, from the same run) plus the
sum of these parts' medians over every adapted layer, plus the optimizer's; its ratio is that
over the frozen step. It counts no Python or autograd overhead: a lower bound for any
implementation with these numerics, not an estimate.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Dict, List

import miss_ext  # noqa: F401  (registers torch.ops.miss_ext)
import torch
import torch.nn.functional as F

from . import timing
from .floor import fp32_units, product_time
from .train_bench import TARGETS, TrainConfig, optimizer

FLOOR_VARIANTS = ("standard", "mini", "bat")


def layer_shapes(cfg: TrainConfig, targets: str) -> Counter:
    """(in, out) of each adapted linear layer -> how many the model has."""
    head_dim = cfg.hidden // cfg.heads
    kv = (cfg.kv_heads or cfg.heads) * head_dim
    h, i = cfg.hidden, cfg.intermediate
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return Counter(dims[n] for n in TARGETS[targets] for _ in range(cfg.layers))


def _read(t: torch.Tensor, r: int) -> Dict[str, Callable[[], object]]:
    return {"sum": lambda: t.sum(0, dtype=torch.float32),
            "blocksum": lambda: torch.ops.miss_ext.blocksum(t, r, torch.float32)}


def _parts(n: int, fin: int, fout: int, cfg: TrainConfig, dtype, autocast: bool, device) -> Dict[str, Callable]:
    """Every part the floor may count for one layer shape, on detached tensors (no autograd)."""
    act = torch.bfloat16 if autocast else dtype
    x, g = torch.randn(n, fin, dtype=act, device=device), torch.randn(n, fout, dtype=act, device=device)
    dx = torch.empty_like(x)
    w16 = torch.randn(fout, fin, dtype=torch.bfloat16, device=device)
    x16 = x.to(torch.bfloat16)
    prod = torch.bfloat16 if autocast else torch.float32
    w_copy, g16 = torch.empty_like(w16), g.to(torch.bfloat16)
    parts: Dict[str, Callable] = {"bf16_gemm": lambda: F.linear(x16, w16), "pass_dx": lambda: dx.copy_(x),
                                  "pass_w": lambda: w_copy.copy_(w16), "bat_gw": lambda: g16.t() @ x16}
    parts.update({f"read_x_{k}": f for k, f in _read(x, cfg.r).items()})
    parts.update({f"read_g_{k}": f for k, f in _read(g, cfg.mini_r).items()})
    for v, m in (("standard", fout), ("mini", cfg.mini_r)):
        s = torch.randn(n, cfg.r, dtype=prod, device=device)
        d = torch.randn(cfg.r, m, dtype=prod, device=device)
        gm = torch.randn(n, m, dtype=prod, device=device)
        parts[f"{v}_fwd"] = lambda s=s, d=d: s @ d
        parts[f"{v}_dd"] = lambda s=s, gm=gm: s.t() @ gm
        parts[f"{v}_ds"] = lambda gm=gm, d=d: gm @ d.t()
    return parts


def layer_floor_ms(t: Dict[str, float], variant: str, n: int, fin: int, fout: int, cfg: TrainConfig,
                   autocast: bool, fp32_cost: float = float("inf")) -> Dict[str, float]:
    """The floor's parts (ms) for one layer from the part medians ``t``; ``fp32_cost``: an fp32
    product's cost in bf16 products of its flops where one runs at the hardware's fp32 rate
    (bench/floor.py's fp32_units)."""
    rate = 2.0 * n * fin * fout / t["bf16_gemm"]  # flops per ms of the layer's own bf16 GEMM
    if variant == "bat":
        transform_pieces, contraction_pieces = (1, 1) if autocast else (2, min(3, fp32_cost))
        flops = 2.0 * cfg.r * fin * fout
        return {"gw": min(t["bat_gw"], t["bf16_gemm"]),
                "transform": 2 * (t["pass_w"] + transform_pieces * flops / rate),
                "contraction": contraction_pieces * flops / rate}
    m = fout if variant == "standard" else cfg.mini_r
    flops = 2.0 * n * cfg.r * m
    if autocast:
        products = t[f"{variant}_fwd"] + t[f"{variant}_dd"] + t[f"{variant}_ds"]
    else:
        products = sum(product_time(t[f"{variant}_{k}"], flops, pieces, rate, fp32_cost)
                       for k, pieces in (("fwd", 6), ("dd", 3), ("ds", 2)))
    out = {"read_x": min(t["read_x_sum"], t["read_x_blocksum"]), "products": products, "grad_add": t["pass_dx"]}
    if variant == "mini":
        out["read_g"] = min(t["read_g_sum"], t["read_g_blocksum"])
    return out


def optimizer_step(cfg: TrainConfig, targets: str, variant: str, device) -> Callable[[], None]:
    """Clipping (if the run clips) and one AdamW step over the variant's fp32 blocks."""
    g = torch.Generator().manual_seed(cfg.seed)
    params = []
    for (fin, fout), count in layer_shapes(cfg, targets).items():
        m = cfg.mini_r if variant == "mini" else fout  # BAT's (out/r, r, r) holds r x out too
        for _ in range(count):
            p = torch.nn.Parameter(torch.zeros(cfg.r, m, device=device))
            p.grad = (1e-3 * torch.randn(cfg.r, m, generator=g)).to(device)
            params.append(p)
    opt = optimizer(params, cfg)

    def step():
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()

    return step


class FloorParts:
    """The parts of one configuration's floor, timed a round at a time: run_preset_case calls
    ``round()`` after each round of its rows, so the parts see the machine as the rows do. Timed
    on their own after the rows instead, BAT's ``G^T x`` read 68 ms in one configuration and
    91-103 ms in the next (the same tensors, a Zen 4 EPYC, two runs), putting the floor above
    every measured row."""

    def __init__(self, cfg: TrainConfig, targets: str, dtype, device="cpu", variants=FLOOR_VARIANTS):
        self.cfg, self.targets, self.dtype, self.device, self.variants = cfg, targets, dtype, device, variants
        self.n = cfg.batch * cfg.seq
        self.shapes = layer_shapes(cfg, targets)
        self.fns: Dict[object, Callable] = {}
        for shape in self.shapes:
            for k, fn in _parts(self.n, *shape, cfg, dtype, cfg.autocast, device).items():
                self.fns[(shape, k)] = fn
        for v in variants:
            self.fns[("optimizer", v)] = optimizer_step(cfg, targets, v, device)
        self.clock = timing.clock_for(device)
        self.times: Dict[object, List[float]] = {k: [] for k in self.fns}

    def round(self, record: bool = True) -> None:
        """Every part once (``record``: keep the times; False for warm-up rounds). The caller
        holds timing.no_gc(), as run_preset_case does around its rounds."""
        for k, fn in self.fns.items():
            _, ms = timing.timed(self.clock, fn)
            if record:
                self.times[k].append(ms)

    def rows(self, frozen_ms: float) -> List[Dict]:
        """One row per variant: ``frozen_ms`` (the frozen step of the run beside it) plus the
        median of every part over the recorded rounds, summed over the adapted layers."""
        cfg, n = self.cfg, self.n
        med = {k: timing.median(v) for k, v in self.times.items()}
        units = fp32_units(self.device)
        totals: Dict[str, Counter] = {v: Counter() for v in self.variants}
        for (fin, fout), count in self.shapes.items():
            t = {k: ms for (shape, k), ms in med.items() if shape == (fin, fout)}
            for v in self.variants:
                for k, ms in layer_floor_ms(t, v, n, fin, fout, cfg, cfg.autocast, units).items():
                    totals[v][k] += count * ms
        for v in self.variants:
            totals[v]["optimizer"] = med[("optimizer", v)]
        rows = []
        for v in self.variants:
            extra = sum(totals[v].values())
            step = frozen_ms + extra
            rows.append({
                "targets": self.targets, "dtype": str(self.dtype).replace("torch.", ""), "autocast": cfg.autocast,
                "impl": "floor", "variant": v, "method": "floor", "r": cfg.r,
                "mini_r": cfg.mini_r if v == "mini" else "", "batch": cfg.batch, "seq": cfg.seq,
                "step_ms": step, "floor_extra_ms": extra,
                "floor_parts_ms": " ".join(f"{k}={ms:.3g}" for k, ms in totals[v].items()),
                "x_frozen": step / frozen_ms if frozen_ms > 0 else math.nan,
                "tokens_per_s": n / (step / 1e3) if step > 0 else math.nan,
            })
        return rows


def floor_rows(cfg: TrainConfig, targets: str, dtype, frozen_ms: float, device="cpu", variants=FLOOR_VARIANTS,
               warmup: int = 3, repeats: int = 15) -> List[Dict]:
    """FloorParts' rows with the parts timed on their own (``warmup`` + ``repeats`` rounds), for
    a floor without the rows beside it."""
    parts = FloorParts(cfg, targets, dtype, device, variants)
    with timing.no_gc():
        for i in range(warmup + repeats):
            parts.round(record=i >= warmup)
    return parts.rows(frozen_ms)
