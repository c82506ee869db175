"""torch.compile(fullgraph=True): models with MissLinear layers of every variant (and a layer
holding all of them) compile without a graph break, forward and backward, and match eager; the
same for PEFT models under the miss_ext.peft patch. Models are tiny: compiling is the cost."""

import pytest
import torch
import torch._dynamo
from torch import nn

import miss_ext
import miss_ext.peft as mp

from conftest import assert_close

from peft import MissConfig, get_peft_model  # noqa: E402


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.std = nn.Linear(36, 32)  # 36 % 8 != 0: padded block sum
        self.mini = nn.Linear(32, 32)
        self.bat = nn.Linear(32, 32)
        self.mixed = nn.Linear(32, 16)

    def forward(self, x):
        h = torch.relu(self.std(x))
        h = torch.relu(self.mini(h))
        h = torch.tanh(self.bat(h))
        return self.mixed(h)


def miss_net(dropout=0.0):
    torch.manual_seed(0)
    model = Net()
    model.std = miss_ext.MissLinear(model.std, r=8, init_weights=False, miss_dropout=dropout)
    model.mini = miss_ext.MissLinear(model.mini, r=8, mini_r=4, init_weights="mini", miss_dropout=dropout)
    model.bat = miss_ext.MissLinear(model.bat, r=8, init_weights="bat")
    mixed = miss_ext.MissLinear(model.mixed, r=8, init_weights="bat", adapter_name="b1")
    mixed.update_layer("s", 4, init_weights=False, miss_dropout=dropout)
    mixed.update_layer("m", 8, mini_r=8, init_weights="mini")
    mixed.update_layer("b2", 8, init_weights="bat")
    mixed.set_adapter(["b1", "s", "m", "b2"])
    model.mixed = mixed
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_((0.05 if p.dim() == 3 else 0.3) * torch.randn_like(p))
    return model


def fwd_bwd(model, x, seed=5):
    torch.manual_seed(seed)
    xi = x.clone().requires_grad_()
    y = model(xi)
    y.pow(2).sum().backward()
    # A merged or disabled adapter gets no gradient: keep its None in the list.
    grads = [xi.grad] + [None if p.grad is None else p.grad.clone() for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.grad = None
    return y.detach(), grads


def check_compiles_like_eager(model, x, backend, train=False):
    torch._dynamo.reset()
    model.train(train)
    want_y, want_g = fwd_bwd(model, x)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got_y, got_g = fwd_bwd(compiled, x)
    assert_close(got_y, want_y)
    assert [g is None for g in got_g] == [g is None for g in want_g]
    for a, b in zip(got_g, want_g):
        if b is not None:
            assert_close(a, b, scale=max(1.0, b.abs().max().item()))
    # A second call reuses the graph (fullgraph would have raised on any break).
    got_y2, _ = fwd_bwd(compiled, x)
    assert_close(got_y2, want_y)


def test_inductor_all_variants():
    """Inductor on the layer that holds every variant at once (the full net costs ~4x the
    compile time on a small CPU for no extra coverage)."""
    check_compiles_like_eager(miss_net().mixed, torch.randn(4, 32), "inductor")


def test_aot_eager_with_dropout():
    """Eval mode (dropout off) matches eager; in training the seed is drawn inside the graph
    from torch's generator, so the same manual_seed gives eager's masks."""
    model = miss_net(dropout=0.25)
    x = torch.randn(2, 3, 36)
    check_compiles_like_eager(model, x, "aot_eager", train=False)
    check_compiles_like_eager(model, x, "aot_eager", train=True)


def test_merged_and_disabled_compile():
    model = miss_net()
    x = torch.randn(4, 36)
    model.mixed.merge()
    check_compiles_like_eager(model, x, "aot_eager")
    for m in (model.std, model.mini, model.bat, model.mixed):
        m.enable_adapters(False)
    model.bat.base_layer.weight.requires_grad_(True)  # something to differentiate
    check_compiles_like_eager(model, x, "aot_eager")


@pytest.mark.parametrize("variant", [True, "mini", "bat"])
def test_peft_patched_compiles(variant):
    torch.manual_seed(0)
    # 36 inputs do not split into 8 x 8 blocks: BAT leaves `std` alone.
    targets = ["mini", "bat", "mixed"] + ([] if variant == "bat" else ["std"])
    model = get_peft_model(Net(), MissConfig(r=8, mini_r=8, init_weights=variant, target_modules=targets))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".miss_block." in n:
                p.copy_((0.05 if p.dim() == 3 else 0.3) * torch.randn_like(p))
    x = torch.randn(4, 36)
    inner = model.base_model.model
    want = fwd_bwd(inner, x)
    with mp.patched():
        torch._dynamo.reset()
        compiled = torch.compile(inner, fullgraph=True, backend="aot_eager")
        got = fwd_bwd(compiled, x)
    assert_close(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        assert_close(a, b, scale=max(1.0, b.abs().max().item()))


def mixed_precision(model):
    """A bf16 model with fp32 blocks, as get_peft_model leaves a bf16 model."""
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, miss_ext.MissLinear):
            for p in m.miss_block.values():
                p.data = p.data.float()
    return model


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_mixed_precision_compiles(backend):
    """bf16 base, fp32 blocks (what users run): the ops' fake kernels give the mixed dtypes, so the
    graph is whole; aot_eager runs the same kernels, so it is bit-equal to eager. Inductor fuses
    the elementwise ops around the layers in fp32 without bf16 roundings in between, so there
    the gradients agree to bf16 precision."""
    torch._dynamo.reset()
    model = mixed_precision(miss_net() if backend == "aot_eager" else miss_net().mixed)
    x = torch.randn(4, 36 if backend == "aot_eager" else 32, dtype=torch.bfloat16)
    model.eval()
    want_y, want_g = fwd_bwd(model, x)
    got_y, got_g = fwd_bwd(torch.compile(model, fullgraph=True, backend=backend), x)
    assert got_y.dtype == torch.bfloat16 and torch.equal(got_y, want_y)
    for a, b in zip(got_g, want_g):
        assert a.dtype == b.dtype
        if backend == "aot_eager":
            assert torch.equal(a, b)
        else:
            assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() < 2e-2


def test_autocast_compiles_like_eager():
    """Trainer(bf16=True): a bf16 model with fp32 blocks under autocast. The layers pass autocast's
    choices to the ops as arguments (BAT's half_products, miss_linear's dtypes), so the graph is
    whole and aot_eager, running the same kernels, is bit-equal to eager (r = 16: BAT on the CPU's
    one-piece path where the machine has it)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    miss_ext.inject(model, ["0"], r=16, init_weights="bat")
    miss_ext.inject(model, ["2"], r=16, init_weights=True)
    miss_ext.inject(model, ["4"], r=16, mini_r=8, init_weights="mini")
    model = mixed_precision(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn_like(p))
    x = torch.randn(24, 64, dtype=torch.bfloat16)

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fwd_bwd(m, x)

    want_y, want_g = run(model)
    got_y, got_g = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert torch.equal(got_y, want_y)
    for a, b in zip(got_g, want_g):
        assert torch.equal(a, b)
