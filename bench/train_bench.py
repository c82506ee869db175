"""The pieces of a training step on a small Llama built in code (``transformers.LlamaConfig``, no
downloads): the configuration, the model, the batches, one step (forward + backward + AdamW, the
forward under autocast when asked) and the bytes autograd saves for backward. The rows that use
them are in :mod:`bench.train_preset`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from . import memory

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
    # "fused": torch's fused AdamW kernel, what HF Trainer runs by default (its optim
    # "adamw_torch_fused" from torch 2.8 on); "plain": torch.optim.AdamW's own default (on CPU
    # one tensor at a time), what a hand-written loop or PEFT's MetaMathQA benchmark runs.
    adamw: str = "fused"

    def describe(self) -> str:
        extra = "" if self.kv_heads in (None, self.heads) else f" kv_heads={self.kv_heads}"
        extra += f" wd={self.weight_decay}" if self.weight_decay != 0.01 else ""
        extra += f" clip={self.grad_clip}" if self.grad_clip else ""
        extra += " autocast=bfloat16" if self.autocast else ""
        extra += f" adamw={self.adamw}"
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


ADAMW = ("fused", "plain")


def optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.adamw not in ADAMW:
        raise ValueError(f"adamw must be one of {', '.join(ADAMW)} (got {cfg.adamw!r})")
    fused = {"fused": True} if cfg.adamw == "fused" else {}
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def train_step(model, ids, opt, params, cfg: TrainConfig) -> torch.Tensor:
    """One step: forward (under autocast if asked), backward, optional clipping, AdamW. ``opt``
    None (the frozen model: nothing to train) runs forward and backward only."""
    loss = _loss(model, ids, cfg)
    loss.backward()
    if opt is None:
        return loss
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
