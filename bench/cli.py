"""``python -m bench [layer|train] [options]`` (run from the repository root)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Tuple

import miss_ext
import torch

from . import cases as K
from . import env, report
from .floor import run_floor
from .layer_bench import run_suite
from .outputs import csv_list, output_paths
from .profile import profile_case
from .serving_bench import run_serve
from .step_profile import profile_step
from .train_bench import ADAMW, TRAIN_DEFAULTS, TrainConfig
from .train_preset import DEFAULT_PRESET, IMPLS, PRESETS, configurations, entries, quiet_transformers, run_preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="miss_ext benchmarks: one layer against the frozen nn.Linear (floor) and PEFT's "
        "MissLinear (peer), or end-to-end training of a small Llama (mode 'train').",
    )
    p.add_argument("mode", nargs="?", default="layer", choices=("layer", "train", "profile", "serve", "floor"),
                   help="layer (default): the one-layer suite; train: the training benchmark; profile: "
                   "per-operator torch.profiler breakdown of the layer cases (floor, peft, ours), or with "
                   "--preset of a training step (frozen, peft, ours; --repeats steps); serve: "
                   "mixed-adapter batches (bench/serving_bench.py); floor: the cost model's floor for the layer "
                   "cases from parts measured here, beside miss_ext's ratio (bench/floor.py)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--dtypes", default=None,
                   help="comma list of dtype specs: a dtype (float32, bfloat16, float16; short: fp32, bf16, fp16) "
                   "or A+B = base weight and activations in A, adapter blocks in B (bfloat16+float32, "
                   "bf16+fp32: what get_peft_model builds on a bf16 model). Layer default: the suite's "
                   "(bfloat16+float32,float32,bfloat16); train: plain dtypes only, default float32")
    p.add_argument("--bat-precision", default="base", choices=("base", "promote"),
                   help="miss_ext's BAT mode where the blocks are wider than the base (mixed specs; layer and "
                   "profile modes): base (default; GEMMs in the base dtype on W' formed in fp32, rounded once) "
                   "or promote (PEFT's fp32 promotion)")
    p.add_argument("--variants", default=",".join(K.VARIANTS), help="comma list of standard,mini,bat")
    p.add_argument("--suite", default="default", choices=sorted(K.SUITES),
                   help="layer shapes: default (1024x2048x2048, r=64), llm (4096/11008, r=16/64/128), "
                   "smoke (seconds)")
    p.add_argument("--shape", action="append", default=None, metavar="N,in,out,r[,mini_r]",
                   help="replace the suite's shapes (repeatable)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default: the suite's: default 10, llm 5, smoke 2; x5 on CUDA)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default: the suite's: 2, 1, 1; +3 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="CSV path (default: bench/results/<mode>-<suite>-<device>-<time>.csv)")
    p.add_argument("--png", default=None, help="PNG path (default: next to the CSV); layer mode only")
    p.add_argument("--no-png", action="store_true", help="do not draw the chart")
    p.add_argument("--no-check", action="store_true", help="skip the error checks (layer mode)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = p.add_argument_group("train mode (a flag left out takes the preset's value; defaults: preset step)")
    t.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="step (default): the users' configuration, bf16 Llama (hidden 1024, intermediate 2816, "
                   "2 layers, 512 tokens, vocab 2000), fp32 blocks, r = mini_r = 64, all-linear and q/v, autocast "
                   "off and on; large: the same at hidden 2048, intermediate 5632, 2048 tokens (GEMM-dominated); "
                   "metamathqa: PEFT's MetaMathQA MiSS settings (q/v, no autocast, every implementation's rows)")
    t.add_argument("--autocast", nargs="?", const="on", default=None, metavar="off,on",
                   help="comma list of off and on: each step's forward under torch.autocast(bfloat16) or not; "
                   "--autocast alone means on (default: the preset's; step: off,on)")
    t.add_argument("--impls", default=None, help=f"comma list of {','.join(IMPLS)} (default: the preset's; "
                   "step: peft,inject)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps per run (step: 20)")
    t.add_argument("--train-warmup", type=int, default=None, help="first steps left out of the times (step: 3)")
    t.add_argument("--layers", type=int, default=None, help="(step: 2)")
    t.add_argument("--hidden", type=int, default=None, help="(step: 1024)")
    t.add_argument("--intermediate", type=int, default=None, help="(step: 2816)")
    t.add_argument("--heads", type=int, default=None, help="(step: 16)")
    t.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: as many as --heads)")
    t.add_argument("--vocab", type=int, default=None, help="(step: 2000)")
    t.add_argument("--seq", type=int, default=None, help="tokens per sequence (step: 512)")
    t.add_argument("--batch", type=int, default=None, help="(step: 1)")
    t.add_argument("--r", type=int, default=None, help="MiSS r (step: 64)")
    t.add_argument("--mini-r", type=int, default=None, help="(step: 64)")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (step: 1e-4)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (step: 0.1)")
    t.add_argument("--grad-clip", type=float, default=None, help="max gradient norm (step: 1.0)")
    t.add_argument("--adamw", default=None, choices=ADAMW,
                   help="fused: torch's fused AdamW, HF Trainer's default optimizer (adamw_torch_fused); plain: "
                   "torch.optim.AdamW's default implementation (step: fused; metamathqa: plain)")
    t.add_argument("--targets", default=None, help="comma list of qv (q_proj,v_proj) and all (every "
                   "linear but lm_head); default: the preset's (step: all,qv)")
    t.add_argument("--no-lora", action="store_true", help="leave out the PEFT LoRA row")
    t.add_argument("--no-floor", action="store_true", help="leave out the floor rows (standard, mini, bat)")
    return p


def _dtype_specs(args, default) -> list:
    try:
        return K.parse_dtypes(csv_list(args.dtypes) if args.dtypes else default)
    except ValueError as e:
        raise SystemExit(f"--dtypes: {e}") from None


def _shapes(args, suite) -> list:
    try:
        return [K.parse_shape(s) for s in args.shape] if args.shape else list(suite.shapes)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def _check_device(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
        if not miss_ext.build_info().get("cuda"):
            raise SystemExit("--device cuda: miss_ext was built without CUDA kernels")
    elif dev.type != "cpu":
        raise SystemExit(f"--device {device}: only cpu and cuda are supported")


def run_layer(args) -> Tuple[int, List[dict]]:
    suite = K.SUITES[args.suite]
    shapes = _shapes(args, suite)
    dtypes = _dtype_specs(args, suite.dtypes)
    cases, skipped = K.build_cases(shapes, dtypes, csv_list(args.variants))
    on_cuda = torch.device(args.device).type == "cuda"
    # GPU rounds are cheap and event timings of sub-millisecond calls jitter: take more of them.
    repeats = args.repeats if args.repeats is not None else suite.repeats * (5 if on_cuda else 1)
    warmup = args.warmup if args.warmup is not None else suite.warmup + (3 if on_cuda else 0)
    meta = env.collect(args.device)
    suite_name = "custom" if args.shape else args.suite
    meta.update(suite=suite_name, clock="cuda-events" if meta["device"].startswith("cuda") else "perf_counter")
    print(f"# miss_ext layer bench: suite={suite_name} device={meta['device_name']} torch={meta['torch']} "
          f"threads={meta['threads']} commit={meta['git_commit']} repeats={repeats} warmup={warmup}"
          + (f" bat_precision={args.bat_precision}" if any(c.mixed for c in cases) else ""),
          flush=True)
    for c, why in skipped:
        print(f"# skipped {c.label()}: {why}")
    rows = run_suite(cases, args.device, warmup, repeats, check=not args.no_check, seed=args.seed,
                     progress=not args.no_progress, bat_precision=args.bat_precision)
    show_peak = meta["device"].startswith("cuda")
    print(report.layer_table(rows, show_peak=show_peak))
    print("# ratios: median over interleaved rounds of (time / time of the other in the same round); "
          "fl = frozen nn.Linear, flW = linear with weight grad (BAT's floor)")
    if not args.no_check:
        print("# err/frozen: ||y - y_float64|| / ||y_frozen - y_frozen_float64||, y_frozen = the frozen "
              "nn.Linear in the base dtype on the same x; |y|/|yfr| = ||y_float64|| / ||y_frozen_float64|| (rounding "
              "errors grow with the output); contract for BAT's default mixed mode: "
              "err/frozen <= 2.5 x max(1, ||W'||/||W||) (w_growth in the CSV)")
    if any(c.mixed for c in cases):
        print("# A+B dtype: base weight, x, y and dL/dy in A, adapter blocks in B (for PEFT and miss_ext alike)")
    csv_path, png_path = output_paths(args, "layer", suite_name)
    report.write_csv(csv_path, rows, meta)
    print(f"# csv: {csv_path}")
    if png_path is not None:
        title = f"miss_ext vs PEFT, time / frozen nn.Linear (suite {suite_name})\n{meta['device_name']}, " \
                f"torch {meta['torch']}, {meta['threads']} threads, {meta['git_commit']}, {meta['date']}"
        out = report.write_png(png_path, rows, title)
        print(f"# png: {out}" if out else "# png: skipped (matplotlib not installed)")
    return 0, rows


def train_config(args, preset) -> TrainConfig:
    """TrainConfig from the preset's values, then the flags given (autocast is chosen per run)."""
    values = dict(TRAIN_DEFAULTS)
    values.update(preset.config)
    flags = dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                 kv_heads=args.kv_heads, vocab=args.vocab, seq=args.seq, batch=args.batch, r=args.r,
                 mini_r=args.mini_r, lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                 steps=args.steps, warmup=args.train_warmup, adamw=args.adamw)
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update(seed=args.seed, autocast=False)
    if values["steps"] < 1:
        raise SystemExit("--steps must be at least 1")
    if values["hidden"] % values["heads"]:
        raise SystemExit(f"--hidden ({values['hidden']}) must be divisible by --heads ({values['heads']})")
    kv = values["kv_heads"]
    if kv is not None and (kv < 1 or values["heads"] % kv):
        raise SystemExit(f"--kv-heads ({kv}) must divide --heads ({values['heads']})")
    return TrainConfig(**values)


def _choices(flag: str, text: str, allowed) -> list:
    got = csv_list(text)
    for t in got:
        if t not in allowed:
            raise SystemExit(f"{flag}: unknown {t!r} ({', '.join(allowed)})")
    if not got:
        raise SystemExit(f"{flag}: empty")
    return list(dict.fromkeys(got))


def _train_dtypes(args, default: str) -> list:
    specs = _dtype_specs(args, [default])
    mixed = [sp.name for sp in specs if sp.mixed]
    if mixed:
        raise SystemExit(f"--dtypes {','.join(mixed)}: train mode takes plain dtypes; the adapter blocks are "
                         f"what get_peft_model makes (float32 on a bfloat16/float16 model)")
    return [sp.base for sp in specs]


def _preset_plan(args):
    """(preset, dtypes, targets, autocast modes, implementations, TrainConfig) of a train or
    profile --preset run: the preset's values, then the flags given."""
    preset = PRESETS[args.preset or DEFAULT_PRESET]
    dtypes = _train_dtypes(args, preset.dtype)
    targets = _choices("--targets", args.targets or preset.targets, ("all", "qv"))
    autocast = [a == "on" for a in _choices("--autocast", args.autocast or preset.autocast, ("off", "on"))]
    impls = _choices("--impls", args.impls or preset.impls, IMPLS)
    return preset, dtypes, targets, autocast, impls, train_config(args, preset)


def run_train(args) -> Tuple[int, List[dict]]:
    preset, dtypes, targets, autocast, impls, cfg = _preset_plan(args)
    meta = env.collect(args.device)
    meta.update(preset=preset.name, train_config=cfg.describe())
    print(f"# miss_ext train bench, preset {preset.name}: {preset.about}", flush=True)
    print(f"# device={meta['device_name']} torch={meta['torch']} threads={meta['threads']} "
          f"commit={meta['git_commit']} peft={meta['peft']} {cfg.describe()}", flush=True)
    try:
        rows = run_preset(cfg, preset, dtypes, targets, csv_list(args.variants), args.device,
                          lora=not args.no_lora, progress=not args.no_progress, autocast=autocast, impls=impls,
                          floor=not args.no_floor)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    on_cuda = meta["device"].startswith("cuda")
    print("# x frozen: step time / the frozen model's step time in the same round; /peft: / PEFT's same variant; "
          "bat/default: / the same implementation's standard MiSS. Each a median over steps of the paired "
          "ratio: lower is better", flush=True)
    print(report.preset_table(rows, on_cuda=on_cuda))
    for key in report.SUMMARIES:
        print()
        print(report.summary_table(rows, key))
    peak = ("torch.cuda.max_memory_allocated during a timed step above what was allocated before it" if on_cuda
            else "one more step after the timed ones under torch.profiler(profile_memory=True), the running "
            "maximum of its allocations above the start")
    print(f"# ms: median step time over steps {cfg.warmup + 1}..{cfg.steps}, all rows' steps interleaved "
          f"round-robin; saved for backward: bytes autograd keeps between forward and backward (parameters left "
          f"out); peak memory of a step: {peak} (the model and AdamW's state "
          f"exist before it); 'vs frozen': minus the frozen model's")
    print("# rows: frozen = the same model, every parameter frozen, enable_input_require_grads() (fwd+bwd, no "
          "optimizer); peft = PEFT's MiSS (get_peft_model defaults: fp32 blocks); inject (ours) = miss_ext.inject; "
          "patch = PEFT's model under miss_ext.peft.patch(); bat = miss_ext's default BAT mode "
          "(bat_precision='base'), bat-promote = PEFT's fp32 promotion; lora = PEFT LoRA "
          f"r={preset.lora_r} alpha={preset.lora_alpha}; floor = the frozen step + the parts each adapted layer "
          "cannot avoid (bench/train_floor.py)")
    csv_path, _ = output_paths(args, "train", preset.name, png=False)
    report.write_csv(csv_path, rows, meta)
    print(f"# csv: {csv_path}")
    return (0 if all(r.get("loss_ok") is not False for r in rows) else 1), rows


def run_step_profile(args) -> Tuple[int, List[dict]]:
    """``profile --preset P``: one table per (dtype, targets, autocast) of the preset."""
    preset, dtypes, targets, autocast, impls, cfg = _preset_plan(args)
    rows = entries(csv_list(args.variants), lora=False, impls=impls)
    steps = args.repeats if args.repeats is not None else 3
    warmup = args.train_warmup if args.train_warmup is not None else 2
    if steps < 1 or warmup < 0:
        raise SystemExit("profile --preset: --repeats must be at least 1 and --train-warmup at least 0")
    meta = env.collect(args.device)
    print(f"# miss_ext step profile, preset {preset.name}: device={meta['device_name']} torch={meta['torch']} "
          f"threads={meta['threads']} commit={meta['git_commit']} peft={meta['peft']} {cfg.describe()}", flush=True)
    with quiet_transformers():
        for d, t, c in configurations(cfg, dtypes, targets, autocast):
            print(profile_step(c, preset, rows, d, t, args.device, steps, warmup), flush=True)
    return 0, []


def run_profile(args) -> Tuple[int, List[dict]]:
    if args.preset:
        return run_step_profile(args)
    suite = K.SUITES[args.suite]
    shapes = _shapes(args, suite)
    dtypes = _dtype_specs(args, suite.dtypes)
    cases, _ = K.build_cases(shapes, dtypes, csv_list(args.variants))
    iters = args.repeats if args.repeats is not None else 5
    for case in cases:
        print(profile_case(case, args.device, who=("floor", "peft", "ours"), iters=iters, seed=args.seed,
                           bat_precision=args.bat_precision), flush=True)
    return 0, []


def run(argv=None) -> Tuple[int, List[dict]]:
    """``python -m bench ...`` in-process: (exit status, the rows measured)."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_device(args.device)
    if args.mode not in ("train", "profile") and (args.preset or args.autocast or args.impls):
        raise SystemExit("--preset, --autocast and --impls belong to the train mode: "
                         "python -m bench train --preset ... (or profile --preset ...)")
    if args.mode == "profile" and not args.preset and (args.autocast or args.impls):
        raise SystemExit("--autocast and --impls profile a training step: python -m bench profile --preset step ...")
    if args.mode == "train":
        return run_train(args)
    if args.mode == "profile":
        return run_profile(args)
    if args.mode == "floor":
        suite = K.SUITES[args.suite]
        return run_floor(args, _shapes(args, suite), _dtype_specs(args, ("bfloat16+float32",)),
                         csv_list(args.variants)), []
    if args.mode == "serve":
        return run_serve(args)
    return run_layer(args)


def main(argv=None) -> int:
    return run(argv)[0]


if __name__ == "__main__":
    sys.exit(main())
