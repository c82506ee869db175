"""Per-operator breakdown of one layer case (``python -m bench profile``): which kernel of
miss_ext (or PEFT, or the floor) takes the time, with ``torch.profiler`` over a few
forward+backward calls, after warmup."""

from __future__ import annotations

from typing import List

import torch
from torch.profiler import ProfilerActivity, profile

from . import contestants as C
from .cases import Case


def profile_case(case: Case, device="cpu", who=("floor", "ours"), iters: int = 5, warmup: int = 2,
                 top: int = 12, seed: int = 0, bat_precision: str = "base") -> str:
    setup = C.make_setup(case, device, seed)
    C.build_modules(setup, with_floor_w=False, bat_precision=bat_precision)
    runners = {c.name: c for c in C.contestants(setup)}
    acts = [ProfilerActivity.CPU]
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        acts.append(ProfilerActivity.CUDA)
    sort_key = "self_device_time_total" if is_cuda else "self_cpu_time_total"
    out: List[str] = []
    for name in who:
        c = runners[name]
        for _ in range(warmup):
            c.prepare()
            c.backward(c.forward())
        with profile(activities=acts) as prof:
            for _ in range(iters):
                c.prepare()
                c.backward(c.forward())
            if is_cuda:
                torch.cuda.synchronize()
        out.append(f"## {case.label()} - {name} ({iters} fwd+bwd calls, sorted by {sort_key})")
        out.append(prof.key_averages().table(sort_by=sort_key, row_limit=top, max_name_column_width=64))
    setup.modules.clear()
    return "\n".join(out)
