"""The flop model of docs/MATH.md section 8: what a MiSS layer must compute, as a ratio to the frozen
linear (forward ``2*N*in*out``; backward to ``x`` the same again). It counts the GEMM-like work
only; the memory-bound passes (block sums, tiling, adds) are left out, so a kernel at its
floor shows a measured ratio a little above this one."""

from __future__ import annotations

from .cases import Case


def flops(case: Case) -> dict:
    s = case.shape
    n, i, o, r = s.tokens, s.in_features, s.out_features, s.r
    gemm = 2.0 * n * i * o
    if case.variant == "standard":
        small = 2.0 * n * r * o  # S @ D, G @ D^T, S^T @ G
        extra_f, extra_b = small, 2 * small
    elif case.variant == "mini":
        small = 2.0 * n * r * s.mini_r  # S @ Dm, Gs @ Dm^T, S^T @ Gs
        extra_f, extra_b = small, 2 * small
    else:  # bat: transform in forward; backward: Gw = G^T x, W' recomputed, dB = W3^T Gw3
        transform = 2.0 * o * i * r
        extra_f, extra_b = transform, gemm + 2 * transform
    return {"floor_fwd": gemm, "floor_bwd": gemm, "miss_fwd": gemm + extra_f, "miss_bwd": gemm + extra_b}


def flop_ratios(case: Case) -> dict:
    """``flops/floor_{fwd,bwd,total}``: the ideal time ratio if every flop cost the same."""
    f = flops(case)
    return {
        "flops/floor_fwd": f["miss_fwd"] / f["floor_fwd"],
        "flops/floor_bwd": f["miss_bwd"] / f["floor_bwd"],
        "flops/floor_total": (f["miss_fwd"] + f["miss_bwd"]) / (f["floor_fwd"] + f["floor_bwd"]),
    }
