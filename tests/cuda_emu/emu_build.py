"""Builds the CUDA emulation harness (see README.md), cached, and optionally runs it.

    python tests/cuda_emu/emu_build.py                  # build, then: harness run
    python tests/cuda_emu/emu_build.py run blocksum     # build, then: harness run blocksum
    python tests/cuda_emu/emu_build.py --sanitize run   # the same under ASan + UBSan (-O1 -g)
    python tests/cuda_emu/emu_build.py --gcov run       # line coverage of csrc/cuda/ by the suites

Sources: csrc/cuda/*.cu and *.cuh rewritten by emu_prep.py, selftest/faults.cu likewise,
harness/*.cpp and runtime/*.cpp; headers from runtime/, fake/, csrc/ and torch's include dir (c10 Half/BFloat16,
taken from the running torch). Every object is cached under a hash of everything that can
change it (its rewritten text, all headers, compiler, flags, torch version), so a rebuild
after editing one .cu recompiles that file only, and nothing is written into the source tree.
The cache is $MISS_EXT_EMU_CACHE, else $XDG_CACHE_HOME/miss_ext/cuda_emu or
~/.cache/miss_ext/cuda_emu; it is pruned to CACHE_LIMIT bytes, oldest first.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CUDA_DIR = REPO / "csrc" / "cuda"
sys.path.insert(0, str(HERE))
import emu_prep  # noqa: E402

# -O1: the emulation runs about as fast as at -O2, and each (mutated) file compiles in 2/3 of the time.
FLAGS = ["-std=c++17", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas", "-DMISS_EXT_WITH_CUDA"]
SANITIZE_FLAGS = ["-std=c++17", "-O1", "-g", "-ffp-contract=off", "-Wno-unknown-pragmas", "-DMISS_EXT_WITH_CUDA",
                  "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
CACHE_LIMIT = 400 * 1024 * 1024


class BuildError(RuntimeError):
    pass


LAST_OBJECTS: dict[str, Path] = {}  # source label -> object, of the last build()


def compiler() -> str | None:
    """The C++ compiler ($CXX, else g++), or None when there is none."""
    return shutil.which(os.environ.get("CXX", "g++"))


def torch_include() -> Path:
    """torch's header folder, for c10/util/Half.h and BFloat16.h (any torch build has them)."""
    import torch

    inc = Path(torch.__file__).resolve().parent / "include"
    if not (inc / "c10" / "util" / "Half.h").exists():
        raise BuildError(f"torch {torch.__version__} at {inc.parent} ships no c10/util/Half.h")
    return inc


def cache_dir() -> Path:
    if os.environ.get("MISS_EXT_EMU_CACHE"):
        return Path(os.environ["MISS_EXT_EMU_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "miss_ext" / "cuda_emu"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: a per-user temporary folder
        path = Path(tempfile.gettempdir()) / f"miss_ext_cuda_emu_{os.getuid()}"
    return path


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _tree_text(folder: Path, patterns=("*.h", "*.cuh")) -> list:
    out = []
    for pat in patterns:
        for f in sorted(folder.rglob(pat)):
            out += [str(f.relative_to(folder)), f.read_bytes()]
    return out


def _write_atomic(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _prune(root: Path):
    """Deletes the least recently used files beyond CACHE_LIMIT; never one used in the last
    hour, which a concurrent build may be about to link."""
    files = []
    for d in ("obj", "bin", "src", "pch"):
        for f in (root / d).rglob("*") if (root / d).exists() else []:
            try:
                if f.is_file():
                    files.append((f.stat().st_mtime, f.stat().st_size, f))
            except OSError:  # removed meanwhile
                pass
    total = sum(size for _, size, _ in files)
    if total <= CACHE_LIMIT:
        return
    for mtime, size, f in sorted(files):
        if total <= CACHE_LIMIT * 3 // 4 or mtime > time.time() - 3600:
            break
        total -= size
        f.unlink(missing_ok=True)


DTYPE_BITS = {"float32": 1, "float64": 2, "float16": 4, "bfloat16": 8}


def build(sanitize: bool = False, overrides: dict[str, str] | None = None, jobs: int | None = None,
          log=None, gcov: bool = False, override_dtypes: list[str] | None = None) -> Path:
    """Builds (or finds in the cache) the harness; returns its path.

    overrides maps a csrc/cuda file name to replacement source text (the mutation test), and
    override_dtypes restricts those files to the dtypes named (they compile faster; the
    harness must then run with --dtypes among them). gcov instruments the objects for gcov
    (LAST_OBJECTS then names them)."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler: set CXX or install g++")
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in CUDA_DIR.iterdir()}
    if unknown:
        raise BuildError(f"overrides for files not in csrc/cuda: {sorted(unknown)}")
    flags = (SANITIZE_FLAGS if sanitize else FLAGS) + (["--coverage"] if gcov else [])
    tinc = torch_include()
    import torch

    cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    root = cache_dir()

    def source(path: Path) -> str:
        return overrides.get(path.name, path.read_text()) if path.parent == CUDA_DIR else path.read_text()

    # Rewritten CUDA headers, then the key of everything an object can include.
    cuh = {f.name: emu_prep.rewrite(source(f), str(f)) for f in sorted(CUDA_DIR.glob("*.cuh"))}
    header_key = _hash(cxx_version, flags, torch.__version__, *sorted(cuh.items()),
                       *_tree_text(REPO / "csrc", ("*.h",)), *_tree_text(HERE / "runtime"), *_tree_text(HERE / "fake"),
                       *_tree_text(HERE / "harness"), *_tree_text(HERE / "selftest"))
    inc_dir = root / "src" / header_key
    for name, text in cuh.items():
        if not (inc_dir / "cuda" / name).exists():
            _write_atomic(inc_dir / "cuda" / name, text.encode())
    includes = [f"-I{inc_dir}", f"-I{REPO / 'csrc'}", f"-I{HERE / 'fake'}", f"-I{HERE / 'runtime'}",
                f"-I{HERE / 'selftest'}", f"-I{tinc}"]

    # The headers every unit includes, precompiled once (g++ uses X.h.gch for -include X.h).
    pch = root / "pch" / header_key / "emu_pch.h"
    if not pch.with_suffix(".h.gch").exists():
        _write_atomic(pch, (HERE / "runtime" / "emu_pch.h").read_bytes())
        tmp = pch.with_name(f"emu_pch.{os.getpid()}.tmp")
        r = subprocess.run([cxx, *flags, *includes, "-x", "c++-header", str(pch), "-o", str(tmp)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"precompiling {pch.name} failed:\n{r.stderr[-6000:]}")
        os.replace(tmp, pch.with_suffix(".h.gch"))
    includes = ["-include", str(pch), *includes]

    restrict = []  # extra flags of the overridden files
    if override_dtypes:
        restrict = [f"-DEMU_DTYPES={sum(DTYPE_BITS[d] for d in set(override_dtypes))}"]
    units = []  # (label, text, is_cuda, extra flags)
    for f in sorted(CUDA_DIR.glob("*.cu")) + sorted((HERE / "selftest").glob("*.cu")):
        extra = restrict if f.parent == CUDA_DIR and f.name in overrides else []
        units.append((str(f.relative_to(REPO)), emu_prep.rewrite(source(f), str(f)), True, extra))
    for f in sorted((HERE / "harness").glob("*.cpp")) + sorted((HERE / "runtime").glob("*.cpp")):
        units.append((str(f.relative_to(REPO)), f.read_text(), False, []))

    def compile_unit(unit):
        label, text, is_cuda, extra = unit
        key = _hash(header_key, label, text, *extra)
        obj = root / "obj" / f"{key}.o"
        if obj.exists():
            os.utime(obj)
            return obj, False
        src = root / "obj" / f"{key}.{os.getpid()}.{threading.get_ident()}.{'cu' if is_cuda else 'cpp'}"
        _write_atomic(src, text.encode())
        # A unit with extra macros skips the precompiled header, which was built without them.
        cmd = [cxx, *flags, *extra, *(includes[2:] if extra else includes)]
        if is_cuda:
            cmd += ["-include", str(HERE / "runtime" / "emu_cuda.h"), "-x", "c++"]
        else:
            cmd += [f"-I{HERE / 'harness'}"]
        # gcov names its notes after the -o path, so instrumented objects are written in place.
        tmp = obj if gcov else obj.with_suffix(f".{os.getpid()}.tmp.o")
        r = subprocess.run(cmd + ["-c", str(src), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"compiling {label} failed:\n{' '.join(cmd)} -c {src}\n{r.stderr[-6000:]}")
        os.replace(tmp, obj)
        src.unlink(missing_ok=True)
        return obj, True

    jobs = jobs or int(os.environ.get("MAX_JOBS", 0)) or os.cpu_count() or 2
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(compile_unit, units))
    objs = [o for o, _ in results]
    LAST_OBJECTS.clear()
    LAST_OBJECTS.update({u[0]: o for u, o in zip(units, objs)})
    if log:
        log(f"emu build: {sum(new for _, new in results)} of {len(units)} objects compiled")
    exe = root / "bin" / _hash(*[o.name for o in objs], flags) / "harness"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_name(f"harness.{os.getpid()}.tmp")
        r = subprocess.run([cxx, *flags, *map(str, objs), "-o", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"linking the harness failed:\n{r.stderr[-6000:]}")
        os.replace(tmp, exe)
    os.utime(exe)
    _prune(root)
    return exe


def gcov_report(exe: Path, args) -> int:
    """Runs the instrumented harness, then prints gcov's line coverage of csrc/cuda/ (a line
    counts as executed when any instantiation of it ran in any object)."""
    cuda = [obj for label, obj in LAST_OBJECTS.items() if label.startswith("csrc/cuda/")]
    for obj in cuda:
        obj.with_suffix(".gcda").unlink(missing_ok=True)
    rc = subprocess.run([str(exe), *args]).returncode
    ran, missed = {}, {}
    for obj in cuda:
        out = subprocess.run(["gcov", "-t", "-o", str(obj.parent), str(obj)], capture_output=True, text=True,
                             cwd=obj.parent).stdout
        source = None
        for line in out.splitlines():
            parts = line.split(":", 2)
            if len(parts) < 3:
                continue
            count, lineno = parts[0].strip(), parts[1].strip()
            if lineno == "0" and parts[2].startswith("Source:"):
                source = os.path.relpath(parts[2][len("Source:"):], REPO)
            elif source and source.startswith("csrc/cuda/") and lineno.isdigit() and count not in ("-", ""):
                (missed if count.startswith("#####") else ran).setdefault(source, set()).add(int(lineno))
    never_total = 0
    for source in sorted(set(ran) | set(missed)):
        never = sorted(missed.get(source, set()) - ran.get(source, set()))
        never_total += len(never)
        print(f"{source}: {len(ran.get(source, ()))} lines executed, never executed: {never or 'none'}")
    print(f"gcov: {never_total} lines of csrc/cuda/ never executed")
    return rc or (1 if never_total else 0)


def main(argv):
    sanitize, gcov = "--sanitize" in argv, "--gcov" in argv
    args = [a for a in argv if a not in ("--sanitize", "--gcov")] or ["run"]
    exe = build(sanitize=sanitize, gcov=gcov, log=lambda m: print(m, file=sys.stderr))
    print(f"harness: {exe}", file=sys.stderr)
    if gcov:
        return gcov_report(exe, args)
    env = dict(os.environ)
    if sanitize:
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0")  # the selftest abandons fibers on purpose
    return subprocess.run([str(exe), *args], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
