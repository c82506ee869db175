"""Gradient checkpointing (``model.gradient_checkpointing_enable()``) with ``miss_dropout > 0``.

miss_ext draws each dropout seed from torch's default generator in forward and regenerates the
mask from it in backward. Under checkpointing the forward of each decoder layer runs twice; the
recomputation must draw the same seeds (torch.utils.checkpoint restores the RNG state, with
``use_reentrant=True`` and ``False``), so the gradients must equal the plain run's bit for bit.
A control run with ``preserve_rng_state=False`` must differ, which shows the comparison sees
the masks.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import miss_ext  # noqa: E402
import miss_ext.peft as mp  # noqa: E402
from peft import MissConfig, get_peft_model  # noqa: E402

from _models import PROJECTIONS as TARGETS, load, miss_kwargs, randomize_all_blocks as randomize_blocks, save_tiny_llama, token_batch  # noqa: E402

P = 0.2


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def build(llama_dir, how, variant):
    kw = miss_kwargs(variant, miss_dropout=P)
    if how == "inject":
        model = miss_ext.inject(load(llama_dir), TARGETS, **kw)
    else:
        model = get_peft_model(load(llama_dir), MissConfig(target_modules=TARGETS, **kw))
    randomize_blocks(model)
    return model.train()


def gradients(model, checkpointing=None, seed=5):
    """Block gradients of one step; ``checkpointing`` is None or the kwargs for
    ``gradient_checkpointing_enable``. Also counts the forward calls of one adapted layer."""
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        # The embeddings are frozen: reentrant checkpointing needs an input that requires grad.
        model.enable_input_require_grads()
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    calls = []
    hook = layer.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = token_batch(2, 16)
    torch.manual_seed(seed)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".miss_block" in n for n in grads)
    return grads, len(calls)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
@pytest.mark.parametrize("how", ["inject", "patch"])
def test_checkpointing_regenerates_dropout_masks(llama_dir, how, variant):
    with mp.patched() if how == "patch" else contextlib.nullcontext():
        plain, calls = gradients(build(llama_dir, how, variant))
        assert calls == 1
        for reentrant in (True, False):
            got, calls = gradients(build(llama_dir, how, variant), {"use_reentrant": reentrant})
            assert calls == 2, "the layer was not recomputed: checkpointing is not active"
            assert got.keys() == plain.keys()
            for name in plain:
                assert torch.equal(got[name], plain[name]), f"use_reentrant={reentrant}: {name} differs"
        if variant == "bat":
            return  # no dropout in BAT (as in PEFT): nothing random to replay
        # Controls: another seed, or a recomputation that does not restore the RNG state, gives
        # other masks and so other gradients.
        other, _ = gradients(build(llama_dir, how, variant), seed=6)
        assert any(not torch.equal(other[n], plain[n]) for n in plain)
        lost, _ = gradients(build(llama_dir, how, variant), {"use_reentrant": False, "preserve_rng_state": False})
        assert any(not torch.equal(lost[n], plain[n]) for n in plain)
