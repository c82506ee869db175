"""The modules a layer case compares, all on ONE frozen ``nn.Linear`` and ONE random block:

* ``floor``  - the frozen linear itself; ``x.requires_grad``, backward to ``x`` only;
* ``peft``   - ``peft.tuners.miss.layer.MissLinear`` around the same linear, block copied in;
* ``ours``   - ``miss_ext.MissLinear`` around the same linear, same block values;
* ``floorW`` - (BAT only) a copy of the linear whose weight requires grad: forward + ``dL/dx`` +
  ``dL/dW``, the GEMMs BAT cannot avoid (docs/MATH.md section 8), i.e. BAT's real floor.

x, the upstream gradient and the linear are in the case's base dtype, the block in its block
dtype (``bfloat16+float32``: an fp32 block on a bf16 layer, for PEFT too, as ``get_peft_model``
leaves it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List

import miss_ext
import torch
from torch import nn

from .cases import INIT_WEIGHTS, Case
from .timing import Contestant


@dataclass
class LayerSetup:
    case: Case
    x: torch.Tensor  # (N, in), requires grad
    grad_out: torch.Tensor  # (N, out), the upstream gradient fed to backward
    base: nn.Linear  # frozen, shared by floor / peft / ours
    block: torch.Tensor  # the random non-zero block values (a plain tensor, in the block dtype)
    modules: Dict[str, nn.Module] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        w = self.base.weight
        return w.numel() * w.element_size()


def block_shape(case: Case) -> tuple:
    s = case.shape
    if case.variant == "bat":
        return (s.out_features // s.r, s.r, s.r)
    if case.variant == "mini":
        return (s.r, s.mini_r)
    return (s.r, s.out_features)


def make_setup(case: Case, device, seed: int = 0) -> LayerSetup:
    s = case.shape
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(s.in_features, s.out_features, bias=True)
    with torch.no_grad():  # nn.Linear's default init, from our generator
        bound = 1.0 / s.in_features**0.5
        base.weight.uniform_(-bound, bound, generator=gen)
        base.bias.uniform_(-bound, bound, generator=gen)
    base = base.to(device=device, dtype=case.dtype).requires_grad_(False)
    x = torch.randn(s.tokens, s.in_features, generator=gen).to(device=device, dtype=case.dtype)
    x.requires_grad_(True)
    g = torch.randn(s.tokens, s.out_features, generator=gen).to(device=device, dtype=case.dtype)
    # Non-zero block with entries 0.3x the weight's standard deviation (bound / sqrt(3)): the
    # standard/mini term is then about 0.3x the frozen output, and BAT's B about 0.3x W (W' ~ W),
    # a trained adapter's size, the same at every shape (a fixed scale would make the adapter
    # dominate wide layers and inflate the err/frozen ratios by the output's growth).
    scale = 0.3 * bound / 3**0.5
    block = (scale * torch.randn(block_shape(case), generator=gen)).to(device=device, dtype=case.block)
    return LayerSetup(case, x, g, base, block)


def _set_block(module: nn.Module, block: torch.Tensor) -> None:
    p = module.miss_block["default"]
    with torch.no_grad():
        p.data = block.detach().clone()
    p.requires_grad_(True)


def make_peft(setup: LayerSetup) -> nn.Module:
    from peft import MissConfig
    from peft.tuners.miss.layer import MissLinear as PeftMissLinear

    c, s = setup.case, setup.case.shape
    cfg = MissConfig(r=s.r, mini_r=s.mini_r, init_weights=INIT_WEIGHTS[c.variant], miss_dropout=0.0)
    m = PeftMissLinear(setup.base, "default", config=cfg, r=s.r)
    setup.base.requires_grad_(False)
    _set_block(m, setup.block)
    return m.train()


def make_ours(setup: LayerSetup, bat_precision: str = "base") -> nn.Module:
    c, s = setup.case, setup.case.shape
    m = miss_ext.MissLinear(setup.base, r=s.r, mini_r=s.mini_r, init_weights=INIT_WEIGHTS[c.variant],
                            miss_dropout=0.0, adapter_name="default", bat_precision=bat_precision)
    setup.base.requires_grad_(False)
    _set_block(m, setup.block)
    return m.train()


def make_floor_w(setup: LayerSetup) -> nn.Module:
    lin = copy.deepcopy(setup.base)
    lin.weight.requires_grad_(True)  # bias stays frozen, as it is under BAT
    return lin


def build_modules(setup: LayerSetup, with_floor_w: bool | None = None,
                  bat_precision: str = "base") -> Dict[str, nn.Module]:
    """``bat_precision`` is miss_ext's BAT mode for blocks wider than the base (mixed cases)."""
    if with_floor_w is None:
        with_floor_w = setup.case.variant == "bat"
    mods = {"floor": setup.base, "peft": make_peft(setup), "ours": make_ours(setup, bat_precision)}
    if with_floor_w:
        mods["floorW"] = make_floor_w(setup)
    setup.modules = mods
    return mods


def trainable(module: nn.Module) -> List[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def contestants(setup: LayerSetup) -> List[Contestant]:
    """Round-robin order: floor, peft, ours (, floorW)."""
    x, g = setup.x, setup.grad_out
    out = []
    for name, mod in setup.modules.items():
        params = trainable(mod)

        def prepare(params=params):
            x.grad = None
            for p in params:
                p.grad = None

        out.append(Contestant(name, prepare, (lambda mod=mod: mod(x)), (lambda y: y.backward(g))))
    return out
