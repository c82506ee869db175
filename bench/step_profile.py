"""Per-operator breakdown of one training step at model level (``python -m bench profile
--preset step``): the frozen model's step, PEFT's and ours side by side, so a gap to the floor
(``python -m bench train``) can be traced to the operators that make it before anything is
optimised. torch.profiler over a few steps after warm-up; each operator's self time (device time
on CUDA), in ms per step."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

from .train_bench import TrainConfig, make_batches, train_step
from .train_preset import Entry, Preset, build_contestants


def op_times(contestant, batches, cfg: TrainConfig, device, steps: int, warmup: int) -> Dict[str, float]:
    """Operator -> self time in ms per step over ``steps`` profiled steps after ``warmup``."""
    is_cuda = torch.device(device).type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    c = contestant
    with c.context():
        for i in range(warmup):
            train_step(c.model, batches[i % len(batches)], c.opt, c.params, cfg)
        with profile(activities=acts) as prof:
            for i in range(steps):
                train_step(c.model, batches[i % len(batches)], c.opt, c.params, cfg)
            if is_cuda:
                torch.cuda.synchronize(device)
    attr = "self_device_time_total" if is_cuda else "self_cpu_time_total"
    out: Dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, attr)
        if us > 0:
            out[e.key] = out.get(e.key, 0.0) + us / 1e3 / steps
    return out


def step_table(columns: Dict[str, Dict[str, float]], top: int) -> List[str]:
    """Text rows: the total, then the ``top`` operators by their largest time in any column, then
    the rest as one row."""
    names = list(columns)
    ops = sorted({k for col in columns.values() for k in col},
                 key=lambda k: -max(col.get(k, 0.0) for col in columns.values()))
    width = max([len("operator")] + [min(len(k), 60) for k in ops[:top]])
    head = f"{'operator':<{width}} | " + " ".join(f"{n:>16}" for n in names)
    lines = [head, "-" * len(head)]

    def row(label: str, vals) -> str:
        return f"{label[:60]:<{width}} | " + " ".join(f"{v:16.2f}" for v in vals)

    lines.append(row("total (sum of self times)", [sum(columns[n].values()) for n in names]))
    for k in ops[:top]:
        lines.append(row(k, [columns[n].get(k, 0.0) for n in names]))
    rest = ops[top:]
    if rest:
        lines.append(row(f"{len(rest)} more operators", [sum(columns[n].get(k, 0.0) for k in rest) for n in names]))
    return lines


def profile_step(cfg: TrainConfig, preset: Preset, rows: List[Entry], dtype, targets: str, device,
                 steps: int = 3, warmup: int = 2, top: int = 15) -> str:
    """The table for one configuration (dtype, targets, ``cfg.autocast``): one column per row."""
    contestants = build_contestants(cfg, preset, rows, dtype, targets, device)
    batches = make_batches(cfg, device)
    columns = {f"{c.entry.impl} {c.entry.label}" if c.entry.impl != "frozen" else "frozen":
               op_times(c, batches, cfg, device, steps, warmup) for c in contestants}
    clock = "device" if torch.device(device).type == "cuda" else "CPU"
    title = (f"## step profile: {str(dtype).replace('torch.', '')}, targets {targets}, autocast "
             f"{'on' if cfg.autocast else 'off'}: ms per step ({clock} self time, {steps} steps after "
             f"{warmup}), lower is better")
    return "\n".join([title] + step_table(columns, top))
