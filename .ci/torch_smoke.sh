#!/usr/bin/env bash
# CI: build miss_ext against one torch release the way a user would, then run the smoke subset
# (gradcheck, opcheck, reference, layer, build) against that build.
#
#   bash .ci/torch_smoke.sh VERSION MODE CUDA
#     VERSION  a torch release on the package index, e.g. 2.11.0
#     MODE     no-isolation: `pip install --no-build-isolation .` with the setuptools torch leaves
#                            in a new venv (65.5 for torch < 2.13, whose cap keeps it) and wheel;
#              wheel:        `pip wheel .` (pip's build isolation), the wheel's torch pin checked,
#                            then the wheel installed
#     CUDA     cuda: CPU + CUDA kernels for sm_90 (a compile and link check: no GPU is needed)
#              cpu:  CPU kernels only
#
# The venv, ${MISS_EXT_CACHE:-$HOME/.cache/miss_ext}/venv-torch-VERSION, is kept for the next run
# (torch with its CUDA libraries is 3-5 GB); everything else happens in a temp copy of the
# repository, so the working tree is never touched.
set -euo pipefail

VERSION="$1" MODE="$2" CUDA="$3"
CACHE="${MISS_EXT_CACHE:-$HOME/.cache/miss_ext}"
VENV="$CACHE/venv-torch-$VERSION"
PY="$VENV/bin/python"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "[torch_smoke $VERSION] $*"; }
die() {
  echo "[torch_smoke $VERSION] FAIL: $*" >&2
  exit 1
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/miss_ext_smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# Pins torch for every pip call below: nothing may swap it, and it replaces any constraints
# file of the machine's pip configuration (one that caps torch below VERSION, for one).
echo "torch==$VERSION" >"$WORK/constraints.txt"
export PIP_CONSTRAINT="$WORK/constraints.txt" PIP_DISABLE_PIP_VERSION_CHECK=1

# --- venv ------------------------------------------------------------------------------------
if [[ -x "$PY" ]] && "$PY" -c "import sys, torch, pytest, hypothesis, peft; sys.exit(torch.__version__.split('+')[0] != '$VERSION')" 2>/dev/null; then
  log "reusing $VENV"
else
  log "creating $VENV (torch==$VERSION from the package index)"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  # pip and setuptools stay as the venv and torch leave them: that is what users build with.
  "$PY" -m pip install -q "torch==$VERSION" pytest hypothesis peft transformers ninja wheel ||
    die "pip could not install torch==$VERSION and the test packages"
fi
log "$("$PY" -c 'import torch, setuptools; print("torch", torch.__version__, "cuda", torch.version.cuda, "| setuptools", setuptools.__version__)')"

# --- copy of the repository ------------------------------------------------------------------
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/outside"
(cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) |
  tar -C "$WORK/src" -xf -

# --- build -----------------------------------------------------------------------------------
export MAX_JOBS="${MAX_JOBS:-2}" TORCH_CUDA_ARCH_LIST=9.0
case "$CUDA" in
  cuda) export MISS_EXT_FORCE_CUDA=1 ;;
  cpu) export MISS_EXT_FORCE_CUDA=0 ;;
  *) die "CUDA must be cuda or cpu, not $CUDA" ;;
esac
start=$(date +%s)
set +e
case "$MODE" in
  no-isolation)
    log "build: pip install --no-build-isolation . (MAX_JOBS=$MAX_JOBS, CUDA: $CUDA)"
    (cd "$WORK/src" && "$PY" -m pip install -v --no-build-isolation . >"$WORK/build.log" 2>&1)
    ;;
  wheel)
    log "build: pip wheel . (build isolation on; MAX_JOBS=$MAX_JOBS, CUDA: $CUDA)"
    (cd "$WORK/src" && "$PY" -m pip wheel -v --no-deps -w "$WORK/dist" . >"$WORK/build.log" 2>&1)
    ;;
  *) die "MODE must be no-isolation or wheel, not $MODE" ;;
esac
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  grep -nE 'error|Error|FAILED' "$WORK/build.log" | head -40 >&2 || true
  tail -30 "$WORK/build.log" >&2
  die "the build failed (exit $rc)"
fi
grep -m1 "miss_ext: building against" "$WORK/build.log" | sed 's/^ */  /' || true
if [[ "$MODE" == wheel ]]; then
  whl="$(ls "$WORK"/dist/miss_ext-*.whl)"
  pin="$("$PY" - "$whl" <<'PYEOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    lines = z.read(meta).decode().splitlines()
print("\n".join(ln for ln in lines if re.match(r"Requires-Dist: torch\s*([=<>!~;]|$)", ln)))
PYEOF
)"
  [[ "$pin" == "Requires-Dist: torch==$VERSION" ]] || die "the wheel requires '$pin', not torch==$VERSION"
  log "  $(basename "$whl"): $pin"
  # The venv is cached across runs and the version does not change with the sources: without
  # --force-reinstall pip keeps the previous run's build and the tests import stale code.
  "$PY" -m pip install -q --force-reinstall --no-deps "$whl" || die "the wheel did not install"
fi
log "  built and installed in $(($(date +%s) - start)) s"

# --- what was built --------------------------------------------------------------------------
(cd "$WORK/outside" && "$PY" - "$CUDA" <<'EOF') || die "the import check failed"
import sys
import torch
import miss_ext

info = miss_ext.build_info()
print("[torch_smoke]   build_info:", info)
assert info["torch_version"] == torch.__version__, info
assert info["cuda"] == (sys.argv[1] == "cuda"), f"cuda={info['cuda']}, wanted {sys.argv[1]}"
x = torch.randn(5, 10, dtype=torch.float64)
want = torch.nn.functional.pad(x, (0, 2)).view(5, 3, 4).sum(1)
torch.testing.assert_close(torch.ops.miss_ext.blocksum(x, 4), want)
EOF

# --- smoke subset ----------------------------------------------------------------------------
log "tests: gradcheck, opcheck, reference, layer, build"
# From the copy's root: its miss_ext/ has no _C, so the import hands over to the installed build.
(cd "$WORK/src" && "$PY" -m pytest -q -p no:cacheprovider tests/test_ops_gradcheck.py tests/test_ops_opcheck.py \
  tests/test_ops_reference.py tests/test_layer.py tests/test_build.py 2>&1 | tail -4) |
  tee "$WORK/tests.log"
grep -qE '^[0-9]+ passed' "$WORK/tests.log" && ! grep -qE '[0-9]+ (failed|error)' "$WORK/tests.log" ||
  die "the smoke tests failed"
log "OK"
