"""The per-operator case table: everything the operator tests need to know about each
``torch.ops.miss_ext`` operator, in one place.

``OPS[name]`` holds, for one operator:

* ``samples(device)``: argument tuples for ``torch.library.opcheck`` (schema, fake kernel,
  autograd registration, AOT dispatch): tests/test_ops_opcheck.py;
* ``gradcheck``: float64 gradcheck cases, each ``make(device)`` giving ``(fn, inputs)`` pairs
  (usually every subset of the inputs requiring grad): tests/test_ops_gradcheck.py;
* ``reference``: the float64 formula with the operator's own signature (tests/_op_reference.py),
  against which ``parity`` cases run on the CPU; on CUDA the same cases compare the CUDA kernel
  with the CPU kernel: tests/test_ops_parity.py (the GPU script bench/gpu_check.sh runs it);
* ``bad``: bad calls with the substrings their message must hold; the real kernel must raise,
  leave its inputs' bits unchanged, and the fake kernel (FakeTensor) must raise the same
  message: tests/test_bad_input.py; ``bad_device``: two-tensor calls with one tensor on another
  device (meta, or CUDA), checked there too;
* ``threads``: calls on the shared large inputs of ``thread_inputs`` whose bits must not depend
  on the run or the intra-op thread count (``vendor_gemm``: ops ending in the frozen layer's
  vendor GEMM, held to that GEMM's own behaviour): tests/test_threads.py.

A new operator gets its entry here; tests/test_ops_opcheck.py fails until it has one, with
samples, gradcheck, parity and bad-input cases.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

import _op_reference as REF

ops = torch.ops.miss_ext
f64 = torch.float64
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.bfloat16, torch.float16)
SEED = torch.tensor([7], dtype=torch.int64)
PARITY_SEED = torch.tensor([1234], dtype=torch.long)


@dataclass
class Grad:
    id: str
    make: Callable  # device -> [(fn, inputs)], each checked with gradcheck


@dataclass
class Parity:
    id: str
    make: Callable  # dtype -> the op's arguments, CPU tensors
    run: Callable  # (implementation namespace, *arguments) -> one tensor
    dtypes: tuple = FLOAT_DTYPES
    tol_dtype: Callable = lambda dtype: dtype  # noqa: E731  (whose tolerance the result gets)
    exact: bool = False  # bit-equal, not within a tolerance


@dataclass
class Bad:
    id: str
    make: Callable  # () -> input tensors
    call: Callable  # (*inputs) -> raises
    needles: list
    exc: type = RuntimeError
    fake: bool = True  # False: the fault is in the values, which a fake kernel never sees
    # False: the rule names a device (the seed's), so the same call on meta tensors is another call
    meta: bool = True


@dataclass
class BadDevice:
    id: str
    make: Callable  # other device -> input tensors, one of them on that device
    call: Callable
    names: list  # the arguments the message must name


@dataclass
class Threads:
    id: str
    run: Callable  # thread_inputs(dtype) -> tensor
    vendor_gemm: tuple | None = None  # (m, k, n) of the vendor GEMM the op ends in


@dataclass
class OpCases:
    samples: Callable
    gradcheck: list
    parity: list
    bad: list
    bad_device: list = field(default_factory=list)
    threads: list = field(default_factory=list)


# ---------------------------------------------------------------- gradcheck helpers


def rand64(*shape, device, scale=1.0):
    return (scale * torch.randn(*shape, dtype=f64, device=device)).requires_grad_()


def subsets(n):
    """Every non-empty subset of n input positions."""
    return [s for k in range(1, n + 1) for s in itertools.combinations(range(n), k)]


def with_grad_on(tensors, subset):
    return [t.detach().requires_grad_(i in subset) for i, t in enumerate(tensors)]


def every_subset(fn, tensors):
    return [(fn, with_grad_on(tensors, s)) for s in subsets(len(tensors))]


def _shape_id(*parts):
    return "-".join(str(p).replace(" ", "") for p in parts)


# ---------------------------------------------------------------- shared sample tensors

W8, B2 = (lambda: torch.randn(8, 8)), (lambda: torch.randn(2, 4, 4) * 0.1)
W12 = lambda: torch.randn(12, 8)  # noqa: E731


def _samples(device):
    """opcheck inputs for every operator, built from one set of tensors per device."""
    f = dict(device=device)
    seed = torch.tensor([99], dtype=torch.int64)
    x = torch.randn(2, 3, 10, **f, requires_grad=True)
    s = torch.randn(2, 3, 4, **f, requires_grad=True)
    w = torch.randn(8, 12, **f, requires_grad=True)
    b = (0.1 * torch.randn(2, 4, 4, **f)).requires_grad_()
    g = torch.randn(8, 12, **f, requires_grad=True)
    xb = torch.randn(5, 12, **f, requires_grad=True)
    bias = torch.randn(8, **f, requires_grad=True)
    # Mixed precision: bfloat16 activations/weights with float32 blocks.
    bf = dict(device=device, dtype=torch.bfloat16)
    xh = torch.randn(2, 3, 10, **bf, requires_grad=True)
    wh = torch.randn(8, 12, **bf)
    xbh = torch.randn(5, 12, **bf, requires_grad=True)
    gh = torch.randn(5, 8, **bf, requires_grad=True)
    return {
        "blocksum": [(x, 4), (x.detach(), 16), (xh, 4, torch.float32)],
        "blocksum_dropout": [(x, 4, 0.3, seed), (xh, 4, 0.3, seed, torch.float32)],
        "tile": [(s, 10), (s.detach(), 3), (s, 10, torch.bfloat16)],
        "tile_dropout": [(s, 10, 0.5, seed), (s, 10, 0.5, seed, torch.float16)],
        "tile_add": [(x, s), (xh, s)],
        "bat_transform": [(w, b), (w.detach(), b), (wh, b, torch.bfloat16)],
        "bat_block_grad": [(g, w, 4)],
        "bat_input_grad": [(torch.randn(5, 8, **f, requires_grad=True), w, [b]),
                           (torch.randn(5, 8, **f), w.detach(), [b, b]),
                           (gh, wh, [b]), (gh.detach(), wh, [b, b]), (gh, wh, [b], True)],
        "bat_io_block_grad": [(torch.randn(5, 8, **f, requires_grad=True), xb, w, 4), (gh, xbh, wh, 4),
                              (gh.detach(), xbh.detach(), wh, 2, torch.float64), (gh, xbh, wh, 4, None, True)],
        "bat_weight_grad": [(g, b)],
        "bat_linear": [(xb, w, bias, [b]), (xb, w.detach(), None, [b, b]),
                       (xbh, wh, bias.detach().bfloat16(), [b]), (xbh, wh, None, [b, b]),
                       (xbh, wh, None, [b], True)],  # half_products: autocast's precision
        "bat_unmerge": [(w, b)],
        "miss_linear": [
            (xb, w.detach(), bias, torch.randn(4, 8, **f, requires_grad=True), 0.0, None),
            (xb, w, None, torch.randn(4, 2, **f, requires_grad=True), 0.25, seed),
            (xbh, wh, None, torch.randn(4, 8, **f, requires_grad=True), 0.0, None),
            (xbh, wh, bias.detach().bfloat16(), torch.randn(4, 2, **f, requires_grad=True), 0.25, seed),
            # round_base: autocast's path, the block a copy in x's half type
            (xbh, wh, bias.detach().bfloat16(), torch.randn(4, 8, **f).bfloat16().requires_grad_(), 0.0, None, True),
            (xbh, wh, None, torch.randn(4, 2, **f).bfloat16().requires_grad_(), 0.0, None, True),
        ],
        "miss_add_product": [(torch.randn(5, 8, **f, requires_grad=True), torch.randn(5, 4, **f, requires_grad=True),
                              torch.randn(4, 8, **f, requires_grad=True)),
                             (gh, torch.randn(5, 4, **f, requires_grad=True), torch.randn(4, 8, **f, requires_grad=True))],
        "miss_block_grads": [(torch.randn(5, 8, **f, requires_grad=True), torch.randn(5, 4, **f, requires_grad=True),
                              torch.randn(4, 8, **f, requires_grad=True)),
                             (gh, torch.randn(5, 4, **f), torch.randn(4, 8, **f, requires_grad=True))],
        "miss_merge": [(w, torch.randn(4, 8, **f, requires_grad=True), 1.0), (w, torch.randn(3, 2, **f), -1.0)],
        # Mixed-adapter rows: a standard and a mini block, index -1 for base rows.
        "miss_gathered_product": [
            (torch.randn(2, 3, 8, **f, requires_grad=True), torch.randn(2, 3, 4, **f, requires_grad=True),
             [torch.randn(4, 8, **f, requires_grad=True), torch.randn(4, 2, **f, requires_grad=True)],
             torch.tensor([[0, 1, -1], [1, 1, 0]], device=device)),
            (torch.randn(5, 8, **bf), torch.randn(5, 4, **f, requires_grad=True),
             [torch.randn(4, 8, **f, requires_grad=True)], torch.tensor([0, -1, 0, 0, -1], device=device)),
        ],
    }


def _samples_of(name):
    return lambda device: _samples(device)[name]


# ---------------------------------------------------------------- gradcheck cases

# (shape, r): batch dims, in % r != 0, r = 1, r = in, r > in.
_BLOCKSUM_GRAD_SHAPES = [((3, 8), 4), ((2, 3, 10), 4), ((4, 5), 1), ((3, 6), 6), ((2, 5), 8)]
_DROPOUT_PS = [0.0, 0.3, 0.9]
_BAT_GRAD_SHAPES = [(8, 12, 4), (6, 6, 1), (4, 4, 4)]
_BAT_IO_SHAPES = [((5,), 8, 12, 4), ((2, 3), 4, 4, 4), ((4,), 6, 3, 3)]
_PRODUCT_SHAPES = [((5,), 4, 8), ((2, 3), 3, 5), ((4,), 1, 2)]
_UNMERGE_SHAPES = [(8, 12, 4), (4, 4, 4), (6, 3, 3)]
_MERGE_SHAPES = [(8, 12, 4, 8), (8, 10, 4, 8), (6, 5, 5, 3), (4, 4, 1, 4)]


def _grad_blocksum(shape, r):
    return lambda d: [(lambda t: ops.blocksum(t, r), (rand64(*shape, device=d),))]


def _grad_blocksum_noncontiguous(d):
    x = torch.randn(10, 6, dtype=f64, device=d).t().requires_grad_()  # (6, 10), stride (1, 6)
    return [(lambda t: ops.blocksum(t, 4), (x,))]


def _grad_tile(shape, r):
    return lambda d: [(lambda t: ops.tile(t, shape[-1]), (rand64(*shape[:-1], r, device=d),))]


def _grad_tile_add(shape, r):
    def make(d):
        base, s = rand64(*shape, device=d), rand64(*shape[:-1], r, device=d)
        return [(lambda b, t: ops.tile_add(b, t), (base, s))]
    return make


def _grad_blocksum_dropout(p):
    return lambda d: [(lambda t: ops.blocksum_dropout(t, 4, p, torch.tensor([12345])), (rand64(3, 2, 10, device=d),))]


def _grad_tile_dropout(p):
    return lambda d: [(lambda t: ops.tile_dropout(t, 10, p, torch.tensor([12345])), (rand64(3, 2, 4, device=d),))]


def _grad_bat_pair(which, out_f, in_f, r):
    def make(d):
        w = rand64(out_f, in_f, device=d)
        b = rand64(out_f // r, r, r, device=d, scale=0.3)
        g = rand64(out_f, in_f, device=d)
        if which == "bat_transform":
            return every_subset(lambda w_, b_: ops.bat_transform(w_, b_), [w, b])
        if which == "bat_block_grad":
            return every_subset(lambda g_, w_: ops.bat_block_grad(g_, w_, r), [g, w])
        if which == "bat_weight_grad":
            return every_subset(lambda g_, b_: ops.bat_weight_grad(g_, b_), [g, b])
        if which == "bat_unmerge":
            b = rand64(out_f // r, r, r, device=d, scale=0.2)
            return every_subset(lambda w_, b_: ops.bat_unmerge(w_, b_), [w, b])
        raise ValueError(which)
    return make


def _grad_bat_io_block_grad(lead, out_f, in_f, r):
    def make(d):
        g, x, w = rand64(*lead, out_f, device=d), rand64(*lead, in_f, device=d), rand64(out_f, in_f, device=d)
        return every_subset(lambda g_, x_, w_: ops.bat_io_block_grad(g_, x_, w_, r), [g, x, w])
    return make


def _grad_bat_input_grad(lead, out_f, in_f, r):
    def make(d):
        g, w = rand64(*lead, out_f, device=d), rand64(out_f, in_f, device=d)
        b = rand64(out_f // r, r, r, device=d, scale=0.3)
        cases = every_subset(lambda g_, w_, b_: ops.bat_input_grad(g_, w_, [b_]), [g, w, b])
        b2 = rand64(out_f // r, r, r, device=d, scale=0.3)
        return cases + [(lambda g_, p, q: ops.bat_input_grad(g_, w.detach(), [p, q]), (g, b, b2))]
    return make


def _grad_product(which, lead, r, out_f):
    def make(d):
        base, s = rand64(*lead, out_f, device=d), rand64(*lead, r, device=d)
        block, grad = rand64(r, out_f, device=d), rand64(*lead, out_f, device=d)
        if which == "miss_add_product":
            return every_subset(lambda a, b, c: ops.miss_add_product(a, b, c), [base, s, block])
        return every_subset(lambda a, b, c: ops.miss_block_grads(a, b, c), [grad, s, block])
    return make


def _grad_miss_merge(out_f, in_f, r, m):
    def make(d):
        w, block = rand64(out_f, in_f, device=d), rand64(r, m, device=d)
        return [case for alpha in (1.0, -1.0)
                for case in every_subset(lambda w_, b_, a=alpha: ops.miss_merge(w_, b_, a), [w, block])]
    return make


def _grad_bat_linear(d):
    x, w, bias = rand64(3, 8, device=d), rand64(8, 8, device=d), rand64(8, device=d)
    b1, b2 = rand64(2, 4, 4, device=d, scale=0.3), rand64(4, 2, 2, device=d, scale=0.3)
    # Every subset of the inputs is checked through the functional form (test_ops_gradcheck.py).
    return [(lambda a, w_, c, b_: ops.bat_linear(a, w_, c, [b_]), (x, w, bias, b1)),
            (lambda a, p, q: ops.bat_linear(a, w.detach(), None, [p, q]), (x, b1, b2))]


def _grad_miss_linear(m, p, round_base=False):
    def make(d):
        x, w, bias, block = rand64(2, 3, 10, device=d), rand64(8, 10, device=d), rand64(8, device=d), rand64(4, m, device=d)
        seed = torch.tensor([3]) if p > 0 else None
        return [(lambda a, w_, c, b_: ops.miss_linear(a, w_, c, b_, p, seed, round_base), (x, w, bias, block))]
    return make


def _grad_gathered(d):
    base, s = rand64(2, 3, 8, device=d), rand64(2, 3, 4, device=d)
    blocks = [rand64(4, 8, device=d), rand64(4, 2, device=d)]
    index = torch.tensor([[0, 1, -1], [1, 1, 0]], device=d)
    return [(lambda a, b, p, q: ops.miss_gathered_product(a, b, [p, q], index), (base, s, *blocks))]


# ---------------------------------------------------------------- parity cases
# CUDA against the CPU kernels (and on the CPU, the kernels against the float64 reference) on
# every kernel path, including the gaps the CPU emulation found (tests/cuda_emu/) and the
# mixed-precision paths (a bf16/fp16 base with fp32 blocks).

_WIDE = lambda dtype: torch.float32  # noqa: E731  (mixed cases whose result is in the wide dtype)
# blocksum: tiny r, odd r, r > in, in % r != 0, long rows (split path), r == in, r = 3.
_BLOCKSUM_PARITY = [(7, 64, 4), (3, 100, 7), (5, 33, 64), (3, 8, 1), (2, 60000, 16), (257, 4096, 64), (4, 512, 512),
                    (9, 1000, 3)]
_TILE_PARITY = [(7, 4, 64), (3, 7, 100), (5, 64, 33), (3, 1, 8), (129, 64, 4096), (2, 16, 60000)]
# BAT: r = 1, odd r, small-r path, r in (32, 64) not a multiple of 16, WMMA sizes, r == in; split
# rows on the small and 32-wide tiled block-grad paths (48, 4096, 16), (64, 2048, 32); WMMA with
# several tiles and splits (160, 1280, 80).
_BAT_PARITY = [(8, 12, 1), (48, 96, 3), (128, 256, 16), (96, 192, 32), (240, 480, 40), (288, 576, 48), (256, 512, 64),
               (512, 1024, 128), (128, 128, 128), (200, 300, 100), (64, 8192, 64), (48, 4096, 16), (64, 2048, 32),
               (160, 1280, 80)]
_BAT_MIXED_PARITY = [(128, 256, 16), (96, 192, 48), (256, 512, 64)]
# Weights at an offset, sliced after the move. torch.randn(97, 192)[1:] starts 384 bytes in,
# 16-byte aligned, so it still takes WMMA; one element (2 bytes) in forces the fallback.
_OFFSET_WEIGHTS = {
    "row-sliced": (lambda dtype: torch.randn(97, 192, dtype=dtype), lambda t: t[1:]),
    "misaligned": (lambda dtype: torch.randn(96 * 192 + 1, dtype=dtype), lambda t: t[1:].view(96, 192)),
}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocksum_parity():
    cases = []
    for n, fin, r in _BLOCKSUM_PARITY:
        cases.append(Parity(_shape_id(n, fin, r), lambda dt, n=n, fin=fin: (torch.randn(n, fin, dtype=dt),),
                            lambda o, x, r=r: o.blocksum(x, r)))
        # Sliced after the move: .cuda() of a sliced tensor would come back contiguous.
        cases.append(Parity(_shape_id("strided", n, fin, r), lambda dt, n=n, fin=fin: (torch.randn(n, fin + 5, dtype=dt),),
                            lambda o, w, fin=fin, r=r: o.blocksum(w[:, 2:fin + 2], r)))
    # The wide-column path (r-blocks wider than a row's threads) with split rows.
    cases.append(Parity("wide-split", lambda dt: (torch.randn(1, 16384, dtype=dt),), lambda o, x: o.blocksum(x, 1024)))
    for n, fin, r in [(7, 64, 4), (3, 100, 7), (2, 60000, 16), (1, 16384, 1024)]:
        cases.append(Parity(_shape_id("mixed", n, fin, r), lambda dt, n=n, fin=fin: (torch.randn(n, fin, dtype=dt),),
                            lambda o, x, r=r: o.blocksum(x, r, dtype=torch.float32), HALF_DTYPES, _WIDE))
    return cases


def _blocksum_dropout_parity():
    seed = PARITY_SEED
    cases = []
    for n, fin, r in _BLOCKSUM_PARITY:
        cases.append(Parity(_shape_id(n, fin, r), lambda dt, n=n, fin=fin: (torch.randn(n, fin, dtype=dt),),
                            lambda o, x, r=r: o.blocksum_dropout(x, r, 0.3, seed)))

        # A row stride that is a multiple of the vector width, 16 bytes in: the vector path on
        # strided rows (fin + 5 never is one).
        def strided(dt, n=n, fin=fin):
            v = 16 // torch.empty((), dtype=dt).element_size()
            return (torch.randn(n, fin + 4 * v, dtype=dt),)

        def run(o, w, fin=fin, r=r):
            v = 16 // w.element_size()
            return o.blocksum_dropout(w[:, v:fin + v], r, 0.3, seed)
        cases.append(Parity(_shape_id("strided-vector", n, fin, r), strided, run))
    cases.append(Parity("wide-split", lambda dt: (torch.randn(1, 16384, dtype=dt),),
                        lambda o, x: o.blocksum_dropout(x, 1024, 0.3, seed)))
    for n, fin, r in [(7, 64, 4), (3, 100, 7), (2, 60000, 16), (1, 16384, 1024)]:
        cases.append(Parity(_shape_id("mixed", n, fin, r), lambda dt, n=n, fin=fin: (torch.randn(n, fin, dtype=dt),),
                            lambda o, x, r=r: o.blocksum_dropout(x, r, 0.3, seed, dtype=torch.float32), HALF_DTYPES, _WIDE))
    return cases


def _tile_parity(which):
    seed = PARITY_SEED
    run = {
        "tile": lambda o, s, f: o.tile(s, f),
        "tile_dropout": lambda o, s, f: o.tile_dropout(s, f, 0.3, seed),
    }.get(which)
    cases = []
    for n, r, feats in _TILE_PARITY:
        if which == "tile_add":
            cases.append(Parity(_shape_id(n, r, feats),
                                lambda dt, n=n, r=r, f=feats: (torch.randn(n, f, dtype=dt), torch.randn(n, r, dtype=dt)),
                                lambda o, b, s: o.tile_add(b, s)))
        else:
            cases.append(Parity(_shape_id(n, r, feats), lambda dt, n=n, r=r: (torch.randn(n, r, dtype=dt),),
                                lambda o, s, f=feats: run(o, s, f)))
    for n, r, feats in [(7, 4, 64), (3, 7, 100), (129, 64, 4096)]:
        if which == "tile_add":
            cases.append(Parity(_shape_id("mixed", n, r, feats),
                                lambda dt, n=n, r=r, f=feats: (torch.randn(n, f, dtype=dt), torch.randn(n, r)),
                                lambda o, b, s: o.tile_add(b, s), HALF_DTYPES))
        else:
            def make(dt, n=n, r=r):
                return (torch.randn(n, r), dt)
            mixed = {
                "tile": lambda o, s, dt, f=feats: o.tile(s, f, dtype=dt),
                "tile_dropout": lambda o, s, dt, f=feats: o.tile_dropout(s, f, 0.3, seed, dtype=dt),
            }[which]
            cases.append(Parity(_shape_id("mixed", n, r, feats), make, mixed, HALF_DTYPES))
    if which == "tile_dropout":
        # The dropout mask itself must match bit for bit.
        cases.append(Parity("mask", lambda dt: (torch.ones(37, 1, dtype=torch.float64),),
                            lambda o, ones: o.tile_dropout(ones, 1000, 0.25, seed), (torch.float64,), exact=True))
    return cases


def _bat_parity(which):
    run = {
        "bat_transform": lambda o, w, g, b, r: o.bat_transform(w, b),
        "bat_weight_grad": lambda o, w, g, b, r: o.bat_weight_grad(g, b),
        "bat_block_grad": lambda o, w, g, b, r: o.bat_block_grad(g, w, r),
        "bat_unmerge": lambda o, w, g, b, r: o.bat_unmerge(w, b),
    }[which]
    shapes = _BAT_PARITY if which != "bat_unmerge" else [(8, 12, 1), (48, 96, 3), (128, 256, 16), (96, 192, 48)]
    cases = []
    for out_f, in_f, r in shapes:
        def make(dt, out_f=out_f, in_f=in_f, r=r):
            return (torch.randn(out_f, in_f, dtype=dt), torch.randn(out_f, in_f, dtype=dt),
                    0.1 * torch.randn(out_f // r, r, r, dtype=dt))
        # bat_unmerge solves in fp32 at least; a half-precision block's I + B rounds first.
        cases.append(Parity(_shape_id(out_f, in_f, r), make, lambda o, w, g, b, r=r: run(o, w, g, b, r),
                            FLOAT_DTYPES if which != "bat_unmerge" else (torch.float64, torch.float32)))
    if which in ("bat_transform", "bat_block_grad"):
        for name, (big, view) in _OFFSET_WEIGHTS.items():
            def make(dt, big=big):
                return (big(dt), torch.randn(96, 192, dtype=dt), 0.1 * torch.randn(2, 48, 48, dtype=dt))
            if which == "bat_transform":
                fn = lambda o, w, g, b, view=view: o.bat_transform(view(w), b)  # noqa: E731
            else:
                fn = lambda o, w, g, b, view=view: o.bat_block_grad(g, view(w), 48)  # noqa: E731
            cases.append(Parity(_shape_id(name, 96, 192, 48), make, fn))
    if which == "bat_transform":
        for out_f, in_f, r in _BAT_MIXED_PARITY:
            def make(dt, out_f=out_f, in_f=in_f, r=r):
                return (torch.randn(out_f, in_f, dtype=dt), 0.1 * torch.randn(out_f // r, r, r), dt)
            cases.append(Parity(_shape_id("mixed", out_f, in_f, r), make,
                                lambda o, w, b, dt: o.bat_transform(w, b, dtype=dt), HALF_DTYPES))
    return cases


def _bat_mixed_layer_parity(which):
    cases = []
    for out_f, in_f, r in _BAT_MIXED_PARITY:
        def make(dt, out_f=out_f, in_f=in_f, r=r):
            return (torch.randn(64, out_f, dtype=dt), torch.randn(64, in_f, dtype=dt), torch.randn(out_f, in_f, dtype=dt),
                    0.1 * torch.randn(out_f // r, r, r))
        if which == "bat_io_block_grad":
            cases.append(Parity(_shape_id("mixed", out_f, in_f, r), make,
                                lambda o, g, x, w, b, r=r: o.bat_io_block_grad(g, x, w, r), HALF_DTYPES, _WIDE))
        elif which == "bat_linear":
            cases.append(Parity(_shape_id("mixed", out_f, in_f, r), make,
                                lambda o, g, x, w, b: o.bat_linear(x, w, None, [b]), HALF_DTYPES))
        else:
            cases.append(Parity(_shape_id("mixed", out_f, in_f, r), make,
                                lambda o, g, x, w, b: o.bat_input_grad(g, w, [b]), HALF_DTYPES))
    if which == "bat_input_grad":
        cases.append(Parity(_shape_id(48, 96, 3), lambda dt: (torch.randn(5, 48, dtype=dt), torch.randn(48, 96, dtype=dt),
                                                             0.1 * torch.randn(16, 3, 3, dtype=dt)),
                            lambda o, g, w, b: o.bat_input_grad(g, w, [b])))
    if which == "bat_linear":
        cases.append(Parity(_shape_id("chain", 48, 96, 3), lambda dt: (
            torch.randn(5, 96, dtype=dt), torch.randn(48, 96, dtype=dt), torch.randn(48, dtype=dt),
            0.1 * torch.randn(16, 3, 3, dtype=dt), 0.1 * torch.randn(8, 6, 6, dtype=dt)),
            lambda o, x, w, c, b1, b2: o.bat_linear(x, w, c, [b1, b2])))
    return cases


def _miss_product_parity(which):
    def make(dt):
        return (torch.randn(33, 512, dtype=dt), torch.randn(33, 64, dtype=_acc(dt)), 0.1 * torch.randn(64, 512, dtype=_acc(dt)))
    if which == "miss_add_product":
        return [Parity("33x64x512", make, lambda o, base, s, blk: o.miss_add_product(base, s, blk), HALF_DTYPES)]
    return [Parity("33x64x512", make, lambda o, g, s, blk: torch.cat([t.flatten() for t in o.miss_block_grads(g, s, blk)]),
                   HALF_DTYPES, _WIDE)]


def _miss_linear_parity():
    def make(dt, m=512):
        return (torch.randn(4, 9, 512, dtype=dt), torch.randn(512, 512, dtype=dt), torch.randn(512, dtype=dt),
                0.1 * torch.randn(64, m, dtype=torch.float32))
    return [
        Parity("mixed-4x9x512", make, lambda o, x, w, c, b: o.miss_linear(x, w, c, b, 0.0, None)[0], HALF_DTYPES),
        Parity("mini-dropout-2x5x24", lambda dt: (torch.randn(2, 5, 24, dtype=dt), torch.randn(12, 24, dtype=dt),
                                                   torch.randn(12, dtype=dt), 0.1 * torch.randn(8, 4, dtype=dt)),
               lambda o, x, w, c, b: torch.cat([t.flatten().to(x.dtype) for t in o.miss_linear(x, w, c, b, 0.3, PARITY_SEED)]),
               (torch.float64, torch.float32)),
        # autocast's path: x, the weight and a copy of the block in one half type, PEFT's roundings
        Parity("round-base-4x9x512", lambda dt: tuple(t.to(dt) for t in make(torch.float32)),
               lambda o, x, w, c, b: o.miss_linear(x, w, c, b, 0.0, None, True)[0], HALF_DTYPES),
        Parity("round-base-mini-4x9x512", lambda dt: tuple(t.to(dt) for t in make(torch.float32, 64)),
               lambda o, x, w, c, b: o.miss_linear(x, w, c, b, 0.0, None, True)[0], HALF_DTYPES),
    ]


def _miss_merge_parity():
    cases = []
    for out_f, in_f, r, m in [(64, 100, 7, 64), (128, 256, 64, 16), (96, 4096, 128, 96), (10, 3, 5, 5)]:
        def make(dt, out_f=out_f, in_f=in_f, r=r, m=m):
            return (torch.randn(out_f, in_f, dtype=dt), torch.randn(r, m, dtype=_acc(dt)))
        cases.append(Parity(_shape_id(out_f, in_f, r, m), make, lambda o, w, b: o.miss_merge(w, b, 0.5)))
    return cases


def _gathered_parity():
    # Runs of rows per adapter, alternating rows, mini blocks, r past one staging chunk, more
    # adapters than one launch takes (40), the layer of issue 12.
    cases = []
    for n, out_f, r, k, m in [(37, 300, 40, 3, 12), (19, 64, 7, 4, 16), (80, 32, 4, 40, 0), (1024, 2048, 64, 8, 0),
                              (256, 4096, 16, 5, 64)]:
        def make(dt, n=n, out_f=out_f, r=r, k=k, m=m):
            acc = _acc(dt)
            blocks = [torch.randn(r, m if (m and i % 2) else out_f, dtype=acc) for i in range(k)]
            index = torch.randint(-1, k, (n,))
            index[: n // 2] = torch.arange(n // 2) * k // max(n // 2, 1)  # runs of rows, as sequences give
            return (torch.randn(n, out_f, dtype=dt), torch.randn(n, r, dtype=acc), index, *blocks)
        cases.append(Parity(_shape_id(n, out_f, r, k, m), make,
                            lambda o, base, s, index, *blocks: o.miss_gathered_product(base, s, list(blocks), index)))
    return cases


# ---------------------------------------------------------------- thread-count invariance


def thread_inputs(dtype):
    """Sized so the work really is split across threads (blocksum/tile/merge: several row
    grains; BAT: several 512-row chunks per slab)."""
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(
        x=rnd(1024, 300),  # row grain 2^16 / 300 = 218 rows: 5 tasks
        s=rnd(1024, 7),
        w=rnd(128, 1280),  # BAT, r = 16: 8 slabs x 3 chunks of 512 rows
        b=rnd(8, 16, 16) * 0.05,
        g=rnd(128, 1280),
        blk=rnd(16, 32),  # mini block for the (128, 1280) weight
    )


def _cat(outs):
    return torch.cat([o.flatten() for o in outs])


THREAD_SEED = torch.tensor([12345], dtype=torch.int64)


# ---------------------------------------------------------------- the table

OPS: dict[str, OpCases] = {
    "blocksum": OpCases(
        samples=_samples_of("blocksum"),
        gradcheck=[Grad(_shape_id(s, r), _grad_blocksum(s, r)) for s, r in _BLOCKSUM_GRAD_SHAPES]
        + [Grad("noncontiguous", _grad_blocksum_noncontiguous)],
        parity=_blocksum_parity(),
        bad=[
            Bad("int", lambda: [torch.arange(16).reshape(2, 8)], lambda x: ops.blocksum(x, 4),
                ["miss_ext.blocksum", "'x'", "must be float32, float64, bfloat16 or float16", "Long"]),
            Bad("int-1d", lambda: [torch.arange(8)], lambda x: ops.blocksum(x, 4), ["'x'", "float32"]),
            Bad("bool", lambda: [torch.ones(2, 8, dtype=torch.bool)], lambda x: ops.blocksum(x, 4), ["'x'", "must be float32", "Bool"]),
            Bad("bool-1d", lambda: [torch.ones(8, dtype=torch.bool)], lambda x: ops.blocksum(x, 4), ["'x'", "float32"]),
            Bad("scalar", lambda: [torch.tensor(1.0)], lambda x: ops.blocksum(x, 1), ["'x'", "at least 1 dimension"]),
            Bad("scalar-r4", lambda: [torch.tensor(1.0)], lambda x: ops.blocksum(x, 4), ["'x'", "at least 1 dimension"]),
            Bad("r0", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum(x, 0), ["'r'", "must be a positive integer", "got 0"]),
            Bad("rneg", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum(x, -4), ["'r'", "must be a positive integer", "got -4"]),
            Bad("rneg3", lambda: [torch.randn(4, 8)], lambda x: ops.blocksum(x, -3), ["'r'", "positive"]),
            Bad("narrower-dtype", lambda: [torch.randn(4, 8)], lambda x: ops.blocksum(x, 4, torch.bfloat16), ["'dtype'", "wider"]),
        ],
        threads=[Threads("blocksum", lambda t: ops.blocksum(t["x"], 13))],
    ),
    "blocksum_dropout": OpCases(
        samples=_samples_of("blocksum_dropout"),
        gradcheck=[Grad(f"p{p}", _grad_blocksum_dropout(p)) for p in _DROPOUT_PS],
        parity=_blocksum_dropout_parity(),
        bad=[
            Bad("int", lambda: [torch.ones(2, 8, dtype=torch.int32)], lambda x: ops.blocksum_dropout(x, 4, 0.5, SEED),
                ["'x'", "must be float32"]),
            Bad("r0", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum_dropout(x, 0, 0.5, SEED),
                ["'r'", "must be a positive integer"]),
            Bad("p", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum_dropout(x, 4, 1.5, SEED), ["'p'", "must be in [0, 1]"]),
            Bad("p-neg", lambda: [torch.randn(2, 8)], lambda x: ops.blocksum_dropout(x, 4, -0.1, SEED), ["'p'", "must be in [0, 1]"]),
            Bad("seed-float", lambda: [torch.randn(4, 8), torch.tensor([1.0])], lambda x, s: ops.blocksum_dropout(x, 4, 0.5, s),
                ["'seed'", "int64"], meta=False),
            Bad("seed-2", lambda: [torch.randn(2, 8), torch.tensor([1, 2])], lambda x, s: ops.blocksum_dropout(x, 4, 0.5, s),
                ["'seed'", "one element"], meta=False),
        ],
        threads=[Threads("blocksum_dropout", lambda t: ops.blocksum_dropout(t["x"], 13, 0.3, THREAD_SEED))],
    ),
    "tile": OpCases(
        samples=_samples_of("tile"),
        gradcheck=[Grad(_shape_id(s, r), _grad_tile(s, r)) for s, r in _BLOCKSUM_GRAD_SHAPES],
        parity=_tile_parity("tile"),
        bad=[
            Bad("int", lambda: [torch.ones(2, 4, dtype=torch.int64)], lambda s: ops.tile(s, 8), ["miss_ext.tile", "'s'", "must be float32"]),
            Bad("scalar", lambda: [torch.tensor(1.0)], lambda s: ops.tile(s, 4), ["'s'", "at least 1 dimension"]),
            Bad("r0", lambda: [torch.randn(2, 0)], lambda s: ops.tile(s, 8), ["'s'", "non-empty last dimension"]),
            Bad("features-neg", lambda: [torch.randn(2, 4)], lambda s: ops.tile(s, -1), ["'features'", "must be >= 0"]),
            Bad("wider-dtype", lambda: [torch.randn(4, 2, dtype=torch.bfloat16)], lambda s: ops.tile(s, 8, torch.float32),
                ["'dtype'", "narrower"]),
        ],
        threads=[Threads("tile", lambda t: ops.tile(t["s"], 300))],
    ),
    "tile_dropout": OpCases(
        samples=_samples_of("tile_dropout"),
        gradcheck=[Grad(f"p{p}", _grad_tile_dropout(p)) for p in _DROPOUT_PS],
        parity=_tile_parity("tile_dropout"),
        bad=[
            Bad("seed", lambda: [torch.randn(2, 4), torch.tensor([1.0])], lambda s, seed: ops.tile_dropout(s, 8, 0.5, seed),
                ["'seed'", "CPU int64 tensor with one element"], meta=False),
            Bad("int", lambda: [torch.ones(2, 4, dtype=torch.int32)], lambda s: ops.tile_dropout(s, 8, 0.5, SEED), ["'s'", "float32"]),
            Bad("p", lambda: [torch.randn(2, 4)], lambda s: ops.tile_dropout(s, 8, 2.0, SEED), ["'p'", "[0, 1]"]),
        ],
        threads=[Threads("tile_dropout", lambda t: ops.tile_dropout(t["s"], 300, 0.3, THREAD_SEED))],
    ),
    "tile_add": OpCases(
        samples=_samples_of("tile_add"),
        gradcheck=[Grad(_shape_id(s, r), _grad_tile_add(s, r)) for s, r in _BLOCKSUM_GRAD_SHAPES],
        parity=_tile_parity("tile_add"),
        bad=[
            Bad("bool", lambda: [torch.ones(2, 8, dtype=torch.bool), torch.ones(2, 4)], ops.tile_add, ["'base'", "must be float32"]),
            # s may be wider than base (mixed precision), never narrower.
            Bad("dtypes", lambda: [torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 4)], ops.tile_add,
                ["'s'", "base's dtype", "wider float"]),
            Bad("ranks", lambda: [torch.randn(2, 3, 8), torch.randn(6, 4)], ops.tile_add, ["'base'", "'s'", "same leading dimensions"]),
            Bad("leading", lambda: [torch.randn(4, 8), torch.randn(3, 2)], ops.tile_add, ["leading dimensions"]),
        ],
        bad_device=[BadDevice("tile_add", lambda d: [torch.randn(2, 8), torch.randn(2, 4, device=d)], ops.tile_add, ["'base'", "'s'"])],
        threads=[Threads("tile_add", lambda t: ops.tile_add(t["x"], t["s"]))],
    ),
    "bat_transform": OpCases(
        samples=_samples_of("bat_transform"),
        gradcheck=[Grad(_shape_id(*s), _grad_bat_pair("bat_transform", *s)) for s in _BAT_GRAD_SHAPES],
        parity=_bat_parity("bat_transform"),
        bad=[
            Bad("int-block", lambda: [W8(), torch.zeros(2, 4, 4, dtype=torch.int32)], ops.bat_transform, ["'block'", "must be float32"]),
            Bad("int-weight", lambda: [torch.randn(8, 8).int(), torch.randn(2, 4, 4)], ops.bat_transform, ["'weight'", "float32"]),
            Bad("1d-weight", lambda: [torch.randn(8), B2()], ops.bat_transform, ["'weight'", "must be 2-D"]),
            Bad("2d-block", lambda: [W8(), torch.randn(4, 4)], ops.bat_transform, ["'block'", "must be 3-D"]),
            Bad("r0", lambda: [torch.randn(0, 8), torch.randn(0, 0, 0)], ops.bat_transform,
                ["'block.shape[1]'", "must be a positive integer"]),
            Bad("in-indivisible", lambda: [torch.randn(8, 10), B2()], ops.bat_transform, ["divisible by r", "r = 4"]),
            Bad("out-indivisible", lambda: [torch.randn(6, 8), torch.randn(1, 4, 4)], ops.bat_transform, ["divisible by r"]),
            Bad("nonsquare", lambda: [W8(), torch.randn(2, 4, 2)], ops.bat_transform, ["'block'", "square r x r"]),
            Bad("nonsquare-4x3", lambda: [W8(), torch.randn(2, 4, 3)], ops.bat_transform, ["'block'", "r x r"]),
            Bad("nblocks", lambda: [W8(), torch.randn(4, 4, 4)], ops.bat_transform, ["'block'", "out_features / r = 2", "got 4"]),
            Bad("nblocks-3", lambda: [W8(), torch.randn(3, 4, 4)], ops.bat_transform, ["'block'", "out_features / r"]),
        ],
        bad_device=[BadDevice("bat_transform", lambda d: [W8(), B2().to(d)], ops.bat_transform, ["'weight'", "'block'"])],
        threads=[Threads("bat_transform", lambda t: ops.bat_transform(t["w"], t["b"])),
                 Threads("bat_transform-mixed", lambda t: ops.bat_transform(t["w"], t["b"].float(), t["w"].dtype))],
    ),
    "bat_block_grad": OpCases(
        samples=_samples_of("bat_block_grad"),
        gradcheck=[Grad(_shape_id(*s), _grad_bat_pair("bat_block_grad", *s)) for s in _BAT_GRAD_SHAPES],
        parity=_bat_parity("bat_block_grad"),
        bad=[
            Bad("int", lambda: [torch.ones(8, 8, dtype=torch.int16), W8()], lambda g, w: ops.bat_block_grad(g, w, 4),
                ["'grad'", "must be float32"]),
            Bad("3d", lambda: [torch.randn(2, 8, 8), torch.randn(2, 8, 8)], lambda g, w: ops.bat_block_grad(g, w, 4),
                ["'grad'", "must be 2-D"]),
            Bad("r0", lambda: [W8(), W8()], lambda g, w: ops.bat_block_grad(g, w, 0), ["'r'", "must be a positive integer"]),
            Bad("indivisible", lambda: [torch.randn(8, 6), torch.randn(8, 6)], lambda g, w: ops.bat_block_grad(g, w, 4),
                ["divisible by r"]),
            Bad("shapes", lambda: [W8(), torch.randn(8, 4)], lambda g, w: ops.bat_block_grad(g, w, 4), ["'grad'", "'weight'", "same shape"]),
        ],
        bad_device=[BadDevice("bat_block_grad", lambda d: [W8(), W8().to(d)], lambda g, w: ops.bat_block_grad(g, w, 4),
                              ["'grad'", "'weight'"])],
        threads=[Threads("bat_block_grad", lambda t: ops.bat_block_grad(t["g"], t["w"], 16))],
    ),
    "bat_input_grad": OpCases(
        samples=_samples_of("bat_input_grad"),
        gradcheck=[Grad(_shape_id(*s), _grad_bat_input_grad(*s)) for s in _BAT_IO_SHAPES],
        parity=_bat_mixed_layer_parity("bat_input_grad"),
        bad=[
            Bad("no-blocks", lambda: [torch.randn(2, 8), W8()], lambda g, w: ops.bat_input_grad(g, w, []), ["'blocks'", "at least one"]),
            Bad("int-grad", lambda: [torch.ones(2, 8, dtype=torch.int32), W8(), B2()], lambda g, w, b: ops.bat_input_grad(g, w, [b]),
                ["'grad'", "must be float32"]),
            Bad("block-narrower", lambda: [torch.randn(2, 8, dtype=torch.float64), W8(), B2()],
                lambda g, w, b: ops.bat_input_grad(g, w, [b]), ["every block", "grad's dtype", "wider float"]),
        ],
        threads=[Threads("bat_input_grad", lambda t: ops.bat_input_grad(t["x"][:64, :128].contiguous(), t["w"], [t["b"]]),
                         vendor_gemm=(64, 128, 1280))],
    ),
    "bat_io_block_grad": OpCases(
        samples=_samples_of("bat_io_block_grad"),
        gradcheck=[Grad(_shape_id(*s), _grad_bat_io_block_grad(*s)) for s in _BAT_IO_SHAPES],
        parity=_bat_mixed_layer_parity("bat_io_block_grad"),
        bad=[
            Bad("indivisible", lambda: [torch.randn(3, 8), torch.randn(3, 8), torch.randn(8, 8)],
                lambda g, x, w: ops.bat_io_block_grad(g, x, w, 3), ["divisible by r"]),
            Bad("leading", lambda: [torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 8)],
                lambda g, x, w: ops.bat_io_block_grad(g, x, w, 4), ["'x'", "leading dimensions"]),
        ],
        threads=[Threads("bat_io_block_grad", lambda t: ops.bat_io_block_grad(
            t["x"][:, :128].contiguous(), t["x"][:, :160].contiguous(), t["w"][:, :160].contiguous(), 16))],
    ),
    "bat_weight_grad": OpCases(
        samples=_samples_of("bat_weight_grad"),
        gradcheck=[Grad(_shape_id(*s), _grad_bat_pair("bat_weight_grad", *s)) for s in _BAT_GRAD_SHAPES],
        parity=_bat_parity("bat_weight_grad"),
        bad=[
            Bad("bool", lambda: [W8(), torch.zeros(2, 4, 4, dtype=torch.bool)], ops.bat_weight_grad, ["'block'", "must be float32"]),
            Bad("indivisible", lambda: [torch.randn(8, 6), B2()], ops.bat_weight_grad, ["divisible by r"]),
        ],
        bad_device=[BadDevice("bat_weight_grad", lambda d: [W8(), B2().to(d)], ops.bat_weight_grad, ["'grad'", "'block'"])],
        threads=[Threads("bat_weight_grad", lambda t: ops.bat_weight_grad(t["g"], t["b"]))],
    ),
    "bat_linear": OpCases(
        samples=_samples_of("bat_linear"),
        gradcheck=[Grad("8x8-r4-and-chain", _grad_bat_linear)],
        parity=_bat_mixed_layer_parity("bat_linear"),
        bad=[
            Bad("int-x", lambda: [torch.ones(2, 8, dtype=torch.int32), W8(), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
                ["'x'", "must be float32"]),
            # the block side may be wider than the activation side (mixed precision), never narrower
            Bad("dtypes", lambda: [torch.randn(2, 8, dtype=torch.float64), W8(), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
                ["every block", "x's dtype", "wider float"]),
            Bad("3d-weight", lambda: [torch.randn(2, 8), torch.randn(1, 8, 8), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
                ["'weight'", "must be 2-D"]),
            Bad("x-features", lambda: [torch.randn(2, 6), W8(), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
                ["'x'", "must end in in_features = 8"]),
            Bad("bias", lambda: [torch.randn(2, 8), W8(), torch.randn(4), B2()], lambda x, w, bias, b: ops.bat_linear(x, w, bias, [b]),
                ["'bias'", "(out_features,)"]),
            Bad("no-blocks", lambda: [torch.randn(2, 8), W8()], lambda x, w: ops.bat_linear(x, w, None, []), ["'blocks'", "at least one"]),
        ],
        bad_device=[
            BadDevice("bat_linear-weight", lambda d: [torch.randn(2, 8), W8().to(d), B2()], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
                      ["'x'", "'weight'"]),
            BadDevice("bat_linear-block", lambda d: [torch.randn(2, 8), W8(), B2().to(d)], lambda x, w, b: ops.bat_linear(x, w, None, [b]),
                      ["'block"]),
        ],
        threads=[Threads("bat_linear", lambda t: ops.bat_linear(t["x"].new_ones(64, 1280), t["w"], None, [t["b"]]),
                         vendor_gemm=(64, 1280, 128))],
    ),
    "bat_unmerge": OpCases(
        samples=_samples_of("bat_unmerge"),
        gradcheck=[Grad(_shape_id(*s), _grad_bat_pair("bat_unmerge", *s)) for s in _UNMERGE_SHAPES],
        parity=_bat_parity("bat_unmerge"),
        bad=[
            Bad("int", lambda: [torch.ones(8, 8, dtype=torch.int64), B2()], ops.bat_unmerge, ["'weight'", "must be float32"]),
            Bad("indivisible", lambda: [torch.randn(8, 6), B2()], ops.bat_unmerge, ["divisible by r"]),
            # singular I + B_i: a fault in the values
            Bad("singular", lambda: [W8(), torch.stack([torch.zeros(4, 4), -torch.eye(4)])], ops.bat_unmerge,
                ["miss_ext.bat_unmerge", "I + B_i is singular", "block row(s) i = 1", "'block'"], fake=False),
            Bad("singular-rank1", lambda: [W8(), torch.stack([-torch.ones(4, 4) / 4, -torch.ones(4, 4) / 4])], ops.bat_unmerge,
                ["singular", "'block'"], fake=False),
            Bad("singular-expanded", lambda: [torch.randn(8, 8), -torch.eye(4).expand(2, 4, 4)], ops.bat_unmerge,
                ["singular", "block row"], fake=False),
        ],
        bad_device=[BadDevice("bat_unmerge", lambda d: [W8(), B2().to(d)], ops.bat_unmerge, ["'weight'", "'block'"])],
        threads=[Threads("bat_unmerge", lambda t: ops.bat_unmerge(t["w"], t["b"]))],
    ),
    "miss_linear": OpCases(
        samples=_samples_of("miss_linear"),
        gradcheck=[Grad("standard", _grad_miss_linear(8, 0.0)), Grad("mini-dropout", _grad_miss_linear(2, 0.3)),
                   Grad("standard-round-base", _grad_miss_linear(8, 0.0, True)),
                   Grad("mini-round-base", _grad_miss_linear(2, 0.0, True))],
        parity=_miss_linear_parity(),
        bad=[
            Bad("int-x", lambda: [torch.ones(2, 8, dtype=torch.int32), W12(), torch.randn(4, 12)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["miss_ext.miss_linear", "'x'", "must be float32"]),
            Bad("dtypes", lambda: [torch.randn(2, 8, dtype=torch.float64), W12(), torch.randn(4, 12)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'x'", "'weight'", "must have the same dtype"]),
            Bad("block-dtype", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12, dtype=torch.bfloat16)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'block'", "x's dtype", "wider float"]),
            Bad("block-dtype-8x8", lambda: [torch.randn(2, 8), torch.randn(8, 8), torch.zeros(4, 8, dtype=torch.bfloat16)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'block'", "x's dtype"]),
            Bad("x-features", lambda: [torch.randn(2, 6), W12(), torch.randn(4, 12)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'x'", "must end in in_features = 8"]),
            Bad("3d-block", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12, 1)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'block'", "must be 2-D"]),
            Bad("r0", lambda: [torch.randn(2, 8), W12(), torch.randn(0, 12)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'block.shape[0]'", "must be a positive integer"]),
            Bad("mini-indivisible", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 5)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["out_features (12)", "divisible by block.shape[1] (5"]),
            Bad("bias", lambda: [torch.randn(2, 8), W12(), torch.randn(3), torch.randn(4, 12)],
                lambda x, w, bias, b: ops.miss_linear(x, w, bias, b, 0.0, None), ["'bias'", "(out_features,)"]),
            Bad("no-seed", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 0.5, None), ["'seed'", "required when p > 0"]),
            Bad("p", lambda: [torch.randn(2, 8), W12(), torch.randn(4, 12)],
                lambda x, w, b: ops.miss_linear(x, w, None, b, 1.5, SEED), ["'p'", "must be in [0, 1]"]),
        ],
        bad_device=[
            BadDevice("miss_linear-weight", lambda d: [torch.randn(2, 8), W12().to(d), torch.randn(4, 12)],
                      lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'x'", "'weight'"]),
            BadDevice("miss_linear-block", lambda d: [torch.randn(2, 8), W12(), torch.randn(4, 12, device=d)],
                      lambda x, w, b: ops.miss_linear(x, w, None, b, 0.0, None), ["'x'", "'block'"]),
        ],
        threads=[Threads("miss_linear", lambda t: _cat(ops.miss_linear(t["g"][:, :300].contiguous(), t["x"][:128], None, t["blk"],
                                                                       0.3, THREAD_SEED)),
                         vendor_gemm=(128, 300, 1024))],
    ),
    "miss_add_product": OpCases(
        samples=_samples_of("miss_add_product"),
        gradcheck=[Grad(_shape_id(*s), _grad_product("miss_add_product", *s)) for s in _PRODUCT_SHAPES],
        parity=_miss_product_parity("miss_add_product"),
        bad=[
            Bad("block-shape", lambda: [torch.randn(3, 8), torch.randn(3, 4), torch.randn(4, 6)], ops.miss_add_product, ["'block'", "shape"]),
            Bad("int-base", lambda: [torch.ones(3, 8, dtype=torch.int32), torch.randn(3, 4), torch.randn(4, 8)], ops.miss_add_product,
                ["'base'", "float32"]),
        ],
        threads=[Threads("miss_add_product", lambda t: ops.miss_add_product(t["x"][:, :32].contiguous(), t["s"][:, :4].float(),
                                                                            t["blk"][:4].float()))],
    ),
    "miss_block_grads": OpCases(
        samples=_samples_of("miss_block_grads"),
        gradcheck=[Grad(_shape_id(*s), _grad_product("miss_block_grads", *s)) for s in _PRODUCT_SHAPES],
        parity=_miss_product_parity("miss_block_grads"),
        bad=[
            Bad("dtypes", lambda: [torch.randn(3, 8), torch.randn(3, 4).double(), torch.randn(4, 8)], ops.miss_block_grads,
                ["'s'", "'block'", "same dtype"]),
        ],
        threads=[Threads("miss_block_grads", lambda t: _cat(ops.miss_block_grads(
            t["x"][:, :32].contiguous(), t["s"][:, :4].float(), t["blk"][:4].float())))],
    ),
    "miss_merge": OpCases(
        samples=_samples_of("miss_merge"),
        gradcheck=[Grad(_shape_id(*s), _grad_miss_merge(*s)) for s in _MERGE_SHAPES],
        parity=_miss_merge_parity(),
        bad=[
            Bad("int-block", lambda: [W8(), torch.ones(2, 8, dtype=torch.int64)], lambda w, b: ops.miss_merge(w, b, 1.0),
                ["'block'", "must be float32"]),
            Bad("3d-block", lambda: [W8(), torch.randn(2, 4, 4)], lambda w, b: ops.miss_merge(w, b, 1.0), ["'block'", "must be 2-D"]),
            Bad("1d-weight", lambda: [torch.randn(8), torch.randn(2, 8)], lambda w, b: ops.miss_merge(w, b, 1.0), ["'weight'", "must be 2-D"]),
            Bad("r0", lambda: [W8(), torch.randn(0, 8)], lambda w, b: ops.miss_merge(w, b, 1.0),
                ["'block.shape[0]'", "must be a positive integer"]),
            Bad("mini-indivisible", lambda: [W8(), torch.randn(2, 3)], lambda w, b: ops.miss_merge(w, b, 1.0),
                ["out_features (8)", "divisible by block.shape[1] (3"]),
        ],
        bad_device=[BadDevice("miss_merge", lambda d: [W8(), torch.randn(2, 8, device=d)], lambda w, b: ops.miss_merge(w, b, 1.0),
                              ["'weight'", "'block'"])],
        threads=[Threads("miss_merge", lambda t: ops.miss_merge(t["w"], t["blk"], -1.0))],
    ),
    "miss_gathered_product": OpCases(
        samples=_samples_of("miss_gathered_product"),
        gradcheck=[Grad("standard-and-mini", _grad_gathered)],
        parity=_gathered_parity(),
        bad=[
            Bad("no-blocks", lambda: [torch.randn(3, 8), torch.randn(3, 4), torch.tensor([0, 0, 0])],
                lambda b, s, i: ops.miss_gathered_product(b, s, [], i), ["'blocks'"]),
            Bad("float-index", lambda: [torch.randn(3, 8), torch.randn(3, 4), torch.randn(4, 8), torch.zeros(3)],
                lambda b, s, blk, i: ops.miss_gathered_product(b, s, [blk], i), ["'index'"]),
        ],
        threads=[Threads("miss_gathered_product", lambda t: ops.miss_gathered_product(
            t["x"][:, :32].contiguous(), t["s"][:, :4].float(), [t["blk"][:4].float(), t["blk"][:4, :8].float()],
            torch.arange(1024) % 3 - 1))],
    ),
}

# Ids must be unique per operator: they name the test cases.
for _name, _cases in OPS.items():
    for _field in ("gradcheck", "parity", "bad", "bad_device", "threads"):
        _ids = [c.id for c in getattr(_cases, _field)]
        assert len(_ids) == len(set(_ids)), (_name, _field, _ids)


def params(field_name, ops_filter=None):
    """``(op name, case)`` pairs of one field over the table, with ``op-case`` ids, for
    ``pytest.mark.parametrize``."""
    import pytest

    return [pytest.param(name, case, id=f"{name}-{case.id}")
            for name, cases in OPS.items() for case in getattr(cases, field_name)]
