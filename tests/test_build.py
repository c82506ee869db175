"""Build and load behaviour: build_info and its CPU paths, the brgemm build probe, the build
backend inside pip's isolation and the exact torch pin of what it builds, the build's messages
when torch cannot be imported, importing from a source folder without a compiled extension or
from the checkout's parent folder, and silence on import. (Full builds with each torch release
run in .ci/torch_smoke.sh.)"""

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
    assert "rebuild it against this torch with: pip install " in msg


def test_local_build_tag_is_not_a_mismatch(monkeypatch):
    monkeypatch.setattr(_build_meta, "TORCH_VERSION", torch.__version__.split("+")[0] + "+other")
    assert _load.load_core() is miss_ext._C


def _setup_py_message(cmd, env=None):
    """Runs setup.py as a build would and returns its one-line stop message."""
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith("then run the same command again")
    return lines[0]


def test_build_without_torch_says_install_torch_first(tmp_path):
    """An interpreter without torch: the message says so, with the order of the two steps."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=120)
    msg = _setup_py_message([str(tmp_path / "env" / "bin" / "python"), "setup.py", "--name"])
    assert "torch is not installed" in msg and "pip install torch==" in msg


def test_build_with_broken_torch_names_the_error(tmp_path):
    (tmp_path / "torch.py").write_text("raise ImportError('libtorch_cpu.so: cannot open shared object file')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    msg = _setup_py_message([sys.executable, "setup.py", "--name"], env)
    import importlib.metadata

    # The distribution's version: PyPI's CUDA wheels say 2.11.0 where torch.__version__ says 2.11.0+cu130.
    assert f"torch {importlib.metadata.version('torch')} is installed" in msg and "libtorch_cpu.so" in msg


# ---------------------------------------------------------------- the build backend

BACKEND = os.path.join(REPO, "build_backend")
RELEASE = torch.__version__.split("+")[0]


def _overlay(tmp_path):
    """A folder holding only the build requirements (setuptools, linked from this env), as
    pip's and build's isolated environments do."""
    import setuptools

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    site = os.path.dirname(os.path.dirname(setuptools.__file__))
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        if os.path.exists(os.path.join(site, name)):
            (overlay / name).symlink_to(os.path.join(site, name))
    return overlay


def _isolated_like_pip(tmp_path, code):
    """Runs `code` the way pip runs a build backend under build isolation: the target
    interpreter, its site-packages taken off sys.path by a sitecustomize on PYTHONPATH, and an
    overlay folder holding only the build requirements (here setuptools, linked from this env)."""
    overlay = _overlay(tmp_path)
    (overlay / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        sys.path[:] = [p for p in sys.path if "-packages" not in p]
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(overlay), BACKEND]), PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_backend_finds_the_target_torch_inside_build_isolation(tmp_path):
    code = textwrap.dedent("""
        import importlib.util, sys
        assert importlib.util.find_spec("torch") is None, "the fake isolation did not hide torch"
        import setuptools, miss_ext_backend
        miss_ext_backend._use_target_torch()
        import torch
        print(torch.__version__)
        print(setuptools.__file__)
    """)
    proc = _isolated_like_pip(tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    version, setuptools_file = proc.stdout.split()
    assert version == torch.__version__
    # The build requirements still come from the build's own environment, not the target's.
    assert setuptools_file.startswith(str(tmp_path / "overlay"))


def test_backend_without_any_torch_is_one_line_naming_what_works(tmp_path, monkeypatch):
    sys.path.insert(0, BACKEND)
    try:
        import miss_ext_backend
    finally:
        sys.path.remove(BACKEND)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=120)
    monkeypatch.setattr(miss_ext_backend, "_torch_importable", lambda: False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "env" / "bin" / "python"))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as info:
        miss_ext_backend.get_requires_for_build_wheel()
    msg = str(info.value.code)
    assert "\n" not in msg and msg.startswith("miss_ext: no torch to build against: " + sys.executable)
    assert f"pip wheel --no-deps {REPO}" in msg and "python -m build --no-isolation" in msg
    assert f"from {REPO}, `uv pip install .`" in msg


def test_a_front_end_building_in_its_own_env_gets_the_command_that_works(tmp_path):
    """`python -m build` runs the backend in a fresh venv of its own: the message names the
    interpreter that has torch and what to run with it, in one line."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=120)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_overlay(tmp_path)), BACKEND]))
    hook = "import miss_ext_backend; miss_ext_backend.get_requires_for_build_wheel()"
    front_end = textwrap.dedent(f"""
        import subprocess, sys
        p = subprocess.run([{str(tmp_path / "env" / "bin" / "python")!r}, "-c", {hook!r}], cwd={REPO!r},
                           capture_output=True, text=True)
        print(p.returncode, p.stderr.strip().splitlines()[-1])
    """)
    proc = subprocess.run([sys.executable, "-c", front_end], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    code, msg = proc.stdout.strip().split(" ", 1)
    assert code == "1"
    assert msg.startswith(f"miss_ext: this front-end builds in a fresh environment of its own ({tmp_path}/env/bin/python)")
    assert f"cannot see the torch installed for {sys.executable}" in msg
    assert msg.endswith(f"build with `pip wheel --no-deps {REPO}` or `python -m build --no-isolation` there instead")


def test_plain_pip_install_resolves_against_the_installed_torch(tmp_path):
    """pip's real isolated build, up to the metadata (no compile): it finds the installed torch
    and the wheel would require exactly that release."""
    import json

    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
         "--report", str(report), REPO],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "miss_ext" not in out:
        pytest.skip(f"pip could not set up its isolated build env here (no index?):\n{out[-2000:]}")
    assert proc.returncode == 0, out[-3000:]
    (item,) = json.loads(report.read_text())["install"]
    assert item["metadata"]["name"] == "miss_ext"
    assert f"torch=={RELEASE}" in item["metadata"]["requires_dist"]


def test_installed_metadata_pins_the_torch_it_was_built_against():
    import importlib.metadata

    requires = importlib.metadata.requires("miss_ext")
    assert f"torch=={RELEASE}" in requires, requires
    assert _build_meta.TORCH_VERSION.split("+")[0] == RELEASE


# ---------------------------------------------------------------- CPU paths


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_build_info_reports_the_cpu_paths():
    info = miss_ext.build_info()
    assert isinstance(info["cpu_brgemm"], bool)
    status = info["cpu_brgemm_status"]
    assert info["cpu_brgemm"] == (status == "active")
    assert status == "active" or status.startswith(("off: ", "not compiled: "))
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to compare against")
    # What GCC's x86-64-v4 / v3 levels (the target_clones of csrc/cpu/vec.cpp) require.
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe"}
    want = "avx512" if v4 | v3 <= flags else "avx2" if v3 <= flags else "portable"
    assert info["cpu_vector_isa"] == want


def test_the_fast_path_runs_where_the_cpu_has_it():
    """On a CPU with AMX or AVX512-BF16, torch's brgemm must have compiled in and passed its
    self-test: when it silently fell back, the bf16 mixed-precision paths run several times
    slower (2.5x on a Zen 4's fp32 GEMM)."""
    flags = _cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    info = miss_ext.build_info()
    if os.environ.get("MISS_EXT_CPU_BRGEMM") == "0":
        assert info["cpu_brgemm_status"] == "off: MISS_EXT_CPU_BRGEMM=0"
    elif {"amx_bf16", "amx_tile"} <= flags or "avx512_bf16" in flags:
        assert info["cpu_brgemm"], info["cpu_brgemm_status"]
    else:
        assert not info["cpu_brgemm"] and info["cpu_brgemm_status"].startswith("off: ")
    # AMX tiles only where the CPU has them (then the fp32-product paths stay off).
    if info["cpu_brgemm_amx"]:
        assert info["cpu_brgemm"] and {"amx_bf16", "amx_tile"} <= flags


def test_the_fp32_micro_kernel_runs_where_the_bf16_one_does():
    """The fp32 products (the forward term without autocast, BAT's contraction on AVX512-BF16
    CPUs) need the bf16 path active and this torch's fp32 brgemm (its CPUBLAS_BRGEMM_F32F32F32
    marker, every supported torch has it); when its self-test silently failed they would run at
    aten's fp32 GEMM rate, half as fast."""
    info = miss_ext.build_info()
    assert isinstance(info["cpu_brgemm_fp32"], bool)
    if not info["cpu_brgemm"]:
        assert not info["cpu_brgemm_fp32"]
        return
    import torch.utils.cpp_extension as ext

    header = os.path.join(ext.include_paths()[0], "ATen", "native", "CPUBlas.h")
    with open(header) as f:
        declared = "CPUBLAS_BRGEMM_F32F32F32" in f.read()
    assert info["cpu_brgemm_fp32"] == declared


def _brgemm_probe():
    sys.path.insert(0, BACKEND)
    try:
        import brgemm_probe
    finally:
        sys.path.remove(BACKEND)
    return brgemm_probe


def test_brgemm_probe_agrees_with_the_build():
    """The build probe (a compile and link of csrc/cpu/torch_brgemm.h) accepts this torch exactly
    when the build compiled the brgemm path in."""
    ok, why = _brgemm_probe().usable(os.path.join(REPO, "csrc"))
    status = miss_ext.build_info()["cpu_brgemm_status"]
    assert ok == (not status.startswith("not compiled")), (why, status)


def test_a_changed_brgemm_api_is_a_fallback_not_a_compile_failure(tmp_path):
    """A torch whose brgemm changed signature: the probe says no (and why), so setup.py builds
    the portable kernels instead of failing."""
    fake = tmp_path / "ATen" / "native"
    fake.mkdir(parents=True)
    (fake / "CPUBlas.h").write_text(textwrap.dedent("""
        #pragma once
        #include <c10/core/ScalarType.h>
        #include <c10/util/BFloat16.h>
        #define CPUBLAS_BRGEMM_BF16BF16F32
        namespace at::native::cpublas {
        bool could_pack(c10::ScalarType dt);
        void brgemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, const c10::BFloat16* B, float* C);
        void brgemm_release(bool is_vnni = true);
        }
    """))
    ok, why = _brgemm_probe().usable(os.path.join(REPO, "csrc"), first_include_dirs=[str(tmp_path)])
    assert not ok and "error" in why.lower(), why
    env = dict(os.environ, CXX="false")
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import brgemm_probe; "
                           "print(brgemm_probe.usable(sys.argv[2]))", BACKEND, os.path.join(REPO, "csrc")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(False, 'false exited with 1')"


def test_brgemm_can_be_turned_off_and_says_so():
    code = "import miss_ext; i = miss_ext.build_info(); print(i['cpu_brgemm'], '|', i['cpu_brgemm_status'])"
    env = dict(os.environ, MISS_EXT_CPU_BRGEMM="0")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    status = proc.stdout.strip()
    if status.startswith("False | not compiled"):
        pytest.skip(f"this build has no brgemm to turn off ({status})")
    assert status == "False | off: MISS_EXT_CPU_BRGEMM=0"


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
    assert msg.endswith(f"pip install -e {repo}")
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
    assert msg.endswith(f"pip install -e {repo}")


# ---------------------------------------------------------------- the checkout's parent folder


def _checkout_named_miss_ext(tmp_path):
    """A checkout folder named miss_ext (as `git clone` names it) inside tmp_path: the root
    __init__.py, setup.py, and a miss_ext/ package without _C."""
    root = tmp_path / "miss_ext"
    _copy_package(root, with_binary=False)
    shutil.copy(os.path.join(REPO, "__init__.py"), root / "__init__.py")
    (root / "setup.py").write_text("")
    return root


def test_from_the_checkouts_parent_the_installed_package_is_used(tmp_path):
    """A script run from the folder holding the clone: Python finds the clone folder first; it
    hands over to the installed miss_ext instead of importing as an empty namespace package."""
    _checkout_named_miss_ext(tmp_path)
    code = "import miss_ext; print(miss_ext.__file__); print(miss_ext.MissLinear.__name__)"

    def run(cwd):
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    (tmp_path / "elsewhere").mkdir()
    installed, _ = run(tmp_path / "elsewhere")
    where, name = run(tmp_path)
    assert where == installed and name == "MissLinear"
    assert where != str(tmp_path / "miss_ext" / "__init__.py")


def test_from_the_checkouts_parent_without_an_install_is_one_clear_error(tmp_path):
    root = _checkout_named_miss_ext(tmp_path)
    # -S: no site-packages, so no installed miss_ext (and no editable-install hook) to hand over to.
    proc = subprocess.run([sys.executable, "-S", "-c", "import miss_ext"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: miss_ext: `import miss_ext` found {root}, a miss_ext source checkout")
    assert last.endswith(f"Install it with: pip install {root}")


# ---------------------------------------------------------------- silence on import


def _stderr_of(code, env=None):
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_import_prints_nothing_beyond_what_torch_prints(tmp_path):
    assert _stderr_of("import miss_ext") == _stderr_of("import torch")
    # The same without numpy (torch's optional dependency): torch warns once, if ever, when a
    # numpy conversion is first attempted; importing miss_ext must not attempt one.
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\")\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    assert _stderr_of("import miss_ext", env) == _stderr_of("import torch", env)


@pytest.mark.parametrize("ours", ["bench", "conftest"])
def test_bench_and_tests_keep_other_packages_load_noise_out(ours):
    """peft imports torchao and bitsandbytes (the test extra installs both), which log a
    "Failed to load ..." line per optional native piece this machine lacks on every import."""
    pytest.importorskip("peft")
    code = f"import sys; sys.path.insert(0, 'tests'); import {ours}; import peft"
    err = _stderr_of(code)
    noise = [ln for ln in err.splitlines() if "Failed to load" in ln or "_pytree.py" in ln]
    assert not noise, err
