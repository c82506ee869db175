#!/usr/bin/env bash
# CI: prove that miss_ext builds with its CUDA kernels (no GPU needed) and that the CPU kernels
# of that build still work.
#
#   bash .ci/cuda_build_check.sh        (from the repository root, no arguments)
#
# Uses (creating it when missing) the venv ${MISS_EXT_CACHE:-$HOME/.cache/miss_ext}/venv-cu130
# with a CUDA torch, builds a copy of the repository in a temp dir for sm_90 so the working tree
# is never touched, installs the result into that venv and imports it from outside the repo.
# Needs python3, gcc and nvcc 13.0 (/usr/local/cuda-13.0 or on PATH) and the local torch wheels.
set -euo pipefail

TORCH_VERSION="2.14.1"
CACHE="${MISS_EXT_CACHE:-$HOME/.cache/miss_ext}"
VENV="$CACHE/venv-cu130"
PY="$VENV/bin/python"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "[cuda_build_check] $*"; }
die() {
  echo "[cuda_build_check] FAIL: $*" >&2
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/miss_ext_cuda_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- 1. toolchain ----------------------------------------------------------------------------
log "step 1/5: toolchain"
command -v python3 >/dev/null || die "python3 not found"
NVCC="$(command -v nvcc || true)"
if [[ -z "$NVCC" && -x /usr/local/cuda-13.0/bin/nvcc ]]; then
  NVCC=/usr/local/cuda-13.0/bin/nvcc
  export PATH="/usr/local/cuda-13.0/bin:$PATH"
fi
[[ -n "$NVCC" ]] || die "nvcc not found (install CUDA 13.0 at /usr/local/cuda-13.0 or put nvcc on PATH)"
log "  nvcc: $NVCC ($("$NVCC" --version | grep -o 'release [0-9.]*' || echo 'version unknown'))"
log "  gcc:  $(gcc --version | head -1)"

# --- 2. venv with a CUDA torch ---------------------------------------------------------------
log "step 2/5: venv $VENV"
torch_ok() {
  "$PY" - "$TORCH_VERSION" <<'EOF' 2>/dev/null
import sys
import torch
ok = torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda is not None
sys.exit(0 if ok else 1)
EOF
}
if [[ -x "$PY" ]] && torch_ok; then
  log "  reusing it"
else
  if [[ ! -x "$PY" ]]; then
    log "  creating it"
    mkdir -p "$CACHE"
    python3 -m venv "$VENV" || die "python3 -m venv failed (is python3-venv installed?)"
  else
    log "  present but without CUDA torch $TORCH_VERSION: installing it"
  fi
  "$PY" -m pip install --upgrade pip setuptools wheel ninja || die "pip could not install the build tools"
  "$PY" -m pip install "torch==$TORCH_VERSION" || die "pip could not install torch==$TORCH_VERSION"
  torch_ok || die "the venv's torch is not a CUDA build of $TORCH_VERSION: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)"
fi
"$PY" -m pip install ninja >/dev/null 2>&1 || log "  (ninja not installable; the build will be slower)"
log "  torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null)"

# --- 3. copy of the repository ---------------------------------------------------------------
log "step 3/5: copying the repository to $WORK/src"
mkdir -p "$WORK/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and untracked-but-not-ignored files: exactly what a commit of this tree would hold.
  (cd "$REPO" && git ls-files -z -co --exclude-standard |
    tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$WORK/src" -xf -
else
  tar -C "$REPO" --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.so' \
    --exclude='*.egg-info' --exclude=./.venv -cf - . | tar -C "$WORK/src" -xf -
fi
[[ -f "$WORK/src/setup.py" ]] || die "the copy has no setup.py; run this from a miss_ext checkout"
ls "$WORK"/src/csrc/cuda/*.cu >/dev/null 2>&1 || die "no csrc/cuda/*.cu in the repository"

# --- 4. build and install --------------------------------------------------------------------
log "step 4/5: building with TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 (a few minutes)"
BUILD_LOG="$WORK/build.log"
start=$(date +%s)
set +e
(cd "$WORK/src" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 MISS_EXT_FORCE_CUDA=1 \
  "$PY" -m pip install --no-build-isolation --no-deps --force-reinstall -v . 2>&1) |
  tee "$BUILD_LOG" |
  sed -nE 's#^ *\[([0-9]+/[0-9]+)\] .* -c ([^ ]+) .*#  [\1] compiling \2#p; s#^ *\[([0-9]+/[0-9]+)\] .* -shared .*#  [\1] linking#p'
rc=${PIPESTATUS[0]}
set -e
if [[ $rc -ne 0 ]]; then
  echo "----- build log (errors) -----" >&2
  grep -nE 'error|Error|FAILED' "$BUILD_LOG" | head -60 >&2 || true
  echo "----- build log (last 40 lines) -----" >&2
  tail -40 "$BUILD_LOG" >&2
  die "the CUDA build failed (exit $rc)"
fi
log "  built and installed in $(($(date +%s) - start)) s"

# --- 5. import from outside the repository ---------------------------------------------------
log "step 5/5: import check"
mkdir -p "$WORK/outside"
(cd "$WORK/outside" && "$PY" - <<'EOF') || die "the import check failed"
import os
import torch
import miss_ext

assert "site-packages" in os.path.dirname(miss_ext.__file__), f"imported the wrong miss_ext: {miss_ext.__file__}"
info = miss_ext.build_info()
print("[cuda_build_check]   build_info:", info)
assert info["cuda"] is True, f"build_info()['cuda'] is {info['cuda']!r}: the CUDA kernels were not built"
assert "9.0" in info["cuda_archs"], f"unexpected cuda_archs {info['cuda_archs']!r}"

# The CPU kernels of the CUDA build still work.
x = torch.randn(5, 10, dtype=torch.float64)
got = torch.ops.miss_ext.blocksum(x, 4)
want = torch.nn.functional.pad(x, (0, 2)).view(5, 3, 4).sum(1)
torch.testing.assert_close(got, want)
print("[cuda_build_check]   CPU blocksum matches the reference")
print("[cuda_build_check]   torch.cuda.is_available():", torch.cuda.is_available())
EOF
log "OK"
