"""Build and load behaviour: build_info, the torch-version guard, the no-torch build error."""

import importlib
import os
import subprocess
import sys

import pytest
import torch

import miss_ext
from miss_ext import _build_meta, _load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_describes_this_build():
    info = miss_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)
    assert info["cuda"] == _build_meta.WITH_CUDA
    if info["cuda"]:
        assert info["cuda_archs"]
    # An OpenMP torch must get an OpenMP extension, or at::parallel_for runs serially.
    if "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        assert info["openmp"]


def test_torch_version_mismatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_build_meta, "TORCH_VERSION", "1.0.0+fake")
    with pytest.raises(ImportError) as info:
        _load.load_core()
    msg = str(info.value)
    assert "1.0.0+fake" in msg and torch.__version__ in msg
    assert "pip install --no-build-isolation" in msg


def test_local_build_tag_is_not_a_mismatch(monkeypatch):
    monkeypatch.setattr(_build_meta, "TORCH_VERSION", torch.__version__.split("+")[0] + "+other")
    assert _load.load_core() is miss_ext._C


def test_build_without_torch_stops_with_one_line(tmp_path):
    """A plain `pip install .` builds in an isolated env without torch: setup.py must stop at
    once with the command to run, not pull a torch of another ABI."""
    (tmp_path / "torch.py").write_text("raise ImportError('no torch here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "pip install --no-build-isolation ." in lines[0]
