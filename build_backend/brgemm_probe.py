"""Whether this torch still has the internal brgemm API miss_ext's AMX path calls.

setup.py asks before compiling: at::native::cpublas is not a public API and may change in any
torch release. When the probe fails the extension is built without that path (the portable
kernels run, and build_info() says "not compiled") instead of failing to compile.
"""

import os
import subprocess
import tempfile

# Includes csrc/cpu/torch_brgemm.h, the one file that calls the API, so the probe tests exactly
# the calls the extension makes; linking an executable also proves libtorch_cpu exports them.
PROBE = """
#include "cpu/torch_brgemm.h"
int main() {
  using namespace miss_ext::cpu;
  c10::BFloat16 a[2] = {}, b[32] = {};
  float c[16];
  if (torch_brgemm::could_pack()) {
    torch_brgemm::gemm(1, 16, 2, 2, 16, 16, false, a, b, c);
    torch_brgemm::release();
  }
  return 0;
}
"""


def usable(csrc, first_include_dirs=()):
    """(ok, why) for the torch importable here; csrc: the extension's csrc/ folder.
    first_include_dirs come before torch's own (tests use them to plant a changed header)."""
    if os.environ.get("MISS_EXT_TORCH_BRGEMM") == "0":
        return False, "MISS_EXT_TORCH_BRGEMM=0"
    import torch
    from torch.utils import cpp_extension

    with open(cpp_extension.__file__) as f:  # the C++ standard torch builds extensions with
        std = "c++20" if "c++20" in f.read() else "c++17"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(PROBE)
        cmd = [os.environ.get("CXX", "c++"), f"-std={std}",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
        cmd += [f"-I{d}" for d in first_include_dirs]
        cmd += [f"-I{csrc}"] + [f"-I{d}" for d in cpp_extension.include_paths()]
        cmd += [src, "-o", os.path.join(tmp, "probe")]
        cmd += [f"-L{d}" for d in cpp_extension.library_paths()]
        # Only the probe's own references must resolve: torch's libraries bring dependencies
        # (OpenMP, CUDA) that need not be on the linker's path.
        cmd += ["-ltorch_cpu", "-lc10", "-Wl,--unresolved-symbols=ignore-in-shared-libs"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as err:
            return False, f"the probe could not run: {err}"
    if proc.returncode != 0:
        lines = proc.stderr.splitlines()
        errors = [ln for ln in lines if "error" in ln.lower()]
        return False, (errors or lines or [f"{cmd[0]} exited with {proc.returncode}"])[0].strip()
    return True, "ok"
