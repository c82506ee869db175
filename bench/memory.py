"""Memory kept for backward.

``SavedTensorsMeter`` counts, through ``torch.autograd.graph.saved_tensors_hooks``, the bytes of
every distinct storage autograd keeps alive between forward and backward (a view keeps its whole
storage, so storages, not views, are counted, each once). Storages of tensors passed in
``exclude`` (the module's parameters and buffers, the input ``x``: things that exist anyway and
that the floor keeps too) are counted apart, in ``excluded_bytes``.

On CUDA, ``cuda_peak`` measures ``torch.cuda.max_memory_allocated`` above the memory allocated
when it starts. On CPU no allocator statistic sees torch (tracemalloc does not); ``cpu_peak_bytes``
runs a function once under ``torch.profiler`` with ``profile_memory=True`` and takes the running
maximum of the allocations and frees it records (every thread's, in time order): the peak above
the start. The profiler slows the call, so it is never a timed one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from torch.profiler import ProfilerActivity, profile


def storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr(), st.nbytes())
    except Exception:  # tensors without a storage (subclasses, sparse): count them by identity
        return ("id", id(t), 0)


def storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except Exception:
        return int(t.numel() * t.element_size())


class SavedTensorsMeter:
    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
        self._kept: dict = {}
        self._excluded: dict = {}
        self.n_saved = 0  # number of pack calls (tensors saved, counting repeats)

    # The hooks only look at the tensor and return it unchanged: nothing is copied or kept.
    def _pack(self, t: torch.Tensor):
        self.n_saved += 1
        key = storage_key(t)
        (self._excluded if key in self._exclude else self._kept)[key] = storage_nbytes(t)
        return t

    @staticmethod
    def _unpack(t):
        return t

    @property
    def saved_bytes(self) -> int:
        """Bytes of distinct saved storages that are not excluded (the activation memory)."""
        return sum(self._kept.values())

    @property
    def excluded_bytes(self) -> int:
        return sum(self._excluded.values())

    @property
    def n_storages(self) -> int:
        return len(self._kept)

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@contextmanager
def cuda_peak(device):
    """Yields a dict whose ``peak_bytes`` (set on exit) is the peak allocated above the start."""
    res = {"peak_bytes": float("nan")}
    dev = torch.device(device)
    if dev.type != "cuda":
        yield res
        return
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    try:
        yield res
    finally:
        torch.cuda.synchronize(dev)
        res["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - start


def cpu_peak_bytes(fn) -> float:
    """Peak of torch's CPU allocations above the start while ``fn()`` runs; NaN when this torch's
    profiler does not expose its memory events (they are read through a private attribute)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        now = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            now += e.nbytes()
            peak = max(peak, now)
    except AttributeError:
        return float("nan")
    return float(peak)
