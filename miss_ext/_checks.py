"""Argument checks of the Python entry points (functional API, MissLinear, inject, the PEFT
patch). The operators check their own arguments in csrc/front/; these cover what the
Python layer adds on top (a ``base_out`` the operators never see, adapter names, layer inputs),
so that a mismatch raises an error naming the argument instead of broadcasting into a wrong
result or failing deep inside aten.

Only shapes, devices, non-float dtypes and names are checked: any mix of the float dtypes is
allowed (half-precision activations with fp32 blocks is the normal training setup).
"""

from __future__ import annotations

import numbers
from typing import Iterable, Optional, Union

import torch
from torch import nn

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def tensor(fn: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor (got {type(t).__name__})")
    return t


def floating(fn: str, name: str, t) -> torch.Tensor:
    tensor(fn, name, t)
    if t.dtype not in FLOATS:
        raise TypeError(
            f"{fn}: argument '{name}' must be float32, float64, bfloat16 or float16 (got {t.dtype}); "
            f"cast it with .float() or .to(dtype)"
        )
    return t


def features_last(fn: str, name: str, t: torch.Tensor, what: str) -> None:
    if t.dim() < 1:
        raise ValueError(f"{fn}: argument '{name}' must have at least 1 dimension ({what} last), got a scalar")


def same_device(fn: str, **tensors: Optional[torch.Tensor]) -> None:
    named = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{fn}: arguments '{first_name}' (on {first.device}) and '{name}' (on {t.device}) must be "
                f"on the same device; move one with .to(device)"
            )


def dropout_p(fn: str, p) -> float:
    if not isinstance(p, numbers.Real):
        raise TypeError(f"{fn}: argument 'dropout_p' must be a number in [0, 1] (got {p!r})")
    value = float(p)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{fn}: argument 'dropout_p' (the dropout probability) must be in [0, 1] (got {p!r})")
    return value


def additive(fn: str, x, base_out, block, p, mini: bool) -> None:
    """The arguments of miss_forward (``mini=False``) and mini_forward: ``x`` (..., in),
    ``base_out`` (..., out) with the same leading dimensions, ``block`` (r, out) or, for mini,
    (r, mini_r) with mini_r dividing out."""
    for name, t in (("x", x), ("base_out", base_out), ("block", block)):
        floating(fn, name, t)
    features_last(fn, "x", x, "in_features")
    features_last(fn, "base_out", base_out, "out_features")
    shape = "(r, mini_r)" if mini else "(r, out_features)"
    if block.dim() != 2:
        raise ValueError(f"{fn}: argument 'block' must be 2-D with shape {shape} (got {block.dim()}-D shape {tuple(block.shape)})")
    if block.shape[0] < 1:
        raise ValueError(f"{fn}: argument 'block' must have at least one row (block.shape[0] is r, got {tuple(block.shape)})")
    if x.shape[:-1] != base_out.shape[:-1]:
        raise ValueError(
            f"{fn}: arguments 'x' {tuple(x.shape)} and 'base_out' {tuple(base_out.shape)} must have the same "
            f"leading dimensions (x is (..., in_features), base_out the frozen layer's output (..., out_features) "
            f"for that same x)"
        )
    out_f, m = base_out.shape[-1], block.shape[1]
    if mini:
        if m < 1 or out_f % m:
            raise ValueError(
                f"{fn}: out_features ({out_f}) must be divisible by mini_r ({m}): 'base_out' ends in "
                f"out_features and 'block' is (r, mini_r); choose mini_r dividing out_features"
            )
    elif m != out_f:
        raise ValueError(
            f"{fn}: argument 'block' must have shape (r, out_features) with out_features = base_out.shape[-1] = "
            f"{out_f} (got {tuple(block.shape)}); for a (r, mini_r) block use mini_forward"
        )
    same_device(fn, x=x, base_out=base_out, block=block)
    dropout_p(fn, p)


def blocks_list(fn: str, blocks) -> list:
    if isinstance(blocks, torch.Tensor):
        return [blocks]
    if blocks is None or isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
        raise TypeError(
            f"{fn}: argument 'blocks' must be a (out_features / r, r, r) tensor or a sequence of them "
            f"(got {type(blocks).__name__})"
        )
    blocks = list(blocks)
    for i, b in enumerate(blocks):
        tensor(fn, f"blocks[{i}]", b)
    return blocks


# ---------------------------------------------------------------- layers


def layer_input(fn: str, x, in_features: int, blocks: Iterable[torch.Tensor] = ()) -> None:
    """A linear layer's input: a float tensor ending in ``in_features``, on the adapters'
    device. An integer ``x`` would otherwise be cast to float by the adapter path and the
    result cast back to integers."""
    floating(fn, "x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{fn}: argument 'x' must end in in_features = {in_features} (got shape {tuple(x.shape)})")
    for b in blocks:
        if b.device != x.device:
            raise ValueError(
                f"{fn}: argument 'x' is on {x.device} but the layer's adapters are on {b.device}; "
                f"move the input (or the model) with .to(device)"
            )


def adapter_name(name) -> str:
    """A name usable as a key of ``miss_block`` (it becomes part of parameter names)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(
            f"adapter_name must be a non-empty string without '.' (got {name!r}): it becomes part of the "
            f"parameter names (miss_block.<adapter_name>)"
        )
    if hasattr(nn.ParameterDict(), name):
        raise ValueError(f"adapter_name {name!r} clashes with an attribute of nn.ParameterDict; choose another name")
    return name


def adapter_names(fn: str, names: Union[str, Iterable[str]], known: Iterable[str], where: str) -> list[str]:
    """``names`` (a name or an iterable of names) as a list, checked against ``known``.

    An empty list is allowed (nothing active: the base layer alone); an unknown or repeated
    name raises, since it would silently change what the layer computes."""
    if isinstance(names, str):
        names = [names]
    elif names is None or not hasattr(names, "__iter__"):
        raise TypeError(f"{fn}: adapter names must be a string or a list of strings (got {names!r})")
    names = list(names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise TypeError(f"{fn}: adapter names must be strings (got {bad!r})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{fn}: adapter(s) {repeated} listed more than once; each adapter applies once")
    known = list(known)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(
            f"{fn}: adapter(s) {missing} not found {where} (has {known}); add it first (to run the base "
            f"layer alone, disable the adapters or pass an empty list)"
        )
    return names
