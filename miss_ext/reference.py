"""Pure-PyTorch reference of every miss_ext operator and MiSS variant, written from
docs/MATH.md for clarity, not speed. Tests and benchmarks compare the kernels with it.
Everything here is differentiable through plain autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Philox4x32-10 constants (csrc/common/philox.h).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor):
    """hi and lo 32-bit words of a * b for a constant a < 2^32 and int64 b < 2^32, without
    overflowing int64 (b is split into 16-bit halves)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo  # < 2^48
    p_hi = a * b_hi  # < 2^48, weight 2^16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi & _MASK32, lo


def philox4x32_10(seed: int, block: torch.Tensor) -> torch.Tensor:
    """The four 32-bit words (as int64, shape (..., 4)) of Philox4x32-10 for counters
    ``(lo32(block), hi32(block), 0, 0)`` under key ``(lo32(seed), hi32(seed))``."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, seed >> 32
    c0, c1 = block & _MASK32, (block >> 32) & _MASK32
    c2 = torch.zeros_like(block)
    c3 = torch.zeros_like(block)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def dropout_threshold(p: float) -> int:
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return 1 << 32
    return int(p * 4294967296.0)


def dropout_mask(seed: int | torch.Tensor, shape: Sequence[int], p: float) -> torch.Tensor:
    """Keep mask (bool, ``shape``) of the fused dropout: element with row-major index ``idx``
    is kept iff word ``idx % 4`` of ``philox4x32_10(seed, idx // 4)`` >= ``dropout_threshold(p)``."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.item())
    numel = 1
    for s in shape:
        numel *= s
    idx = torch.arange(numel, dtype=torch.int64)
    words = philox4x32_10(seed, idx // 4)
    word = words.gather(1, (idx % 4).unsqueeze(1)).squeeze(1)
    return (word >= dropout_threshold(p)).reshape(tuple(shape))


def apply_dropout(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    if p <= 0.0:
        return x
    keep = dropout_mask(seed, x.shape, p).to(x.device)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return x * keep.to(x.dtype) * scale


# ---------------------------------------------------------------- block sum family


def blocksum(x: torch.Tensor, r: int) -> torch.Tensor:
    """``S[..., c] = sum_j xp[..., j*r + c]`` with ``xp`` = ``x`` zero-padded to a multiple of r."""
    features = x.shape[-1]
    pad = (-features) % r
    xp = F.pad(x, (0, pad))
    return xp.reshape(*x.shape[:-1], (features + pad) // r, r).sum(-2)


def tile(s: torch.Tensor, features: int) -> torch.Tensor:
    """``out[..., k] = s[..., k % r]`` for ``k < features``."""
    r = s.shape[-1]
    reps = -(-features // r) if features else 0
    return s.repeat(*([1] * (s.dim() - 1)), reps)[..., :features]


def blocksum_dropout(x: torch.Tensor, r: int, p: float, seed) -> torch.Tensor:
    return blocksum(apply_dropout(x, p, seed), r)


def tile_dropout(s: torch.Tensor, features: int, p: float, seed) -> torch.Tensor:
    return apply_dropout(tile(s, features), p, seed)


def tile_add(base: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return base + tile(s, base.shape[-1])


# ---------------------------------------------------------------- standard and mini


def miss_forward(x, base_out, block, dropout_p: float = 0.0, seed=None):
    """Standard MiSS (docs/MATH.md section 1): ``base_out + blocksum_r(dropout(x)) @ block``."""
    return base_out + blocksum(apply_dropout(x, dropout_p, seed), block.shape[0]) @ block


def mini_block_expand(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """docs/MATH.md section 2: the effective ``(r, out)`` block, ``D[c, o] = Dm[c, o mod m]``."""
    return block.repeat(1, out_features // block.shape[1])


def mini_forward(x, base_out, block, dropout_p: float = 0.0, seed=None):
    return miss_forward(x, base_out, mini_block_expand(block, base_out.shape[-1]), dropout_p, seed)


def miss_delta_weight(block: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """docs/MATH.md section 1/6: ``dW[o, k] = D[k mod r, o]`` (mini: ``D`` from section 2)."""
    d = mini_block_expand(block, out_features)
    return tile(d.t(), in_features)


def miss_merge(weight: torch.Tensor, block: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    dw = miss_delta_weight(block.to(acc), weight.shape[0], weight.shape[1])
    return (weight.to(acc) + alpha * dw).to(weight.dtype)


# ---------------------------------------------------------------- BAT


def _blocks4(w: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) -> (out/r, in/r, r, r) with [i, j] = W_ij (a permuted copy: fine here)."""
    out_f, in_f = w.shape
    return w.reshape(out_f // r, r, in_f // r, r).permute(0, 2, 1, 3)


def _unblocks4(b4: torch.Tensor) -> torch.Tensor:
    nb, nj, r, _ = b4.shape
    return b4.permute(0, 2, 1, 3).reshape(nb * r, nj * r)


def bat_transform(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """docs/MATH.md section 3: ``W'_ij = W_ij + W_ij B_i + B_i``, in the block's dtype."""
    r = block.shape[-1]
    w4 = _blocks4(weight.to(block.dtype), r)
    b = block.unsqueeze(1)
    return _unblocks4(w4 + w4 @ b + b)


def bat_block_grad(grad: torch.Tensor, weight: torch.Tensor, r: int) -> torch.Tensor:
    """``dL/dB_i = sum_j (W_ij + I)^T G_ij``."""
    g4 = _blocks4(grad, r)
    w4 = _blocks4(weight.to(grad.dtype), r)
    return (w4.transpose(-1, -2) @ g4 + g4).sum(1)


def bat_weight_grad(grad: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``dL/dW_ij = G_ij (I + B_i)^T``."""
    r = block.shape[-1]
    g4 = _blocks4(grad, r)
    b = block.to(grad.dtype).unsqueeze(1)
    return _unblocks4(g4 + g4 @ b.transpose(-1, -2))


def bat_linear(x, weight, bias: Optional[torch.Tensor], blocks) -> torch.Tensor:
    """docs/MATH.md sections 3 and 5: ``x W'^T + b`` with each block's transform applied in turn."""
    if isinstance(blocks, torch.Tensor):
        blocks = [blocks]
    w = weight
    for b in blocks:
        w = bat_transform(w, b)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def bat_unmerge(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """docs/MATH.md section 6: ``W_ij = (W'_ij - B_i)(I + B_i)^-1`` by a solve in fp32 (fp64)."""
    r = block.shape[-1]
    acc = torch.float64 if torch.float64 in (weight.dtype, block.dtype) else torch.float32
    b = block.to(acc).unsqueeze(1)
    a = b + torch.eye(r, dtype=acc, device=block.device)
    y = _blocks4(weight.to(acc), r) - b
    return _unblocks4(torch.linalg.solve(a, y, left=False)).to(weight.dtype)
