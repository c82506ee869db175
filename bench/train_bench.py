"""End-to-end training: a small Llama built in code (``transformers.LlamaConfig``, no downloads),
MiSS on q/v or on every linear but ``lm_head``, trained with PEFT (``get_peft_model`` +
``MissConfig``) and with miss_ext (the same ``nn.Linear`` modules wrapped in
``miss_ext.MissLinear``), from the same weights and the same batches, steps interleaved.

Reports tokens/s, memory (CUDA peak, or on CPU the bytes autograd saves for backward) and the
losses of both after N steps, which must agree closely.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from . import memory, timing
from .cases import INIT_WEIGHTS
from .progress import progress_bar

TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
PEFT_PREFIX = "base_model.model."


@dataclass
class TrainConfig:
    layers: int = 2
    hidden: int = 256
    intermediate: int = 768
    heads: int = 4
    vocab: int = 2048
    seq: int = 128
    batch: int = 4
    r: int = 16
    mini_r: int = 16
    lr: float = 1e-3
    steps: int = 20
    warmup: int = 3
    seed: int = 0
    distinct_batches: int = 4  # batches cycled, so the loss visibly falls
    kv_heads: Optional[int] = None  # None: as many as heads (no grouped-query attention)
    weight_decay: float = 0.01  # torch's AdamW default
    grad_clip: Optional[float] = None  # max gradient norm, clipped before each optimizer step
    autocast: bool = False  # the forward (and loss) under torch.autocast(bfloat16)

    def describe(self) -> str:
        extra = "" if self.kv_heads in (None, self.heads) else f" kv_heads={self.kv_heads}"
        extra += f" wd={self.weight_decay}" if self.weight_decay != 0.01 else ""
        extra += f" clip={self.grad_clip}" if self.grad_clip else ""
        extra += " autocast=bfloat16" if self.autocast else ""
        return (f"llama layers={self.layers} hidden={self.hidden} inter={self.intermediate} "
                f"heads={self.heads} vocab={self.vocab} seq={self.seq} batch={self.batch} r={self.r} "
                f"mini_r={self.mini_r} lr={self.lr} steps={self.steps}{extra}")


TRAIN_DEFAULTS = {f: getattr(TrainConfig, f) for f in TrainConfig.__dataclass_fields__}


def build_llama(cfg: TrainConfig, dtype, device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads or cfg.heads,
        max_position_embeddings=max(cfg.seq, 128), attention_dropout=0.0, use_cache=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(conf).to(device=device, dtype=dtype)


def inject_miss_ext(model: nn.Module, names, r: int, mini_r: int, init_weights) -> List[str]:
    """Replaces every ``nn.Linear`` child called one of ``names`` by ``miss_ext.MissLinear``
    around it; freezes everything else. Returns the qualified names replaced."""
    import miss_ext

    model.requires_grad_(False)
    done = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                setattr(parent, child_name, miss_ext.MissLinear(
                    child, r=r, mini_r=mini_r, init_weights=init_weights, miss_dropout=0.0))
                done.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return done


def build_pair(cfg: TrainConfig, targets: str, variant: str, dtype, device):
    """(peft_model, ours_model) from one base model; ours' blocks get PEFT's initial values and
    dtype (PEFT keeps adapters in float32 for half-precision models)."""
    from peft import MissConfig, get_peft_model

    base = build_llama(cfg, dtype, device)
    ours = copy.deepcopy(base)
    names = TARGETS[targets]
    pcfg = MissConfig(r=cfg.r, mini_r=cfg.mini_r, init_weights=INIT_WEIGHTS[variant], miss_dropout=0.0,
                      target_modules=list(names))
    peft_model = get_peft_model(base, pcfg)
    inject_miss_ext(ours, names, cfg.r, cfg.mini_r, INIT_WEIGHTS[variant])
    p_params = {n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n: p
                for n, p in peft_model.named_parameters() if p.requires_grad}
    o_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    if set(p_params) != set(o_params):
        missing = sorted(set(p_params) ^ set(o_params))[:6]
        raise RuntimeError(f"trainable parameters differ between PEFT and miss_ext: {missing} ...")
    with torch.no_grad():
        for n, p in o_params.items():
            p.data = p_params[n].detach().clone()
    return peft_model.train(), ours.train(), sorted(o_params), p_params, o_params


def make_batches(cfg: TrainConfig, device) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    return [torch.randint(cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(device)
            for _ in range(cfg.distinct_batches)]


def forward_context(cfg: TrainConfig, device):
    """torch.autocast(bfloat16) around the forward when ``cfg.autocast``, else nothing."""
    if cfg.autocast:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(model, ids, cfg: Optional[TrainConfig] = None):
    with forward_context(cfg, ids.device) if cfg is not None else contextlib.nullcontext():
        return model(input_ids=ids, labels=ids).loss


def optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def train_step(model, ids, opt, params, cfg: TrainConfig) -> torch.Tensor:
    """One step: forward (under autocast if asked), backward, optional clipping, AdamW."""
    loss = _loss(model, ids, cfg)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def saved_bytes(model, ids, cfg: Optional[TrainConfig] = None) -> int:
    """Bytes autograd keeps for one forward (parameters excluded); no optimizer step."""
    with memory.SavedTensorsMeter([*model.parameters(), *model.buffers(), ids]) as meter:
        loss = _loss(model, ids, cfg)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return meter.saved_bytes


def loss_tolerance(dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def train_case(cfg: TrainConfig, targets: str, variant: str, dtype, device, bar=None) -> Dict:
    peft_model, ours, names, p_params, o_params = build_pair(cfg, targets, variant, dtype, device)
    models = {"peft": peft_model, "ours": ours}
    params = {"peft": [p_params[n] for n in names], "ours": [o_params[n] for n in names]}
    opts = {k: optimizer(v, cfg) for k, v in params.items()}
    batches = make_batches(cfg, device)
    row = {"targets": targets, "variant": variant, "dtype": str(dtype).replace("torch.", ""), "autocast": cfg.autocast,
           "adapted_layers": sum(1 for n in names), "trainable_params": sum(p.numel() for p in o_params.values()),
           "steps": cfg.steps, "batch": cfg.batch, "seq": cfg.seq, "r": cfg.r,
           "mini_r": cfg.mini_r if variant == "mini" else ""}
    for k, m in models.items():
        row[f"{k}_saved_bytes"] = saved_bytes(m, batches[0], cfg)
    clock = timing.clock_for(device)
    times = {k: [] for k in models}
    losses = {k: [] for k in models}
    peaks = {k: [] for k in models}
    with timing.no_gc():
        for step in range(cfg.steps):
            ids = batches[step % len(batches)]
            for k, m in models.items():
                with memory.cuda_peak(device) as peak:
                    clock.sync()
                    t0 = clock.mark()
                    loss = train_step(m, ids, opts[k], params[k], cfg)
                    t1 = clock.mark()
                    clock.sync()
                losses[k].append(float(loss.detach().float().item()))
                if step >= cfg.warmup or cfg.steps <= cfg.warmup:
                    times[k].append(clock.elapsed_ms(t0, t1))
                    peaks[k].append(peak["peak_bytes"])
            if bar is not None:
                bar.update(1)
    tokens = cfg.batch * cfg.seq
    for k in models:
        ms = timing.median(times[k])
        row[f"{k}_step_ms"] = ms
        row[f"{k}_tokens_per_s"] = tokens / (ms / 1e3) if ms > 0 else math.nan
        row[f"{k}_peak_bytes"] = max(peaks[k]) if peaks[k] else math.nan
        row[f"{k}_first_loss"] = losses[k][0]
        row[f"{k}_loss"] = losses[k][-1]
    row["ours_speedup_vs_peft"] = timing.paired_ratio(times["peft"], times["ours"])  # >1: ours faster
    diffs = [abs(a - b) for a, b in zip(losses["peft"], losses["ours"])]
    row["loss_max_abs_diff"] = max(diffs) if diffs else math.nan
    row["loss_ok"] = bool(diffs) and all(math.isfinite(d) for d in diffs) and \
        max(diffs) <= loss_tolerance(torch.bfloat16 if cfg.autocast else dtype) * max(1.0, abs(losses["peft"][-1]))
    return row


def run_train_suite(cfg: TrainConfig, targets, variants, dtypes, device="cpu", progress: bool = True) -> List[Dict]:
    combos = [(t, v, d) for d in dtypes for t in targets for v in variants]
    bar = progress_bar(len(combos) * cfg.steps, "train bench", "step", progress)
    rows = []
    try:
        with warnings.catch_warnings():
            # transformers deprecation chatter triggered inside PEFT, not ours to fix here
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
            for t, v, d in combos:
                if bar is not None:
                    bar.set_postfix_str(f"{t}/{v}/{str(d).replace('torch.', '')}")
                rows.append(train_case(cfg, t, v, d, device, bar))
    finally:
        if bar is not None:
            bar.close()
    return rows
