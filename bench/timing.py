"""Interleaved timing: contestants run round-robin (a, b, c, a, b, c, ...) after a warmup, so a
slow patch of a noisy machine hits all of them alike. One call of a contestant gives three
numbers: forward, backward, and forward+backward (from the same run). On CUDA the marks are
CUDA events; on CPU ``time.perf_counter_ns``.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch

PHASES = ("fwd", "bwd", "total")


class CpuClock:
    name = "perf_counter"

    def sync(self) -> None:
        pass

    def mark(self):
        return time.perf_counter_ns()

    def elapsed_ms(self, a, b) -> float:
        return (b - a) / 1e6


class ThreadClock(CpuClock):
    """CPU time of the calling thread (with torch.set_num_threads(1) all compute runs there):
    steadier than wall time on a machine that other jobs share."""

    name = "thread_time"

    def mark(self):
        return time.thread_time_ns()


class CudaClock:
    """CUDA events on the current stream (torch.cuda.Event exists in every torch >= 1.x)."""

    name = "cuda-events"

    def __init__(self, device) -> None:
        self.device = torch.device(device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def mark(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b)


def clock_for(device) -> object:
    return CudaClock(device) if torch.device(device).type == "cuda" else CpuClock()


@dataclass
class Contestant:
    """``prepare()`` runs untimed before each call (clear grads); ``forward()`` returns what
    ``backward(out)`` consumes."""

    name: str
    prepare: Callable[[], None]
    forward: Callable[[], object]
    backward: Callable[[object], None]


@dataclass
class Samples:
    fwd: List[float] = field(default_factory=list)
    bwd: List[float] = field(default_factory=list)
    total: List[float] = field(default_factory=list)

    def phase(self, p: str) -> List[float]:
        return getattr(self, p)


@contextmanager
def no_gc():
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def timed(clock, fn: Callable[[], object]):
    """``(fn(), ms)``: one call, synchronized before and after (a CUDA clock's events are read
    only once the device has reached them)."""
    clock.sync()
    t0 = clock.mark()
    out = fn()
    t1 = clock.mark()
    clock.sync()
    return out, clock.elapsed_ms(t0, t1)


def run_interleaved(contestants: List[Contestant], clock, warmup: int, repeats: int,
                    progress: Callable[[], None] | None = None) -> Dict[str, Samples]:
    """Round-robin ``warmup + repeats`` rounds; returns the timed samples (ms) per contestant."""
    out = {c.name: Samples() for c in contestants}
    with no_gc():
        for i in range(warmup + repeats):
            for c in contestants:
                c.prepare()
                clock.sync()
                m0 = clock.mark()
                y = c.forward()
                m1 = clock.mark()
                c.backward(y)
                m2 = clock.mark()
                clock.sync()
                del y
                if i >= warmup:
                    s = out[c.name]
                    s.fwd.append(clock.elapsed_ms(m0, m1))
                    s.bwd.append(clock.elapsed_ms(m1, m2))
                    s.total.append(clock.elapsed_ms(m0, m2))
            if progress is not None:
                progress()
    return out


def median(xs: List[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def paired_ratio(num: List[float], den: List[float]) -> float:
    """Median over rounds of ``num[i] / den[i]``: both were measured in the same round, so a
    load spike that hits the round cancels out (more robust than a ratio of medians)."""
    rs = [a / b for a, b in zip(num, den) if b > 0]
    return statistics.median(rs) if rs else math.nan


def spread(xs: List[float]) -> float:
    """Relative half-width of the middle 50% (IQR / 2 / median); a noise indicator."""
    if len(xs) < 4:
        return math.nan
    q = statistics.quantiles(xs, n=4)
    m = statistics.median(xs)
    return (q[2] - q[0]) / 2 / m if m > 0 else math.nan
