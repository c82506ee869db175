"""``MissLinear``: a frozen linear layer with MiSS adapters on the miss_ext kernels.

Parameter names and shapes follow PEFT's ``MissLinear`` (``base_layer.*``,
``miss_block.<adapter>``), as in a live PEFT model's ``state_dict()``. PEFT's saved adapter files
drop the adapter name (``...miss_block``): :func:`miss_ext.load_adapter` loads them, and
``load_state_dict`` given such keys raises rather than silently loading nothing.

Unlike PEFT, the variant is stored per adapter, so standard, mini and BAT adapters can share
a layer. With several active adapters the layer computes (docs/MATH.md section 5)::

    y = x W'^T + b + sum over active standard/mini adapters of their terms

where ``W'`` is the base weight after every active BAT adapter's transform, in the order of
``active_adapters``. Merging keeps that meaning: BAT adapters are always merged into the
weight before additive ones (see :func:`merge_steps`), so a merged layer computes what the
unmerged one did.

The module-level helpers are shared with :mod:`miss_ext.peft`, which runs PEFT's own layers on
the same code.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from . import _checks
from . import functional as MF
from ._ops_common import holds
from ._keys import reject_peft_keys

InitWeights = Union[bool, str]
VARIANTS = ("standard", "bat", "mini")
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
    variant = variant_of(init_weights)
    if variant == "bat":
        shape = (out_f // r, r, r)
    elif variant == "mini":
        shape = (r, mini_r)
    else:
        shape = (r, out_f)
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


# ---------------------------------------------------------------- forward pieces


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    # Devices without autocast (meta) raise on the query itself; nothing can be autocast there.
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or nothing on a device without autocast
    (meta), where even a disabled autocast context raises."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def add_miss_term(result: torch.Tensor, x: torch.Tensor, block: torch.Tensor, variant: str, dropout_p: float) -> torch.Tensor:
    """``result`` plus a standard or mini adapter's term; ``x`` is already in the dtype the
    caller wants the adapter branch in, ``dropout_p`` is 0 outside training. A dropout seed is
    drawn from torch's default generator only when dropout is live, so ``torch.manual_seed``
    replays it."""
    fn = MF.mini_forward if variant == "mini" else MF.miss_forward
    return fn(x, result, block, dropout_p, True)


def plain_linear(base_layer: nn.Module, args, kwargs) -> bool:
    """True when ``base_layer(x)`` is exactly ``F.linear(x, weight, bias)``: a plain
    ``nn.Linear`` forward, no hooks, no extra arguments; its GEMM can then be fused with an
    adapter's (quantized and other linear-like bases stay black boxes)."""
    hooks = nn.modules.module
    return (
        not args
        and not kwargs
        and isinstance(base_layer, nn.Linear)
        and type(base_layer).forward is nn.Linear.forward
        and plain_tensor(base_layer.weight)  # a quantized subclass weight runs its own GEMM
        and not base_layer._forward_hooks
        and not base_layer._forward_pre_hooks
        and not hooks._global_forward_hooks
        and not hooks._global_forward_pre_hooks
    )


def additive_output(
    base_layer: nn.Module,
    x: torch.Tensor,
    terms: Sequence[tuple[torch.Tensor, str, float]],
    args=(),
    kwargs=None,
    cast: Callable[[torch.Tensor, torch.dtype], torch.Tensor] = lambda t, dtype: t.to(dtype),
    base_out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``base_out`` (default ``base_layer(x)``) plus the standard/mini ``terms`` (block, variant,
    dropout p already 0 outside training).

    Without a given ``base_out``, when the base is a plain ``nn.Linear`` in x's dtype whose first
    block has that dtype or a wider one (a float32 block on a bfloat16 layer), and no autocast,
    that adapter runs fused with the base GEMM (``miss_linear``): same numbers, fewer passes over
    the activations, only the ``N x r`` block sum kept for backward. ``x`` is cast to a block's
    dtype only when that dtype cannot hold x's values; a wider block sums x into its own
    precision directly (the same values as the cast, without the copy)."""
    kwargs = kwargs or {}
    terms = list(terms)
    if base_out is None:
        fusable = (
            terms
            and autocast_dtype(x) is None
            and plain_linear(base_layer, args, kwargs)
            and x.dtype == base_layer.weight.dtype
            and holds(x.dtype, terms[0][0].dtype)
        )
        if fusable:
            block, _, p = terms.pop(0)
            base_out = MF.miss_linear(x, base_layer.weight, base_layer.bias, block, p, True)
        else:
            base_out = base_layer(x, *args, **kwargs)
    for block, variant, p in terms:
        xi = x if holds(x.dtype, block.dtype) else cast(x, block.dtype)
        base_out = add_miss_term(base_out, xi, block, variant, p)
    return base_out


def bat_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    blocks: Sequence[torch.Tensor],
    precision: str = "base",
) -> torch.Tensor:
    """``x W'^T + b`` for BAT blocks composed in order, in the compute dtype ``precision`` picks
    (see BAT_PRECISIONS): "base" runs both GEMMs in the dtype of x and the base weight (bf16 for a
    bf16 model), with ``W'`` formed in the blocks' precision and rounded once; "promote" is PEFT's
    own promotion of the weight's and the blocks' dtypes (fp32 GEMMs for fp32 blocks). Under
    autocast, like any linear layer, it runs in the autocast dtype (the op is not autocast-aware,
    so the choice is explicit here). Blocks narrower than the compute dtype are cast up."""
    dtype = autocast_dtype(x)
    if dtype is None:
        dtype = torch.promote_types(x.dtype, weight.dtype) if precision == "base" else weight.dtype
        if precision != "base":
            for b in blocks:
                dtype = torch.promote_types(dtype, b.dtype)
    x = x.to(dtype)
    blocks = [b if holds(dtype, b.dtype) else b.to(dtype) for b in blocks]
    # The BAT kernels call aten GEMMs internally; a live autocast would recast those and break
    # the kernels' dtype contract, so the op runs with autocast off (the dtype is chosen above).
    with autocast_off(x.device.type):
        return MF.bat_linear(x, weight, bias, blocks)


# ---------------------------------------------------------------- merging


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


class MissLinear(nn.Module):
    """A frozen ``base_layer`` plus MiSS adapters.

    Args:
        base_layer: any module with ``in_features``/``out_features`` (called as a black box for
            the standard and mini variants); BAT and merging also need a real ``weight``.
        r: block size.
        mini_r: width of the shared block for ``init_weights="mini"`` (``None``: PEFT's default, 1).
        init_weights: ``True`` (standard, zeros), ``False`` (standard, random), ``"bat"``, ``"mini"``.
        miss_dropout: dropout on the adapter branch's input (standard and mini only, as in PEFT).
        adapter_name: name of the first adapter, which is active and trainable.
        bat_precision: how BAT adapters compute when their blocks are wider than the base (fp32
            blocks on a bf16/fp16 model): ``"base"`` (default) runs the GEMMs in the base dtype on
            ``W'`` formed in fp32 and rounded once (fast; the error bound is in docs/MATH.md);
            ``"promote"`` reproduces PEFT's promotion to fp32 GEMMs exactly (slow).

    New blocks take the base weight's device and are fp32 (fp64 on an fp64 base), as with
    PEFT's ``get_peft_model``; ``.to()`` them for other dtypes. On a meta base (a model built
    under ``torch.device("meta")``) the blocks are meta too; after ``to_empty`` call
    :meth:`reset_parameters` (or load them) since ``to_empty`` leaves them uninitialised.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 64,
        mini_r: Optional[int] = None,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
        adapter_name: str = "default",
        bat_precision: str = "base",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = features_of(base_layer)
        self.bat_precision = check_bat_precision(bat_precision)
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.miss_block = nn.ParameterDict()
        self.register_load_state_dict_pre_hook(reject_peft_keys)  # PEFT file keys never match
        self.miss_r: dict[str, int] = {}
        self.miss_mini_r: dict[str, int] = {}
        self.miss_dropout_p: dict[str, float] = {}
        self.miss_variant: dict[str, str] = {}
        self.miss_init_weights: dict[str, InitWeights] = {}
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = [adapter_name]
        self._disable_adapters = False
        self.update_layer(adapter_name, r, mini_r, init_weights, miss_dropout)

    # ------------------------------------------------------------ adapters

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        mini_r: Optional[int] = None,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
        inference_mode: bool = False,
    ) -> None:
        """Adds (or replaces) adapter ``adapter_name``; every check runs before any change.
        As in PEFT the adapter is trainable only if it is active."""
        _checks.adapter_name(adapter_name)
        variant = variant_of(init_weights)
        mini_r = 1 if mini_r is None else mini_r
        check_adapter_shape(self.in_features, self.out_features, r, mini_r, variant)
        p = check_dropout(miss_dropout)
        if variant == "bat":
            real_weight(self.base_layer)
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge() before replacing it")
        w = getattr(self.base_layer, "weight", None)
        device = w.device if isinstance(w, torch.Tensor) else None
        block = new_block(
            self.in_features, self.out_features, r, mini_r, init_weights, adapter_dtype(self.base_layer), device
        )
        self.miss_block[adapter_name] = nn.Parameter(block)
        self.miss_r[adapter_name] = r
        self.miss_mini_r[adapter_name] = mini_r
        self.miss_dropout_p[adapter_name] = p
        self.miss_variant[adapter_name] = variant
        self.miss_init_weights[adapter_name] = init_weights
        self._set_active(self.active_adapters, inference_mode=inference_mode)

    def add_adapter(
        self,
        adapter_name: str,
        r: int,
        mini_r: Optional[int] = None,
        init_weights: InitWeights = True,
        miss_dropout: float = 0.0,
    ) -> None:
        """Like :meth:`update_layer`, but refuses to replace an existing adapter."""
        if adapter_name in self.miss_block:
            raise ValueError(f"adapter {adapter_name!r} already exists; use update_layer() to replace it")
        self.update_layer(adapter_name, r, mini_r, init_weights, miss_dropout)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapter)

    @property
    def active_adapter(self) -> list[str]:
        return self.active_adapters

    def set_adapter(self, adapter_names: Union[str, Iterable[str]], inference_mode: bool = False) -> None:
        """Activates ``adapter_names`` (in this order: it is the BAT composition order) and, as
        PEFT does, makes exactly those trainable unless ``inference_mode``. Every name must be an
        adapter of this layer, listed once; an empty list activates none (the base alone)."""
        names = _checks.adapter_names(
            "MissLinear.set_adapter", adapter_names, self.miss_block.keys(), "on this layer"
        )
        self._set_active(names, inference_mode)

    def _set_active(self, names: list[str], inference_mode: bool = False) -> None:
        """Unchecked ``set_adapter``: in a model, the active list may name adapters that other
        layers have and this one lacks (as in PEFT; forward skips them)."""
        for key, block in self.miss_block.items():
            block.requires_grad_(key in names and not inference_mode)
        self._active_adapter = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.miss_block:
            raise ValueError(f"no adapter {adapter_name!r} on this layer (has {list(self.miss_block)})")
        if adapter_name in self.merged_adapters:
            raise ValueError(
                f"adapter {adapter_name!r} is merged into the base weight; unmerge() before deleting it"
            )
        for d in (self.miss_block, self.miss_r, self.miss_mini_r, self.miss_dropout_p, self.miss_variant, self.miss_init_weights):
            del d[adapter_name]
        active = [a for a in self._active_adapter if a != adapter_name]
        if not active and adapter_name in self._active_adapter and len(self.miss_block):
            active = [sorted(self.miss_block)[0]]  # PEFT's choice: deterministic across layers
            warnings.warn(f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {active[0]}.")
        self._set_active(active)

    def reset_parameters(self, adapter_names: Optional[Iterable[str]] = None) -> None:
        """Re-applies the documented init of ``adapter_names`` (default: every adapter) in place:
        zeros, or PEFT's random init for ``init_weights=False``. The parameters stay the same
        objects (FSDP2 shards and optimizers keep them); the base layer is not touched.

        This is the step after ``model.to_empty(device=...)``, which leaves every tensor
        uninitialised; loops that call ``reset_parameters()`` on each module (as FSDP's meta
        init does) reach it. Refused while an adapter to reset is merged."""
        if adapter_names is None:
            names = list(self.miss_block)
        else:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.miss_block]
        if unknown:
            raise ValueError(f"cannot reset unknown adapter(s) {unknown} (has {list(self.miss_block)})")
        merged = [n for n in names if n in self.merged_adapters]
        if merged:
            raise ValueError(f"adapter(s) {merged} are merged into the base weight; unmerge() before resetting them")
        for n in names:
            init_block_(self.miss_block[n], self.miss_init_weights[n])

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch; disabling unmerges first, so the base layer alone is what runs."""
        if enabled:
            self._set_active(self.active_adapters)
            self._disable_adapters = False
        else:
            if self.merged:
                self.unmerge()
            for block in self.miss_block.values():
                block.requires_grad_(False)
            self._disable_adapters = True

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with layer.disable_adapter(): ...`` runs the base layer alone, then restores."""
        was_disabled = self._disable_adapters
        grads = {k: b.requires_grad for k, b in self.miss_block.items()}
        self.enable_adapters(False)
        try:
            yield self
        finally:
            self._disable_adapters = was_disabled
            for k, b in self.miss_block.items():
                b.requires_grad_(grads.get(k, False))

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def base_weight(self) -> torch.Tensor:
        return real_weight(self.base_layer)

    def _active(self) -> list[str]:
        return [a for a in self._active_adapter if a in self.miss_block]

    # ------------------------------------------------------------ merging

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merges ``adapter_names`` (default: the active ones not yet merged) into the base weight
        (docs/MATH.md section 6). The new weight is computed out of place and copied in only when
        every step succeeded, so a failed safe merge leaves the weight bit-for-bit unchanged."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        names = self._active() if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self.miss_block]
        if unknown:
            raise ValueError(f"cannot merge unknown adapter(s) {unknown} (has {list(self.miss_block)})")
        # Merging is idempotent per adapter (merged ones are skipped), so a repeated name merges once.
        names = [n for n in dict.fromkeys(names) if n not in self.merged_adapters]
        if not names:
            if self.merged:
                warnings.warn("All adapters are already merged, nothing to do.")
            return
        weight = self.base_weight()
        steps, order = merge_steps(self._with_variants(self.merged_adapters), self._with_variants(names))
        new = apply_steps(weight, steps, self.miss_block, check_finite=safe_merge)
        with torch.no_grad():
            weight.copy_(new)
        self.merged_adapters = order

    def unmerge(self) -> None:
        """Takes every merged adapter out, last merged first. A singular BAT ``I + B_i`` raises
        and leaves the weight and ``merged_adapters`` as they were."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.base_weight()
        new = apply_steps(weight, unmerge_steps(self._with_variants(self.merged_adapters)), self.miss_block)
        with torch.no_grad():
            weight.copy_(new)
        self.merged_adapters = []

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``dW`` that merging ``adapter_name`` alone adds to the current base weight
        (for BAT it depends on that weight: ``W B_i + B_i`` per block)."""
        _checks.adapter_names("MissLinear.get_delta_weight", adapter_name, self.miss_block.keys(), "on this layer")
        block = self.miss_block[adapter_name]
        variant = self.miss_variant[adapter_name]
        if variant == "bat":
            return delta_weight(self.base_weight(), block, variant)
        return MF.miss_delta_weight(block, self.out_features, self.in_features)

    def _with_variants(self, names: Sequence[str]) -> list[tuple[str, str]]:
        return [(n, self.miss_variant[n]) for n in names]

    # ------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args, adapter_names: Optional[Sequence[str]] = None, **kwargs) -> torch.Tensor:
        """``adapter_names`` (inference only): one adapter name per sample (the first dim of
        ``x``), ``"__base__"`` for the base layer alone; see :mod:`miss_ext.serving`."""
        if adapter_names is not None:
            _checks.layer_input("MissLinear", x, self.in_features, self.miss_block.values())
            from .serving import layer_forward

            return layer_forward(self, x, adapter_names, args, kwargs)
        _checks.layer_input("MissLinear", x, self.in_features, [self.miss_block[n] for n in self._active()])
        previous_dtype = x.dtype
        if self._disable_adapters and self.merged:
            self.unmerge()  # only reachable if merge() was called while disabled (PEFT does this too)
        active = [] if self._disable_adapters or self.merged else self._active()
        bat = [a for a in active if self.miss_variant[a] == "bat"]
        terms = [
            (self.miss_block[n], self.miss_variant[n], self.miss_dropout_p[n] if self.training else 0.0)
            for n in active
            if self.miss_variant[n] != "bat"
        ]
        base_out = None
        if bat:
            bias = getattr(self.base_layer, "bias", None)
            base_out = bat_output(x, self.base_weight(), bias, [self.miss_block[n] for n in bat], self.bat_precision)
        result = additive_output(self.base_layer, x, terms, args, kwargs, base_out=base_out)
        return result.to(previous_dtype)

    def extra_repr(self) -> str:
        parts = [
            f"{n}: {self.miss_variant[n]} r={self.miss_r[n]}"
            + (f" mini_r={self.miss_mini_r[n]}" if self.miss_variant[n] == "mini" else "")
            + (f" dropout={self.miss_dropout_p[n]}" if self.miss_dropout_p[n] else "")
            for n in self.miss_block
        ]
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{'; '.join(parts)}]"
