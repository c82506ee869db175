"""Resuming training (issue #6): a checkpoint saved mid-training (model and optimizer state
dicts plus torch's RNG state, which the dropout seed is drawn from) and loaded into a fresh
model continues bit-identically."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import miss_ext

from conftest import INIT_RANDOM as INIT  # noqa: E402


def _model(variant, p, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 16))
    kw = {"mini_r": 8} if variant == "mini" else {}
    miss_ext.inject(model, ["0", "2"], r=4, init_weights=INIT[variant], miss_dropout=p, **kw)
    return model


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)


def _train(model, opt, steps):
    losses = []
    model.train()
    for t in steps:
        x, y = _batch(t)
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _opt(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01)


@pytest.mark.parametrize("variant,p", [("standard", 0.0), ("standard", 0.3), ("mini", 0.2), ("bat", 0.0)])
def test_checkpoint_resume_is_bit_identical(variant, p):
    total, cut = 12, 5
    # Uninterrupted run, checkpointing at step `cut` as a training loop would.
    model = _model(variant, p, seed=0)
    opt = _opt(model)
    torch.manual_seed(42)  # dropout seeds come from torch's default generator
    losses = _train(model, opt, range(cut))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    losses += _train(model, opt, range(cut, total))
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # Fresh process state: another init, other RNG position; then load the checkpoint.
    fresh = _model(variant, p, seed=7)
    fresh_opt = _opt(fresh)
    torch.manual_seed(999)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    resumed = _train(fresh, fresh_opt, range(cut, total))

    for a, b in zip(losses[cut:], resumed):
        assert torch.equal(a, b), (a, b)
    state = fresh.state_dict()
    assert list(state) == list(final)
    for k, v in final.items():
        assert torch.equal(state[k], v), f"{k} differs after resuming"
    # The run actually trained (and with dropout, the dropout was live).
    assert any(not torch.equal(v, ckpt["model"][k]) for k, v in final.items() if "miss_block" in k)
