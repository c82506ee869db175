"""Merging adapters into the base weight and taking them out again (docs/MATH.md section 6): the
one path that MissLinear and the patched PEFT layers both run.

The layer computes "BAT-composed weight plus additive terms", and BAT transforms do not commute
with additive deltas, so merged adapters are kept in the order [BAT..., additive...] (see
:func:`merge_steps`): a merged layer computes what the unmerged one did. The new weight is
computed out of place and set only when every step succeeded.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from . import functional as MF
from ._core_variants import check_materialised


def merge(view, names: Sequence[str], safe_merge: bool = False) -> None:
    """Merges ``names`` (checked, none merged yet) into ``view``'s base weight; a failed safe
    merge leaves the weight bit for bit as it was."""
    weight = view.base_weight()
    merged = [(a, view.variant(a)) for a in view.merged_adapters if a in view.blocks]
    steps, order = merge_steps(merged, [(a, view.variant(a)) for a in names])
    view.set_base_weight(apply_steps(weight, steps, view.blocks, check_finite=safe_merge))
    view.merged_adapters = order


def unmerge(view) -> None:
    """Takes every merged adapter out, last merged first. A singular BAT ``I + B_i`` raises and
    leaves the weight and the merged list as they were."""
    if not view.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    merged = [(a, view.variant(a)) for a in view.merged_adapters if a in view.blocks]
    view.set_base_weight(apply_steps(view.base_weight(), unmerge_steps(merged), view.blocks))
    view.merged_adapters = []


def merge_steps(merged: Sequence[tuple[str, str]], new: Sequence[tuple[str, str]]):
    """Plan merging ``new`` (name, variant) pairs on top of the already ``merged`` ones.

    BAT transforms do not commute with additive deltas, and the layer's meaning is
    "BAT-composed weight plus additive terms", so merged adapters are kept in the order
    [BAT..., additive...]. Merging a BAT adapter while additive ones are merged therefore takes
    those off first and puts them back after. Returns (steps, new merged order); a step is
    (op, name) with op in add/sub/bat.
    """
    merged_bat = [n for n, v in merged if v == "bat"]
    merged_add = [n for n, v in merged if v != "bat"]
    new_bat = [n for n, v in new if v == "bat"]
    new_add = [n for n, v in new if v != "bat"]
    steps = []
    readd = merged_add if new_bat else []
    steps += [("sub", n) for n in reversed(readd)]
    steps += [("bat", n) for n in new_bat]
    steps += [("add", n) for n in readd + new_add]
    return steps, merged_bat + new_bat + merged_add + new_add


def unmerge_steps(merged: Sequence[tuple[str, str]]):
    return [("unbat" if v == "bat" else "sub", n) for n, v in reversed(merged)]


def apply_steps(
    weight: torch.Tensor, steps, blocks: dict, check_finite: bool = False
) -> torch.Tensor:
    """The weight after ``steps``, computed out of place in fp32 (fp64 when anything is fp64)
    and rounded once to the weight's dtype (docs/MATH.md section 6). Raises before returning, so the
    caller's weight is untouched on any failure (on a meta model: see check_materialised)."""
    check_materialised(weight, [blocks[n] for _, n in steps])
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        wide = weight.dtype == torch.float64 or any(blocks[n].dtype == torch.float64 for _, n in steps)
        acc = torch.float64 if wide else torch.float32
        w = weight.to(acc)
        for op, name in steps:
            b = blocks[name].detach().to(device=w.device, dtype=acc)
            if op == "add":
                w = MF.miss_merge(w, b, 1.0)
            elif op == "sub":
                w = MF.miss_merge(w, b, -1.0)
            elif op == "bat":
                w = MF.bat_transform(w, b)
            else:
                w = MF.bat_unmerge(w, b)
            if check_finite and op in ("add", "bat") and not torch.isfinite(w).all():
                raise ValueError(
                    f"NaNs detected in the merged weights (safe_merge): the adapter {name!r} seems to "
                    f"be broken; the base weight was left unchanged"
                )
        return w.to(weight.dtype) if steps else weight.clone()


def delta_weight(weight: torch.Tensor, block: torch.Tensor, variant: str) -> torch.Tensor:
    """Dense ``dW`` with ``W + dW`` the merged weight, in the block's dtype (differentiable)."""
    out_f, in_f = weight.shape
    if variant != "bat":
        return MF.miss_delta_weight(block, out_f, in_f)
    acc = torch.float64 if torch.float64 in (weight.dtype, block.dtype) else torch.float32
    w = weight.detach().to(acc)
    return (MF.bat_transform(w, block.to(acc)) - w).to(block.dtype)

