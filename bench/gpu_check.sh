#!/usr/bin/env bash
# The one script for a GPU machine (no network): build miss_ext in place for sm_90, then
#   1. build_info,
#   2. a quick CUDA-vs-CPU kernel parity and determinism sweep over every kernel path
#      (including the gaps the CPU emulation found, tests/cuda_emu/, and the mixed-precision
#      paths: bf16/fp16 base, fp32 blocks): pytest tests/test_ops_parity.py -m cuda, whose
#      cases are the per-op case table's (tests/_op_cases.py; on the CPU the same cases
#      compare the CPU kernels with the float64 reference in every test run),
#   3. the other CUDA test cases:  pytest -q tests -k 'cuda and not cuda_emulation and not
#      test_ops_parity' (no -x: one run reports every failure; the CPU emulation of the
#      kernels is left to CI),
#   4. the benchmarks, model level first: python -m bench train --device cuda (the training
#      step x the frozen model's, bf16 Llama with fp32 blocks, all-linear and q/v, autocast off
#      and on), its per-operator profile (python -m bench profile --preset step), the per-call overhead (python -m bench.overhead_bench --device cuda), then
#      python -m bench --device cuda and --suite llm in bfloat16 (a failure there
#      is reported, not fatal).
# Everything goes to $OUT when it is set, else to bench/results/gpu_check/: build.log,
# info.log, parity.log, parity.xml (JUnit), tests.log, tests.xml (JUnit), bench.log/.csv/.png (the default table),
# train_step.log/.csv (the model-level step table), step_profile.log (its operators), overhead.log (per-call overhead), bench_llm.log/.csv (the LLM-shape table), summary.txt (one line per step). Each step has a
# timeout and the whole run stays under 8 minutes. Exit status: non-zero when the build, the
# parity sweep or the tests fail.
#
#   bash bench/gpu_check.sh            (from the repository root)
set -uo pipefail

export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null || PY=python3

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
LOGS="${OUT:-bench/results/gpu_check}"
mkdir -p "$LOGS"

BUDGET=470  # seconds for everything, leaving margin under 8 minutes
T0=$(date +%s)
STATUS=0

log() { echo "[gpu_check $(($(date +%s) - T0))s] $*" | tee -a "$LOGS/summary.txt"; }
: >"$LOGS/summary.txt"

# run_step NAME CAP LOGFILE CMD...: runs CMD with a timeout of min(CAP, time left), output to
# the terminal and LOGFILE; returns CMD's status (124 on timeout).
run_step() {
  local name=$1 cap=$2 logf=$3
  shift 3
  local left=$((BUDGET - ($(date +%s) - T0)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    log "$name: SKIPPED, only ${left}s of the budget left"
    return 124
  fi
  log "$name: start (timeout ${limit}s, log $logf)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logf"
  local rc=${PIPESTATUS[0]}
  if ((rc == 124 || rc == 137)); then
    log "$name: TIMED OUT after ${limit}s"
  elif ((rc != 0)); then
    log "$name: FAILED (exit $rc)"
  else
    log "$name: ok"
  fi
  return "$rc"
}

log "machine: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
log "python: $("$PY" --version 2>&1), torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1)"

# --- build -------------------------------------------------------------------------------------
# An editable install must leave the compiled core importable from the source tree; if this
# setuptools did not build it in place, do so explicitly.
export PY
# shellcheck disable=SC2016  # expanded by the bash -c below, not here
BUILD='"$PY" -m pip install --no-build-isolation --no-deps -v -e . || exit $?
if ! "$PY" -c "import miss_ext" 2>/dev/null; then
  echo "editable install does not import; building the extension in place"
  "$PY" setup.py build_ext --inplace || exit $?
fi'
if ! run_step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)" 300 "$LOGS/build.log" bash -c "$BUILD"; then
  grep -nE 'error|FAILED' "$LOGS/build.log" | head -40
  log "the build failed; nothing else can run"
  exit 1
fi

run_step "build_info" 60 "$LOGS/info.log" "$PY" -c '
import torch, miss_ext
info = miss_ext.build_info()
print("build_info:", info)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
assert info["cuda"], "the CUDA kernels were not built"
assert torch.cuda.is_available(), "no CUDA device visible"
' || STATUS=1

# --- kernel parity: CUDA against the CPU kernels, on every kernel path --------------------------
# tests/test_ops_parity.py, driven by the per-op case table (tests/_op_cases.py); a skipped case
# (no device, no CUDA build) fails this step as a mismatch would: skipped is not passed.
# shellcheck disable=SC2016  # expanded by the bash -c below, not here
PARITY='"$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_ops_parity.py -m cuda --junitxml "$LOGS/parity.xml" || exit $?
"$PY" - "$LOGS/parity.xml" <<"PYEOF"
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
ran, skipped = int(suite.get("tests")), int(suite.get("skipped"))
print(f"kernel parity: {ran} cases, {skipped} skipped")
raise SystemExit(1 if skipped or not ran else 0)
PYEOF'
export LOGS
run_step "kernel parity" 90 "$LOGS/parity.log" bash -c "$PARITY" || STATUS=1

# --- tests --------------------------------------------------------------------------------------
run_step "pytest -k cuda" 180 "$LOGS/tests.log" \
  "$PY" -m pytest -q -rfE tests -k 'cuda and not cuda_emulation and not test_ops_parity' --junitxml "$LOGS/tests.xml" || STATUS=1

# --- benchmarks (informative; a failure does not fail the check) --------------------------------
# Model level: the step preset (bf16 Llama, fp32 blocks, all-linear and q/v, autocast off and on),
# every row x the frozen model's step, with the floor rows; 8 steps, 3 untimed, to stay near a minute.
train_args=(train --device cuda --steps 8 --train-warmup 3 --no-progress --csv "$LOGS/train_step.csv")
if ! run_step "bench train step" 90 "$LOGS/train_step.log" "$PY" -m bench "${train_args[@]}"; then
  log "the model-level step table did not complete; see $LOGS/train_step.log (not counted as a failure)"
fi
# Where the step's time goes, per operator (device self time): frozen, PEFT's and ours, standard
# and BAT, all-linear under autocast (HF Trainer's bf16=True), 3 steps after 2.
prof_args=(profile --preset step --device cuda --targets all --autocast on --variants standard,bat --repeats 3 --train-warmup 2)
if ! run_step "bench step profile" 45 "$LOGS/step_profile.log" "$PY" -m bench "${prof_args[@]}"; then
  log "the step profile did not complete; see $LOGS/step_profile.log (not counted as a failure)"
fi
# Per-call overhead (a tiny layer: the host's Python and dispatch work per adapted layer, what a
# small model's GPU step waits on): frozen, PEFT, patch, ours, ours on the registered autograd.
if ! run_step "bench overhead" 40 "$LOGS/overhead.log" "$PY" -m bench.overhead_bench --device cuda --rounds 5 --calls 50; then
  log "the per-call overhead table did not complete; see $LOGS/overhead.log (not counted as a failure)"
fi
bench_args=(--device cuda --no-progress --csv "$LOGS/bench.csv" --png "$LOGS/bench.png")
if ! run_step "bench" 200 "$LOGS/bench.log" "$PY" -m bench "${bench_args[@]}"; then
  log "the benchmark did not complete; see $LOGS/bench.log (not counted as a failure)"
fi
llm_args=(--device cuda --suite llm --dtypes bfloat16 --no-progress --no-png --csv "$LOGS/bench_llm.csv")
if ! run_step "bench llm bf16" 150 "$LOGS/bench_llm.log" "$PY" -m bench "${llm_args[@]}"; then
  log "the LLM-shape benchmark did not complete; see $LOGS/bench_llm.log (not counted as a failure)"
fi

log "done: $([[ $STATUS == 0 ]] && echo PASS || echo FAIL) in $(($(date +%s) - T0))s; logs in $LOGS"
exit "$STATUS"
