"""miss_ext.inject: PEFT's target matching (names, suffixes, regex, all-linear), freezing,
parameter counts, several adapters model-wide, and docs/MATH.md section 7 errors that name the rule
and leave the model unchanged."""

import copy

import pytest
import torch
from torch import nn

import miss_ext
from miss_ext.inject import adapters_disabled, find_targets, miss_layers, set_adapter, trainable_parameters

from peft import MissConfig, get_peft_model  # noqa: E402


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.v = nn.Linear(32, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 24)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        h = self.norm(x + self.v(torch.tanh(self.q(x))))
        return self.down(torch.relu(self.up(h)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj = nn.Linear(24, 32)
        self.head = nn.Linear(32, 10)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        for b in self.blocks:
            x = self.proj(b(x))
        return self.head(x)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [type(m) for m in model.modules()] == types


def peft_targets(model, target_modules):
    """The module names PEFT wraps for the same target_modules: the oracle of the matching."""
    pm = get_peft_model(copy.deepcopy(model), MissConfig(r=4, target_modules=target_modules))
    prefix = "base_model.model."
    return sorted(n[len(prefix):] for n, m in pm.named_modules() if type(m).__name__ == "MissLinear")


@pytest.mark.parametrize(
    "targets",
    [["q", "v"], ["blocks.0.up", "proj"], ["down"], r"blocks\.\d\.(q|up)", r".*\.v", "all-linear"],
)
def test_targets_match_peft(targets):
    model = Net()
    wanted = peft_targets(model, targets)
    if targets == "all-linear":
        # PEFT looks for the output head only on transformers models; we ask any module that
        # has get_output_embeddings().
        wanted.remove("head")
    assert sorted(find_targets(model, targets)) == wanted
    miss_ext.inject(model, targets, r=4)
    assert sorted(n for n, _ in miss_layers(model)) == wanted


def test_all_linear_skips_output_head_of_llama():
    import _models

    # No reseed: the weights come from the per-test seed, as they always have.
    model = _models.build(seed=None, **dict(_models.SMALL, num_hidden_layers=1, max_position_embeddings=2048))
    wanted = peft_targets(model, "all-linear")
    miss_ext.inject(model, "all-linear", r=8, init_weights="bat")
    names = sorted(n for n, _ in miss_layers(model))
    assert names == wanted and len(names) == 7 and "lm_head" not in names


def test_wraps_freezes_and_counts():
    model = Net()
    x = torch.randn(3, 32)
    y = model(x)
    out = miss_ext.inject(model, ["q", "up", "down"], r=8, init_weights="mini", mini_r=8)
    assert out is model
    assert torch.equal(model(x), y)  # zero-initialised blocks: the model is unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{m}.miss_block.default" for i in range(2) for m in ("q", "up", "down")}
    n_train, n_total = trainable_parameters(model)
    assert n_train == 6 * 8 * 8
    assert n_total == sum(p.numel() for p in Net().parameters()) + n_train


def test_print_trainable_parameters(capsys):
    model = miss_ext.inject(Net(), ["head"], r=4)
    miss_ext.print_trainable_parameters(model)
    n_train, n_total = trainable_parameters(model)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {n_train:,d} || all params: {n_total:,d} || trainable%: {100 * n_train / n_total:.4f}"
    )


def test_second_adapter_is_inactive_until_set():
    model = miss_ext.inject(Net(), ["q"], r=4, init_weights=False)
    miss_ext.inject(model, ["q", "v"], r=8, init_weights="bat", adapter_name="b")
    layers = dict(miss_layers(model))
    assert set(layers) == {"blocks.0.q", "blocks.1.q", "blocks.0.v", "blocks.1.v"}
    # As in PEFT, the added adapter is frozen and the first one stays active everywhere.
    assert all(layer.active_adapters == ["default"] for layer in layers.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".b"))
    set_adapter(model, ["default", "b"])
    assert all(p.requires_grad for n, p in model.named_parameters() if ".miss_block." in n)
    with pytest.raises(ValueError, match="not found"):
        set_adapter(model, "nope")
    x = torch.randn(2, 32)
    with torch.no_grad():
        y = model(x)
        for layer in layers.values():
            layer.miss_block["b"].normal_(0, 0.05)
        assert not torch.equal(model(x), y)
        with adapters_disabled(model):
            assert all(layer.disable_adapters for layer in layers.values())
            base = model(x)
        assert not torch.equal(model(x), base)
        for layer in layers.values():
            layer.set_adapter([])
        assert torch.equal(model(x), base)


def test_no_match_names_the_pattern():
    model = Net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"target_modules=\['k_proj'\] matched no module"):
        miss_ext.inject(model, ["k_proj"], r=4)
    with pytest.raises(ValueError, match=r"target_modules='blocks\.q' matched no module"):
        miss_ext.inject(model, "blocks.q", r=4)  # a regex must match the whole name
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        (dict(target_modules=["q", "down"], r=33), ValueError, "blocks.0.q: `r` \\(33\\) must be less than or equal to in_features"),
        (dict(target_modules=["q", "down"], r=16, init_weights="bat"), ValueError, "blocks.0.down: BAT .* divisible by r"),
        (dict(target_modules=["up", "down"], r=4, init_weights="mini", mini_r=16), ValueError, "blocks.0.down: mini .* divisible by mini_r"),
        (dict(target_modules=["q"], r=0), ValueError, "`r` must be a positive integer"),
        (dict(target_modules=["q"], r=4, init_weights="lora"), ValueError, "init_weights must be"),
        (dict(target_modules=["q"], r=4, miss_dropout=1.5), ValueError, "miss_dropout"),
        (dict(target_modules=["q", "norm"], r=4), TypeError, "'blocks.0.norm' \\(LayerNorm\\).* not an nn.Linear"),
    ],
)
def test_errors_leave_model_unchanged(kwargs, exc, needle):
    """Every target is validated before the first replacement: a failure on the last target
    leaves the earlier ones unwrapped."""
    model = Net()
    snap = snapshot(model)
    with pytest.raises(exc, match=needle):
        miss_ext.inject(model, **kwargs)
    assert_unchanged(model, snap)
    assert all(p.requires_grad for p in model.parameters())


def test_duplicate_adapter_leaves_model_unchanged():
    model = miss_ext.inject(Net(), ["q"], r=4)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already exists"):
        miss_ext.inject(model, ["v", "q"], r=4)
    assert_unchanged(model, snap)


def test_import_miss_ext_does_not_import_peft():
    import subprocess
    import sys

    code = "import sys, miss_ext; miss_ext.inject; assert 'peft' not in sys.modules; import miss_ext.peft; " \
           "assert 'peft' not in sys.modules; miss_ext.peft.patch(); assert 'peft' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
