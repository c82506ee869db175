"""``python -m bench serve``: mixed-adapter batches (serving), forward only, no grad.

One layer, ``seqs`` sequences of ``tokens / seqs`` tokens, one standard MiSS adapter per
sequence (all of rank r), against:

* ``floor``: the frozen ``nn.Linear`` alone;
* ``single``: the same batch with one adapter for every sequence (the plain forward);
* ``mixed``: ``layer(x, adapter_names=[a0, a1, ...])``, one adapter per sequence;
* ``peft``: PEFT's LoRA layer of the same rank with the same number of adapters, given the same
  ``adapter_names`` (its ``_mixed_batch_forward``: one sub-batch per adapter, in Python).

Targets (issue 12): ``mixed / single <= 1.15`` and ``mixed / peft < 1``. Two clocks: wall time
with the requested threads, interleaved rounds, paired ratios (bench/timing.py); and the thread
CPU time (``time.thread_time``) with one thread, which other processes on a loaded machine
disturb far less. A mixed case with BAT adapters (grouped per adapter, W' cached or not) is
timed too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import List

import miss_ext
import torch
from torch import nn

from . import env, report, timing
from .cases import parse_dtypes
from .outputs import csv_list, output_paths

DEFAULT = dict(seqs=8, tokens=1024, in_f=2048, out_f=2048, r=64)
SMOKE = dict(seqs=4, tokens=64, in_f=128, out_f=128, r=16)


@dataclass
class ServeCase:
    seqs: int
    tokens: int
    in_f: int
    out_f: int
    r: int
    dtype: torch.dtype  # base: weight, activations, output
    block_dtype: torch.dtype  # the adapters' blocks (PEFT's LoRA weights too)

    @property
    def dtype_name(self) -> str:
        name = str(self.dtype).replace("torch.", "")
        return name if self.block_dtype == self.dtype else f"{name}+{str(self.block_dtype).replace('torch.', '')}"

    def label(self) -> str:
        return (f"{self.seqs}x{self.tokens // self.seqs} tokens {self.in_f}->{self.out_f} "
                f"r={self.r} {self.seqs} adapters {self.dtype_name}")


def _contestants(case: ServeCase, device, seed: int):
    torch.manual_seed(seed)
    dt = case.dtype
    base = nn.Linear(case.in_f, case.out_f).to(device=device, dtype=dt)
    names = [f"a{i}" for i in range(case.seqs)]
    layer = miss_ext.MissLinear(base, r=case.r, adapter_name=names[0])
    for n in names[1:]:
        layer.update_layer(n, case.r)
    layer.miss_block.to(case.block_dtype)
    with torch.no_grad():
        for p in layer.miss_block.values():
            p.normal_(0, 0.02)
    layer.eval()
    # The BAT case: half the sequences on BAT adapters (r must divide both features).
    bat = None
    if case.in_f % case.r == 0 and case.out_f % case.r == 0:
        bat = miss_ext.MissLinear(nn.Linear(case.in_f, case.out_f).to(device=device, dtype=dt), r=case.r,
                                  adapter_name=names[0])
        for i, n in enumerate(names[1:], 1):
            bat.update_layer(n, case.r, init_weights="bat" if i % 2 else True)
        bat.miss_block.to(case.block_dtype)
        with torch.no_grad():
            for p in bat.miss_block.values():
                p.normal_(0, 0.02)
        bat.eval()
    x = torch.randn(case.seqs, case.tokens // case.seqs, case.in_f, device=device, dtype=dt)

    peft_layer = None
    try:
        from peft import LoraConfig, get_peft_model

        class One(nn.Module):
            def __init__(self, lin):
                super().__init__()
                self.lin = lin

            def forward(self, t):
                return self.lin(t)

        model = get_peft_model(One(nn.Linear(case.in_f, case.out_f).to(device=device, dtype=dt)),
                               LoraConfig(r=case.r, lora_alpha=case.r, target_modules=["lin"]), adapter_name=names[0])
        for n in names[1:]:
            model.add_adapter(n, LoraConfig(r=case.r, lora_alpha=case.r, target_modules=["lin"]))
        for pname, p in model.named_parameters():
            if "lora_" in pname:
                p.data = p.data.to(case.block_dtype)
                if "lora_B" in pname:
                    p.data.normal_(0, 0.02)
        model.eval()
        peft_layer = model.base_model.model.lin
    except ImportError:
        pass

    def run(fn):
        return timing.Contestant(fn.__name__, lambda: None, fn, lambda y: None)

    def floor():
        return base(x)

    def single():
        return layer(x)

    def mixed():
        return layer(x, adapter_names=names)

    out = [run(floor), run(single), run(mixed)]
    if peft_layer is not None:
        def peft():
            return peft_layer(x, adapter_names=names)

        out.append(run(peft))
    if bat is not None:
        bat_cached = copy.deepcopy(bat)
        miss_ext.cache_bat_weights(bat_cached)  # fills on its first (warmup) call

        def mixed_bat():
            return bat(x, adapter_names=names)

        def mixed_bat_cached():
            return bat_cached(x, adapter_names=names)

        out += [run(mixed_bat), run(mixed_bat_cached)]
    # A check that the mixed batch is right: sample i equals its adapter alone.
    with torch.no_grad():
        y = layer(x, adapter_names=names)
        err = 0.0
        for i, n in enumerate(names):
            layer.set_adapter(n)
            want = layer(x[i : i + 1])
            err = max(err, ((y[i : i + 1] - want).abs().max() / want.abs().max().clamp_min(1e-30)).item())
        layer.set_adapter(names[0])
    return out, err


def _measure(contestants, clock, warmup, repeats):
    with torch.no_grad():
        return timing.run_interleaved(contestants, clock, warmup, repeats)


def _row(case, samples, prefix: str) -> dict:
    med = {k: timing.median(v.fwd) for k, v in samples.items()}
    row = {f"{prefix}{k}_ms": round(v, 3) for k, v in med.items()}

    def ratio(a, b):
        if a in samples and b in samples:
            return round(timing.paired_ratio(samples[a].fwd, samples[b].fwd), 3)
        return float("nan")

    row[f"{prefix}mixed/single"] = ratio("mixed", "single")
    row[f"{prefix}mixed/peft"] = ratio("mixed", "peft")
    row[f"{prefix}single/floor"] = ratio("single", "floor")
    row[f"{prefix}mixed/floor"] = ratio("mixed", "floor")
    row[f"{prefix}bat_mixed/single"] = ratio("mixed_bat", "single")
    row[f"{prefix}bat_cached/single"] = ratio("mixed_bat_cached", "single")
    row[f"{prefix}spread_mixed"] = round(timing.spread(samples["mixed"].fwd), 3)
    return row


def table(rows: List[dict]) -> str:
    cols = [("case", "case"), ("wall mixed/single", "mixed/single"), ("wall mixed/peft", "mixed/peft"),
            ("cpu1 mixed/single", "cpu1_mixed/single"), ("cpu1 mixed/peft", "cpu1_mixed/peft"),
            ("single/floor", "single/floor"), ("bat mixed/single", "bat_mixed/single"),
            ("bat cached/single", "bat_cached/single"), ("max rel err", "max_rel_err")]
    head = "| " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for _, k in cols) + " |")
    return "\n".join(lines)


def run_serve(args) -> int:
    dims = dict(SMOKE if args.suite == "smoke" else DEFAULT)
    if args.shape:
        parts = [int(v) for v in args.shape[0].split(",")]
        dims.update(tokens=parts[0], in_f=parts[1], out_f=parts[2], r=parts[3])
    dtypes = parse_dtypes(csv_list(args.dtypes) if args.dtypes else ["float32"])
    smoke = args.suite == "smoke"
    repeats = args.repeats if args.repeats is not None else (2 if smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    meta = env.collect(args.device)
    meta.update(suite=f"serve-{args.suite}")
    print(f"# miss_ext serving bench: device={meta['device_name']} torch={meta['torch']} "
          f"threads={meta['threads']} commit={meta['git_commit']} repeats={repeats} warmup={warmup}", flush=True)
    rows = []
    for spec in dtypes:
        case = ServeCase(dims["seqs"], dims["tokens"], dims["in_f"], dims["out_f"], dims["r"], spec.base, spec.block)
        contestants, err = _contestants(case, args.device, args.seed)
        row = {"case": case.label(), "dtype": case.dtype_name, "max_rel_err": f"{err:.1e}"}
        row.update(_row(case, _measure(contestants, timing.clock_for(args.device), warmup, repeats), ""))
        if torch.device(args.device).type == "cpu":
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                row.update(_row(case, _measure(contestants, timing.ThreadClock(), warmup, repeats), "cpu1_"))
            finally:
                torch.set_num_threads(threads)
        rows.append(row)
        print(f"# {case.label()}: done", flush=True)
    print(table(rows))
    print("# wall: paired median ratios of forward times with the requested threads; cpu1: the same with "
          "thread CPU time and one thread (steadier on a loaded machine). targets: mixed/single <= 1.15, "
          "mixed/peft < 1")
    csv_path, _ = output_paths(args, "serve", args.suite, png=False)
    report.write_csv(csv_path, rows, meta)
    print(f"# csv: {csv_path}")
    return 0, rows
