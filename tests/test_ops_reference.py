"""Every operator against miss_ext.reference, per device and dtype, on awkward layouts."""

import pytest
import torch

from miss_ext import functional as MF
from miss_ext import reference as R

from conftest import DEVICES, assert_close

ops = torch.ops.miss_ext
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (leading dims, in_features, r): batch dims, in % r != 0, r = 1, r = in, r > in (padding).
BLOCKSUM_CASES = [
    ((4,), 16, 4),
    ((2, 3), 10, 4),
    ((5,), 7, 1),
    ((3,), 12, 12),
    ((2, 2, 2), 9, 16),
    ((0,), 8, 4),
    ((6,), 130, 64),
]


def _noncontig(t: torch.Tensor, how: str) -> torch.Tensor:
    """Same values as ``t`` in a non-contiguous layout."""
    if how == "contiguous":
        return t
    if how == "transposed":  # features not last in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "sliced":  # every other row of a bigger buffer, columns offset
        big = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
        big = torch.cat([big, big], dim=0) if t.dim() > 1 else big
        view = big[::2, 1 : 1 + t.shape[-1]] if t.dim() > 1 else big[1 : 1 + t.shape[-1]]
        view.copy_(t)
        return view
    raise ValueError(how)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,features,r", BLOCKSUM_CASES)
def test_blocksum_and_tile(device, dtype, lead, features, r):
    x = torch.randn(*lead, features, dtype=torch.float64).to(device)
    scale = max(1.0, (features / r) ** 0.5)
    out = ops.blocksum(x.to(dtype), r)
    assert out.shape == (*lead, r) and out.dtype == dtype
    assert_close(out, R.blocksum(x.to(dtype).double(), r), dtype, scale)
    s = torch.randn(*lead, r, dtype=torch.float64).to(device)
    t = ops.tile(s.to(dtype), features)
    assert t.shape == (*lead, features)
    assert_close(t, R.tile(s.to(dtype).double(), features), dtype)
    base = torch.randn(*lead, features, dtype=torch.float64).to(device)
    ta = ops.tile_add(base.to(dtype), s.to(dtype))
    assert_close(ta, R.tile_add(base.to(dtype).double(), s.to(dtype).double()), dtype, 2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["transposed", "sliced"])
def test_blocksum_noncontiguous(device, how):
    x = torch.randn(6, 20, device=device)
    xs = _noncontig(x, how)
    assert not xs.is_contiguous()
    torch.testing.assert_close(ops.blocksum(xs, 8), R.blocksum(x, 8))
    # An expanded (stride 0) batch dimension.
    row = torch.randn(1, 20, device=device).expand(5, 20)
    torch.testing.assert_close(ops.blocksum(row, 8), R.blocksum(row.contiguous(), 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f,in_f,r", [(8, 12, 4), (6, 6, 1), (16, 16, 16), (128, 192, 64), (64, 1030, 2)])
def test_bat_ops(device, dtype, out_f, in_f, r):
    w = torch.randn(out_f, in_f, dtype=torch.float64, device=device).to(dtype).double()
    b = (0.1 * torch.randn(out_f // r, r, r, dtype=torch.float64, device=device)).to(dtype).double()
    g = torch.randn(out_f, in_f, dtype=torch.float64, device=device).to(dtype).double()
    s = max(1.0, r**0.5)
    assert_close(ops.bat_transform(w.to(dtype), b.to(dtype)), R.bat_transform(w, b), dtype, s)
    assert_close(ops.bat_weight_grad(g.to(dtype), b.to(dtype)), R.bat_weight_grad(g, b), dtype, s)
    # dB sums over in/r blocks of r x r products: its magnitude grows like sqrt(in * r).
    assert_close(ops.bat_block_grad(g.to(dtype), w.to(dtype), r), R.bat_block_grad(g, w, r), dtype, (in_f * r) ** 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bat_transform_weight_dtype_differs(device, dtype):
    """The transform runs in the block's dtype, whatever the weight's (as PEFT does)."""
    w = torch.randn(8, 8, device=device)
    b = 0.1 * torch.randn(2, 4, 4, device=device, dtype=dtype)
    out = ops.bat_transform(w.to(torch.float16), b)
    assert out.dtype == dtype
    assert_close(out, R.bat_transform(w.to(torch.float16).double(), b.double()), dtype, 2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bat_linear_chain(device, dtype):
    x = torch.randn(3, 5, 16, device=device, dtype=dtype)
    w = torch.randn(8, 16, device=device, dtype=dtype)
    bias = torch.randn(8, device=device, dtype=dtype)
    blocks = [0.1 * torch.randn(2, 4, 4, device=device, dtype=dtype), 0.1 * torch.randn(4, 2, 2, device=device, dtype=dtype)]
    out = MF.bat_linear(x, w, bias, blocks)
    ref = R.bat_linear(x.double(), w.double(), bias.double(), [b.double() for b in blocks])
    assert_close(out, ref, dtype, 4.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("out_f,in_f,r", [(8, 12, 4), (64, 64, 16), (6, 6, 6)])
def test_bat_unmerge_inverts_transform(device, dtype, out_f, in_f, r):
    w = torch.randn(out_f, in_f, device=device, dtype=dtype)
    b = 0.1 * torch.randn(out_f // r, r, r, device=device, dtype=dtype)
    merged = ops.bat_transform(w, b)
    back = ops.bat_unmerge(merged, b)
    assert back.dtype == dtype
    assert_close(back, R.bat_unmerge(merged.double(), b.double()), dtype, 2.0)
    assert_close(back, w, dtype, 4.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_f,in_f,r,m", [(8, 12, 4, 8), (8, 10, 4, 8), (12, 9, 3, 4), (6, 5, 5, 6), (16, 16, 1, 2)])
def test_miss_merge(device, dtype, out_f, in_f, r, m):
    w = torch.randn(out_f, in_f, device=device, dtype=dtype)
    block = torch.randn(r, m, device=device, dtype=torch.float32)
    for alpha in (1.0, -1.0):
        out = ops.miss_merge(w, block, alpha)
        assert out.dtype == dtype
        assert_close(out, R.miss_merge(w.double(), block.double(), alpha), dtype, 2.0)
    dw = MF.miss_delta_weight(block.double(), out_f, in_f)
    torch.testing.assert_close(dw, R.miss_delta_weight(block.double(), out_f, in_f))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_functional_variants_match_reference(device, dtype):
    x = torch.randn(2, 7, 20, device=device, dtype=dtype)
    base = torch.randn(2, 7, 12, device=device, dtype=dtype)
    d = torch.randn(8, 12, device=device, dtype=dtype)
    dm = torch.randn(8, 4, device=device, dtype=dtype)
    assert_close(MF.miss_forward(x, base, d), R.miss_forward(x.double(), base.double(), d.double()), dtype, 8.0)
    assert_close(MF.mini_forward(x, base, dm), R.mini_forward(x.double(), base.double(), dm.double()), dtype, 8.0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    x = torch.randn(0, 16, device=device)
    assert ops.blocksum(x, 4).shape == (0, 4)
    assert ops.tile(torch.randn(0, 4, device=device), 16).shape == (0, 16)
    z = torch.randn(3, 0, device=device)
    assert torch.equal(ops.blocksum(z, 4), torch.zeros(3, 4, device=device))
    w = torch.randn(8, 8, device=device)
    assert ops.bat_linear(torch.randn(0, 8, device=device), w, None, [torch.zeros(2, 4, 4, device=device)]).shape == (0, 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [12, 4])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fused_linear_matches_unfused(device, dtype, m, p):
    x = torch.randn(2, 7, 20, device=device, dtype=dtype)
    w = torch.randn(12, 20, device=device, dtype=dtype)
    bias = torch.randn(12, device=device, dtype=dtype)
    block = torch.randn(8, m, device=device, dtype=dtype)
    seed = MF.dropout_seed()
    x.requires_grad_()
    block.requires_grad_()
    y = MF.miss_linear(x, w, bias, block, p, True, seed)
    x64 = x.detach().double().requires_grad_()
    b64 = block.detach().double().requires_grad_()
    base = torch.nn.functional.linear(x64, w.double(), bias.double())
    fn = R.miss_forward if m == 12 else R.mini_forward
    ref = fn(x64, base, b64, p, seed)
    assert_close(y, ref, dtype, 10.0)
    g = torch.randn_like(ref)
    y.backward(g.to(dtype))
    ref.backward(g)
    assert_close(x.grad, x64.grad, dtype, 10.0)
    assert_close(block.grad, b64.grad, dtype, 30.0)


# ---------------------------------------------------------------- > 2^31 elements


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.slow
@pytest.mark.skipif(_mem_available_gb() < 12, reason="needs >= 12 GB MemAvailable for a 4.3 GB float16 tensor")
def test_indexing_past_2_31_elements():
    """blocksum over an (N, in) float16 input of 2^31 + 2^16 elements, and tile producing one.

    x[n, k] = a(n) + b(k) with a(n) small integers that identify the row and b(k) quarter steps
    (exact in float16), written in one broadcast pass. Then
    S[n, c] = cnt(c) * a(n) + sum_j b(j*r + c), cheap to compute independently; rows past
    2^31 / in (elements past 2^31) have their own a(n), so a 32-bit index overflow shows.
    """
    n_rows, in_f, r = 2**15 + 1, 2**16, 4096  # 2^31 + 2^16 elements, cnt(c) = 16
    assert n_rows * in_f > 2**31
    a = ((torch.arange(n_rows) * 37) % 201 - 100).to(torch.float16)  # integers in [-100, 100]
    b = (((torch.arange(in_f) * 7) % 5 - 2) * 0.25).to(torch.float16)  # {-0.5, ..., 0.5}
    x = torch.empty(n_rows, in_f, dtype=torch.float16)
    torch.add(a[:, None], b[None, :], out=x)  # one broadcast pass: no second big tensor
    s = ops.blocksum(x, r)
    del x
    cnt = in_f // r
    expected = cnt * a.double()[:, None] + b.double().view(cnt, r).sum(0)[None, :]
    assert_close(s, expected, dtype=torch.float16, scale=float(expected.abs().max()))
    # The last rows (all elements past 2^31) on their own, exactly.
    tail = slice(2**31 // in_f, n_rows)
    assert torch.equal(s[tail].double(), expected[tail].to(torch.float16).double())

    # tile writing past 2^31: out[n, k] = s[n, k % r]; check rows at both ends and past 2^31.
    small = a[:, None].expand(n_rows, r).contiguous() + b[:r]
    out = ops.tile(small, in_f)
    assert out.shape == (n_rows, in_f) and out.numel() > 2**31
    for row in (0, 1, 2**31 // in_f - 1, 2**31 // in_f, n_rows - 1):
        assert torch.equal(out[row], small[row].repeat(cnt)), row
    assert torch.equal(out[-1, -r:], small[-1])
