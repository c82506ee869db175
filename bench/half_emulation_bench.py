"""One bf16 layer with an fp32 block (get_peft_model's layer), autocast off and on, on a CPU where
torch emulates the half-type GEMM (AVX2 only): ours and PEFT against the frozen ``nn.Linear``
(whose GEMMs run that emulation) and against the same frozen layer run by hand on fp32 copies of
x, W and b (the upcast floor; docs/MATH.md 11.5). Interleaved rounds, medians, every ratio
lower-is-better.

    python -m bench.half_emulation_bench [--rounds 5] [--shape 512,1024,2816,64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from .cases import Case, Shape
from .contestants import build_modules, contestants, make_setup
from .timing import Contestant


def upcast_floor(setup) -> Contestant:
    w, b, x, g = setup.base.weight, setup.base.bias, setup.x, setup.grad_out

    def forward():
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), w.float(), b.float()).to(x.dtype)

    def prepare():
        x.grad = None

    return Contestant("upcast", prepare, forward, lambda y: y.backward(g))


def medians(cs, rounds: int, autocast: bool) -> dict:
    times = {c.name: [] for c in cs}
    for r in range(rounds + 1):  # round 0 warms up
        for c in cs:
            c.prepare()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = c.forward()
            c.backward(y)
            if r:
                times[c.name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shape", default="512,1024,2816,64", help="N,in,out,r (mini_r = r)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, i, o, r = (int(v) for v in args.shape.split(","))
    print(f"# {n} tokens, {i} -> {o}, r = {r}, bf16 base, fp32 block; medians of {args.rounds} "
          "interleaved rounds of forward+backward; every ratio lower is better")
    print("| variant, autocast | ours x frozen | PEFT x frozen | ours / PEFT | ours x upcast floor |")
    print("|---|---|---|---|---|")
    for variant in ("standard", "mini", "bat"):
        case = Case(variant=variant, dtype=torch.bfloat16, shape=Shape(n, i, o, r, r), block_dtype=torch.float32)
        setup = make_setup(case, "cpu")
        build_modules(setup, with_floor_w=False)
        cs = contestants(setup) + [upcast_floor(setup)]
        for autocast in (False, True):
            m = medians(cs, args.rounds, autocast)
            print(f"| {variant}, {'on' if autocast else 'off'} | {m['ours'] / m['floor']:.3f} | "
                  f"{m['peft'] / m['floor']:.3f} | {m['ours'] / m['peft']:.3f} | {m['ours'] / m['upcast']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
