"""Big-model flows (issue #13): models built on the meta device, then materialised.

* Every variant can be injected, and PEFT-wrapped under the patch, on a tiny Llama built under
  ``torch.device("meta")``: blocks are meta too, fp32 on a bf16 base (as get_peft_model ends);
  forward and backward on meta tensors give the right shapes and dtypes.
* Merging a meta model is refused with a clear error and changes nothing.
* ``to_empty`` + base weights from the plain model's state dict + adapters from their
  documented init (``miss_ext.reset_adapter_parameters``) or from a PEFT checkpoint gives the
  model built directly on the CPU, bit for bit: parameters, outputs and gradients.
* accelerate's ``init_empty_weights`` + ``load_checkpoint_and_dispatch``, and transformers'
  ``from_pretrained(low_cpu_mem_usage=True)`` then inject or patched PEFT.

The FSDP2 flow (meta build, inject, fully_shard, to_empty, load, train on 2 processes) is in
tests/test_distributed.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import miss_ext
import miss_ext.peft as mp

import _models as tl

from peft import MissConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

VARIANTS = list(tl.VARIANTS)


def inject(model, variant):
    return miss_ext.inject(model, tl.TARGETS, r=tl.R, **tl.VARIANTS[variant])


def peft_wrap(model, variant):
    return get_peft_model(model, MissConfig(target_modules=tl.TARGETS, r=tl.R, **tl.VARIANTS[variant]))


def blocks(model):
    return {n: p for n, p in model.named_parameters() if "miss_block" in n}


def assert_same_model(got, want):
    """Same parameter/buffer names, dtypes, devices and bits; same requires_grad."""
    g, w = got.state_dict(keep_vars=True), want.state_dict(keep_vars=True)
    assert list(g) == list(w)
    for k in w:
        assert g[k].dtype == w[k].dtype and g[k].device == w[k].device, k
        assert torch.equal(g[k], w[k]), k
        assert g[k].requires_grad == w[k].requires_grad, k
    for (k, a), (_, b) in zip(got.named_buffers(), want.named_buffers()):
        assert torch.equal(a, b), k


def assert_same_run(got, want):
    """One forward and backward: bit-identical loss, logits and block gradients (``got`` and
    ``want`` may be a miss_ext and a PEFT model of the same base)."""
    ids = tl.batch()
    outs = []
    for model in (got, want):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        outs.append((out.logits, out.loss, [p.grad for p in blocks(model).values()]))
    (lg, loss_g, grad_g), (lw, loss_w, grad_w) = outs
    assert torch.equal(lg, lw) and torch.equal(loss_g, loss_w)
    assert len(grad_g) == len(grad_w) > 0  # in module order (PEFT and miss_ext names differ)
    for i, (a, b) in enumerate(zip(grad_g, grad_w)):
        assert b is not None and torch.equal(a, b), i


def materialise(model, base_state, peft_model=None):
    """to_empty on the CPU, then the base weights from the plain model's state dict (keys
    mapped into the wrappers) and the non-persistent rotary buffers."""
    outer = peft_model if peft_model is not None else model
    outer.to_empty(device="cpu")
    result = model.load_state_dict(miss_ext.to_injected_state_dict(model, base_state), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert all("miss_block" in k for k in result.missing_keys), result.missing_keys
    tl.reinit_rope(model)
    return outer


# ---------------------------------------------------------------- on the meta device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("how", ["inject", "peft"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_forward_backward_shapes_and_dtypes(variant, how, dtype):
    model = tl.build("meta", dtype)
    if how == "inject":
        inject(model, variant)
        layer_type = miss_ext.MissLinear
    else:
        model = peft_wrap(model, variant)
        import peft.tuners.miss.layer as peft_layer

        layer_type = peft_layer.MissLinear
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    assert len(layers) == len(tl.TARGETS) * 2
    ref_blocks = blocks(inject(tl.build("cpu", dtype), variant))  # the normal build's blocks
    got_blocks = blocks(model)
    assert len(got_blocks) == len(ref_blocks)
    for (name, b), want in zip(got_blocks.items(), ref_blocks.values()):
        assert b.is_meta and b.requires_grad, name
        assert b.shape == want.shape and b.dtype == want.dtype == torch.float32, name

    ids = tl.batch().to("meta")
    with mp.patched():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    assert out.logits.is_meta and out.logits.shape == (*ids.shape, tl.VOCAB)
    assert out.logits.dtype == dtype
    for name, b in got_blocks.items():
        assert b.grad is not None and b.grad.is_meta, name
        assert b.grad.shape == b.shape and b.grad.dtype == b.dtype, name
    base = [p for n, p in model.named_parameters() if "miss_block" not in n]
    assert base and all(p.is_meta and p.dtype == dtype and p.grad is None for p in base)


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_layer_matches_real_layer_shapes(variant):
    """MissLinear alone, bf16 base with bias, 3-D input: the meta layer's output and gradients
    have the shapes and dtypes of the same layer on the CPU."""
    results = []
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        base = nn.Linear(16, 24, dtype=torch.bfloat16, device=device)
        layer = miss_ext.MissLinear(base, r=4, **tl.VARIANTS[variant], miss_dropout=0.1 if variant != "bat" else 0.0)
        x = torch.randn(2, 3, 16, dtype=torch.bfloat16, device=device, requires_grad=True)
        y = layer(x)
        y.float().sum().backward()
        blk = layer.miss_block["default"]
        results.append([(t.shape, t.dtype, t.device.type) for t in (y, x.grad, blk, blk.grad)])
    meta, cpu = results
    assert [m[:2] for m in meta] == [c[:2] for c in cpu]
    assert {m[2] for m in meta} == {"meta"}


@pytest.mark.parametrize("how", ["inject", "peft"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_on_meta_is_refused(variant, how):
    model = tl.build("meta")
    model = inject(model, variant) if how == "inject" else peft_wrap(model, variant)
    layer = model.get_submodule(
        ("" if how == "inject" else "base_model.model.") + "model.layers.0.self_attn.q_proj"
    )
    before = {k: (v.shape, v.dtype, v.device) for k, v in layer.state_dict().items()}
    with mp.patched():
        with pytest.raises(RuntimeError, match="cannot merge or unmerge MiSS adapters on the meta device.*to_empty"):
            layer.merge()
        if how == "inject":
            with pytest.raises(RuntimeError, match="meta device"):
                miss_ext.MissLinear(nn.Linear(8, 8, device="meta"), r=4).merge(safe_merge=True)
        # The dense delta is a pure function of the blocks: shape-only on meta.
        delta = layer.get_delta_weight("default") if how == "inject" else None
    assert layer.merged_adapters == []
    assert {k: (v.shape, v.dtype, v.device) for k, v in layer.state_dict().items()} == before
    if delta is not None:
        assert delta.is_meta and delta.shape == layer.base_layer.weight.shape


# ---------------------------------------------------------------- materialised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_inject_to_empty_reset_equals_cpu_build(variant, dtype):
    """meta build -> inject -> to_empty -> base state dict + documented init == CPU build."""
    want = inject(tl.build("cpu", dtype), variant)
    base_state = tl.build("cpu", dtype).state_dict()  # the plain model's checkpoint

    model = inject(tl.build("meta", dtype), variant)
    materialise(model, base_state)
    with torch.no_grad():  # to_empty leaves garbage: make it visible if reset missed a block
        for b in blocks(model).values():
            b.fill_(float("nan"))
    assert miss_ext.reset_adapter_parameters(model) is model
    assert_same_model(model, want)
    assert_same_run(model, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_peft_to_empty_reset_equals_cpu_build(variant):
    want = peft_wrap(tl.build("cpu"), variant)
    base_state = tl.build("cpu").state_dict()

    model = peft_wrap(tl.build("meta"), variant)
    materialise(model.get_base_model(), base_state, peft_model=model)
    with torch.no_grad():
        for b in blocks(model).values():
            b.fill_(float("nan"))
    miss_ext.reset_adapter_parameters(model)
    assert_same_model(model, want)
    with mp.patched():
        assert_same_run(model, want)


@pytest.mark.parametrize("variant", VARIANTS)
def test_adapters_from_peft_checkpoint_equal_cpu_build(variant, tmp_path):
    """A PEFT checkpoint with trained (non-zero) blocks, loaded three ways into meta-built
    models: load_peft_adapter after to_empty, load_peft_adapter into an adapter injected on meta
    and materialised, and PEFT's own set_peft_model_state_dict under the patch."""
    source = peft_wrap(tl.build("cpu"), variant)
    tl.randomize_blocks(source)
    source.save_pretrained(tmp_path)
    base_state = tl.build("cpu").state_dict()
    want = mp.load_peft_adapter(tl.build("cpu"), str(tmp_path))  # the in-memory build

    plain = tl.build("meta")
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        mp.load_peft_adapter(plain, str(tmp_path))
    assert not any(isinstance(m, miss_ext.MissLinear) for m in plain.modules())  # untouched
    materialise(plain, base_state)
    mp.load_peft_adapter(plain, str(tmp_path))
    assert_same_model(plain, want)
    assert_same_run(plain, want)

    injected = inject(tl.build("meta"), variant)
    materialise(injected, base_state)
    assert mp.load_peft_adapter(injected, str(tmp_path)) is injected
    assert_same_model(injected, want)

    wrapped = peft_wrap(tl.build("meta"), variant)
    materialise(wrapped.get_base_model(), base_state, peft_model=wrapped)
    from safetensors.torch import load_file

    set_peft_model_state_dict(wrapped, load_file(tmp_path / "adapter_model.safetensors"))
    for got, ref in zip(blocks(wrapped).values(), blocks(source).values()):
        assert torch.equal(got, ref)
    with mp.patched():
        assert_same_run(wrapped, want)


def test_load_peft_adapter_into_existing_adapter_checks_shapes(tmp_path):
    source = peft_wrap(tl.build("cpu"), "standard")
    source.save_pretrained(tmp_path)
    model = miss_ext.inject(tl.build("cpu"), tl.TARGETS, r=2 * tl.R)  # same targets, other r
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="exists with other shapes"):
        mp.load_peft_adapter(model, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- reset: rules


def test_reset_adapter_parameters_rules():
    model = inject(tl.build("cpu"), "standard")
    miss_ext.inject(model, ["q_proj"], r=tl.R, init_weights=False, adapter_name="rand")
    tl.randomize_blocks(model)
    layer = model.model.layers[0].self_attn.q_proj
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ValueError, match=r"\['nope'\] not found"):
        miss_ext.reset_adapter_parameters(model, ["nope"])
    layer.merge(adapter_names=["default"])
    snapshot["model.layers.0.self_attn.q_proj.base_layer.weight"] = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"q_proj: adapter\(s\) \['default'\] are merged"):
        miss_ext.reset_adapter_parameters(model)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())  # nothing reset
    layer.unmerge()

    ids = [id(p) for p in model.parameters()]
    miss_ext.reset_adapter_parameters(model, "rand")  # only that adapter, PEFT's random init
    rand = layer.miss_block["rand"]
    assert not torch.equal(rand, snapshot["model.layers.0.self_attn.q_proj.miss_block.rand"])
    assert rand.abs().sum() > 0 and rand.requires_grad is False  # inactive adapter stays frozen
    assert not torch.equal(layer.miss_block["default"], torch.zeros_like(layer.miss_block["default"]))
    miss_ext.reset_adapter_parameters(model)
    assert all(b.abs().sum() == 0 for n, b in blocks(model).items() if n.endswith("default"))
    assert [id(p) for p in model.parameters()] == ids  # in place: FSDP2 and optimizers keep them


def test_to_injected_state_dict_maps_only_wrapped_layers():
    model = inject(tl.build("cpu"), "standard")
    plain = tl.build("cpu").state_dict()
    mapped = miss_ext.to_injected_state_dict(model, plain)
    assert set(mapped) == set(model.state_dict()) - set(blocks(model))
    assert mapped["model.layers.1.mlp.down_proj.base_layer.weight"] is plain["model.layers.1.mlp.down_proj.weight"]
    assert "model.layers.1.mlp.up_proj.weight" in mapped  # not a target
    again = miss_ext.to_injected_state_dict(model, mapped)  # already mapped: unchanged
    assert list(again) == list(mapped) and all(again[k] is mapped[k] for k in mapped)


# ---------------------------------------------------------------- accelerate, transformers


@pytest.mark.parametrize("variant", VARIANTS)
def test_accelerate_init_empty_weights(variant, tmp_path):
    """init_empty_weights -> inject -> load_checkpoint_and_dispatch of the injected model's
    checkpoint (base + trained blocks) == the in-memory model."""
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import save_file

    want = inject(tl.build("cpu"), variant)
    tl.randomize_blocks(want)
    save_file({k: v.contiguous() for k, v in want.state_dict().items()}, tmp_path / "model.safetensors")

    with accelerate.init_empty_weights():
        model = transformers_model()
    inject(model, variant)
    assert all(b.is_meta for b in blocks(model).values())
    model = accelerate.load_checkpoint_and_dispatch(model, str(tmp_path / "model.safetensors"), device_map={"": "cpu"})
    assert_same_model(model, want)
    assert_same_run(model, want)


def transformers_model():
    import transformers

    return transformers.LlamaForCausalLM(tl.config())


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_pretrained_low_cpu_mem_usage(variant, tmp_path):
    tl.build("cpu").save_pretrained(tmp_path)
    import transformers

    def load():
        return transformers.LlamaForCausalLM.from_pretrained(tmp_path, low_cpu_mem_usage=True)

    want = inject(tl.build("cpu"), variant)
    model = inject(load(), variant)
    assert_same_model(model, want)
    assert_same_run(model, want)

    want = peft_wrap(tl.build("cpu"), variant)
    model = peft_wrap(load(), variant)
    assert_same_model(model, want)
    with mp.patched():
        assert_same_run(model, want)
