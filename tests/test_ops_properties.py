"""Property-based parity of every torch.ops.miss_ext operator (blocksum, blocksum_dropout,
tile, tile_dropout, tile_add, bat_transform, bat_block_grad, bat_weight_grad, bat_linear,
bat_unmerge, miss_merge, miss_linear) and every MissLinear variant
with miss_ext.reference, forward and gradients (issue #6).

Hypothesis draws shapes (0 tokens, 1 feature, primes, in % r != 0, r = 1, r = in, r > in where
the op allows it), leading batch dims, dtypes, memory layouts (transposed, sliced, strided,
expanded) and value magnitudes (large and tiny powers of two). The reference runs in float64
on the very same (already rounded) inputs.

Tolerance: conftest's per-dtype ``tol(dtype, scale)`` with ``scale`` = the largest entry of
the same computation run on absolute values (inputs and upstream gradient replaced by their
absolute values, in float64). Every op here is a sum of products, so that run is exactly the
sum of the magnitudes of the terms: the rounding-error bound of the computation, which scales
atol with the magnitude of the values. bat_unmerge (a solve) uses the magnitude of its result.

Examples per test: ``examples(N)`` from tests/_strategies.py (N in the default ``ci``
profile, 20 N with ``MISS_EXT_HYPOTHESIS_PROFILE=thorough``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import miss_ext
from miss_ext import reference as ref
from miss_ext.functional import dropout_seed

from _strategies import DTYPES, FEATURES, LAYOUTS, LEAD, TOKENS, examples, magnitudes, make_tensor
from conftest import DEVICES, INIT_RANDOM, TOLERANCES, assert_close

ops = torch.ops.miss_ext


# ---------------------------------------------------------------- harness


def _scale(bound: torch.Tensor, dtype: torch.dtype) -> float:
    m = float(bound.detach().abs().max()) if bound.numel() else 0.0
    return max(m, torch.finfo(dtype).tiny)


def _finite_bound(bound: torch.Tensor, dtype: torch.dtype) -> bool:
    """The computation's magnitude stays well inside ``dtype``'s range (else overflow is
    legitimate and the example is not a parity case)."""
    return bound.numel() == 0 or float(bound.detach().abs().max()) < torch.finfo(dtype).max / 16


_EPS_ORDER = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two float dtypes (its tolerance applies to a result rounded to it)."""
    return a if _EPS_ORDER[a] >= _EPS_ORDER[b] else b


def _prep(args, diff, to64=False, absval=False):
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            t = a.detach()
            if to64:
                t = t.double()
            if absval:
                t = t.abs()
            if i in diff:
                t = t.requires_grad_(True)
            out.append(t)
        else:
            out.append(a)
    return out


def check_parity(kernel, reference, args, diff, dtype, seed=0, exact=False):
    """Compares ``kernel(*args)`` with ``reference(*args_in_fp64)`` and, for the arguments whose
    indices are in ``diff``, the gradients for a random upstream gradient."""
    ka = _prep(args, diff)
    ra = _prep(args, diff, to64=True)
    aa = _prep(args, diff, to64=True, absval=True)
    out = kernel(*ka)
    expected = reference(*ra)
    bound = reference(*aa)
    assume(_finite_bound(bound, dtype))
    assert out.shape == expected.shape, (out.shape, expected.shape)
    if exact:
        assert torch.equal(out.double(), expected), "expected a bit-exact result"
    else:
        assert_close(out, expected, dtype=dtype, scale=_scale(bound, dtype), msg=f"forward ({dtype})")
    if not diff or out.numel() == 0:
        return
    g = make_tensor(out.shape, out.dtype, seed=seed + 7, device=out.device)
    idx = sorted(diff)
    kg = torch.autograd.grad(out, [ka[i] for i in idx], g, allow_unused=True)
    rg = torch.autograd.grad(expected, [ra[i] for i in idx], g.double(), allow_unused=True)
    ag = torch.autograd.grad(bound, [aa[i] for i in idx], g.double().abs(), allow_unused=True)
    for i, k, r_, a in zip(idx, kg, rg, ag):
        if r_ is None:
            r_ = torch.zeros_like(ra[i])
            a = r_
        if k is None:
            k = torch.zeros_like(ka[i])
        assert k.shape == ka[i].shape and k.dtype == ka[i].dtype, (i, k.shape, k.dtype)
        gd = _coarser(dtype, k.dtype)
        assume(_finite_bound(a, gd))  # a gradient rounded to a narrower dtype may overflow it
        assert_close(k, r_, dtype=gd, scale=_scale(a, gd), msg=f"grad of argument {i} ({dtype})")


DTYPE = st.sampled_from(DTYPES)
LAYOUT = st.sampled_from(LAYOUTS)
SEED = st.integers(0, 2**16)
P = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])


@st.composite
def feats_and_r(draw, allow_r_above=True):
    f = draw(FEATURES)
    choices = [st.just(1), st.just(f), st.integers(1, f)]
    if allow_r_above:
        choices.append(st.integers(f + 1, f + 5))
    return f, draw(st.one_of(*choices))


def _seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor([seed * 0x9E3779B97F4A7C15 % 2**63], dtype=torch.int64)


# ---------------------------------------------------------------- block sum family


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, lead=LEAD, n=TOKENS, fr=feats_and_r(), layout=LAYOUT, seed=SEED, data=st.data())
def test_blocksum_parity(device, dtype, lead, n, fr, layout, seed, data):
    f, r = fr
    x = make_tensor((*lead, n, f), dtype, data.draw(magnitudes(dtype)), layout, seed, device=device)
    check_parity(lambda x: ops.blocksum(x, r), lambda x: ref.blocksum(x, r), [x], {0}, dtype, seed)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, lead=LEAD, n=TOKENS, fr=feats_and_r(), layout=LAYOUT, p=P, seed=SEED, data=st.data())
def test_blocksum_dropout_parity(device, dtype, lead, n, fr, layout, p, seed, data):
    f, r = fr
    x = make_tensor((*lead, n, f), dtype, data.draw(magnitudes(dtype)), layout, seed, device=device)
    s = _seed_tensor(seed)
    check_parity(
        lambda x: ops.blocksum_dropout(x, r, p, s),
        lambda x: ref.blocksum_dropout(x, r, p, s),
        [x], {0}, dtype, seed,
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, lead=LEAD, n=TOKENS, r=st.sampled_from([1, 2, 3, 5, 8, 13]), f=st.integers(0, 40),
       layout=LAYOUT, seed=SEED, data=st.data())
def test_tile_parity(device, dtype, lead, n, r, f, layout, seed, data):
    s = make_tensor((*lead, n, r), dtype, data.draw(magnitudes(dtype)), layout, seed, device=device)
    # Forward is a pure copy: bit-exact.
    check_parity(lambda s: ops.tile(s, f), lambda s: ref.tile(s, f), [s], {0}, dtype, seed, exact=True)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, lead=LEAD, n=TOKENS, r=st.sampled_from([1, 2, 3, 5, 8, 13]), f=st.integers(0, 40),
       layout=LAYOUT, p=P, seed=SEED, data=st.data())
def test_tile_dropout_parity(device, dtype, lead, n, r, f, layout, p, seed, data):
    s = make_tensor((*lead, n, r), dtype, data.draw(magnitudes(dtype)), layout, seed, device=device)
    sd = _seed_tensor(seed)
    check_parity(
        lambda s: ops.tile_dropout(s, f, p, sd), lambda s: ref.tile_dropout(s, f, p, sd), [s], {0}, dtype, seed
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, lead=LEAD, n=TOKENS, fr=feats_and_r(), lb=LAYOUT, ls=LAYOUT, seed=SEED, data=st.data())
def test_tile_add_parity(device, dtype, lead, n, fr, lb, ls, seed, data):
    out, m = fr  # base (..., out), s (..., m); m may exceed out (tile cuts it)
    base = make_tensor((*lead, n, out), dtype, data.draw(magnitudes(dtype)), lb, seed, device=device)
    s = make_tensor((*lead, n, m), dtype, data.draw(magnitudes(dtype)), ls, seed + 1, device=device)
    check_parity(ops.tile_add, ref.tile_add, [base, s], {0, 1}, dtype, seed)


# ---------------------------------------------------------------- BAT


@st.composite
def bat_shape(draw):
    r = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    nb = draw(st.sampled_from([0, 1, 2, 3, 5]))
    nj = draw(st.sampled_from([1, 2, 3, 7]))
    return r, nb * r, nj * r  # r, out, in (r = in when nj == 1)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, shp=bat_shape(), lw=LAYOUT, lb=LAYOUT, seed=SEED, data=st.data())
def test_bat_transform_parity(device, dtype, shp, lw, lb, seed, data):
    r, out, in_f = shp
    w = make_tensor((out, in_f), dtype, data.draw(magnitudes(dtype)), lw, seed, device=device)
    b = make_tensor((out // r, r, r), dtype, data.draw(magnitudes(dtype)), lb, seed + 1, device=device)
    check_parity(ops.bat_transform, ref.bat_transform, [w, b], {0, 1}, dtype, seed)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, shp=bat_shape(), lg=LAYOUT, lw=LAYOUT, seed=SEED, data=st.data())
def test_bat_block_grad_parity(device, dtype, shp, lg, lw, seed, data):
    r, out, in_f = shp
    g = make_tensor((out, in_f), dtype, data.draw(magnitudes(dtype)), lg, seed, device=device)
    w = make_tensor((out, in_f), dtype, data.draw(magnitudes(dtype)), lw, seed + 1, device=device)
    check_parity(
        lambda g, w: ops.bat_block_grad(g, w, r), lambda g, w: ref.bat_block_grad(g, w, r), [g, w], {0, 1}, dtype, seed
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, shp=bat_shape(), lg=LAYOUT, lb=LAYOUT, seed=SEED, data=st.data())
def test_bat_weight_grad_parity(device, dtype, shp, lg, lb, seed, data):
    r, out, in_f = shp
    g = make_tensor((out, in_f), dtype, data.draw(magnitudes(dtype)), lg, seed, device=device)
    b = make_tensor((out // r, r, r), dtype, data.draw(magnitudes(dtype)), lb, seed + 1, device=device)
    check_parity(ops.bat_weight_grad, ref.bat_weight_grad, [g, b], {0, 1}, dtype, seed)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, shp=bat_shape(), lead=LEAD, n=TOKENS, n_blocks=st.integers(1, 3), bias=st.booleans(),
       w_dtype=st.sampled_from([None, torch.float32]), lx=LAYOUT, lw=LAYOUT, seed=SEED, data=st.data())
def test_bat_linear_parity(device, dtype, shp, lead, n, n_blocks, bias, w_dtype, lx, lw, seed, data):
    r, out, in_f = shp
    w_dtype = w_dtype or dtype  # weight and bias may have another float dtype than x / blocks
    x = make_tensor((*lead, n, in_f), dtype, data.draw(magnitudes(dtype)), lx, seed, device=device)
    w = make_tensor((out, in_f), w_dtype, data.draw(magnitudes(dtype)), lw, seed + 1, device=device)
    bmag = data.draw(magnitudes(dtype))
    blocks = [make_tensor((out // r, r, r), dtype, bmag, "contiguous", seed + 2 + k, device=device) for k in range(n_blocks)]
    b = make_tensor((out,), w_dtype, 1.0, "contiguous", seed + 9, device=device) if bias else None
    # The transformed weight W' is an intermediate of the size of W: it too must fit the dtype
    # (with magnitudes 2^30 three fp32 transforms legitimately overflow it).
    w_abs = w.double().abs()
    for blk in blocks:
        w_abs = ref.bat_transform(w_abs, blk.double().abs())
    assume(_finite_bound(w_abs, dtype))
    args = [x, w, b, *blocks]
    diff = {0, 1} | set(range(3, 3 + n_blocks)) | ({2} if bias else set())
    check_parity(
        lambda x, w, b, *bl: ops.bat_linear(x, w, b, list(bl)),
        lambda x, w, b, *bl: ref.bat_linear(x, w, b, list(bl)),
        args, diff, dtype, seed,
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, shp=bat_shape(), lw=LAYOUT, seed=SEED, data=st.data())
def test_bat_unmerge_parity(device, dtype, shp, lw, seed, data):
    r, out, in_f = shp
    wmag = data.draw(magnitudes(dtype))
    w0 = make_tensor((out, in_f), dtype, wmag, "contiguous", seed, device=device)
    # Well-conditioned I + B_i (||B_i|| <= 1/2): the solve's error stays at rounding level.
    b = make_tensor((out // r, r, r), dtype, 0.5 / r, "contiguous", seed + 1, device=device)
    merged = ref.bat_transform(w0.double(), b.double()).to(dtype)
    if lw == "transposed":
        merged = merged.t().contiguous().t()
    elif lw == "sliced":
        merged = torch.cat([merged, merged[:, :1]], 1)[:, :in_f]
    got = ops.bat_unmerge(merged, b)
    expected = ref.bat_unmerge(merged.double(), b.double())
    scale = _scale(ref.bat_transform(merged.double().abs(), b.double().abs()), dtype)
    assert got.dtype == dtype and got.shape == merged.shape
    assert_close(got, expected, dtype=dtype, scale=scale, msg="bat_unmerge forward")
    # ... and it inverts the transform (up to the rounding of `merged` to dtype).
    assert_close(got, w0.double(), dtype=dtype, scale=4 * scale, msg="bat_unmerge(bat_transform(W)) != W")
    if merged.numel() == 0:
        return
    # Gradients through the solve (autograd formula in _ops.py) against the fp64 reference.
    m_k = merged.detach().requires_grad_(True)
    b_k = b.detach().requires_grad_(True)
    m_r = merged.detach().double().requires_grad_(True)
    b_r = b.detach().double().requires_grad_(True)
    up = make_tensor(merged.shape, dtype, seed=seed + 3, device=device)
    gk = torch.autograd.grad(ops.bat_unmerge(m_k, b_k), [m_k, b_k], up)
    gr = torch.autograd.grad(ref.bat_unmerge(m_r, b_r), [m_r, b_r], up.double())
    gscale = _scale(ref.bat_block_grad(up.double().abs() * 2, merged.double().abs(), r), dtype)
    assert_close(gk[0], gr[0], dtype=dtype, scale=2 * float(up.abs().max()), msg="bat_unmerge grad weight")
    assert_close(gk[1], gr[1], dtype=dtype, scale=4 * gscale, msg="bat_unmerge grad block")


# ---------------------------------------------------------------- fused frozen linear + adapter


def _ref_miss_linear(x, w, b, blk, p, seed):
    """docs/MATH.md sections 1, 2, 4: (x W^T + b + tile_out(S @ Dm), S) with S = blocksum_r(dropout(x))."""
    s = ref.blocksum(ref.apply_dropout(x, p, seed), blk.shape[0])
    y = F.linear(x, w, b) + s @ ref.mini_block_expand(blk, w.shape[0])
    return y, s


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, lead=LEAD, n=TOKENS, fr=feats_and_r(allow_r_above=False), out=FEATURES, mini=st.booleans(),
       bias=st.booleans(), p=st.sampled_from([0.0, 0.0, 0.2, 0.7]), which=st.sampled_from(["y", "s", "both"]),
       lx=LAYOUT, lw=LAYOUT, seed=SEED, data=st.data())
def test_miss_linear_op_parity(device, dtype, lead, n, fr, out, mini, bias, p, which, lx, lw, seed, data):
    in_f, r = fr
    m = data.draw(st.sampled_from([d for d in range(1, out + 1) if out % d == 0])) if mini else out
    x = make_tensor((*lead, n, in_f), dtype, data.draw(magnitudes(dtype)), lx, seed, device=device)
    w = make_tensor((out, in_f), dtype, data.draw(magnitudes(dtype)), lw, seed + 1, device=device)
    blk = make_tensor((r, m), dtype, data.draw(magnitudes(dtype)), "contiguous", seed + 2, device=device)
    b = make_tensor((out,), dtype, 1.0, "contiguous", seed + 3, device=device) if bias else None
    sd = _seed_tensor(seed) if p > 0 else None
    pick = {
        "y": lambda ys: ys[0],
        "s": lambda ys: ys[1],
        "both": lambda ys: torch.cat([ys[0], ys[1]], -1),  # gradients flow into both outputs
    }[which]
    check_parity(
        lambda x, w, b, blk: pick(ops.miss_linear(x, w, b, blk, p, sd)),
        lambda x, w, b, blk: pick(_ref_miss_linear(x, w, b, blk, p, sd)),
        [x, w, b, blk], {0, 1, 3} | ({2} if bias else set()), dtype, seed,
    )


# ---------------------------------------------------------------- merge


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(40), deadline=None)
@given(dtype=DTYPE, out=FEATURES, fr=feats_and_r(allow_r_above=False), mini=st.booleans(),
       alpha=st.sampled_from([1.0, -1.0, 0.5, 3.0]), b_dtype=st.sampled_from([None, torch.float32]),
       lw=LAYOUT, seed=SEED, data=st.data())
def test_miss_merge_parity(device, dtype, out, fr, mini, alpha, b_dtype, lw, seed, data):
    in_f, r = fr
    if mini:
        m = data.draw(st.sampled_from([d for d in range(1, out + 1) if out % d == 0]))
    else:
        m = out
    w = make_tensor((out, in_f), dtype, data.draw(magnitudes(dtype)), lw, seed, device=device)
    b = make_tensor((r, m), b_dtype or dtype, data.draw(magnitudes(dtype)), "contiguous", seed + 1, device=device)
    # The merge is computed in fp32 (fp64) and rounded once to the weight's dtype.
    check_parity(
        lambda w, b: ops.miss_merge(w, b, alpha), lambda w, b: ref.miss_merge(w, b, alpha), [w, b], {0, 1}, dtype, seed
    )


# ---------------------------------------------------------------- MissLinear variants


def _set_active(layer, names):
    if hasattr(layer, "set_adapter"):
        layer.set_adapter(names)
    else:
        layer.active_adapters = list(names)


def _reference_layer(x, w, bias, adapters, seeds):
    """The docs/MATH.md (section 5) forward of a MissLinear: BAT adapters compose into the weight, then every
    standard/mini adapter adds its term, in order. ``seeds`` are the dropout seeds of the
    additive adapters with dropout, in order."""
    bat = [blk for kind, blk, p in adapters if kind == "bat"]
    y = ref.bat_linear(x, w, bias, bat) if bat else F.linear(x, w, bias)
    seeds = iter(seeds)
    for kind, blk, p in adapters:
        if kind == "bat":
            continue
        s = next(seeds) if p > 0 else None
        fn = ref.mini_forward if kind == "mini" else ref.miss_forward
        y = fn(x, y, blk, p, s)
    return y


@st.composite
def layer_case(draw):
    dtype = draw(DTYPE)
    kinds = draw(st.lists(st.sampled_from(["standard", "mini", "bat"]), min_size=1, max_size=3))
    r = draw(st.sampled_from([1, 2, 3, 4, 8]))
    need_div = "bat" in kinds
    in_f = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 12, 16, 24, 31]).filter(lambda f: f >= r and (not need_div or f % r == 0)))
    out_f = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 20]).filter(lambda f: not need_div or f % r == 0))
    adapters = []
    for k in kinds:
        rr = r if k == "bat" else draw(st.integers(1, in_f))
        m = draw(st.sampled_from([d for d in range(1, out_f + 1) if out_f % d == 0])) if k == "mini" else 1
        p = draw(st.sampled_from([0.0, 0.0, 0.25, 0.6])) if k != "bat" else 0.0
        adapters.append((k, rr, m, p))
    return dict(
        dtype=dtype, in_f=in_f, out_f=out_f, adapters=adapters, lead=draw(LEAD), n=draw(TOKENS),
        bias=draw(st.booleans()), training=draw(st.booleans()), layout=draw(LAYOUT),
        weight_grad=draw(st.booleans()), xmag=draw(magnitudes(dtype)), wmag=draw(st.sampled_from([1.0, 0.25, 4.0])),
        bmag=draw(st.sampled_from([1.0, 0.01, 0.1])), seed=draw(SEED),
        # None: blocks cast to the base's dtype; float32: MissLinear's default for a half or
        # float32 base (fp32 adapters, as PEFT's get_peft_model), mixed-precision forward.
        block_dtype=draw(st.sampled_from([None, torch.float32])),
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(60), deadline=None)
@given(case=layer_case())
def test_miss_linear_parity(device, case):
    dtype, in_f, out_f, seed = case["dtype"], case["in_f"], case["out_f"], case["seed"]
    base = nn.Linear(in_f, out_f, bias=case["bias"], dtype=dtype, device=device)
    with torch.no_grad():
        base.weight.copy_(make_tensor((out_f, in_f), dtype, case["wmag"], seed=seed, device=device))
        if case["bias"]:
            base.bias.copy_(make_tensor((out_f,), dtype, seed=seed + 1, device=device))
    first = case["adapters"][0]
    init = INIT_RANDOM
    layer = miss_ext.MissLinear(base, r=first[1], mini_r=first[2], init_weights=init[first[0]], miss_dropout=first[3])
    names = ["default"]
    for k, (kind, rr, m, p) in enumerate(case["adapters"][1:], 1):
        layer.update_layer(f"a{k}", rr, mini_r=m, init_weights=init[kind], miss_dropout=p)
        names.append(f"a{k}")
    _set_active(layer, names)
    block_dtype = case["block_dtype"] or dtype
    layer.miss_block.to(block_dtype)
    with torch.no_grad():
        for k, name in enumerate(names):
            blk = layer.miss_block[name]
            assert blk.dtype == block_dtype
            blk.copy_(make_tensor(blk.shape, block_dtype, case["bmag"], seed=seed + 10 + k, device=device))
    layer.train(case["training"])
    if case["weight_grad"]:
        base.weight.requires_grad_(True)  # BAT supports a trainable base weight
    x = make_tensor((*case["lead"], case["n"], in_f), dtype, case["xmag"], case["layout"], seed + 5, device=device)
    x = x.detach().requires_grad_(True)

    torch.manual_seed(seed)
    y = layer(x)
    # The layer draws one dropout seed per additive adapter with dropout, in order, from
    # torch's default generator: replay them.
    torch.manual_seed(seed)
    seeds = [dropout_seed() for (k, _, _, p) in case["adapters"] if k != "bat" and p > 0 and case["training"]]

    adapters = [(kind, layer.miss_block[n], p if case["training"] else 0.0)
                for n, (kind, _, _, p) in zip(names, case["adapters"])]
    params = [x] + [layer.miss_block[n] for n in names] + ([base.weight] if case["weight_grad"] else [])

    def run_ref(absval):
        cast = (lambda t: t.detach().double().abs()) if absval else (lambda t: t.detach().double())
        xr = cast(x).requires_grad_(True)
        wr = cast(base.weight).requires_grad_(case["weight_grad"])
        br = cast(base.bias) if case["bias"] else None
        blocks = {n: cast(layer.miss_block[n]).requires_grad_(True) for n in names}
        ad = [(kind, blocks[n], p) for (kind, _, p), n in zip(adapters, names)]
        yr = _reference_layer(xr, wr, br, ad, seeds)
        return yr, [xr] + [blocks[n] for n in names] + ([wr] if case["weight_grad"] else [])

    expected, rparams = run_ref(False)
    bound, aparams = run_ref(True)
    td = _coarser(dtype, block_dtype)  # the adapter branch runs in the blocks' dtype
    assume(_finite_bound(bound, td))
    assert y.shape == expected.shape and y.dtype == dtype
    assert_close(y, expected, dtype=td, scale=_scale(bound, td), msg="MissLinear forward")
    if y.numel() == 0:
        return
    g = make_tensor(y.shape, dtype, seed=seed + 3, device=device)
    kg = torch.autograd.grad(y, params, g, allow_unused=True)
    rg = torch.autograd.grad(expected, rparams, g.double(), allow_unused=True)
    ag = torch.autograd.grad(bound, aparams, g.double().abs(), allow_unused=True)
    for i, (k, r_, a, p) in enumerate(zip(kg, rg, ag, params)):
        r_ = torch.zeros_like(p, dtype=torch.float64) if r_ is None else r_
        a = torch.zeros_like(r_) if a is None else a
        k = torch.zeros_like(p) if k is None else k
        gd = _coarser(td, k.dtype)
        assume(_finite_bound(a, gd))
        assert_close(k, r_, dtype=gd, scale=_scale(a, gd), msg=f"MissLinear grad of param {i}")


def test_profile_is_selectable():
    """The default profile is the fast ci one; the env var switches to thorough."""
    import os

    from _strategies import PROFILE

    assert PROFILE == os.environ.get("MISS_EXT_HYPOTHESIS_PROFILE", "ci")
    assert TOLERANCES  # the per-dtype table is conftest's, not redefined here
