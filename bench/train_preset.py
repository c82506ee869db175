"""Training presets (``python -m bench train [--preset NAME]``): one model and one set of training
settings, every implementation of MiSS on it and the same model frozen, side by side, timed step
by step in interleaved rounds.

Presets (a Llama built in code from a config, no downloads; bf16 weights; the adapters as
``get_peft_model`` makes them, fp32 blocks; r = mini_r = 64):

* ``step`` (the default): what users run. Hidden 1024, intermediate 2816, 16 heads, 2 layers,
  vocabulary 2000, 512 tokens (batch 1); MiSS on every linear but lm_head (``all``) and on
  q_proj/v_proj (``qv``), each without and with ``torch.autocast(bfloat16)`` (what
  ``Trainer(bf16=True)`` adds); AdamW lr 1e-4, wd 0.1, gradient norm clipped at 1.0, torch's
  fused AdamW (``Trainer``'s default optimizer, ``adamw_torch_fused``, from torch 2.8 on).
* ``large``: the same at a size where GEMMs dominate the step: hidden 2048, intermediate 5632,
  2048 tokens.
* ``metamathqa``: PEFT's published MiSS benchmark (method_comparison/MetaMathQA in PEFT:
  Llama-3.2-3B in bfloat16, no autocast, q_proj/v_proj, r = mini_r = 64, AdamW lr 1e-4, wd 0.1,
  clip 1.0, torch.optim.AdamW's own default implementation) at ``step``'s sizes (vocabulary 4096), with every implementation's rows. A step is
  about 65 GFLOP of matrix products; the cosine schedule and the 768-token, batch-4 batches of
  the original are left out: over a few steps a schedule is a constant, and 512 tokens already
  keep every GEMM large.

Rows (one training run each, all from the same initial weights, on the same batches):

* ``frozen``: the same model with every parameter frozen and ``enable_input_require_grads()``,
  so backward still runs through every layer (forward + backward; no optimizer: nothing to
  train). Every other row's ``x frozen`` is its step time over this row's, in the same round;
* ``peft``:   PEFT's MiSS (``get_peft_model`` defaults), for standard ("default"), mini and bat;
* ``inject``: ``miss_ext.inject`` on the same model, for the same variants; BAT in its default
  mode (``bat_precision="base"``) and in PEFT's fp32 promotion (``bat-promote``);
* ``patch``:  PEFT's model under ``miss_ext.peft.patch(bat_precision=...)``, the same rows
  (``--impls``; in the default only for ``metamathqa``);
* ``lora``: PEFT's LoRA (r=32, lora_alpha=64) on the same targets, the method users pick instead.

After each configuration's rows, :mod:`bench.train_floor` adds the floor rows for standard,
mini and BAT MiSS (the frozen step plus the work no implementation can avoid), its parts timed
in the same rounds as the rows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import miss_ext
import miss_ext.peft as mp
import torch
from torch import nn

from . import memory, timing
from .cases import INIT_WEIGHTS, dtype_str
from .progress import progress_bar
from .train_bench import PEFT_PREFIX, TARGETS, TrainConfig, build_llama, make_batches, optimizer, saved_bytes, \
    train_step
from .train_floor import FLOOR_VARIANTS, FloorParts

IMPLS = ("peft", "inject", "patch")  # the implementations of MiSS a preset can run, in table order


@dataclass(frozen=True)
class Preset:
    name: str
    about: str
    config: dict  # TrainConfig fields; command-line flags override them
    dtype: str = "bfloat16"
    targets: str = "all,qv"  # comma lists, as the flags take them
    autocast: str = "off,on"
    impls: str = "peft,inject"
    lora_r: int = 32
    lora_alpha: int = 64


_OPTIM = dict(lr=1e-4, weight_decay=0.1, grad_clip=1.0, steps=20, warmup=3, adamw="fused")
_STEP = dict(layers=2, hidden=1024, intermediate=2816, heads=16, vocab=2000, seq=512, batch=1, r=64, mini_r=64)

PRESETS = {
    "step": Preset(
        name="step",
        about="the users' configuration: bf16 Llama, fp32 adapter blocks (get_peft_model's default), "
              "all-linear and q/v, autocast off and on",
        config={**_STEP, **_OPTIM},
    ),
    "large": Preset(
        name="large",
        about="the step preset where GEMMs dominate: hidden 2048, intermediate 5632, 2048 tokens",
        config={**_STEP, **_OPTIM, "hidden": 2048, "intermediate": 5632, "seq": 2048, "steps": 10, "warmup": 2},
    ),
    "metamathqa": Preset(
        name="metamathqa",
        about="PEFT's MetaMathQA MiSS settings (bf16 model, fp32 adapter blocks, q_proj/v_proj, "
              "r = mini_r = 64, AdamW lr 1e-4 wd 0.1, clip 1.0) on a Llama built in code",
        config={**_STEP, **_OPTIM, "vocab": 4096, "adamw": "plain"},
        targets="qv", autocast="off", impls="peft,inject,patch",
    ),
}
DEFAULT_PRESET = "step"


@dataclass(frozen=True)
class Entry:
    """One row: an implementation and a variant (``lora`` for PEFT's LoRA)."""

    impl: str  # frozen, peft, inject, patch
    variant: str  # frozen, standard, mini, bat, lora
    bat_precision: str = ""  # miss_ext's BAT mode (inject/patch bat rows): base or promote

    @property
    def label(self) -> str:
        if self.variant == "bat" and self.bat_precision == "promote":
            return "bat-promote"
        return self.variant

    @property
    def key(self) -> str:
        return f"{self.impl}/{self.label}"

    @property
    def peer(self) -> Optional[str]:
        """The PEFT row this one is compared with (same variant), None for PEFT's own rows."""
        if self.impl in ("frozen", "peft"):
            return None
        return f"peft/{self.variant}"

    @property
    def default(self) -> Optional[str]:
        """The same implementation's default MiSS (standard) row, for BAT's "BAT vs default"."""
        return f"{self.impl}/standard" if self.variant == "bat" else None

    def exact(self, autocast: bool) -> bool:
        """Computes PEFT's numbers up to the order of fp32 additions (the loss tolerance is tighter).
        Under autocast both BAT modes run bf16 GEMMs on W' formed in fp32, where PEFT rounds W B and
        B to bf16 first: not PEFT's numbers."""
        return self.variant in ("standard", "mini") or (self.bat_precision == "promote" and not autocast)


def entries(variants=("standard", "mini", "bat"), lora: bool = True, impls=IMPLS, frozen: bool = True) -> List[Entry]:
    """The rows, in table order: the frozen model, PEFT's, inject's, patch's (same variants), then LoRA."""
    for v in variants:
        if v not in INIT_WEIGHTS:
            raise ValueError(f"unknown variant {v!r}; choose from {tuple(INIT_WEIGHTS)}")
    for i in impls:
        if i not in IMPLS:
            raise ValueError(f"unknown implementation {i!r}; choose from {IMPLS}")
    variants = [v for v in INIT_WEIGHTS if v in variants]  # standard, mini, bat order
    rows = [Entry("frozen", "frozen")] if frozen else []
    if "peft" in impls:
        rows += [Entry("peft", v) for v in variants]
    for impl in (i for i in IMPLS[1:] if i in impls):
        for v in variants:
            rows.append(Entry(impl, v, "base" if v == "bat" else ""))
            if v == "bat":
                rows.append(Entry(impl, v, "promote"))
    if lora:
        rows.append(Entry("peft", "lora"))
    return rows


def loss_tolerance(dtype, exact: bool) -> float:
    """Largest |loss difference| to PEFT's same variant over the run, relative to max(1, loss).

    float32: 1e-3 (only the order of fp32 additions differs). In bfloat16/float16 (or under
    autocast) a reordered fp32 sum now and then flips the last bit of a bf16 activation (2^-9
    relative), and AdamW, which normalises gradients, turns such tiny gradient differences into
    parameter differences that do not fade. Rows that compute PEFT's numbers get 2e-3, about
    bf16's unit roundoff and about 20x the difference measured at the preset's sizes over 20
    steps (~1e-4 x loss); BAT's default mode rounds W' to bf16 once where PEFT keeps fp32, one
    more rounding per weight of the frozen layer's own size, and gets 2.5x that (the numeric
    contract allows 2.5x the frozen layer's error). A row that does not train moves away from
    PEFT by the loss's own progress (about 0.15 over the preset's 20 steps) and fails."""
    if dtype in (torch.float32, torch.float64):
        return 1e-3
    return 2e-3 if exact else 5e-3


@dataclass
class Contestant:
    entry: Entry
    model: nn.Module
    params: List[torch.Tensor]
    opt: Optional[torch.optim.Optimizer]  # None for the frozen model
    times: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    peaks: List[float] = field(default_factory=list)

    def context(self):
        """PEFT's class patched for this row's steps only (PEFT's own rows run unpatched)."""
        if self.entry.impl != "patch":
            return contextlib.nullcontext()
        return mp.patched(bat_precision=self.entry.bat_precision or "base")


def _trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n: p
            for n, p in model.named_parameters() if p.requires_grad}


def build_model(entry: Entry, base: nn.Module, cfg: TrainConfig, preset: Preset, targets: str) -> nn.Module:
    from peft import LoraConfig, MissConfig, get_peft_model

    model = copy.deepcopy(base)
    if entry.impl == "frozen":
        model.requires_grad_(False)
        # Without a leaf that needs grad the loss would have no graph: the embeddings' output
        # requires grad instead, as for gradient checkpointing, so backward runs every layer.
        model.enable_input_require_grads()
        return model.train()
    names = list(TARGETS[targets])
    if entry.variant == "lora":
        torch.manual_seed(cfg.seed + 2)  # LoRA's A is random: the same A on every run
        cfg_l = LoraConfig(r=preset.lora_r, lora_alpha=preset.lora_alpha, lora_dropout=0.0, target_modules=names)
        return get_peft_model(model, cfg_l).train()
    init = INIT_WEIGHTS[entry.variant]
    if entry.impl in ("peft", "patch"):
        cfg_m = MissConfig(r=cfg.r, mini_r=cfg.mini_r, init_weights=init, miss_dropout=0.0, target_modules=names)
        return get_peft_model(model, cfg_m).train()
    miss_ext.inject(model, names, r=cfg.r, mini_r=cfg.mini_r, init_weights=init,
                    bat_precision=entry.bat_precision or None)
    return model.train()


def copy_blocks(dst: nn.Module, src: nn.Module, what: str) -> None:
    """``dst``'s trainable blocks take ``src``'s values and dtype (PEFT's, the reference)."""
    d, s = _trainable(dst), _trainable(src)
    if set(d) != set(s):
        missing = sorted(set(d) ^ set(s))[:6]
        raise RuntimeError(f"{what}: trainable parameters differ from PEFT's: {missing} ...")
    with torch.no_grad():
        for n, p in d.items():
            p.data = s[n].detach().clone()


def build_contestants(cfg: TrainConfig, preset: Preset, rows: List[Entry], dtype, targets: str,
                      device) -> List[Contestant]:
    base = build_llama(cfg, dtype, device)
    models: Dict[str, nn.Module] = {}
    for e in rows:
        models[e.key] = build_model(e, base, cfg, preset, targets)
    for e in rows:
        if e.peer in models:
            copy_blocks(models[e.key], models[e.peer], e.key)
    out = []
    for e in rows:
        params = list(_trainable(models[e.key]).values())
        out.append(Contestant(e, models[e.key], params, optimizer(params, cfg) if params else None))
    return out


def run_preset_case(cfg: TrainConfig, preset: Preset, rows: List[Entry], dtype, targets: str, device,
                    bar=None, floor: Optional[FloorParts] = None) -> List[Dict]:
    """The rows' steps, interleaved round-robin; ``floor``'s parts take one round after each
    round of steps."""
    if mp.is_patched():
        raise RuntimeError("miss_ext.peft is patched globally; the PEFT rows must run PEFT's own code. "
                           "Call miss_ext.peft.unpatch() first")
    contestants = build_contestants(cfg, preset, rows, dtype, targets, device)
    batches = make_batches(cfg, device)
    saved = {}
    for c in contestants:
        with c.context():
            saved[c.entry.key] = saved_bytes(c.model, batches[0], cfg)
    clock = timing.clock_for(device)
    n = len(contestants)
    with timing.no_gc():
        for step in range(cfg.steps):
            ids = batches[step % len(batches)]
            timed_round = step >= cfg.warmup or cfg.steps <= cfg.warmup
            # The order rotates each round, so no row always runs right after the same neighbour.
            for c in contestants[step % n:] + contestants[:step % n]:
                def one_step(c=c, ids=ids):
                    with c.context():
                        return train_step(c.model, ids, c.opt, c.params, cfg)

                with memory.cuda_peak(device) as peak:
                    loss, ms = timing.timed(clock, one_step)
                c.losses.append(float(loss.detach().float().item()))
                if timed_round:
                    c.times.append(ms)
                    c.peaks.append(peak["peak_bytes"])
            if floor is not None:
                floor.round(record=timed_round)
            if bar is not None:
                bar.update(1)
    if torch.device(device).type == "cpu":
        # One more step per row, profiled, after the timed ones (so the losses compared are
        # untouched): every row takes it, on the same batch, with its optimizer state in place.
        for c in contestants:
            with c.context():
                c.peaks = [memory.cpu_peak_bytes(lambda: train_step(c.model, batches[0], c.opt, c.params, cfg))]
    return summarize(contestants, saved, cfg, preset, dtype, targets)


def summarize(contestants: List[Contestant], saved: Dict[str, int], cfg: TrainConfig, preset: Preset, dtype,
              targets: str) -> List[Dict]:
    by_key = {c.entry.key: c for c in contestants}
    lora = by_key.get("peft/lora")
    frozen = by_key.get("frozen/frozen")
    tokens = cfg.batch * cfg.seq
    half = cfg.autocast or dtype not in (torch.float32, torch.float64)
    out = []
    for c in contestants:
        e = c.entry
        ms = timing.median(c.times)
        peak = max(c.peaks) if c.peaks else math.nan
        row = {
            "preset": preset.name, "targets": targets, "dtype": dtype_str(dtype), "autocast": cfg.autocast,
            "impl": e.impl, "variant": e.label,
            "method": {"lora": "lora", "frozen": "frozen"}.get(e.variant, "miss"),
            "bat_precision": e.bat_precision, "r": preset.lora_r if e.variant == "lora" else cfg.r,
            "mini_r": cfg.mini_r if e.variant == "mini" else "", "steps": cfg.steps, "timed_steps": len(c.times),
            "batch": cfg.batch, "seq": cfg.seq, "trainable_params": sum(p.numel() for p in c.params),
            "block_dtype": dtype_str(c.params[0].dtype) if c.params else "",
            "step_ms": ms, "step_spread": timing.spread(c.times),
            "tokens_per_s": tokens / (ms / 1e3) if ms > 0 else math.nan,
            "x_frozen": timing.paired_ratio(c.times, frozen.times) if frozen is not None else math.nan,
            "saved_bytes": saved[e.key], "peak_bytes": peak,
            "saved_vs_frozen": saved[e.key] - saved[frozen.entry.key] if frozen is not None else math.nan,
            "peak_vs_frozen": peak - max(frozen.peaks) if frozen is not None and frozen.peaks else math.nan,
            "first_loss": c.losses[0], "loss": c.losses[-1],
        }
        peer = by_key.get(e.peer) if e.peer else None
        row["vs_peft"] = timing.paired_ratio(c.times, peer.times) if peer else math.nan
        default = by_key.get(e.default) if e.default else None
        row["bat_vs_default"] = timing.paired_ratio(c.times, default.times) if default else math.nan
        trains = c is not lora and c is not frozen
        row["vs_lora"] = timing.paired_ratio(c.times, lora.times) if lora is not None and trains else math.nan
        if peer is not None:
            diffs = [abs(a - b) for a, b in zip(c.losses, peer.losses)]
            tol = loss_tolerance(torch.bfloat16 if half else dtype, e.exact(cfg.autocast))
            row["loss_max_abs_diff"] = max(diffs)
            row["loss_tol"] = tol * max(1.0, abs(peer.losses[-1]))
            row["loss_ok"] = all(math.isfinite(d) for d in diffs) and max(diffs) <= row["loss_tol"]
        else:
            row["loss_max_abs_diff"], row["loss_tol"] = math.nan, math.nan
            row["loss_ok"] = all(math.isfinite(v) for v in c.losses)
        out.append(row)
    return out


@contextlib.contextmanager
def quiet_transformers():
    """transformers' FutureWarnings (its deprecations) kept out of a bench's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
        yield


def configurations(cfg: TrainConfig, dtypes, targets, autocast) -> List[tuple]:
    """(dtype, targets, ``cfg`` with that autocast) for every configuration, in table order."""
    return [(d, t, dataclasses.replace(cfg, autocast=a)) for d in dtypes for t in targets for a in autocast]


def run_preset(cfg: TrainConfig, preset: Preset, dtypes, targets, variants, device="cpu", lora: bool = True,
               progress: bool = True, autocast=(False,), impls=IMPLS, floor: bool = True) -> List[Dict]:
    """Every row for each (dtype, targets, autocast), in that order; each configuration's rows
    (``entries``) run interleaved, followed by its floor rows (standard, mini, bat, when ``floor``
    and those variants run), its parts timed in the same rounds."""
    rows = entries(variants, lora, impls)
    combos = configurations(cfg, dtypes, targets, autocast)
    bar = progress_bar(len(combos) * cfg.steps, f"train {preset.name}", "round", progress)
    floor_variants = [v for v in FLOOR_VARIANTS if v in variants] if floor else []
    out = []
    try:
        with quiet_transformers():
            for d, t, c in combos:
                parts = FloorParts(c, t, d, device, floor_variants) if floor_variants else None
                case = run_preset_case(c, preset, rows, d, t, device, bar, parts)
                out += case
                if parts is not None:
                    out += [{"preset": preset.name, **r} for r in parts.rows(case[0]["step_ms"])]
    finally:
        if bar is not None:
            bar.close()
    return out
