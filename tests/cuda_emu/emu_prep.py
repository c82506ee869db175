"""Mechanical rewrite of CUDA sources into C++ that g++ compiles against runtime/emu_cuda.h.

Only three CUDA constructs need a rewrite; every other one is a macro or a fake header:
  kernel<targs><<<grid, block[, smem[, stream]]>>>(args);
      -> ::emu::launch<&kernel<targs>>(::emu::cfg(grid, block[, smem[, stream]]), args);
  __shared__ [__align__(N)] T name[dims];
      -> alignas(N) static T name[dims]; ::emu::shared_array(&name, sizeof(name));
  extern __shared__ T name[];
      -> T* name = reinterpret_cast<T*>(::emu::dyn_smem());
Anything the patterns miss (a launch or __shared__ left over) is an error, never a silent pass.
Line numbers are kept (and #line names the original file), so compiler messages and the
barrier sites the emulator reports point into the real source.

    python emu_prep.py SRC_DIR OUT_DIR      # rewrites every .cu/.cuh of SRC_DIR into OUT_DIR
"""

import pathlib
import re
import sys

_DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SMEM = re.compile(r"__shared__\s+(?:__align__\(\s*(\d+)\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)((?:\s*\[[^\]]+\])*)\s*;")
# kernel or kernel<...> (one level of nested <> in the template arguments), then <<<cfg>>>(args);
_LAUNCH = re.compile(
    r"\b([A-Za-z_][\w:]*\s*(?:<(?:[^<>;{}]|<[^<>;{}]*>)*>)?)\s*<<<(.*?)>>>\s*\((.*?)\)\s*;", re.S
)


class PrepError(RuntimeError):
    pass


def _dyn_smem(m):
    typ, name = m.group(1).strip(), m.group(2)
    return f"{typ}* {name} = reinterpret_cast<{typ}*>(::emu::dyn_smem());"


def _smem(m):
    align, typ, name, dims = m.group(1), m.group(2).strip(), m.group(3), m.group(4)
    a = f"alignas({align}) " if align else ""
    return f"{a}static {typ} {name}{dims}; ::emu::shared_array(&{name}, sizeof({name}));"


def _launch(m):
    kernel = " ".join(m.group(1).split())
    config = " ".join(m.group(2).split())
    args = m.group(3).strip()
    sep = ", " if args else ""
    # Same line count as the original, so compiler messages and barrier sites keep their lines.
    call = f"::emu::launch<&{kernel}>(::emu::cfg({config}){sep}{args});"
    return call + "\n" * (m.group(0).count("\n") - call.count("\n"))


def rewrite(text: str, name: str = "<source>") -> str:
    """The emulator's version of one CUDA source file (``name`` is its path, for messages)."""
    out = _DYN_SMEM.sub(_dyn_smem, text)
    out = _SMEM.sub(_smem, out)
    out = _LAUNCH.sub(_launch, out)
    for leftover, what in (("__shared__", "a __shared__ declaration"), ("<<<", "a kernel launch")):
        if leftover in out:
            line = out[: out.index(leftover)].count("\n") + 1
            raise PrepError(f"{name}:{line}: emu_prep.py cannot rewrite {what}; extend its patterns")
    return f'#line 1 "{name}"\n' + out


def main(argv):
    src, dst = map(pathlib.Path, argv[1:3])
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.suffix in (".cu", ".cuh"):
            (dst / f.name).write_text(rewrite(f.read_text(), str(f)))
            print("rewrote", f.name)


if __name__ == "__main__":
    main(sys.argv)
