"""Quantized bases on CPU: a tiny Llama loaded by transformers with bitsandbytes 4-bit (nf4) and
8-bit (LLM.int8) linear layers, and with torchao int8 weight-only, fine-tuned with MiSS.

* Standard and mini adapters train on every base, with ``miss_ext.inject`` (the base is called
  as a black box) and with ``get_peft_model`` under ``miss_ext.peft.patch()``; both follow plain
  PEFT's losses, and the quantized weights stay bit-for-bit as loaded.
* BAT needs the dense weight. Under the patch it works as in PEFT: PEFT's quantization backend
  dequantizes it. ``inject`` refuses it with an error that names the way out, before touching
  the model. Merging an injected adapter into a quantized base fails the same way; under the
  patch it merges through PEFT's backend (dequantize, merge, requantize) as plain PEFT does.

A package that is missing, or that cannot run on this CPU, skips its cases with the exact error
(a skip, never a pass).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import miss_ext  # noqa: E402
import miss_ext.peft as mp  # noqa: E402
from miss_ext.inject import adapters_disabled, miss_layers  # noqa: E402
from peft import MissConfig, get_peft_model  # noqa: E402

from _models import adam_losses, PROJECTIONS as TARGETS, VARIANT_NAMES as VARIANTS, load, miss_kwargs, randomize_all_blocks as randomize_blocks, save_tiny_llama, token_batch  # noqa: E402

QUANTS = ["bnb-4bit", "bnb-8bit", "torchao-int8wo"]
STEPS = 3


@functools.lru_cache(maxsize=None)
def _unusable(package: str):
    """Why ``package`` cannot quantize a linear layer and run it forward and backward on this
    CPU, or None when it can."""
    try:
        if package == "bitsandbytes":
            import bitsandbytes as bnb

            layers = [bnb.nn.Linear4bit(16, 8, compute_dtype=torch.float32), bnb.nn.Linear8bitLt(16, 8, has_fp16_weights=False)]
            layers = [layer.to("cpu") for layer in layers]
        else:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            layers = [torch.nn.Linear(16, 8)]
            quantize_(layers[0], Int8WeightOnlyConfig())
        x = torch.randn(2, 16, requires_grad=True)
        sum(layer(x).sum() for layer in layers).backward()
    except Exception as e:  # noqa: BLE001 - any failure means "cannot run here", reported verbatim
        return f"{package} cannot run on this machine: {type(e).__name__}: {e}"
    return None


def quantization_config(quant: str):
    package = "bitsandbytes" if quant.startswith("bnb") else "torchao"
    pytest.importorskip(package, reason=f"{package} is not installed")
    reason = _unusable(package)
    if reason:
        pytest.skip(reason)
    if quant == "bnb-4bit":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    if quant == "bnb-8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), layers=1)


def load_quantized(llama_dir, quant):
    model = load(llama_dir, quantization_config=quantization_config(quant))
    proj = model.model.layers[0].self_attn.q_proj
    assert type(proj.weight) not in (torch.Tensor, torch.nn.Parameter), "the base was not quantized"
    # bitsandbytes' CPU backend repacks a 4-bit layer (its weight, and absmax cast to bf16) lazily
    # on its first forward, and what a model computes depends on whether that has happened (the
    # same 3 training steps from a fresh load or after one no-grad forward: losses 4e-3 apart).
    # One forward here starts every run from the repacked base.
    with torch.no_grad():
        model(input_ids=token_batch(1, 4))
    return model


def frozen_state(model):
    """The quantized base as stored (every non-adapter parameter, packed data as is; torchao
    weights dequantized) and the logits of the base alone, to check that training and failed
    calls leave it alone.

    Not through ``state_dict()``: with bitsandbytes 0.50.2's CPU backend, ``state_dict()`` on a
    4-bit layer of a transformers-loaded model whose in_features span several quantization
    blocks (down_proj here), after its first forward, permutes ``weight.quant_state.absmax`` in
    place on every call, and the layer's output changes (by 0.16 after one call): a
    bitsandbytes bug, with or without adapters."""
    disabled = model.disable_adapter() if hasattr(model, "disable_adapter") else adapters_disabled(model)
    with torch.no_grad(), disabled:
        logits = model(input_ids=token_batch(2, 16)).logits
    params = {}
    for name, p in model.named_parameters():
        if ".miss_block" not in name:
            plain = type(p) in (torch.Tensor, torch.nn.Parameter) or not hasattr(p, "dequantize")
            params[name] = (p if plain else p.dequantize()).detach().clone()
    return params, logits


def assert_same_base(before, after):
    (pb, lb), (pa, la) = before, after
    assert pb.keys() == pa.keys()
    for name in pb:
        assert torch.equal(pb[name], pa[name]), f"{name} changed"
    assert torch.equal(lb, la), "the base alone computes something else"


def train(model):
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    return adam_losses(model, token_batch(2, 16), STEPS)


def peft_model(llama_dir, quant, variant):
    model = get_peft_model(load_quantized(llama_dir, quant), MissConfig(target_modules=TARGETS, **miss_kwargs(variant)))
    randomize_blocks(model)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("quant", QUANTS)
def test_train_on_quantized_base(llama_dir, quant, variant):
    assert not mp.is_patched()
    want = train(peft_model(llama_dir, quant, variant))

    with mp.patched():
        model = peft_model(llama_dir, quant, variant)
        assert model.base_model.model.model.layers[0].self_attn.q_proj.quantization_backend is not None
        before = frozen_state(model)
        patched = train(model)
        assert_same_base(before, frozen_state(model))
    torch.testing.assert_close(torch.tensor(patched), torch.tensor(want), rtol=1e-4, atol=1e-4)

    base = load_quantized(llama_dir, quant)
    if variant == "bat":
        with torch.no_grad():
            logits = base(input_ids=token_batch(2, 16)).logits
        with pytest.raises(TypeError) as info:
            miss_ext.inject(base, TARGETS, **miss_kwargs(variant))
        for needle in ("BAT", "real 2-D `weight`", "quantized base", "standard or mini", "miss_ext.peft.patch()"):
            assert needle in str(info.value), str(info.value)
        assert not miss_layers(base), "inject changed the model before failing"
        assert all(p.requires_grad for n, p in base.named_parameters() if "norm" in n), "inject froze parameters before failing"
        with torch.no_grad():
            assert torch.equal(base(input_ids=token_batch(2, 16)).logits, logits)
        return
    model = miss_ext.inject(base, TARGETS, **miss_kwargs(variant))
    randomize_blocks(model)
    blocks = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = frozen_state(model)
    injected = train(model)
    assert_same_base(before, frozen_state(model))
    assert all(not torch.equal(blocks[n], p) for n, p in model.named_parameters() if n in blocks)
    assert injected[-1] < injected[0] - 0.05, injected
    torch.testing.assert_close(torch.tensor(injected), torch.tensor(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant", QUANTS)
def test_merge_on_quantized_base(llama_dir, quant):
    """inject: merging needs the dense weight, so it fails clearly and changes nothing. The
    patch: merges through PEFT's quantization backend, as plain PEFT does."""
    model = miss_ext.inject(load_quantized(llama_dir, quant), TARGETS, **miss_kwargs("standard"))
    randomize_blocks(model)
    layer = miss_layers(model)[0][1]
    before = frozen_state(model)
    with pytest.raises(TypeError, match="real 2-D `weight`.*quantized base"):
        layer.merge()
    assert layer.merged_adapters == []
    assert_same_base(before, frozen_state(model))

    ids = token_batch(2, 16)
    outs = {}
    for patched in (False, True):
        model = peft_model(llama_dir, quant, "standard")
        with mp.patched() if patched else contextlib.nullcontext(), torch.no_grad():
            model.merge_adapter()
            assert model.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]
            outs[patched] = model(input_ids=ids).logits
    # Requantizing the merged weight loses precision, the same way on both paths.
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)
