"""Compute-dtype copies of adapter blocks, made once per optimizer step instead of once per call.

Under autocast an fp32 block enters bf16 (or fp16) products: PEFT, and autocast itself, cast it
on every call, in forward and again in backward. :func:`block_as` keeps one copy per block and
remakes it only when the block changed: its version counter moves on every in-place update (the
optimizer step, ``copy_``, ``load_state_dict``) and its storage changes on ``.data =`` or a device
move. Gradients flow to the block as through ``block.to(dtype)``.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

# block -> ((version, storage address, dtype), copy). Weak keys: a deleted adapter frees its copy.
_copies = WeakIdKeyDictionary()


class _AsCopy(torch.autograd.Function):
    """The cached copy, with ``block.to(dtype)``'s backward (the gradient cast to the block's dtype)."""

    @staticmethod
    def forward(ctx, block, copy):
        ctx.block_dtype = block.dtype
        return copy.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.block_dtype), None


def _cacheable(block: torch.Tensor) -> bool:
    # Traced code (torch.compile) gets the plain cast, which the compiler fuses; tensor subclasses
    # (FSDP's DTensor, fake and meta tensors) have no stable storage to key on.
    return (
        not torch.compiler.is_compiling()
        and type(block) in (torch.Tensor, torch.nn.Parameter)
        and block.device.type != "meta"
    )


def block_as(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``block.to(dtype)``, the copy reused until the block changes."""
    if block.dtype == dtype:
        return block
    if not _cacheable(block):
        return block.to(dtype)
    key = (block._version, block.data_ptr(), dtype)
    hit = _copies.get(block)
    if hit is None or hit[0] != key:
        hit = (key, block.detach().to(dtype))
        _copies[block] = hit
    copy = hit[1]
    if block.requires_grad and torch.is_grad_enabled():
        return _AsCopy.apply(block, copy)
    return copy
