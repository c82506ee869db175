"""export_lora: MiSS adapters written as PEFT LoRA adapters and loaded by plain PEFT
(PeftModel.from_pretrained, LoRA) on a tiny Llama: exact for standard (in % r != 0 too) and
mini, BAT through a truncated SVD whose reported error is the real one."""

import json

import pytest
import torch

import miss_ext
import miss_ext.peft as mp
from miss_ext.export import folding_matrix

from conftest import assert_close

peft = pytest.importorskip("peft")
from peft import MissConfig, PeftModel, get_peft_model  # noqa: E402

import _models as T  # noqa: E402

IDS = T.batch(n=3)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def lora_logits(path):
    return logits(PeftModel.from_pretrained(T.build(), path).eval())


def test_folding_matrix_is_the_block_sum():
    x = torch.randn(5, 30, dtype=torch.float64)
    a = folding_matrix(8, 30, torch.float64)  # 30 % 8 != 0: the padding has no row
    assert torch.equal(x @ a.t(), torch.ops.miss_ext.blocksum(x, 8))


@pytest.mark.parametrize("variant, kw", [
    ("standard", dict(r=4, init_weights=False)),
    ("standard_pad", dict(r=12, init_weights=False)),  # hidden 32 % 12 != 0
    ("mini", dict(r=4, mini_r=8, init_weights="mini")),
])
def test_exact_variants_load_in_plain_peft(variant, kw, tmp_path):
    targets = ["q_proj", "o_proj"] if variant == "standard_pad" else T.TARGETS
    model = miss_ext.inject(T.build(), targets, adapter_name="chat", **kw)
    T.randomize_blocks(model, scale=0.2)
    model.eval()
    report = miss_ext.export_lora(model, str(tmp_path), adapter_name="chat")
    assert report["max_rel_error"] == 0.0 and report["r"] == kw["r"]
    assert all(m["exact"] for m in report["modules"].values())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] == kw["r"] and cfg["rank_pattern"] == {}
    assert_close(lora_logits(str(tmp_path)), logits(model))


def test_bat_svd_rank_energy_and_reported_error(tmp_path):
    model = miss_ext.inject(T.build(), T.TARGETS, r=4, init_weights="bat")
    T.randomize_blocks(model, scale=0.2)
    model.eval()
    with pytest.raises(ValueError, match="rank=... and/or energy"):
        miss_ext.export_lora(model, str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()  # nothing written on a refusal
    # Full rank: the SVD is exact up to float rounding.
    full = miss_ext.export_lora(model, str(tmp_path / "full"), rank=10**6)
    assert full["max_rel_error"] < 1e-5
    assert_close(lora_logits(str(tmp_path / "full")), logits(model))
    # Truncated: the reported error is ||dW - B A|| / ||dW|| of what was written.
    trunc = miss_ext.export_lora(model, str(tmp_path / "trunc"), energy=0.9, rank=6)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "trunc" / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "trunc" / "adapter_config.json").read_text())
    for name, info in trunc["modules"].items():
        layer = model.get_submodule(name)
        dw = layer.get_delta_weight("default").double()
        a = saved[f"base_model.model.{name}.lora_A.weight"].double()
        b = saved[f"base_model.model.{name}.lora_B.weight"].double()
        assert a.shape[0] == info["rank"] <= 6
        assert info["energy"] >= 0.9 - 1e-6 or info["rank"] == 6
        err = ((dw - b @ a).norm() / dw.norm()).item()
        assert err == pytest.approx(info["rel_error"], rel=1e-3, abs=1e-6)
        if info["rank"] != cfg["r"]:
            assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    # PEFT loads the per-module ranks (rank_pattern) and computes B A exactly as written.
    lora = PeftModel.from_pretrained(T.build(), str(tmp_path / "trunc")).eval()
    for name, info in trunc["modules"].items():
        assert lora.get_submodule(f"base_model.model.{name}").lora_A["default"].weight.shape[0] == info["rank"]
    assert 0.0 < trunc["max_rel_error"] < 1.0


def test_patched_peft_model_exports(tmp_path):
    torch.manual_seed(0)
    pm = get_peft_model(T.build(), MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=T.TARGETS))
    T.randomize_blocks(pm, scale=0.2)
    pm.eval()
    with mp.patched():
        want = logits(pm)
        report = miss_ext.export_lora(pm, str(tmp_path))
    assert report["max_rel_error"] == 0.0
    assert_close(lora_logits(str(tmp_path)), want)


def test_export_errors(tmp_path):
    model = miss_ext.inject(T.build(), T.TARGETS, r=4, init_weights="bat")
    with pytest.raises(ValueError, match="not found"):
        miss_ext.export_lora(model, str(tmp_path), adapter_name="nope")
    with pytest.raises(ValueError, match="energy must be"):
        miss_ext.export_lora(model, str(tmp_path), energy=1.5)
    with pytest.raises(ValueError, match="rank must be"):
        miss_ext.export_lora(model, str(tmp_path), rank=0)
    miss_ext.merge_adapters(model)
    with pytest.raises(ValueError, match="unmerge first"):
        miss_ext.export_lora(model, str(tmp_path), rank=4)
