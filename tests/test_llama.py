"""A tiny Llama (built from a config, no downloads) fine-tuned with each MiSS variant: the
loss goes down, and miss_ext.inject and the patched PEFT model follow PEFT's own loss curve."""

import copy

import pytest
import torch

import miss_ext
import miss_ext.peft as mp

from peft import MissConfig, get_peft_model  # noqa: E402

transformers = pytest.importorskip("transformers")

import _models  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = {"standard": 1e-2, "mini": 1e-2, "bat": 3e-3}
STEPS = 6


@pytest.fixture(scope="module")
def base_model():
    return _models.build(seed=0, **_models.SMALL).eval()


def train(model, steps=STEPS, lr=1e-2):
    losses = _models.adam_losses(model, _models.token_batch(4, 16), steps, lr)  # SMALL's vocabulary: 128
    return losses, sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_training_matches_peft(base_model, variant):
    kw = dict(r=8, mini_r=8, init_weights=_models.INIT[variant])
    lr = LR[variant]
    peft_model = get_peft_model(copy.deepcopy(base_model), MissConfig(target_modules=TARGETS, **kw))
    want, n_peft = train(peft_model, lr=lr)

    ours = miss_ext.inject(copy.deepcopy(base_model), TARGETS, **kw)
    got, n_ours = train(ours, lr=lr)

    patched_model = get_peft_model(copy.deepcopy(base_model), MissConfig(target_modules=TARGETS, **kw))
    with mp.patched():
        patched, _ = train(patched_model, lr=lr)

    print(f"\n{variant}: peft {['%.5f' % v for v in want]}\n{'':{len(variant)}}  ours {['%.5f' % v for v in got]}")
    assert n_ours == n_peft  # same trainable parameters
    assert got[-1] < got[0] - 0.05, got  # it learns
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_dropout_trains(base_model):
    """With dropout the masks differ from PEFT's (counter-based), but training still works."""
    model = miss_ext.inject(copy.deepcopy(base_model), TARGETS, r=8, miss_dropout=0.1).train()
    losses, _ = train(model)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_bf16_model_with_fp32_adapters_tracks_peft(base_model, variant):
    """PEFT's MetaMathQA setting in small: a bf16 model, get_peft_model's fp32 blocks, no
    autocast, q/v. Both BAT modes ("base": bf16 GEMMs on W' rounded once; "promote": PEFT's fp32
    promotion) follow PEFT's loss curve; standard and mini give PEFT's numbers."""
    model = copy.deepcopy(base_model).to(torch.bfloat16)
    kw = dict(r=8, mini_r=8, init_weights=_models.INIT[variant])
    lr = LR[variant]
    targets = ["q_proj", "v_proj"]
    peft_model = get_peft_model(copy.deepcopy(model), MissConfig(target_modules=targets, **kw))
    assert {p.dtype for n, p in peft_model.named_parameters() if "miss_block" in n} == {torch.float32}
    want, _ = train(peft_model, lr=lr)
    runs = {}
    for precision in ("base", "promote") if variant == "bat" else ("base",):
        runs[f"inject/{precision}"] = train(miss_ext.inject(copy.deepcopy(model), targets, bat_precision=precision, **kw), lr=lr)[0]
        patched_model = get_peft_model(copy.deepcopy(model), MissConfig(target_modules=targets, **kw))
        with mp.patched(bat_precision=precision):
            runs[f"patched/{precision}"] = train(patched_model, lr=lr)[0]
    print(f"\n{variant}: peft {['%.4f' % v for v in want]}")
    for name, got in runs.items():
        print(f"{name:>16}: {['%.4f' % v for v in got]}")
        assert got[-1] < got[0] - 0.05, (name, got)
        # PEFT-exact paths within bf16 noise of the loss; BAT "base" within what bf16 GEMMs on a
        # bf16-rounded W' (instead of fp32 GEMMs) move a loss over six Adam steps.
        tol = 2e-3 if name.endswith("/base") and variant == "bat" else 1e-3
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=tol, msg=name)
