"""PEP 517 build backend for miss_ext: setuptools, compiling against the torch of the environment
the package is being installed into.

Why a backend of our own: a compiled torch extension must be built against the exact torch it
will run with. pip's default build isolation builds in a temporary environment that hides the
installed torch, and listing torch as a build requirement would make pip download a second,
possibly different, torch (multi-GB for a CUDA build) and compile against that one.

What pip does give us: its isolated build runs this module with the *target* interpreter
(``sys.executable``) and hides the target's site-packages only through environment variables
(PYTHONPATH plus a sitecustomize there). A child interpreter started with ``-E`` ignores those
variables and so reports the target's own ``sys.path``; appending it to ours makes the target's
torch importable while the build requirements pip installed (setuptools, wheel, ninja) still
come first. Front-ends that build with a different interpreter (``python -m build``, ``uv``)
have no such target to find; they get a one-line error naming what works there.
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

from setuptools import build_meta as _setuptools

# What setup.py reads to decide between "compile against torch" and "source distribution".
_SDIST_ENV = "MISS_EXT_BUILDING_SDIST"

_PROBE = (
    "import importlib.util, json, sys;"
    "spec = importlib.util.find_spec('torch');"
    "print(json.dumps({'path': sys.path, 'torch': spec.origin if spec else None}))"
)


def _torch_importable() -> bool:
    return importlib.util.find_spec("torch") is not None


def _target_paths():
    """sys.path of this interpreter as the user runs it (without the build's environment
    variables), and whether torch is importable there; (None, False) if the probe fails."""
    try:
        proc = subprocess.run([sys.executable, "-E", "-c", _PROBE], capture_output=True, text=True,
                              timeout=120, cwd=os.path.expanduser("~"))
        found = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None, False
    return [p for p in found["path"] if p], found["torch"] is not None


def _front_end_python():
    """The Python interpreter that started this build, when it is another environment than ours
    and can import torch (`python -m build` runs us in a fresh venv of its own), else None.
    Linux only (read from /proc); elsewhere the general message stands."""
    import shutil

    proc_dir = f"/proc/{os.getppid()}"
    try:
        with open(f"{proc_dir}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0].decode()
        with open(f"{proc_dir}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        cwd = os.readlink(f"{proc_dir}/cwd")
    except (OSError, ValueError):
        return None
    # A venv's python is a symlink to the base interpreter: compare the paths as invoked.
    if os.sep not in argv0:
        argv0 = shutil.which(argv0, path=env.get(b"PATH", b"").decode()) or ""
    parent = os.path.normpath(os.path.join(cwd, argv0)) if argv0 else ""
    if not os.path.basename(parent).startswith("python") or parent == os.path.normpath(sys.executable):
        return None
    try:
        out = subprocess.run([parent, "-E", "-c", _PROBE], capture_output=True, text=True, timeout=120,
                             cwd=os.path.expanduser("~")).stdout
        return parent if json.loads(out)["torch"] else None
    except (OSError, subprocess.SubprocessError, ValueError, KeyError):
        return None


def _no_torch_message() -> str:
    source = os.getcwd()
    front_end = _front_end_python()
    if front_end:
        return (
            f"miss_ext: this front-end builds in a fresh environment of its own ({sys.executable}), "
            f"which cannot see the torch installed for {front_end}, and the kernels must be "
            f"compiled against that torch: build with `pip wheel --no-deps {source}` or "
            f"`python -m build --no-isolation` there instead"
        )
    return (
        f"miss_ext: no torch to build against: {sys.executable}, the interpreter running this "
        f"build, cannot import torch. The kernels are compiled against the torch already "
        f"installed where miss_ext goes, so install torch there first (any 2.11 - 2.15, e.g. "
        f"`pip install torch`), then run the same command again. Front-ends that build in a "
        f"fresh environment of their own (python -m build, uv build) cannot see that torch: "
        f"there use `pip wheel --no-deps {source}`, `python -m build --no-isolation` or, from "
        f"{source}, `uv pip install .` (pyproject.toml's [tool.uv] hands uv the torch)."
    )


def _use_target_torch():
    if _torch_importable():
        return  # no isolation (--no-build-isolation), or a front-end that provided torch itself
    paths, has_torch = _target_paths()
    if not has_torch:
        raise SystemExit(_no_torch_message())
    # Appended, not prepended: the build requirements pip installed for this build win over
    # older copies in the target (a venv's setuptools 65, for one); torch exists only there.
    sys.path.extend(p for p in paths if p not in sys.path)
    importlib.invalidate_caches()
    if not _torch_importable():
        raise SystemExit(_no_torch_message())


def _check_wheel_tool():
    """setuptools before 70.1 builds wheels (and their metadata) with the separate `wheel`
    package; pip installs it into isolated builds, but --no-build-isolation uses what the
    environment has, and a new venv (Python's setuptools 65.5, which torch 2.11 and 2.12 keep)
    has none. Without this check setuptools fails with "invalid command 'bdist_wheel'"."""
    import setuptools

    major_minor = tuple(int(x) for x in setuptools.__version__.split(".")[:2] if x.isdigit())
    if major_minor < (70, 1) and importlib.util.find_spec("wheel") is None:
        raise SystemExit(
            f"miss_ext: this environment's setuptools {setuptools.__version__} builds wheels with "
            f"the `wheel` package, which is not installed ({sys.executable}): run "
            f"`pip install wheel` (or `pip install 'setuptools>=70.1'`), or build without "
            f"--no-build-isolation, then run the same command again"
        )


# ----------------------------------------------------------------------- PEP 517 / 660 hooks


def get_requires_for_build_wheel(config_settings=None):
    _use_target_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_target_torch()
    _check_wheel_tool()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    _check_wheel_tool()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def get_requires_for_build_editable(config_settings=None):
    _use_target_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_target_torch()
    _check_wheel_tool()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_target_torch()
    _check_wheel_tool()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


# A source distribution compiles nothing, so it needs no torch: every torch it may later be
# built against gets its own wheel with its own exact pin.


def get_requires_for_build_sdist(config_settings=None):
    os.environ[_SDIST_ENV] = "1"
    return _setuptools.get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory, config_settings=None):
    os.environ[_SDIST_ENV] = "1"
    return _setuptools.build_sdist(sdist_directory, config_settings)
