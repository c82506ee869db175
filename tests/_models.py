"""The one tiny Llama builder the tests share (built from a config, no downloads), and the
helpers that go with it.

``build()`` with no size arguments gives the smallest Llama that keeps every projection a
multiple of ``R``, so all three variants fit every one of ``TARGETS`` (BAT needs
in % r == out % r == 0; v_proj's output is 2 kv heads x 8 = 16 wide): the big-model (meta
device), serving, export and distributed tests use it (tests/_dist_worker.py imports this module
when run as a script from this folder). ``SMALL`` is the wider model the end-to-end training
tests (trainer, quantized base, checkpointing, the fine-tuning curves) target with every
projection (``PROJECTIONS``) and load with ``from_pretrained`` from ``save_tiny_llama``.
"""

from __future__ import annotations

import torch
import transformers

from miss_ext.layer import INIT_WEIGHTS

TARGETS = ["q_proj", "v_proj", "down_proj"]
R = 4
# Zero-init variants: their documented init is what reset_adapter_parameters re-applies.
VARIANTS = {
    "standard": dict(init_weights=True),
    "mini": dict(init_weights="mini", mini_r=8),
    "bat": dict(init_weights="bat"),
}
VOCAB, SEQ = 64, 8

TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
SMALL = dict(TINY, vocab_size=128, hidden_size=64, intermediate_size=128, max_position_embeddings=64)

# The training-setup tests adapt every projection of SMALL.
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The variant -> init_weights table is the package's (one table, miss_ext._core_variants).
INIT = INIT_WEIGHTS
VARIANT_NAMES = list(INIT)


def config(**sizes) -> transformers.LlamaConfig:
    """TINY's config, with any of its sizes replaced by ``sizes``."""
    return transformers.LlamaConfig(**{**TINY, **sizes})


def build(device="cpu", dtype=torch.float32, seed: int | None = 0, **sizes) -> transformers.LlamaForCausalLM:
    """The plain model; on a real device its weights depend only on ``seed`` (``None``: on the
    generator's current state)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config(**sizes))
    return model.to(dtype)


def reinit_rope(model: transformers.LlamaForCausalLM) -> None:
    """``to_empty`` also empties non-persistent buffers, which no checkpoint holds; the rotary
    frequencies are recomputed from the config as the module's own __init__ does."""
    rope = model.model.rotary_emb
    inv_freq, _ = rope.compute_default_rope_parameters(rope.config)
    with torch.no_grad():
        rope.inv_freq.copy_(inv_freq)
        rope.original_inv_freq.copy_(inv_freq)


def randomize_blocks(model, scale: float = 0.1, seed: int = 1) -> None:
    """Non-zero blocks (as a trained checkpoint has), identical for a given seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def batch(step: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


# ---------------------------------------------------------------- SMALL, loaded from disk


def save_tiny_llama(path, layers: int = 2, seed: int = 0) -> str:
    """SMALL saved once to ``path`` so each test loads it the way users do (``from_pretrained``,
    with a dtype or a quantization config)."""
    build(seed=seed, **dict(SMALL, num_hidden_layers=layers)).save_pretrained(path)
    return str(path)


def load(path, dtype=None, **kwargs):
    """``from_pretrained`` on CPU; ``dtype`` is what older transformers call ``torch_dtype``."""
    from packaging.version import Version

    transformers.logging.set_verbosity_error()
    if dtype is not None:
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs[key] = dtype
    return transformers.LlamaForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


def token_batch(n: int = 4, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (n, length), generator=torch.Generator().manual_seed(seed))


def adam_losses(model, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list:
    """The loss of each of ``steps`` AdamW steps of ``model``'s trainable parameters on ``ids``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def randomize_all_blocks(model, seed: int = 3) -> None:
    """Every adapter block to small random values (the same for every model with the same
    targets), so the adapters shape the loss from the first step on."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".miss_block" in name:
                scale = 0.02 if p.dim() == 3 else 0.1
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))


def miss_kwargs(variant: str, **extra) -> dict:
    return dict(r=8, mini_r=8, init_weights=INIT[variant], **extra)
