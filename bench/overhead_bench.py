"""Per-call overhead: one small layer (8 tokens, 256 -> 256, r = 16), where the kernels take a few
microseconds and a training step's time is the Python and dispatcher work around them. That work
is paid once per adapted layer per step at every size, so at model level it adds up (all-linear on
a 2-layer Llama: 14 layers), and on a GPU it is what a small model's step waits on.

Rows, forward + backward per call, interleaved rounds, medians:

* ``frozen``: the frozen ``nn.Linear`` (the floor);
* ``peft``: PEFT's MiSS layer (``get_peft_model`` defaults: fp32 block);
* ``patch``: the same PEFT layer under ``miss_ext.peft.patch()``;
* ``ours``: ``miss_ext.MissLinear``;
* ``ours-registered``: the same with ``MISS_EXT_EAGER_AUTOGRAD=0``, every op through
  torch.library's registered autograd (what torch.compile traces).

    python -m bench.overhead_bench [--rounds 15] [--calls 100] [--variants standard,mini,bat] [--device cuda]

Every ratio is lower-is-better; ``+us`` is the time per call above the frozen layer's.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from typing import Callable, Dict

import torch
from torch import nn

import miss_ext
import miss_ext.peft as mp
from miss_ext import _ops_common

from .cases import INIT_WEIGHTS


class _One(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.lin = nn.Linear(features, features, bias=False)

    def forward(self, x):
        return self.lin(x)


@contextlib.contextmanager
def _registered_autograd():
    """Every op through torch.library's registered autograd (MISS_EXT_EAGER_AUTOGRAD=0)."""
    before = _ops_common.EAGER_AUTOGRAD["enabled"]
    _ops_common.EAGER_AUTOGRAD["enabled"] = False
    try:
        yield
    finally:
        _ops_common.EAGER_AUTOGRAD["enabled"] = before


def _layers(variant: str, dtype: torch.dtype, features: int, r: int, device: str) -> Dict[str, Callable]:
    """name -> (module, context factory): the rows above, on the same base weight."""
    from peft import MissConfig, get_peft_model

    torch.manual_seed(0)
    model = _One(features).to(device=device, dtype=dtype)
    frozen = copy.deepcopy(model.lin).requires_grad_(False)
    cfg = dict(r=r, mini_r=r, target_modules=["lin"], init_weights=INIT_WEIGHTS[variant])
    peft_layer = get_peft_model(copy.deepcopy(model), MissConfig(**cfg)).base_model.model.lin
    kw = {"mini_r": r} if variant == "mini" else {}
    ours = miss_ext.MissLinear(copy.deepcopy(model.lin), r=r, init_weights=INIT_WEIGHTS[variant], **kw)
    for p in ours.parameters():  # get_peft_model's fp32 blocks
        if p.requires_grad:
            p.data = p.data.float()
    none = contextlib.nullcontext
    return {
        "frozen": (frozen, none),
        "peft": (peft_layer, none),
        "patch": (peft_layer, mp.patched),
        "ours": (ours, none),
        "ours-registered": (ours, _registered_autograd),
    }


def graph_node_names(fn):
    """The type names of every node of the autograd graph ending in ``fn``."""
    seen, todo, names = set(), [fn], []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        todo += [g for g, _ in f.next_functions]
    return names


def _check_paths(rows, x, autocast: bool) -> None:
    """The two ``ours`` rows must take the paths they are named for."""
    for name in ("ours", "ours-registered"):
        layer, ctx = rows[name]
        with ctx(), torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            eager = any(n.startswith("MissExt_") for n in graph_node_names(layer(x).grad_fn))
        if eager != (name == "ours"):
            raise RuntimeError(f"bench.overhead_bench: row {name!r} did not take its autograd path")


def measure(variant: str, dtype: torch.dtype, autocast: bool, rounds: int, calls: int,
            tokens: int = 8, features: int = 256, r: int = 16, device: str = "cpu") -> Dict[str, float]:
    """Median microseconds per forward + backward call of each row, rounds interleaved (on CUDA
    each row's calls end with a synchronize: the time is what the host waits for)."""
    rows = _layers(variant, dtype, features, r, device)
    x = torch.randn(tokens, features, dtype=dtype, device=device, requires_grad=True)
    g = torch.randn(tokens, features, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    _check_paths(rows, x, autocast)
    times = {name: [] for name in rows}
    for rnd in range(rounds + 1):  # round 0 warms up
        for name, (layer, ctx) in rows.items():
            with ctx():
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
                        y = layer(x)
                    y.backward(g)
                sync()
                elapsed = time.perf_counter() - start
            if rnd:
                times[name].append(elapsed / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--variants", default="standard,mini,bat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [(torch.float32, False, "fp32"), (torch.bfloat16, False, "bf16+fp32"),
               (torch.bfloat16, True, "bf16+fp32 autocast")]
    print(f"# miss_ext per-call overhead: 8 tokens, 256 -> 256, r = 16, fwd+bwd per call; "
          f"torch={torch.__version__} device={args.device} threads={args.threads} rounds={args.rounds} "
          f"calls={args.calls}")
    print("# us: median per call; +us: above the frozen nn.Linear; x frozen and ours/peft: lower is better")
    if args.device == "cpu" and _ops_common.emulated_half_gemm(torch.empty(0, dtype=torch.bfloat16)):
        print("# this CPU has no bf16 GEMM (torch emulates it): the bf16 rows' frozen layer runs the "
              "emulation, miss_ext upcasts (docs/MATH.md 11.5); read overhead from the fp32 rows")
    head = (f"{'variant':8} {'config':18} | {'frozen us':>9} | {'peft +us':>8} {'patch +us':>9} {'ours +us':>8} "
            f"{'registered +us':>14} | {'ours x frozen':>13} {'peft x frozen':>13} {'ours/peft':>9} {'patch/peft':>10}")
    print(head)
    print("-" * len(head))
    for variant in args.variants.split(","):
        for dtype, autocast, label in configs:
            t = measure(variant, dtype, autocast, args.rounds, args.calls, device=args.device)
            f = t["frozen"]
            print(f"{variant:8} {label:18} | {f:9.1f} | {t['peft'] - f:8.1f} {t['patch'] - f:9.1f} "
                  f"{t['ours'] - f:8.1f} {t['ours-registered'] - f:14.1f} | {t['ours'] / f:13.2f} "
                  f"{t['peft'] / f:13.2f} {t['ours'] / t['peft']:9.2f} {t['patch'] / t['peft']:10.2f}", flush=True)


if __name__ == "__main__":
    main()
