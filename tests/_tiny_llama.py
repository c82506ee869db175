"""A tiny Llama for the big-model (meta device) tests, shared by tests/test_meta.py and the
distributed worker (tests/_rel_dist_worker.py, run as a script from this folder).

Sizes are the smallest that keep every projection a multiple of R, so all three variants fit
every target (BAT needs in % r == out % r == 0; v_proj's output is 2 kv heads x 8 = 16 wide).
"""

from __future__ import annotations

import torch
import transformers

TARGETS = ["q_proj", "v_proj", "down_proj"]
R = 4
# Zero-init variants: their documented init is what reset_adapter_parameters re-applies.
VARIANTS = {
    "standard": dict(init_weights=True),
    "mini": dict(init_weights="mini", mini_r=8),
    "bat": dict(init_weights="bat"),
}
VOCAB, SEQ = 64, 8


def config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )


def build(device="cpu", dtype=torch.float32, seed: int = 0) -> transformers.LlamaForCausalLM:
    """The plain model; on a real device its weights depend only on ``seed``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config())
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
