"""The whole-model API for inject users: merge_and_unload, unload, save/load in PEFT's file format
(both directions against plain PEFT on a tiny Llama, logits compared), model-level adapter
switching, and PEFT-format keys that must not load silently."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import miss_ext
from miss_ext.inject import miss_layers

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import MissConfig, PeftModel, get_peft_model  # noqa: E402

import _models  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
from _models import INIT  # noqa: E402
API = ["inject", "set_adapter", "adapters_disabled", "merge_adapters", "unmerge_adapters",
       "merge_and_unload", "unload", "save_adapter", "load_adapter"]


@pytest.fixture(scope="module")
def llama():
    return _models.build(seed=0, vocab_size=96).eval()


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def miss_count(model):
    return len(miss_layers(model))


def test_api_is_exported_and_peft_is_listed_but_not_imported():
    for name in API:
        assert callable(getattr(miss_ext, name)) and name in miss_ext.__all__, name
    code = ("import sys, miss_ext; assert 'peft' in dir(miss_ext); "
            "assert 'peft' not in sys.modules and 'transformers' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_save_load_both_ways_with_plain_peft(llama, variant, tmp_path):
    kw = dict(r=8, mini_r=8, init_weights=INIT[variant])
    # ours -> plain (unpatched) PEFT
    ours = miss_ext.inject(copy.deepcopy(llama), TARGETS, **kw)
    randomize(ours)
    want = logits(ours)
    miss_ext.save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MISS" and cfg["r"] == 8 and cfg["init_weights"] == INIT[variant]
    loaded = PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "ours")
    assert_close(logits(loaded), want)
    # PEFT -> ours
    theirs = get_peft_model(copy.deepcopy(llama), MissConfig(target_modules=TARGETS, **kw))
    randomize(theirs, seed=2)
    want = logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    plain = miss_ext.load_adapter(copy.deepcopy(llama), tmp_path / "peft")
    assert miss_count(plain) == 2 * len(TARGETS)
    assert_close(logits(plain), want)
    # ... and back out: our save of what we loaded is what PEFT saved.
    miss_ext.save_adapter(plain, tmp_path / "again")
    assert_close(logits(PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path / "again")), want)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_merge_and_unload_and_unload(llama, variant):
    base = logits(llama)
    model = miss_ext.inject(copy.deepcopy(llama), TARGETS, r=8, mini_r=8, init_weights=INIT[variant])
    randomize(model)
    want = logits(model)
    assert not torch.allclose(want, base)
    merged = miss_ext.merge_and_unload(model)
    assert type(merged) is type(llama) and miss_count(merged) == 0
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert_close(logits(merged), want, rtol=1e-4, atol=1e-5)

    model = miss_ext.inject(copy.deepcopy(llama), TARGETS, r=8, mini_r=8, init_weights=INIT[variant])
    randomize(model)
    miss_ext.merge_adapters(model)  # unload takes merged adapters out first
    plain = miss_ext.unload(model)
    assert miss_count(plain) == 0
    assert_close(logits(plain), base, rtol=1e-4, atol=1e-5)


def test_model_level_adapter_switching(llama, tmp_path):
    model = miss_ext.inject(copy.deepcopy(llama), TARGETS, r=8)
    miss_ext.inject(model, TARGETS, r=8, init_weights="bat", adapter_name="style")
    randomize(model)
    base, with_default = logits(llama), logits(model)
    miss_ext.set_adapter(model, "style")
    with_style = logits(model)
    assert not torch.allclose(with_style, with_default)
    with miss_ext.adapters_disabled(model):
        assert_close(logits(model), base)
    assert_close(logits(model), with_style)
    with pytest.raises(ValueError, match="'nope'"):
        miss_ext.set_adapter(model, "nope")
    # Save one adapter, load it into an injected model under another name: it comes in inactive.
    miss_ext.save_adapter(model, tmp_path, adapter_name="style")
    other = miss_ext.inject(copy.deepcopy(llama), TARGETS, r=8)
    miss_ext.load_adapter(other, tmp_path, adapter_name="loaded", is_trainable=False)
    assert_close(logits(other), base)  # "default" is zeros and still the active one
    miss_ext.set_adapter(other, "loaded", inference_mode=True)
    assert_close(logits(other), with_style)
    # merge_and_unload of a named adapter
    merged = miss_ext.merge_and_unload(model, adapter_names=["style"])
    assert_close(logits(merged), with_style, rtol=1e-4, atol=1e-5)


def test_peft_file_keys_do_not_load_silently(llama, tmp_path):
    """load_state_dict(strict=False) of a PEFT adapter file into an injected model would load
    nothing (its keys have no adapter name): it raises, pointing to load_adapter."""
    theirs = get_peft_model(copy.deepcopy(llama), MissConfig(target_modules=TARGETS, r=8))
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "adapter_model.safetensors")
    ours = miss_ext.inject(copy.deepcopy(llama), TARGETS, r=8)
    before = logits(ours)
    with pytest.raises(RuntimeError, match=r"PEFT's saved-adapter format.*miss_ext\.load_adapter"):
        ours.load_state_dict(sd, strict=False)
    assert_close(logits(ours), before, rtol=0, atol=0)
    # The mapped keys load, key for key.
    mapped = miss_ext.peft.to_miss_ext_state_dict(sd)
    assert not ours.load_state_dict(mapped, strict=False).unexpected_keys
    assert_close(logits(ours), logits(theirs))


def test_load_adapter_is_strict_and_leaves_the_model_untouched(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    src = miss_ext.inject(copy.deepcopy(llama), TARGETS, r=8)
    miss_ext.save_adapter(src, tmp_path / "good")
    good = load_file(tmp_path / "good" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.miss_block"

    def variant_dir(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
        save_file(tensors, d / "adapter_model.safetensors")
        return d

    cases = {
        "missing": ({k: v for k, v in good.items() if k != key}, "target modules without a saved block"),
        "extra": ({**good, "base_model.model.lm_head.miss_block": good[key].clone()}, "saved blocks without a target module"),
        "shape": ({**good, key: torch.zeros(8, 16)}, r"has shape \(8, 16\)"),
        "named": ({**good, key + ".default": good[key].clone()}, "not MiSS blocks in PEFT's format"),
    }
    for name, (tensors, match) in cases.items():
        model = copy.deepcopy(llama)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            miss_ext.load_adapter(model, variant_dir(name, tensors))
        assert miss_count(model) == 0, name
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
    model = miss_ext.load_adapter(copy.deepcopy(llama), tmp_path / "good")
    with pytest.raises(ValueError, match="already exists"):
        miss_ext.load_adapter(model, tmp_path / "good")


class Nested(nn.Module):
    """fc1 at the top and enc.fc1 below: a list target 'fc1' would select both."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.enc = nn.Sequential()
        self.enc.add_module("fc1", nn.Linear(16, 16))

    def forward(self, x):
        return self.enc(self.fc1(x))


def test_saved_targets_are_exact(tmp_path):
    torch.manual_seed(0)
    base = Nested()
    model = miss_ext.inject(copy.deepcopy(base), r"fc1", r=4)  # the top-level fc1 only
    randomize(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
    miss_ext.save_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(loaded.base_model.model.enc.fc1) is nn.Linear
    with torch.no_grad():
        assert_close(loaded(x), want)
    again = miss_ext.load_adapter(copy.deepcopy(base), tmp_path)
    assert isinstance(again.fc1, miss_ext.MissLinear) and type(again.enc.fc1) is nn.Linear


def test_save_adapter_refuses_what_peft_cannot_express(tmp_path):
    model = miss_ext.inject(Nested(), r"fc1", r=4)
    miss_ext.inject(model, r"enc\.fc1", r=8)
    with pytest.raises(ValueError, match="different settings on different layers"):
        miss_ext.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="'nope' not found"):
        miss_ext.save_adapter(model, tmp_path, adapter_name="nope")
    with pytest.raises(ValueError, match="no MissLinear"):
        miss_ext.merge_and_unload(Nested())


def test_safe_merge_failure_leaves_the_failing_layer_as_it_was():
    torch.manual_seed(0)
    model = miss_ext.inject(Nested(), ["fc1"], r=4)
    x = torch.randn(3, 16)
    with torch.no_grad():
        model.enc.fc1.miss_block["default"][0, 0] = float("nan")
        model.fc1.miss_block["default"].normal_()
        weight = model.enc.fc1.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN"):
        miss_ext.merge_and_unload(model, safe_merge=True)
    assert torch.equal(model.enc.fc1.base_layer.weight, weight)
    assert isinstance(model.enc.fc1, miss_ext.MissLinear)
