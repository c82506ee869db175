"""The variant table: which ``init_weights`` gives which variant, the block each variant has, its
init, and the shape rules (docs/MATH.md section 7). The one place this table lives: the layer,
the model-level functions and the PEFT integration read it from here, the demo (and anyone
else) as ``miss_ext.layer.INIT_WEIGHTS``.
"""

from __future__ import annotations

import math
from typing import Iterable, Union

import torch
from torch import nn

InitWeights = Union[bool, str]
VARIANTS = ("standard", "bat", "mini")
# The init_weights that selects each variant (True: standard with zero init; False, its random
# init for tests, is also standard). PEFT's MissConfig uses the same values.
INIT_WEIGHTS = {"standard": True, "mini": "mini", "bat": "bat"}
# How BAT computes with blocks wider than the base (fp32 blocks on a bf16 model; docs/MATH.md):
#   "base"    (default) both GEMMs in the base dtype on W' formed in fp32 and rounded once;
#   "promote" PEFT's own type promotion: x, W' and both GEMMs in fp32 (exact, slow).
BAT_PRECISIONS = ("base", "promote")


def check_bat_precision(value: str) -> str:
    if value not in BAT_PRECISIONS:
        raise ValueError(f"`bat_precision` must be one of {BAT_PRECISIONS} (got {value!r})")
    return value


def variant_of(init_weights: InitWeights) -> str:
    if init_weights in ("bat", "mini"):
        return init_weights
    if isinstance(init_weights, bool):
        return "standard"
    raise ValueError(
        f"init_weights must be True, False, 'bat' or 'mini' (got {init_weights!r})"
    )


def variant_of_block(block: torch.Tensor, out_features: int) -> str:
    """The variant a block's shape implies. A mini block as wide as the output is the standard
    variant exactly, so the shape alone decides the math."""
    if block.dim() == 3:
        return "bat"
    return "standard" if block.shape[1] == out_features else "mini"


def block_shape(in_f: int, out_f: int, r: int, mini_r: int, variant: str) -> tuple[int, ...]:
    if variant == "bat":
        return (out_f // r, r, r)
    if variant == "mini":
        return (r, mini_r)
    return (r, out_f)


def features_of(base_layer: nn.Module) -> tuple[int, int]:
    in_f = getattr(base_layer, "in_features", None)
    out_f = getattr(base_layer, "out_features", None)
    if not isinstance(in_f, int) or not isinstance(out_f, int):
        raise TypeError(
            f"MissLinear needs a linear-like base layer with integer `in_features` and "
            f"`out_features` (got {type(base_layer).__name__})"
        )
    return in_f, out_f


def check_adapter_shape(in_f: int, out_f: int, r: int, mini_r, variant: str) -> None:
    """docs/MATH.md section 7: the shape rules PEFT enforces, with messages that name the rule."""
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"`r` must be a positive integer (got {r!r})")
    if r > in_f:
        raise ValueError(f"`r` ({r}) must be less than or equal to in_features ({in_f})")
    if variant == "bat" and (in_f % r or out_f % r):
        raise ValueError(
            f"BAT (init_weights='bat') needs in_features ({in_f}) and out_features ({out_f}) "
            f"divisible by r ({r}) so the weight splits into r x r blocks"
        )
    if variant == "mini":
        if not isinstance(mini_r, int) or isinstance(mini_r, bool) or mini_r <= 0:
            raise ValueError(f"`mini_r` must be a positive integer for init_weights='mini' (got {mini_r!r})")
        if out_f % mini_r:
            raise ValueError(
                f"mini (init_weights='mini') needs out_features ({out_f}) divisible by "
                f"mini_r ({mini_r})"
            )


def check_dropout(p) -> float:
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"`miss_dropout` must be in [0, 1] (got {p})")
    return float(p)


def plain_tensor(t) -> bool:
    """A dense torch tensor (or Parameter), not a tensor subclass such as a quantized weight."""
    return type(t) in (torch.Tensor, nn.Parameter)


_QUANTIZED_HINT = (
    "a quantized base keeps packed data there: use the standard or mini variant on it (the base is "
    "then called as a black box), or PEFT's get_peft_model under miss_ext.peft.patch(), which "
    "dequantizes through PEFT's quantization backends"
)


def real_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's 2-D floating-point ``weight``. A meta weight counts: BAT only needs its
    shape until the model is materialised (merging checks for values itself)."""
    w = getattr(base_layer, "weight", None)
    name = type(base_layer).__name__
    if not isinstance(w, torch.Tensor):
        problem = f"{name} has none"
    elif w.dim() != 2 or not w.is_floating_point():
        problem = f"{name}.weight is a {w.dtype} tensor of shape {tuple(w.shape)}; {_QUANTIZED_HINT}"
    elif not plain_tensor(w):
        problem = f"{name}.weight is a {type(w).__name__}, a tensor subclass; {_QUANTIZED_HINT}"
    else:
        return w
    raise TypeError(
        f"BAT (init_weights='bat') and merging need the base weight itself, so the base layer needs a "
        f"real 2-D `weight` tensor ({problem})"
    )


def check_materialised(weight: torch.Tensor, blocks: Iterable[torch.Tensor]) -> None:
    """Merging computes with the weight's and blocks' values, which meta tensors do not have;
    a shape-only merge would leave ``merged_adapters`` claiming a delta that later loaded
    weights do not contain, so it is refused."""
    if weight.is_meta or any(b.is_meta for b in blocks):
        raise RuntimeError(
            "cannot merge or unmerge MiSS adapters on the meta device: the weights hold no values "
            "yet. Materialise the model first (model.to_empty(device=...), then load the base "
            "weights and the adapters or miss_ext.reset_adapter_parameters(model))"
        )


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """fp32 (fp64 on an fp64 base), which is what ``get_peft_model`` ends with: it creates
    blocks in the base dtype and then upcasts fp16/bf16 ones (small blocks; the optimiser wants
    the precision)."""
    w = getattr(base_layer, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype == torch.float64:
        return torch.float64
    return torch.float32


def new_block(in_f: int, out_f: int, r: int, mini_r, init_weights: InitWeights, dtype=None, device=None) -> torch.Tensor:
    shape = block_shape(in_f, out_f, r, mini_r, variant_of(init_weights))
    block = torch.empty(shape, dtype=dtype, device=device)
    init_block_(block, init_weights)
    return block


def init_block_(block: torch.Tensor, init_weights: InitWeights) -> torch.Tensor:
    """A block's documented init, in place: zeros (the adapter starts as the identity), or
    PEFT's random kaiming init for ``init_weights=False`` (for tests)."""
    with torch.no_grad():
        if init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        else:
            block.zero_()
    return block
