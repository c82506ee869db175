"""``MissLinear``: a frozen linear layer with MiSS adapters on the miss_ext kernels.

Parameter names and shapes follow PEFT's ``MissLinear`` (``base_layer.*``,
``miss_block.<adapter>``) so PEFT MiSS state dicts load key for key.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

from . import functional as MF

InitWeights = Union[bool, str]
VARIANTS = ("standard", "bat", "mini")


def variant_of(init_weights: InitWeights) -> str:
    if init_weights in ("bat", "mini"):
        return init_weights
    if isinstance(init_weights, bool):
        return "standard"
    raise ValueError(
        f"init_weights must be True, False, 'bat' or 'mini' (got {init_weights!r})"
    )


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
    """SPEC section 7: the shape rules PEFT enforces, with messages that name the rule."""
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


def new_block(in_f: int, out_f: int, r: int, mini_r, init_weights: InitWeights) -> torch.Tensor:
    variant = variant_of(init_weights)
    if variant == "bat":
        return torch.zeros(out_f // r, r, r)
    if variant == "mini":
        return torch.zeros(r, mini_r)
    block = torch.zeros(r, out_f)
    if init_weights is False:  # PEFT's random init, for tests
        nn.init.kaiming_uniform_(block, a=math.sqrt(5))
    return block


class MissLinear(nn.Module):
    """A frozen ``base_layer`` plus MiSS adapters.

    Args:
        base_layer: any module with ``in_features``/``out_features`` (called as a black box for
            the standard and mini variants); BAT also needs a real ``weight``.
        r: block size.
        mini_r: width of the shared block for ``init_weights="mini"``.
        init_weights: ``True`` (standard, zeros), ``False`` (standard, random), ``"bat"``, ``"mini"``.
        miss_dropout: dropout on the adapter branch's input (standard and mini only, as in PEFT).
        adapter_name: name of the first adapter.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 64,
        mini_r: int = 1,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = features_of(base_layer)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.miss_block = nn.ParameterDict()
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_dropout_p: dict[str, float] = {}
        self.miss_variant: dict[str, str] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.update_layer(adapter_name, r, mini_r, init_weights, miss_dropout)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        mini_r: int = 1,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
    ) -> None:
        """Adds (or replaces) adapter ``adapter_name``; validation happens before any change."""
        variant = variant_of(init_weights)
        check_adapter_shape(self.in_features, self.out_features, r, mini_r, variant)
        if not 0.0 <= float(miss_dropout) <= 1.0:
            raise ValueError(f"`miss_dropout` must be in [0, 1] (got {miss_dropout})")
        if variant == "bat":
            self.base_weight()  # BAT needs a real weight: fail before adding anything
        block = new_block(self.in_features, self.out_features, r, mini_r, init_weights)
        ref = self.base_weight_or_none()
        if ref is not None:
            block = block.to(device=ref.device)
        self.miss_block[adapter_name] = nn.Parameter(block)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_dropout_p[adapter_name] = float(miss_dropout)
        self.miss_variant[adapter_name] = variant

    def base_weight_or_none(self):
        w = getattr(self.base_layer, "weight", None)
        return w if isinstance(w, torch.Tensor) else None

    def base_weight(self) -> torch.Tensor:
        w = self.base_weight_or_none()
        if w is None or w.dim() != 2 or w.is_meta:
            raise TypeError(
                f"BAT (init_weights='bat') transforms the base weight, so the base layer needs a "
                f"real 2-D `weight` tensor ({type(self.base_layer).__name__} has none)"
            )
        return w

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.miss_block]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        previous_dtype = x.dtype
        active = self._active()
        bat = [a for a in active if self.miss_variant[a] == "bat"]
        additive = [a for a in active if self.miss_variant[a] != "bat"]
        if bat:
            result = self._bat_forward(x, bat)
        else:
            result = self.base_layer(x, *args, **kwargs)
        for name in additive:
            block = self.miss_block[name]
            xa = x.to(block.dtype)
            p = self.miss_dropout_p[name]
            fn = MF.mini_forward if self.miss_variant[name] == "mini" else MF.miss_forward
            result = fn(xa, result, block, p, self.training)
        return result.to(previous_dtype)

    def _bat_forward(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        weight = self.base_weight()
        blocks = [self.miss_block[n] for n in names]
        dtype = blocks[0].dtype
        for b in blocks:
            dtype = torch.promote_types(dtype, b.dtype)
        dtype = torch.promote_types(dtype, weight.dtype)
        blocks = [b.to(dtype) for b in blocks]
        bias = getattr(self.base_layer, "bias", None)
        return MF.bat_linear(x.to(dtype), weight, bias, blocks)

    def extra_repr(self) -> str:
        parts = [
            f"{n}: {self.miss_variant[n]} r={self.miss_r[n]}"
            + (f" mini_r={self.miss_mini_r[n]}" if self.miss_variant[n] == "mini" else "")
            for n in self.miss_block
        ]
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{'; '.join(parts)}]"
