"""Worker of tests/test_distributed.py: trains small two-layer MiSS models under
DDP or FSDP2 in one process of a gloo (CPU, localhost) process group.

Run as ``python tests/_dist_worker.py MODE OUT_PATH`` with RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT in the environment (MODE: ``ddp``, ``fsdp2`` or ``fsdp2_meta``). Every variant
is trained in turn on the shards of the same global batches; rank 0 saves the final full
parameters of each variant to OUT_PATH. The single-process references (``train_single``,
``train_llama_single``) share the code.

``fsdp2_meta`` is the big-model flow (issue #13) on the tiny Llama of tests/_models.py:
built on the meta device, injected, ``fully_shard`` per decoder layer and the root,
``to_empty``, adapters reset to their init, then the base weights (the plain model's state
dict) and the trained blocks each loaded with torch.distributed.checkpoint's
``set_model_state_dict`` (as README's "Big models" section does it).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

import miss_ext

VARIANTS = {
    "standard": dict(init_weights=False),
    "mini": dict(init_weights="mini", mini_r=8),
    "bat": dict(init_weights="bat"),
}
STEPS, BATCH, LR = 6, 8, 0.05


def build(variant: str) -> nn.Module:
    """Two stacked MissLinear layers (with a nonlinearity between), identical on every rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16))
    miss_ext.inject(model, ["0", "2"], r=4, **VARIANTS[variant])
    with torch.no_grad():  # non-zero blocks so every path carries gradient from step 0
        for name, p in model.named_parameters():
            if "miss_block" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 16, generator=g)


def _optimizer(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def _train(model, rank: int, world: int) -> None:
    opt = _optimizer(model)
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        # Mean over the local shard; DDP/FSDP average gradients over ranks -> global mean.
        F.mse_loss(model(x), y).backward()
        opt.step()


def train_single(variant: str) -> dict:
    model = build(variant)
    _train(model, 0, 1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- tiny Llama (fsdp2_meta)

LLAMA_STEPS = 3


def build_llama(variant: str) -> nn.Module:
    """The in-memory build: CPU Llama, injected, blocks as a trained checkpoint has them."""
    import _models as tl

    model = tl.build("cpu")
    miss_ext.inject(model, tl.TARGETS, r=tl.R, **tl.VARIANTS[variant])
    tl.randomize_blocks(model)
    return model


def _train_llama(model, rank: int, world: int) -> None:
    import _models as tl

    opt = _optimizer(model)
    for step in range(LLAMA_STEPS):
        ids = tl.batch(step, n=4).chunk(world)[rank]
        opt.zero_grad(set_to_none=True)
        # Every shard has as many tokens, so the mean of the local mean losses is the global one.
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def train_llama_single(variant: str) -> dict:
    model = build_llama(variant)
    _train_llama(model, 0, 1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fsdp2_meta_llama(variant: str, rank: int, world: int) -> dict:
    import _models as tl
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    # The checkpoint: the plain model's weights and the trained blocks (read from disk in real life).
    reference = build_llama(variant)
    base_state = tl.build("cpu").state_dict()
    blocks = {k: v for k, v in reference.state_dict().items() if ".miss_block." in k}
    del reference

    model = tl.build("meta")
    miss_ext.inject(model, tl.TARGETS, r=tl.R, **tl.VARIANTS[variant])
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    tl.reinit_rope(model)
    miss_ext.reset_adapter_parameters(model)  # in place on the DTensor shards
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, miss_ext.to_injected_state_dict(model, base_state), options=options)
    for name, p in model.named_parameters():  # the base load leaves the reset blocks alone
        if ".miss_block." in name and not (type(p).__name__ == "DTensor" and p.full_tensor().eq(0).all()):
            raise AssertionError(f"{name}: not a zeroed DTensor shard after reset and base load")
    set_model_state_dict(model, blocks, options=options)
    _train_llama(model, rank, world)
    return _full_state(model)


def _full_state(model) -> dict:
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):  # DTensor (FSDP2 shard): all-gather, a collective
            v = v.full_tensor()
        out[k] = v.detach().clone()
    return out


def main() -> None:
    import torch.distributed as dist

    mode, out_path = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    from datetime import timedelta

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    try:
        for variant in VARIANTS:
            if mode == "fsdp2_meta":
                results[variant] = _fsdp2_meta_llama(variant, rank, world)
                continue
            model = build(variant)
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP

                wrapped = DDP(model)
                _train(wrapped, rank, world)
                state = _full_state(model)
            elif mode == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                for layer in (model[0], model[2]):
                    fully_shard(layer)
                fully_shard(model)
                _train(model, rank, world)
                state = _full_state(model)
            else:
                raise ValueError(f"unknown mode {mode!r}")
            results[variant] = state
    except Exception:  # report to the test instead of hanging the other rank
        results = {"error": traceback.format_exc()}
    finally:
        if rank == 0:
            torch.save(results, out_path)
        try:
            dist.barrier()  # both ranks tear gloo down together
            dist.destroy_process_group()
        except Exception:
            pass
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an
    # active exception") after all work is done and saved; leave without it. Failures are
    # reported through the results file, which the test reads.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
