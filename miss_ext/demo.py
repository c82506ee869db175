"""A one-minute demo: fit each MiSS variant of a frozen linear layer to a target layer on CPU
and print the loss going down. Run: python -m miss_ext.demo"""

import argparse
import time

import torch
from torch import nn

import miss_ext
from miss_ext.layer import INIT_WEIGHTS


def train(variant: str, steps: int, in_f: int, out_f: int, r: int) -> list[float]:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f)
    # The target differs from the base by a change each variant can represent exactly.
    init = INIT_WEIGHTS[variant]
    layer = miss_ext.MissLinear(base, r=r, mini_r=16, init_weights=init, miss_dropout=0.0)
    with torch.no_grad():
        target = miss_ext.MissLinear(nn.Linear(in_f, out_f), r=r, mini_r=16, init_weights=init)
        target.base_layer.load_state_dict(base.state_dict())
        block = target.miss_block["default"]
        block.copy_((0.02 if variant == "bat" else 0.1) * torch.randn_like(block))
    opt = torch.optim.Adam(layer.miss_block.parameters(), lr=1e-2 if variant != "bat" else 2e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, in_f)
        with torch.no_grad():
            y = target(x)
        loss = nn.functional.mse_loss(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    print(f"miss_ext {miss_ext.__version__} built with {miss_ext.build_info()}")
    for variant in ("standard", "mini", "bat"):
        t0 = time.perf_counter()
        losses = train(variant, args.steps, in_f=256, out_f=192, r=16)
        marks = [0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1]
        trail = "  ".join(f"step {i}: {losses[i]:.5f}" for i in marks)
        print(f"{variant:8s} {trail}  ({time.perf_counter() - t0:.1f}s)")
        if not losses[-1] < losses[0]:
            raise SystemExit(f"{variant}: loss did not go down")


if __name__ == "__main__":
    main()
