"""Multi-process training (issue #6): 2 processes, gloo backend, CPU, localhost only.

A small model (two stacked MissLinear layers around a Tanh), for every variant (standard,
mini, BAT), is trained for a few SGD+momentum steps with each process taking half of every
global batch. The final parameters must match single-process training on the combined batch
within float32 tolerance (the gradient all-reduce sums in another order), and the frozen base
weights must be untouched.

* DDP: torch.nn.parallel.DistributedDataParallel.
* FSDP2: torch.distributed.fsdp.fully_shard (per MissLinear layer, then the root), which runs on
  CPU with gloo here; the full parameters are gathered with DTensor.full_tensor().
* FSDP2 from the meta device (issue #13): a tiny Llama built under torch.device("meta"),
  injected, fully_shard per decoder layer and the root, to_empty, loaded (base + blocks), a few
  steps; it must match single-process training of the same model built in memory.

The workers (tests/_dist_worker.py) are started with subprocess, MASTER_ADDR=127.0.0.1 and
a free port, one thread each; both runs take a few seconds per process start.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import _dist_worker as worker
from conftest import assert_close

HERE = Path(__file__).resolve().parent
WORLD = 2
TIMEOUT_S = 90

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path) -> dict:
    last = ""
    for _attempt in range(2):  # a just-freed port can be taken in between: retry once
        port = _free_port()
        procs = []
        for rank in range(WORLD):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            procs.append(subprocess.Popen(
                [sys.executable, str(HERE / "_dist_worker.py"), mode, str(out)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{mode} workers did not finish within {TIMEOUT_S} s")
        last = "\n".join(f"--- rank {r} (rc {p.returncode}) ---\n{log}" for r, (p, log) in enumerate(zip(procs, logs)))
        if all(p.returncode == 0 for p in procs) and out.exists():
            return torch.load(out, weights_only=True)
        if "address already in use" not in last.lower():
            break
    pytest.fail(f"{mode} workers failed:\n{last}")


def _single(train):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers
    try:
        return {v: train(v) for v in worker.VARIANTS}
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def single():
    return _single(worker.train_single)


def _compare(results, single, mode, build=worker.build):
    assert "error" not in results, f"{mode} worker raised:\n{results.get('error')}"
    assert set(results) == set(worker.VARIANTS)
    for variant, expected in single.items():
        got = results[variant]
        assert set(got) == set(expected), (variant, sorted(set(got) ^ set(expected)))
        start = build(variant).state_dict()
        trained = blocks = 0
        for k, v in expected.items():
            if "miss_block" in k:
                assert_close(got[k], v, dtype=torch.float32, msg=f"{mode} {variant} {k}")
                trained += not torch.equal(v, start[k])
                blocks += 1
            else:  # frozen base weights: bit-for-bit unchanged everywhere
                assert torch.equal(got[k], start[k]) and torch.equal(v, start[k]), f"{mode} {variant} {k} changed"
        assert trained == blocks >= 2, f"{variant}: every adapter must have trained ({trained} of {blocks})"


def test_ddp_matches_single_process(tmp_path, single):
    _compare(_launch("ddp", tmp_path / "ddp.pt"), single, "DDP")


def test_fsdp2_matches_single_process(tmp_path, single):
    _compare(_launch("fsdp2", tmp_path / "fsdp2.pt"), single, "FSDP2")


def test_fsdp2_from_meta_device_matches_single_process(tmp_path):
    pytest.importorskip("transformers")
    single = _single(worker.train_llama_single)
    _compare(_launch("fsdp2_meta", tmp_path / "fsdp2_meta.pt"), single, "FSDP2 meta", build=worker.build_llama)
