"""The one-layer suite: for every case, interleaved timing of floor / PEFT / miss_ext (and BAT's
weight-grad floor), the memory each keeps for backward, and the errors. One dict per case."""

from __future__ import annotations

import gc
from typing import Callable, List, Optional

import torch

from . import accuracy, contestants as C, costmodel, memory, timing
from .cases import Case, dtype_str
from .progress import progress_bar

NAMES = ("floor", "peft", "ours", "floorW")


def measure_memory(setup: C.LayerSetup) -> dict:
    """Saved-for-backward bytes (all devices) and peak allocated bytes (CUDA) of one fwd+bwd."""
    x, g = setup.x, setup.grad_out
    res = {}
    for name, mod in setup.modules.items():
        params = C.trainable(mod)
        exclude = [x, *mod.parameters(), *mod.buffers()]
        x.grad = None
        for p in params:
            p.grad = None
        with memory.cuda_peak(x.device) as peak:
            with memory.SavedTensorsMeter(exclude) as meter:
                y = mod(x)
            y.backward(g)
            del y
        res[f"{name}_saved_bytes"] = meter.saved_bytes
        res[f"{name}_peak_bytes"] = peak["peak_bytes"]
        x.grad = None
        for p in params:
            p.grad = None
    wb = setup.weight_bytes
    for name in setup.modules:
        if name == "floor":
            continue
        extra = res[f"{name}_saved_bytes"] - res["floor_saved_bytes"]
        res[f"{name}_extra_saved_bytes"] = extra
        res[f"{name}_extra_saved_frac_w"] = extra / wb
        res[f"{name}_extra_peak_bytes"] = res[f"{name}_peak_bytes"] - res["floor_peak_bytes"]
    return res


def timing_fields(samples: dict) -> dict:
    res = {}
    for name, s in samples.items():
        for ph in timing.PHASES:
            res[f"{name}_{ph}_ms"] = timing.median(s.phase(ph))
        res[f"{name}_total_spread"] = timing.spread(s.total)
    pairs = [("peft", "floor"), ("ours", "floor"), ("ours", "peft"), ("ours", "floorW"), ("floorW", "floor")]
    for a, b in pairs:
        if a in samples and b in samples:
            for ph in timing.PHASES:
                res[f"{a}/{b}_{ph}"] = timing.paired_ratio(samples[a].phase(ph), samples[b].phase(ph))
    return res


def run_case(case: Case, device, warmup: int, repeats: int, check: bool = True, seed: int = 0,
             progress: Optional[Callable[[], None]] = None, bat_precision: str = "base") -> dict:
    setup = C.make_setup(case, device, seed)
    C.build_modules(setup, bat_precision=bat_precision)
    s = case.shape
    row = {
        "variant": case.variant, "dtype": case.dtype_name, "base_dtype": dtype_str(case.dtype),
        "block_dtype": dtype_str(case.block),
        # miss_ext's BAT mode matters only where the block is wider than the base
        "bat_precision": bat_precision if case.variant == "bat" and case.mixed else "",
        "tokens": s.tokens,
        "in_features": s.in_features, "out_features": s.out_features, "r": s.r,
        "mini_r": s.mini_r if case.variant == "mini" else "", "weight_bytes": setup.weight_bytes,
        "warmup": warmup, "repeats": repeats,
    }
    row.update(costmodel.flop_ratios(case))
    if check:
        row.update(accuracy.errors(setup))
    row.update(measure_memory(setup))
    samples = timing.run_interleaved(C.contestants(setup), timing.clock_for(device), warmup, repeats,
                                     progress=progress)
    row.update(timing_fields(samples))
    setup.modules.clear()
    del setup
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return row


def run_suite(cases: List[Case], device="cpu", warmup: int = 2, repeats: int = 10, check: bool = True,
              seed: int = 0, progress: bool = True, log=None, bat_precision: str = "base") -> List[dict]:
    rows = []
    bar = progress_bar(len(cases) * (warmup + repeats), "layer bench", "round", progress)
    try:
        for case in cases:
            if bar is not None:
                bar.set_postfix_str(case.label())
            row = run_case(case, device, warmup, repeats, check, seed,
                           progress=(bar.update if bar is not None else None), bat_precision=bat_precision)
            rows.append(row)
            if log is not None:
                log(f"done {case.label()}: ours/floor fwd+bwd {row['ours/floor_total']:.3f}, "
                    f"ours/peft {row['ours/peft_total']:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return rows
