"""The tiny Llama the training-setup tests share: built from a config (no download), saved once
to a temporary directory so each test loads it the way users do (``from_pretrained``, with a
dtype or a quantization config)."""

from __future__ import annotations

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT = {"standard": True, "mini": "mini", "bat": "bat"}
VARIANTS = list(INIT)
VOCAB = 128


def llama_config(layers: int = 2):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


def save_tiny_llama(path, layers: int = 2, seed: int = 0) -> str:
    import transformers

    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(llama_config(layers)).save_pretrained(path)
    return str(path)


def load(path, dtype=None, **kwargs):
    """``from_pretrained`` on CPU; ``dtype`` is what older transformers call ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    transformers.logging.set_verbosity_error()
    if dtype is not None:
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs[key] = dtype
    return transformers.LlamaForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


def token_batch(n: int = 4, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def randomize_blocks(model, seed: int = 3) -> None:
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
