"""Build and load behaviour: build_info, the torch-version guard, the build's messages when torch
cannot be imported, and importing from a source folder that has no compiled extension."""

import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap

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


def _setup_py_message(cmd, env=None):
    """Runs setup.py as a build would and returns its one-line stop message."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "pip install --no-build-isolation ." in lines[0]
    return lines[0]


def test_plain_pip_install_says_build_isolation_hid_torch(tmp_path):
    """A plain `pip install .` (pip's real isolated build) with torch installed: the message says
    that isolation hid the installed torch, not that torch is missing."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp_path), REPO],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    if "miss_ext:" not in out:
        pytest.skip(f"pip could not set up its isolated build env here (no index?):\n{out[-2000:]}")
    assert proc.returncode != 0
    assert f"torch {torch.__version__} is installed" in out
    assert "build isolation hid it" in out
    assert "pip install --no-build-isolation ." in out
    assert not list(tmp_path.glob("*.whl"))


def test_build_without_torch_says_install_torch_first(tmp_path):
    """An interpreter without torch: the message says so, with the order of the two steps."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=120)
    msg = _setup_py_message([str(tmp_path / "env" / "bin" / "python"), "setup.py", "--name"])
    assert "torch is not installed" in msg and "pip install torch==" in msg


def test_build_with_broken_torch_names_the_error(tmp_path):
    (tmp_path / "torch.py").write_text("raise ImportError('libtorch_cpu.so: cannot open shared object file')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    msg = _setup_py_message([sys.executable, "setup.py", "--name"], env)
    assert f"torch {torch.__version__} is installed" in msg and "libtorch_cpu.so" in msg


# ---------------------------------------------------------------- source folder without _C


PKG = os.path.dirname(os.path.abspath(miss_ext.__file__))


def _copy_package(dest, with_binary, with_meta=True):
    """A copy of the miss_ext package at dest/miss_ext: its .py sources, and the compiled _C and
    _build_meta.py only if asked (what a non-editable install leaves in the checkout: no _C)."""
    pkg = dest / "miss_ext"
    pkg.mkdir(parents=True)
    for name in os.listdir(PKG):
        is_binary = name.startswith("_C") and name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
        if (name.endswith(".py") and (name != "_build_meta.py" or with_meta)) or (is_binary and with_binary):
            shutil.copy(os.path.join(PKG, name), pkg / name)
    return pkg


def _checkout(tmp_path):
    """A repository checkout without a build: setup.py beside a miss_ext/ without _C."""
    repo = tmp_path / "repo"
    _copy_package(repo, with_binary=False)
    (repo / "setup.py").write_text("")
    return repo


def test_source_folder_defers_to_an_installed_build_of_the_same_sources(tmp_path):
    """Python run from a checkout whose miss_ext/ has no _C (a non-editable install put it in
    site-packages) imports the installed build, which works."""
    repo = _checkout(tmp_path)
    site = tmp_path / "site"
    _copy_package(site, with_binary=True)
    code = textwrap.dedent("""
        import torch, miss_ext
        from miss_ext import functional as MF
        print(miss_ext.__file__)
        print(miss_ext.layer.__file__)
        print(MF.blocksum(torch.ones(2, 8), 4).sum().item())
    """)
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    init, layer, total = proc.stdout.split()
    assert init == str(site / "miss_ext" / "__init__.py")
    assert layer == str(site / "miss_ext" / "layer.py")
    assert float(total) == 16.0  # (2, 4) sums of two ones


def test_source_folder_with_other_sources_names_the_cause(tmp_path, monkeypatch):
    repo = _checkout(tmp_path)
    with open(repo / "miss_ext" / "layer.py", "a") as f:
        f.write("# edited after the install\n")
    site = tmp_path / "site"
    _copy_package(site, with_binary=False)
    (site / "miss_ext" / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    monkeypatch.setattr(_load, "_HERE", str(repo / "miss_ext"))
    monkeypatch.setattr(sys, "path", [str(site)])
    monkeypatch.setattr(sys, "meta_path", [importlib.machinery.PathFinder])
    with pytest.raises(ImportError) as info:
        _load.load_core()
    msg = str(info.value)
    assert "source folder " + str(repo / "miss_ext") in msg
    assert str(site / "miss_ext") in msg and "layer.py differ" in msg
    assert msg.endswith(f"pip install --no-build-isolation -e {repo}")
    assert "circular" not in msg


def test_source_folder_without_any_build_says_build_it(tmp_path, monkeypatch):
    repo = _checkout(tmp_path)
    monkeypatch.setattr(_load, "_HERE", str(repo / "miss_ext"))
    monkeypatch.setattr(sys, "path", [str(tmp_path / "nothing")])
    monkeypatch.setattr(sys, "meta_path", [importlib.machinery.PathFinder])
    with pytest.raises(ImportError) as info:
        _load.load_core()
    msg = str(info.value)
    assert msg.startswith("miss_ext is not built: " + str(repo / "miss_ext"))
    assert msg.endswith(f"pip install --no-build-isolation -e {repo}")
