"""Build miss_ext._C against the torch that is already installed.

pip's build isolation hides that torch; build_backend/miss_ext_backend.py (the build backend
pyproject.toml names) makes it importable here again, so plain `pip install .` works, as does
`--no-build-isolation`. The wheel requires exactly the torch release it was compiled against.

CPU kernels are always built. CUDA kernels are built when torch has CUDA and nvcc is found,
or when MISS_EXT_FORCE_CUDA=1 (MISS_EXT_FORCE_CUDA=0 turns them off); a visible GPU is never
needed. Honours TORCH_CUDA_ARCH_LIST and MAX_JOBS.
"""

import glob
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SAFETENSORS = "safetensors>=0.4"  # save/load_adapter (PEFT's file format)
# The torch releases CI builds and tests against (.ci/run); the README states the same range.
TORCH_RANGE = "torch>=2.11,<2.16"
# Set by build_backend/miss_ext_backend.py while it builds a source distribution.
SDIST = os.environ.get("MISS_EXT_BUILDING_SDIST") == "1"


def _torch_visible_here():
    import importlib.metadata

    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _no_torch_message(err):
    """Why `import torch` failed in this build, as one line."""
    visible = _torch_visible_here()
    if visible:
        return (f"miss_ext: torch {visible} is installed for {sys.executable} but failed to import "
                f"({err}); fix that torch install, then run the same command again")
    return (f"miss_ext: torch is not installed for {sys.executable}; the kernels are compiled "
            f"against the torch already installed, so install one first (any torch 2.11 - 2.15, "
            f"e.g. pip install torch==2.13.0), then run the same command again")


def _license_kwargs():
    # pyproject.toml leaves the license dynamic: setuptools >= 77 wants an SPDX expression,
    # older ones (a venv's own setuptools 65, which torch 2.11/2.12 keep) reject that form, and
    # a --no-build-isolation build uses whichever setuptools the environment has.
    import setuptools

    major = int(re.match(r"\d+", setuptools.__version__).group())
    return {"license_expression": "Apache-2.0"} if major >= 77 else {"license": "Apache-2.0"}


if not SDIST:
    try:
        import torch
    except ImportError as _err:
        # Never pull a torch into the build: it would be a multi-GB download of a torch other
        # than the one the extension must match. Stop at once and say what happened.
        sys.exit(_no_torch_message(_err))

from setuptools import setup  # noqa: E402  (after the torch check: its message comes first)

sys.path.insert(0, os.path.join(HERE, "build_backend"))
import brgemm_probe  # noqa: E402


def _real_cuda_home():
    """The toolkit folder. `nvcc` on PATH may be a wrapper script exec'ing the real one, from
    which torch's own guess (dirname of dirname of `which nvcc`) cannot link."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    candidates = []
    for path in os.environ.get("PATH", "").split(os.pathsep):
        nvcc = os.path.join(path, "nvcc")
        if not os.path.isfile(nvcc):
            continue
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
        except OSError:
            continue
        if head.startswith(b"\x7fELF"):
            candidates.append(os.path.dirname(os.path.dirname(real)))
        else:  # a script: find the binary it execs
            m = re.search(rb"(/\S+)/bin/nvcc", head)
            if m:
                candidates.append(m.group(1).decode())
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        nvcc = os.path.join(c, "bin", "nvcc")
        if os.path.isfile(nvcc):
            return c
    return None


def _want_cuda(cuda_home):
    force = os.environ.get("MISS_EXT_FORCE_CUDA")
    if force == "0":
        return False
    if force == "1":
        if cuda_home is None:
            sys.exit("miss_ext: MISS_EXT_FORCE_CUDA=1 but no nvcc was found; set CUDA_HOME")
        if torch.version.cuda is None:
            sys.exit("miss_ext: MISS_EXT_FORCE_CUDA=1 but this torch has no CUDA; install a CUDA torch")
        return True
    return torch.version.cuda is not None and cuda_home is not None


def _nvcc_version(cuda_home):
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                         capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _default_arch_list(nvcc_version):
    # Ampere and Hopper at least; Blackwell where nvcc knows it; PTX of the newest for the future.
    if nvcc_version >= (12, 8):
        return "8.0;9.0;10.0;12.0+PTX"
    if nvcc_version >= (11, 8):
        return "8.0;9.0+PTX"
    return "8.0+PTX"


def _cuda_math_includes():
    """CUDA library headers (cusparse.h, cublas_v2.h, ...) that pip's nvidia packages carry
    and a bare toolkit may lack; torch's CUDA headers include them."""
    dirs = []
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _torch_uses_openmp():
    return "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]


def _write_build_meta(with_cuda, archs):
    with open(os.path.join(HERE, "miss_ext", "_build_meta.py"), "w") as f:
        f.write("# Written by setup.py at build time: what the compiled _C was built against.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")


def extensions():
    cuda_home = _real_cuda_home()
    with_cuda = _want_cuda(cuda_home)
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it at import
    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/front/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("MISS_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = ["-O3"]  # the C++ standard comes from torch (C++17 on 2.13, C++20 on 2.14)
    if _torch_uses_openmp():
        cxx.append("-fopenmp")
    extra_link = ["-fopenmp"] if _torch_uses_openmp() else []
    include_dirs = [os.path.join(HERE, "csrc")]
    archs = ""
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = _default_arch_list(_nvcc_version(cuda_home))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros += [("MISS_EXT_WITH_CUDA", None), ("MISS_EXT_CUDA_ARCHS", f'"{archs}"')]
        include_dirs += _cuda_math_includes()
        ext = cpp_extension.CUDAExtension(
            "miss_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=extra_link)
    else:
        ext = cpp_extension.CppExtension(
            "miss_ext._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
    _write_build_meta(with_cuda, archs)

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        # Here rather than at import: pip runs setup.py once per build step (requirements,
        # metadata, wheel) and only this last one compiles.
        def build_extensions(self):
            brgemm_ok, brgemm_why = brgemm_probe.usable(os.path.join(HERE, "csrc"))
            if brgemm_ok:
                for e in self.extensions:
                    e.define_macros.append(("MISS_EXT_HAVE_TORCH_BRGEMM", None))
            print(f"miss_ext: building against torch {torch.__version__}, "
                  f"CUDA={'on (' + archs + ')' if with_cuda else 'off'}, "
                  f"OpenMP={'on' if _torch_uses_openmp() else 'off'}, "
                  f"torch brgemm (AMX / AVX512-BF16 path)={'on' if brgemm_ok else 'off: ' + brgemm_why}", file=sys.stderr)
            # pip shows these lines, and a line per compiled file (ninja: "[k/n] <compiler
            # command>"), only with -v; without it the build is silent until it ends.
            print(f"miss_ext: compiling {len(sources)} files (MAX_JOBS="
                  f"{os.environ.get('MAX_JOBS', 'unset: all cores')}); "
                  "one line per file follows as each one finishes", file=sys.stderr)
            super().build_extensions()

    return [ext], BuildExt


def _torch_pin():
    # Exactly the release compiled against: `==2.13.0` also matches 2.13.0+cpu and 2.13.0+cu130
    # (local labels are ignored), so no installer pairs the wheel with another torch, while a
    # build for one flavour still installs beside the other flavour of the same release.
    return f"torch=={torch.__version__.split('+')[0]}"


if SDIST:
    setup(install_requires=[TORCH_RANGE, SAFETENSORS], **_license_kwargs())
else:
    ext_modules, build_ext = extensions()
    setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext},
          install_requires=[_torch_pin(), SAFETENSORS], **_license_kwargs())
