"""``python -m bench floor``: the cost model's floor for the mixed-precision layer (docs/MATH.md
sections 8 and 11.3), with this machine's rates, beside the measured ratio.

The flop model of section 8 counts every flop alike. With a half-type base and fp32 blocks that
is far off: the adapter's products must keep fp32 accuracy (PEFT's numbers), and they run at
fp32 GEMM speed or, as bf16 pieces, at several times their flop count; and the memory passes
that the flop model leaves out (reading x for the block sum, adding the term into y, adding the
tiled gradient into dL/dx) cost as much as the products at these sizes. So the floor here is
built from parts, each measured on its own in the same interleaved run as the frozen layer and
miss_ext's layer:

* the frozen layer: ``F.linear(x, W)`` forward, ``G @ W`` backward (fl = their sum);
* a pass over a tensor: one read and one write of it (``copy_``), or one read (a reduction);
* a product in fp32 accuracy: the cheaper of aten's fp32 GEMM (conversions of bf16 operands not
  counted) and ``pieces x its flops`` at the rate the frozen bf16 GEMM reaches (section 11.3),
  pieces capped at 2 where an fp32 product runs at half the bf16 rate (``fp32_units``);
* BAT's ``Gw = G^T x``: the cheaper of aten's weight-gradient GEMM and the frozen GEMM's time
  (the same flops).

The floor is the sum of the parts a variant cannot avoid, over fl: a lower bound for any
implementation with these numerics, not an estimate of ours.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List

import miss_ext
import torch
import torch.nn.functional as F

from . import cases as K
from .contestants import block_shape, make_ours, make_setup
from .timing import median, no_gc, paired_ratio


def _time_round_robin(fns: Dict[str, Callable[[], object]], warmup: int, repeats: int) -> Dict[str, List[float]]:
    out = {k: [] for k in fns}
    with no_gc():
        for i in range(warmup + repeats):
            for k, fn in fns.items():
                t0 = time.perf_counter_ns()
                fn()
                t1 = time.perf_counter_ns()
                if i >= warmup:
                    out[k].append((t1 - t0) / 1e6)
    return out


def _parts(case: K.Case, setup) -> Dict[str, Callable[[], object]]:
    """The parts ``case``'s floor counts (and only those: each is timed every round). Inputs are
    detached copies: no autograd in any part."""
    s = case.shape
    n, fin, fout, r = s.tokens, s.in_features, s.out_features, s.r
    x = setup.x.detach().clone()
    g = setup.grad_out.detach().clone()
    w = setup.base.weight.detach()
    blocksum = torch.ops.miss_ext.blocksum
    parts: Dict[str, Callable[[], object]] = {"fl_fwd": lambda: F.linear(x, w), "fl_bwd": lambda: g @ w}
    if case.variant == "bat":
        wt = torch.empty_like(w)
        parts["pass_w"] = lambda: wt.copy_(w)
        parts["gw"] = lambda: g.t() @ x
        return parts
    y, dx = torch.empty(n, fout, dtype=case.dtype), torch.empty(n, fin, dtype=case.dtype)
    parts["pass_out"] = lambda: y.copy_(g)
    parts["pass_in"] = lambda: dx.copy_(x)
    # One read, by the faster of aten's reduction and miss_ext's block sum (a pure pass).
    parts["read_x"] = lambda: x.sum(0, dtype=torch.float32)
    parts["read_x_blocksum"] = lambda: blocksum(x, r, torch.float32)
    if case.variant == "mini":
        parts["read_g"] = lambda: g.sum(0, dtype=torch.float32)
        parts["read_g_blocksum"] = lambda: blocksum(g, s.mini_r, torch.float32)
        return parts
    sm, g32 = torch.randn(n, r), g.float()
    d = torch.randn(block_shape(case))
    parts["fp32_fwd"] = lambda: sm @ d
    parts["fp32_ds"] = lambda: g32 @ d.t()
    parts["fp32_dd"] = lambda: sm.t() @ g32
    return parts


def fp32_units(device="cpu") -> float:
    """What one fp32 product costs in bf16 products of its flops, where an fp32 product can run
    at the bf16 hardware's own fp32 rate: 2 on a CPU whose bf16 runs on AVX512-BF16 vector
    instructions, not AMX, with miss_ext's fp32 micro-kernel active (a bf16 dot-product
    instruction does twice the multiply-adds of an fp32 FMA; measured 200-220 against 410-450
    GFLOP/s a core on a Zen 5). Elsewhere no such bound (inf): on AMX the bf16 tiles are many
    times the fp32 rate, and aten's fp32 GEMM is timed on its own."""
    if torch.device(device).type != "cpu":
        return float("inf")
    info = miss_ext.build_info()  # the same test the kernels make (csrc/cpu/amx.h)
    return 2.0 if info["cpu_brgemm_fp32"] and not info["cpu_brgemm_amx"] else float("inf")


def product_time(t_fp32: float, flops: float, pieces: int, bf16_rate: float,
                 fp32_cost: float = float("inf")) -> float:
    """An fp32-accurate product: aten's fp32 GEMM, ``pieces`` bf16 GEMMs of its flops at
    ``bf16_rate`` (flops per ms), or one fp32 product at ``fp32_cost`` (see fp32_units) times
    their cost, whichever is cheapest (docs/MATH.md section 11.3)."""
    return min(t_fp32, min(pieces, fp32_cost) * flops / bf16_rate)


def _read(t: Dict[str, float], what: str) -> float:
    return min(t[f"read_{what}"], t[f"read_{what}_blocksum"])


def floor_of(case: K.Case, t: Dict[str, float], fp32_cost: float = float("inf")) -> Dict[str, float]:
    """Floor time (ms) of forward and backward from the medians ``t`` of the parts; ``fp32_cost``
    as fp32_units gives it for the machine."""
    s = case.shape
    n, fin, fout, r = s.tokens, s.in_features, s.out_features, s.r
    rate = 2.0 * n * fin * fout / t["fl_fwd"]  # flops per ms of the frozen bf16 GEMM
    if case.variant == "standard":
        small = 2.0 * n * r * fout
        fwd = t["fl_fwd"] + _read(t, "x") + product_time(t["fp32_fwd"], small, 6, rate, fp32_cost) + t["pass_out"]
        bwd = (t["fl_bwd"] + product_time(t["fp32_ds"], small, 2, rate, fp32_cost)
               + product_time(t["fp32_dd"], small, 3, rate, fp32_cost) + t["pass_in"])
    elif case.variant == "mini":  # the products are N x r x mini_r: negligible
        fwd = t["fl_fwd"] + _read(t, "x") + t["pass_out"]
        bwd = t["fl_bwd"] + _read(t, "g") + t["pass_in"]
    else:  # bat, default mode: W' formed (two pieces) in forward and again in backward
        transform = t["pass_w"] + 2 * (2.0 * fout * fin * r) / rate
        contraction = min(3, fp32_cost) * (2.0 * fout * fin * r) / rate  # dL/dB from Gw, three pieces
        # Gw = G^T x has the forward GEMM's flops: the cheaper of aten's product (slower than the
        # forward GEMM on CPU) and the forward GEMM's rate.
        gw = min(t["gw"], t["fl_fwd"])
        fwd = t["fl_fwd"] + transform
        bwd = t["fl_bwd"] + transform + gw + contraction
    return {"fwd": fwd, "bwd": bwd, "total": fwd + bwd}


def run_floor(args, shapes, dtype_specs, variants) -> int:
    torch.manual_seed(args.seed)
    repeats = args.repeats if args.repeats is not None else 15
    warmup = args.warmup if args.warmup is not None else 3
    print("# floor: the cost model's lower bound for these numerics (bench/floor.py), x the frozen layer: fwd, "
          "bwd over its GEMMs alone, total over the frozen nn.Linear's measured step; ours: miss_ext's layer, "
          "paired median over the same rounds")
    print(f"{'variant':8} {'dtype':16} {'shape':16} {'r':>4} | {'fl ms':>7} | {'floor fwd':>9} {'bwd':>6} "
          f"{'total':>6} | {'ours':>6} {'ours/floor':>10}")
    for spec in dtype_specs:
        for shape in shapes:
            for variant in variants:
                case = K.Case(variant, spec.base, shape, spec.block)
                if case.skip_reason():
                    continue
                setup = make_setup(case, "cpu", seed=args.seed)
                ours = make_ours(setup, args.bat_precision)
                x, g = setup.x, setup.grad_out
                params = [p for p in ours.parameters() if p.requires_grad]

                def step(mod):
                    x.grad = None
                    for p in params:
                        p.grad = None
                    mod(x).backward(g)

                fns = _parts(case, setup)
                fns["layer_floor"] = lambda: step(setup.base)
                fns["layer_ours"] = lambda: step(ours)
                times = _time_round_robin(fns, warmup, repeats)
                med = {k: median(v) for k, v in times.items()}
                fl = med["fl_fwd"] + med["fl_bwd"]
                fb = floor_of(case, med, fp32_units("cpu"))
                ours_ratio = paired_ratio(times["layer_ours"], times["layer_floor"])
                # The frozen layer as measured (autograd included) plus the parts it does not run.
                layer = med["layer_floor"]
                floor_ratio = (layer + fb["total"] - fl) / layer
                print(f"{variant:8} {spec.name:16} {shape.label():16} {shape.r:>4} | {fl:7.2f} | "
                      f"{fb['fwd'] / med['fl_fwd']:9.2f} {fb['bwd'] / med['fl_bwd']:6.2f} {floor_ratio:6.2f} | "
                      f"{ours_ratio:6.2f} {ours_ratio / floor_ratio:10.2f}", flush=True)
                parts = ", ".join(f"{k} {v:.3f}" for k, v in med.items() if not k.startswith("layer"))
                print(f"#   parts (ms): {parts}")
    return 0
