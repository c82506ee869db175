"""The adapter protocol: what the core (forward, mixed batches, merging) and the model-level
functions read from a MiSS layer, with one view class per kind of layer.

A MiSS layer is either miss_ext's :class:`~miss_ext.MissLinear` or PEFT's own MiSS layer. They
hold the same blocks (``miss_block``, a ParameterDict) but keep the rest differently: the variant
(a dict on MissLinear, the block's shape on PEFT's), the dropout (a float vs an ``nn.Dropout``),
the base weight (the base layer's ``weight`` vs ``get_base_weight``/``set_base_weight``, which go
through PEFT's quantization backends). A view answers the same questions for both, so nothing
above this module branches on the kind of layer. Neither kind is imported here: the views read
attributes (PEFT is an optional dependency; MissLinear sits above the core).
"""

from __future__ import annotations

import torch
from torch import nn

from ._core_variants import plain_tensor, real_weight, variant_of_block

# The BAT compute mode of patched PEFT layers (PEFT's layers have no such setting);
# miss_ext.peft.patch() sets it, and "patched" (model-level code asks whether PEFT layers take
# adapter_names without importing the integration).
PEFT_SETTINGS = {"bat_precision": "base", "patched": False}


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


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


class MissLinearView:
    """The view of a :class:`miss_ext.MissLinear`."""

    __slots__ = ("layer",)
    fn = "MissLinear"  # how argument errors name the layer
    mixed_fn = "MissLinear.forward"

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    @property
    def takes_adapter_names(self) -> bool:
        """Whether the layer's forward takes ``adapter_names`` (mixed-adapter batches)."""
        return True

    @property
    def blocks(self):
        return self.layer.miss_block

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    @property
    def base_layer(self) -> nn.Module:
        return self.layer.base_layer

    def active(self) -> list[str]:
        """The active adapters this layer has (a model-wide list may name others)."""
        blocks = self.layer.miss_block
        return [a for a in self.layer._active_adapter if a in blocks]

    def active_terms(self) -> list[tuple[torch.Tensor, str, float]]:
        """(block, variant, live dropout p) of each active adapter, in the active order."""
        layer = self.layer
        blocks, variants, dropout = layer.miss_block, layer.miss_variant, layer.miss_dropout_p
        training = layer.training
        return [
            (blocks[a], variants[a], dropout[a] if training else 0.0)
            for a in layer._active_adapter
            if a in blocks
        ]

    def variant(self, name: str) -> str:
        return self.layer.miss_variant[name]

    def dropout_p(self, name: str) -> float:
        """The live dropout probability: 0 outside training."""
        return self.layer.miss_dropout_p[name] if self.layer.training else 0.0

    def init_weights(self, name: str, model: nn.Module):
        return self.layer.miss_init_weights[name]

    @property
    def disabled(self) -> bool:
        return self.layer._disable_adapters

    @property
    def merged(self) -> bool:
        return bool(self.layer.merged_adapters)

    @property
    def merged_adapters(self) -> list[str]:
        return self.layer.merged_adapters

    @merged_adapters.setter
    def merged_adapters(self, names: list[str]) -> None:
        self.layer.merged_adapters = names

    def unmerge(self) -> None:
        self.layer.unmerge()

    @property
    def bat_precision(self) -> str:
        return self.layer.bat_precision

    @property
    def bias(self):
        return getattr(self.layer.base_layer, "bias", None)

    def check_bat(self) -> None:
        """Raises where BAT cannot run on this layer's base; MissLinear's base_weight says why."""

    def base_weight(self) -> torch.Tensor:
        return real_weight(self.layer.base_layer)

    def set_base_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_weight().copy_(weight)

    def base(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        return self.layer.base_layer(x, *args, **kwargs)

    def linear(self, args, kwargs):
        """The base layer when it is exactly ``F.linear(x, W, b)`` (fusable), else None."""
        base = self.layer.base_layer
        return base if plain_linear(base, args, kwargs) else None

    cast = staticmethod(_cast)

    @property
    def cache(self):
        """The BAT ``W'`` cache (miss_ext.serving.cache_bat_weights), or None when off."""
        return getattr(self.layer, "_bat_weight_cache", None)


class PeftLayerView(MissLinearView):
    """The view of PEFT's ``MissLayer`` (``peft.tuners.miss.layer``), read by attribute. Its
    variant comes from the block's shape (PEFT keeps one ``miss_fn`` per layer, wrong when
    variants are mixed) and its base weight goes through PEFT's quantization backend."""

    __slots__ = ()

    @property
    def fn(self) -> str:
        return f"miss_ext.peft {type(self.layer).__name__}"

    mixed_fn = fn

    @property
    def takes_adapter_names(self) -> bool:
        return PEFT_SETTINGS["patched"]  # unpatched, PEFT drops adapter_names for MiSS

    def active(self) -> list[str]:
        blocks = self.layer.miss_block
        return [a for a in self.layer.active_adapters if a in blocks]

    def active_terms(self) -> list[tuple[torch.Tensor, str, float]]:
        blocks = self.layer.miss_block
        return [(blocks[a], self.variant(a), self.dropout_p(a)) for a in self.active()]

    def variant(self, name: str) -> str:
        return variant_of_block(self.layer.miss_block[name], self.layer.out_features)

    def dropout_p(self, name: str) -> float:
        """The adapter's nn.Dropout's p in training, else 0."""
        dropouts = self.layer.miss_dropout
        module = dropouts[name] if name in dropouts else None
        if isinstance(module, nn.Dropout) and module.training:
            return float(module.p)
        return 0.0

    def init_weights(self, name: str, model: nn.Module):
        configs = getattr(model, "peft_config", None)
        if isinstance(configs, dict) and name in configs:
            return configs[name].init_weights
        return self.layer.miss_fn  # PEFT keeps only the layer's first config; the same unless mixed

    @property
    def disabled(self) -> bool:
        return self.layer.disable_adapters

    @property
    def merged(self) -> bool:
        return self.layer.merged

    @property
    def bat_precision(self) -> str:
        return PEFT_SETTINGS["bat_precision"]

    @property
    def bias(self):
        return self.layer.get_base_layer().bias

    def check_bat(self) -> None:
        backend = self.layer.quantization_backend
        if backend is not None and not backend.supports_merge:
            raise ValueError(
                "Using MiSS with `init_weights='bat'` is not supported because quantization backend "
                f"{backend.backend_name} does not support dequantization. Use a different "
                "quantization backend or a different MiSS initialization method."
            )

    def base_weight(self) -> torch.Tensor:
        # Detached (`.data`) in PEFT, so, as in PEFT, no gradient reaches the base.
        return self.layer.get_base_weight()

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.layer.set_base_weight(weight)

    def base(self, x: torch.Tensor, args, kwargs) -> torch.Tensor:
        out = self.layer.base_layer(x, *args, **kwargs)
        backend = self.layer.quantization_backend
        return out if backend is None else backend.maybe_clone_base_result(out)

    def linear(self, args, kwargs):
        base = self.layer.base_layer
        if self.layer.quantization_backend is None and plain_linear(base, args, kwargs):
            return base
        return None

    def cast(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.layer._cast_input_dtype(t, dtype)


def view_of(layer: nn.Module) -> MissLinearView:
    """The view of a MiSS layer: MissLinear keeps a variant per adapter, PEFT's layers do not."""
    if isinstance(getattr(layer, "miss_variant", None), dict):
        return MissLinearView(layer)
    return PeftLayerView(layer)
