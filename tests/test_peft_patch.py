"""miss_ext.peft: PEFT's own MiSS models on miss_ext kernels. The unpatched PEFT model is the
oracle: outputs, gradients, several adapters, disable_adapter(), merge_and_unload, dropout,
save_pretrained / from_pretrained, and loading a PEFT checkpoint into an injected model."""

import copy

import pytest
import torch
from torch import nn

import miss_ext
import miss_ext.peft as mp
from miss_ext import functional as MF
from miss_ext import reference as R

from conftest import assert_close

import peft.tuners.miss.layer as peft_layer  # noqa: E402
from peft import MissConfig, PeftModel, get_peft_model  # noqa: E402

from conftest import INIT_RANDOM as INIT  # noqa: E402
TARGETS = ["fc1", "fc2", "fc3"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(40, 64)  # 40 % 16 != 0: zero padding for standard/mini
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 32)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def config(variant, **kw):
    r = 8 if variant == "bat" else 16
    return MissConfig(r=r, mini_r=8, init_weights=INIT[variant], target_modules=TARGETS, **kw)


@pytest.fixture(autouse=True)
def _always_unpatch():
    yield
    mp.unpatch()


def randomize(model, adapter=None):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".miss_block." in n and (adapter is None or n.endswith("." + adapter)):
                p.copy_((0.05 if p.dim() == 3 else 0.3) * torch.randn_like(p))


def peft_model(variant, dtype=torch.float32, **kw):
    base = MLP().to(dtype)
    model = get_peft_model(base, config(variant, **kw))
    randomize(model)
    return model


def outputs_and_grads(model, x):
    xi = x.clone().requires_grad_()
    model.zero_grad()
    y = model(xi)
    y.float().pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad, grads


def assert_same(a, b, dtype):
    ya, xa, ga = a
    yb, xb, gb = b
    assert ya.dtype == yb.dtype
    assert_close(ya, yb, dtype=dtype)
    assert_close(xa, xb, dtype=dtype, scale=max(1.0, xb.float().abs().max().item()))
    assert ga.keys() == gb.keys() and ga
    for k in gb:
        assert_close(ga[k], gb[k], dtype=dtype, scale=max(1.0, gb[k].float().abs().max().item()), msg=k)


def test_patch_unpatch_restore_peft_methods():
    cls = peft_layer.MissLinear
    originals = {m: cls.__dict__[m] for m in mp._METHODS}
    before = peft_model("standard")  # created before patching: still accelerated
    mp.patch()
    mp.patch()  # idempotent
    assert mp.is_patched()
    assert all(cls.__dict__[m] is mp._REPLACEMENTS[m] for m in mp._METHODS)
    assert type(before.base_model.model.fc1).forward is mp._forward
    mp.unpatch()
    assert all(cls.__dict__[m] is originals[m] for m in mp._METHODS)
    with mp.patched():
        assert mp.is_patched()
        with mp.patched():  # nested: the inner exit keeps the outer patch
            pass
        assert mp.is_patched()
    assert not mp.is_patched()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_outputs_and_grads_match_peft(variant, dtype):
    """get_peft_model upcasts the blocks to fp32 on a bf16 base: mixed dtypes for free."""
    model = peft_model(variant, dtype)
    x = torch.randn(2, 5, 40, dtype=dtype)
    want = outputs_and_grads(model, x)
    with mp.patched():
        got = outputs_and_grads(model, x)
    assert_same(got, want, dtype)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_several_adapters_and_disable(variant):
    model = peft_model(variant)
    model.add_adapter("other", config(variant))
    randomize(model, "other")
    model.base_model.set_adapter(["other", "default"])
    x = torch.randn(6, 40)
    want = outputs_and_grads(model, x)
    with model.disable_adapter():
        want_base = model(x)
    with mp.patched():
        assert_same(outputs_and_grads(model, x), want, torch.float32)
        with model.disable_adapter():
            assert torch.equal(model(x), want_base)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_merge_and_unload_matches_peft(variant):
    model = peft_model(variant)
    model.add_adapter("other", config(variant))
    randomize(model, "other")
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(4, 40)
    with torch.no_grad():
        y = model(x)
        theirs = copy.deepcopy(model).merge_and_unload()
        with mp.patched():
            ours = model.merge_and_unload()
        assert type(ours.fc1) is nn.Linear
        for name in TARGETS:
            assert_close(getattr(ours, name).weight, getattr(theirs, name).weight)
        assert_close(ours(x), y)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_layer_merge_unmerge_and_safe_merge(variant):
    model = peft_model(variant)
    layer = model.base_model.model.fc2
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 40)
    with mp.patched(), torch.no_grad():
        y = model(x)
        layer.miss_block["default"].view(-1)[0] = float("inf")
        with pytest.raises(ValueError, match="NaNs detected"):
            layer.merge(safe_merge=True)
        assert torch.equal(layer.base_layer.weight, w0) and not layer.merged
        randomize(model)
        y = model(x)
        model.base_model.merge_adapter()
        assert layer.merged
        assert_close(model(x), y)
        model.base_model.unmerge_adapter()
        assert_close(layer.base_layer.weight, w0)


@pytest.mark.parametrize("variant", ["standard", "mini"])
def test_dropout(variant):
    """p > 0 in eval mode and p = 0 in training equal PEFT; training with p > 0 equals
    miss_ext's reference with the same seed (masks are counter-based, not nn.Dropout's)."""
    x = torch.randn(8, 40)
    for p, train in ((0.3, False), (0.0, True)):
        model = peft_model(variant, miss_dropout=p).train(train)
        want = outputs_and_grads(model, x)
        with mp.patched():
            assert_same(outputs_and_grads(model, x), want, torch.float32)
    model = peft_model(variant, miss_dropout=0.3).train()
    layer = model.base_model.model.fc1
    with mp.patched():
        torch.manual_seed(3)
        y = layer(x)
    torch.manual_seed(3)
    fn = R.mini_forward if variant == "mini" else R.miss_forward
    want = fn(x, layer.base_layer(x), layer.miss_block["default"], 0.3, MF.dropout_seed())
    assert_close(y, want)


def test_mixed_variants_on_one_peft_layer():
    """A BAT adapter next to a standard one on one layer. PEFT before 0.22 stores the variant per
    layer, so this fails there with shape errors; PEFT 0.22 stores it per adapter (``miss_fn`` a
    dict) and, like the patch, applies the BAT transforms first and adds the other terms after
    (docs/MATH.md section 5). The patch reads each adapter's variant from its block."""
    model = peft_model("standard")
    model.add_adapter("bat", config("bat"))
    randomize(model, "bat")
    model.base_model.set_adapter(["default", "bat"])
    layer = model.base_model.model.fc2
    x = torch.randn(4, 64)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    want = R.miss_forward(x, R.bat_linear(x, w, b, layer.miss_block["bat"]), layer.miss_block["default"])
    if isinstance(getattr(layer, "miss_fn", None), dict):  # PEFT >= 0.22: its own numbers agree
        assert_close(layer(x), want)
    else:
        with pytest.raises(RuntimeError):
            layer(x)
    with mp.patched():
        y = layer(x)
        assert_close(y, want)
        layer.merge()
        assert_close(layer(x), want)
        layer.unmerge()
        assert_close(layer(x), want)


@pytest.mark.parametrize("variant", ["standard", "mini", "bat"])
def test_checkpoint_round_trip(variant, tmp_path):
    """save_pretrained (unpatched PEFT) -> PeftModel.from_pretrained under the patch, and ->
    miss_ext.peft.load_peft_adapter into a plain model: the same outputs everywhere."""
    torch.manual_seed(0)
    base_state = MLP().state_dict()
    source = MLP()
    source.load_state_dict(base_state)
    model = get_peft_model(source, config(variant))
    randomize(model)
    x = torch.randn(5, 40)
    with torch.no_grad():
        want = model(x)
    model.save_pretrained(tmp_path)

    fresh = MLP()
    fresh.load_state_dict(base_state)
    with mp.patched(), torch.no_grad():
        loaded = PeftModel.from_pretrained(fresh, tmp_path)
        assert_close(loaded(x), want)

    plain = MLP()
    plain.load_state_dict(base_state)
    mp.load_peft_adapter(plain, str(tmp_path))
    assert isinstance(plain.fc1, miss_ext.MissLinear)
    with torch.no_grad():
        assert_close(plain(x), want)
    # ... and the key mapping is exactly PEFT's layout: PEFT's in-memory state dict loads too.
    sd = {k.replace(".miss_block.default", ".miss_block"): v for k, v in model.state_dict().items()}
    mapped = mp.to_miss_ext_state_dict(sd)
    assert set(mapped) == set(plain.state_dict())


def test_load_peft_adapter_rejects_mismatch(tmp_path):
    model = get_peft_model(MLP(), config("standard"))
    model.save_pretrained(tmp_path)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(40, 64)

    other = Other()
    with pytest.raises(ValueError, match=r"saved blocks without a target module \['fc2'"):
        mp.load_peft_adapter(other, str(tmp_path))
    assert type(other.fc1) is nn.Linear
