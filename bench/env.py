"""What a result was measured on: versions, device, threads, git commit, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

import miss_ext
import torch

REPO = Path(__file__).resolve().parents[1]


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:
        return ""


def git_commit() -> str:
    sha = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return sha + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()} ({os.cpu_count()} cpus)"


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return ""


def collect(device) -> dict:
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda or "",
        "device": str(torch.device(device)),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
    }
    b = miss_ext.build_info()
    info.update(miss_ext=miss_ext.__version__, miss_ext_openmp=b.get("openmp", ""), miss_ext_cuda=b.get("cuda", ""))
    return info


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
