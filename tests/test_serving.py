"""Serving: the gathered product (torch.ops.miss_ext.miss_gathered_product) against a float64
formula, mixed-adapter batches (each sample equals the layer run on it alone with its adapter:
every variant, several r, mixed precision) at layer level, for inject models (mixed_batch, with
generate) and for PEFT models under the patch (forward and generate with adapter_names), the BAT
W' cache, the errors PEFT raises, and torch.compile."""

import pytest
import torch
from torch import nn

import miss_ext
import miss_ext.peft as mp
from miss_ext import serving

from conftest import DEVICES, assert_close, tol

ops = torch.ops.miss_ext
BF = torch.bfloat16


def reference(base, s, blocks, index):
    """float64 rows: base[n] + tile_out(s[n] @ blocks[index[n]])."""
    out_f = base.shape[-1]
    b2, s2, idx = base.reshape(-1, out_f).double(), s.reshape(-1, s.shape[-1]).double(), index.reshape(-1)
    ref = b2.clone()
    for n in range(b2.shape[0]):
        k = int(idx[n])
        if k >= 0:
            t = s2[n] @ blocks[k].double()
            ref[n] += t.repeat(out_f // t.numel())
    return ref.reshape(base.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "base_dtype, block_dtype",
    [(torch.float32, torch.float32), (torch.float64, torch.float64), (BF, torch.float32),
     (torch.float16, torch.float32), (BF, BF), (torch.float32, torch.float64)],
)
def test_gathered_product_matches_formula(device, base_dtype, block_dtype):
    n, out_f, r = 150, 96, 8
    base = torch.randn(3, n // 3, out_f, device=device).to(base_dtype)
    s = torch.randn(3, n // 3, r, device=device).to(block_dtype)
    blocks = [torch.randn(r, m, device=device).to(block_dtype) for m in (out_f, 12, out_f, 96)]
    index = torch.randint(-1, len(blocks), (3, n // 3), device=device)
    index[0, :7] = 2  # a run, and every adapter present
    y = ops.miss_gathered_product(base, s, blocks, index)
    ref = reference(base.cpu(), s.cpu(), [b.cpu() for b in blocks], index.cpu())
    assert y.dtype == base_dtype and y.shape == base.shape
    # Rounded once: the exact value rounded to base's dtype, up to the product's own rounding.
    scale = ref.abs().max().item()
    assert_close(y.cpu().double(), ref.to(base_dtype).double(), dtype=base_dtype if base_dtype != block_dtype else block_dtype, scale=scale)
    rows = index.cpu() == -1
    assert torch.equal(y.cpu()[rows], base.cpu()[rows])  # base rows are copied as they are


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_product_many_adapters_and_empty(device):
    """More adapters than the CUDA kernel's per-launch table (32), and empty inputs."""
    out_f, r, k = 32, 4, 40
    blocks = [torch.randn(r, out_f, device=device) for _ in range(k)]
    index = torch.arange(-1, k, device=device).repeat(2)
    base = torch.randn(index.numel(), out_f, device=device)
    s = torch.randn(index.numel(), r, device=device)
    y = ops.miss_gathered_product(base, s, blocks, index)
    assert_close(y.cpu().double(), reference(base.cpu(), s.cpu(), [b.cpu() for b in blocks], index.cpu()), dtype=torch.float32)
    empty = ops.miss_gathered_product(base[:0], s[:0], blocks, index[:0])
    assert empty.shape == (0, out_f)


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_product_broadcast_base_row(device):
    """A bias broadcast to every row (stride 0) is read in place and gives what its copy gives."""
    bias = torch.randn(48, device=device)
    s = torch.randn(2, 5, 4, device=device)
    blocks = [torch.randn(4, 48, device=device), torch.randn(4, 12, device=device)]
    index = torch.tensor([[0, 1, -1, 0, 0], [1, 1, -1, -1, 0]], device=device)
    got = ops.miss_gathered_product(bias.expand(2, 5, 48), s, blocks, index)
    want = ops.miss_gathered_product(bias.expand(2, 5, 48).contiguous(), s, blocks, index)
    assert torch.equal(got, want)


def test_gathered_product_rejects_bad_input():
    base, s = torch.randn(4, 8), torch.randn(4, 2)
    blocks = [torch.randn(2, 8)]
    good = torch.tensor([0, -1, 0, 0])
    with pytest.raises(RuntimeError, match="values in \\[-1, 1\\)"):
        ops.miss_gathered_product(base, s, blocks, torch.tensor([0, 1, 0, 0]))
    with pytest.raises(RuntimeError, match="values in \\[-1, 1\\)"):
        ops.miss_gathered_product(base, s, blocks, torch.tensor([0, -2, 0, 0]))
    with pytest.raises(RuntimeError, match="int64"):
        ops.miss_gathered_product(base, s, blocks, good.int())
    with pytest.raises(RuntimeError, match="leading shape"):
        ops.miss_gathered_product(base, s, blocks, good[:3])
    with pytest.raises(RuntimeError, match="share r"):
        ops.miss_gathered_product(base, s, [torch.randn(3, 8)], good)
    with pytest.raises(RuntimeError, match="divisible"):
        ops.miss_gathered_product(base, s, [torch.randn(2, 3)], good)
    with pytest.raises(RuntimeError, match="at least one"):
        ops.miss_gathered_product(base, s, [], good)
    with pytest.raises(RuntimeError, match="holds it"):
        ops.miss_gathered_product(base.double(), s, blocks, good)


def test_gathered_product_gradients():
    base = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    s = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    blocks = [torch.randn(4, 8, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 2, dtype=torch.float64, requires_grad=True)]
    index = torch.tensor([0, 1, -1, 1, 0, 0])
    assert torch.autograd.gradcheck(lambda b, s_, d0, d1: ops.miss_gathered_product(b, s_, [d0, d1], index),
                                    (base, s, *blocks))


# ---------------------------------------------------------------- layer level


def random_blocks_(module, scale=0.1):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "miss_block" in name:
                p.copy_(scale * torch.randn_like(p) * (0.5 if p.dim() == 3 else 1.0))


def mixed_layer(in_f=48, out_f=48, dtype=torch.float32):
    """One layer with every variant and several r (standard r=8 and 12 with in % 12 == 0 ...,
    standard r=7 with in % r != 0, mini, two BAT)."""
    torch.manual_seed(0)
    layer = miss_ext.MissLinear(nn.Linear(in_f, out_f).to(dtype), r=8, init_weights=False, adapter_name="s8")
    layer.update_layer("s8b", 8, init_weights=False)
    layer.update_layer("s7", 7, init_weights=False)
    layer.update_layer("m", 8, mini_r=12, init_weights="mini")
    layer.update_layer("m6", 6, mini_r=6, init_weights="mini")
    layer.update_layer("b8", 8, init_weights="bat")
    layer.update_layer("b4", 4, init_weights="bat")
    random_blocks_(layer)
    return layer.eval()


def alone(layer, x, name):
    with torch.no_grad():
        if name == serving.BASE or name not in layer.miss_block:
            with layer.disable_adapter():
                return layer(x)
        before = layer.active_adapters
        layer.set_adapter(name)
        try:
            return layer(x)
        finally:
            layer.set_adapter(before)


NAMES = ["s8", "b8", "__base__", "m", "s7", "s8b", "b4", "m6", "s8", "b8"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, BF])
def test_layer_each_sample_equals_its_adapter_alone(device, dtype):
    """bf16: a bf16 base with fp32 blocks (the mixed-precision layer); float32: all fp32."""
    layer = mixed_layer(dtype=dtype).to(device)
    x = torch.randn(len(NAMES), 5, 48, device=device, dtype=dtype)
    with torch.no_grad():
        y = layer(x, adapter_names=NAMES)
    assert y.dtype == dtype and y.shape == (len(NAMES), 5, 48)
    for i, name in enumerate(NAMES):
        want = alone(layer, x[i : i + 1], name)
        assert_close(y[i : i + 1], want, msg=f"sample {i} ({name})", scale=max(1.0, want.abs().max().item()))
    # BAT samples and base samples take no adapter term: they run the very GEMMs that the layer
    # alone runs on the same rows. The same rows, since a BLAS may pick its kernel, and so its
    # summation order, by the row count (MKL's fp32 GEMM on AVX2 does).
    rest = [i for i, n in enumerate(NAMES) if n == "__base__" or layer.miss_variant[n] != "bat"]
    base_rows = alone(layer, x[rest], "__base__")
    for i, name in enumerate(NAMES):
        if name == "__base__":
            assert torch.equal(y[i], base_rows[rest.index(i)]), f"sample {i} ({name})"
    for name in {n for n in NAMES if n != "__base__" and layer.miss_variant[n] == "bat"}:
        group = [i for i, n in enumerate(NAMES) if n == name]
        assert torch.equal(y[group], alone(layer, x[group], name)), name


def test_layer_2d_input_and_single_name():
    layer = mixed_layer()
    x = torch.randn(4, 48)
    with torch.no_grad():
        y = layer(x, adapter_names=["s8", "s8", "s8", "s8"])
        assert_close(y, alone(layer, x, "s8"))
        assert torch.equal(layer(x, adapter_names=["__base__"] * 4), alone(layer, x, "__base__"))


def test_layer_errors_as_peft():
    layer = mixed_layer()
    x = torch.randn(3, 48)
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(x, adapter_names=["s8", "s8"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        layer(x, adapter_names=["s8", "nope", "s8"])
    with pytest.raises(TypeError, match="one adapter name per sample"):
        layer(x, adapter_names="s8")
    with pytest.raises(ValueError, match="batched input"):
        layer(x[0], adapter_names=["s8"])
    layer.train()
    with pytest.raises(ValueError, match="training mode"):
        layer(x, adapter_names=["s8"] * 3)
    layer.eval()
    layer.set_adapter("s8")
    layer.merge()
    with pytest.raises(ValueError, match="merged adapters"):
        layer(x, adapter_names=["s8"] * 3)
    layer.unmerge()
    with torch.no_grad(), layer.disable_adapter():
        assert torch.equal(layer(x, adapter_names=["s8", "m", "b8"]), layer.base_layer(x))


def test_bat_cache():
    layer = mixed_layer()
    x = torch.randn(len(NAMES), 3, 48)
    with torch.no_grad():
        want = layer(x, adapter_names=NAMES)
        miss_ext.cache_bat_weights(layer)
        assert miss_ext.bat_cache_bytes(layer) == 0
        assert torch.equal(layer(x, adapter_names=NAMES), want)
        assert miss_ext.bat_cache_bytes(layer) == 2 * 48 * 48 * 4  # one W' per BAT adapter
        assert torch.equal(layer(x, adapter_names=NAMES), want)  # from the cache
        layer.miss_block["b8"].mul_(2.0)  # an in-place change is seen
        changed = layer(x, adapter_names=NAMES)
        layer.miss_block["b8"].div_(2.0)
        miss_ext.cache_bat_weights(layer, False)
        layer.miss_block["b8"].mul_(2.0)
        assert torch.equal(changed, layer(x, adapter_names=NAMES))
        layer.miss_block["b8"].div_(2.0)
        assert miss_ext.bat_cache_bytes(layer) == 0
    # With gradients wanted the cache is bypassed: the block still gets its gradient.
    miss_ext.cache_bat_weights(layer)
    layer.miss_block["b8"].requires_grad_(True)
    layer(x, adapter_names=NAMES).sum().backward()
    assert layer.miss_block["b8"].grad is not None and layer.miss_block["b8"].grad.abs().sum() > 0


def test_compile_mixed_batch():
    import torch._dynamo

    torch._dynamo.reset()
    layer = mixed_layer()
    x = torch.randn(len(NAMES), 2, 48)
    names = serving.ModelNames(NAMES)
    with torch.no_grad():
        want = layer(x, adapter_names=names)
        compiled = torch.compile(lambda t: layer(t, adapter_names=names), fullgraph=True, backend="aot_eager")
        assert_close(compiled(x), want)


# ---------------------------------------------------------------- model level


@pytest.fixture(scope="module")
def tiny():
    import _models as T

    return T


def per_sample_logits(model, ids, names, use):
    out = []
    for i, n in enumerate(names):
        with use(n):
            out.append(model(input_ids=ids[i : i + 1]).logits)
    return torch.cat(out)


def test_inject_model_mixed_batch_and_generate(tiny):
    model = tiny.build()
    miss_ext.inject(model, tiny.TARGETS, r=4, adapter_name="s", init_weights=False)
    miss_ext.inject(model, tiny.TARGETS, r=4, mini_r=8, init_weights="mini", adapter_name="m")
    miss_ext.inject(model, ["q_proj"], r=4, init_weights="bat", adapter_name="b")  # on q_proj only
    random_blocks_(model)
    model.eval()
    ids = tiny.batch(n=4)
    names = ["s", "b", "__base__", "m"]

    import contextlib

    def use(name):
        if name == "__base__":
            return miss_ext.adapters_disabled(model)
        miss_ext.set_adapter(model, name)
        return contextlib.nullcontext()

    with torch.no_grad():
        want = per_sample_logits(model, ids, names, use)
        with miss_ext.mixed_batch(model, names):
            got = model(input_ids=ids).logits
        assert_close(got, want, scale=max(1.0, want.abs().max().item()))
        # Greedy generation: each row continues as it would alone.
        with miss_ext.mixed_batch(model, names):
            gen = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        for i, n in enumerate(names):
            with use(n):
                alone_gen = model.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(gen[i : i + 1, : alone_gen.shape[1]], alone_gen), n  # alone may stop at EOS
        with miss_ext.mixed_batch(model, names, num_beams=2):
            beams = model.generate(input_ids=ids, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
        assert beams.shape == (4, ids.shape[1] + 2)
    # The hooks are gone after the block.
    assert not any(m._forward_pre_hooks for _, m in miss_ext.inject.__globals__["miss_layers"](model))
    with pytest.raises(ValueError, match="non-existing adapter"):
        with miss_ext.mixed_batch(model, ["s", "zz", "s", "s"]):
            pass
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        with miss_ext.mixed_batch(model, names):
            pass


def test_peft_patched_mixed_batch(tiny):
    from peft import MissConfig, get_peft_model

    pm = get_peft_model(tiny.build(), MissConfig(r=4, init_weights=False, target_modules=tiny.TARGETS), adapter_name="s")
    pm.add_adapter("m", MissConfig(r=4, mini_r=8, init_weights="mini", target_modules=tiny.TARGETS))
    pm.add_adapter("b", MissConfig(r=4, init_weights="bat", target_modules=["q_proj", "down_proj"]))
    random_blocks_(pm)
    pm.eval()
    ids = tiny.batch(n=4)
    names = ["m", "s", "b", "__base__"]

    import contextlib

    def use(name):
        if name == "__base__":
            return pm.disable_adapter()
        pm.set_adapter(name)
        return contextlib.nullcontext()

    with torch.no_grad(), mp.patched():
        want = per_sample_logits(pm, ids, names, use)
        got = pm(input_ids=ids, adapter_names=names).logits
        assert_close(got, want, scale=max(1.0, want.abs().max().item()))
        gen = pm.generate(input_ids=ids, adapter_names=names, max_new_tokens=3, do_sample=False, pad_token_id=0)
        for i, n in enumerate(names):
            with use(n):
                one = pm.generate(input_ids=ids[i : i + 1], max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert torch.equal(gen[i : i + 1, : one.shape[1]], one), n  # alone may stop at EOS
        beams = pm.generate(input_ids=ids, adapter_names=names, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
        assert beams.shape == (4, ids.shape[1] + 2)
        with pytest.raises(ValueError, match="non-existing adapter"):
            pm(input_ids=ids, adapter_names=["s", "x", "s", "s"])
        pm.train()
        with pytest.raises(ValueError, match="training mode"):
            pm(input_ids=ids, adapter_names=names)
        pm.eval()
    from peft.tuners.miss.model import MissModel

    assert not hasattr(MissModel, "_enable_peft_forward_hooks")  # unpatch restored PEFT


def test_bench_serve_smoke(tmp_path, capsys):
    """python -m bench serve, smoke shapes: runs, reports the ratios, checks the mixed batch."""
    import sys
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from bench import cli

    threads = torch.get_num_threads()
    try:
        assert cli.main(["serve", "--suite", "smoke", "--threads", "1", "--no-progress", "--csv", str(tmp_path / "s.csv")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "mixed/single" in out and (tmp_path / "s.csv").exists()
    import csv

    row = next(csv.DictReader(open(tmp_path / "s.csv")))
    assert float(row["max_rel_err"]) < 1e-5
    for key in ("mixed/single", "mixed/peft", "cpu1_mixed/single", "bat_cached/single"):
        assert float(row[key]) > 0, key
