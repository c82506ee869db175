#!/usr/bin/env bash
# The one script for a GPU machine (no network): build miss_ext in place for sm_90, then
#   1. build_info,
#   2. a quick CUDA-vs-CPU kernel parity and determinism sweep over every kernel path
#      (including the gaps the CPU emulation found, tests/cuda_emu/, and the mixed-precision
#      paths: bf16/fp16 base, fp32 blocks),
#   3. the CUDA test cases:  pytest -q tests -k 'cuda and not cuda_emulation' (no -x: one run
#      reports every failure; the CPU emulation of the kernels is left to CI),
#   4. the benchmarks:       python -m bench --device cuda, and --suite llm in bfloat16
#      (a failure there is reported, not fatal).
# Everything goes to $OUT when it is set, else to bench/results/gpu_check/: build.log,
# info.log, parity.log, tests.log, tests.xml (JUnit), bench.log/.csv/.png (the default table),
# bench_llm.log/.csv (the LLM-shape table), summary.txt (one line per step). Each step has a
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
run_step "kernel parity" 90 "$LOGS/parity.log" "$PY" - <<'EOF' || STATUS=1
import time
import torch
import miss_ext  # noqa: F401  (loads torch.ops.miss_ext)

ops = torch.ops.miss_ext
torch.manual_seed(0)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOL)
failures = []
checked = 0


def report(name, got, want, dtype):
    global checked
    checked += 1
    got, want = got.detach().cpu().double(), want.detach().double()
    if got.shape != want.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        print("FAIL", failures[-1])
        return
    if got.numel() == 0:
        return
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    ok = err <= TOL[dtype] * scale and bool(torch.isfinite(got).all() == torch.isfinite(want).all())
    if not ok:
        failures.append(f"{name}: max abs err {err:.3g} (scale {scale:.3g})")
        print("FAIL", failures[-1])


def both(fn, *args):
    cpu = fn(*[a for a in args])
    dev = fn(*[a.cuda() if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args])
    return dev, cpu


t0 = time.time()
seed = torch.tensor([1234], dtype=torch.long)
for dtype in DTYPES:
    # blocksum / blocksum_dropout: tiny r, odd r, r > in, in % r != 0, long rows (split path),
    # r == in, a sliced (row-strided) x.
    for n, fin, r in [(7, 64, 4), (3, 100, 7), (5, 33, 64), (3, 8, 1), (2, 60000, 16),
                      (257, 4096, 64), (4, 512, 512), (9, 1000, 3)]:
        x = torch.randn(n, fin, dtype=dtype)
        report(f"blocksum {dtype} {(n, fin, r)}", *both(ops.blocksum, x, r), dtype)
        report(f"blocksum_dropout {dtype} {(n, fin, r)}",
               *both(lambda x_, r_: ops.blocksum_dropout(x_, r_, 0.3, seed), x, r), dtype)
        # Sliced after the move: .cuda() of a sliced tensor would come back contiguous.
        wide = torch.randn(n, fin + 5, dtype=dtype)
        report(f"blocksum strided {dtype} {(n, fin, r)}",
               *both(lambda w_, r_: ops.blocksum(w_[:, 2:fin + 2], r_), wide, r), dtype)
        # A row stride that is a multiple of the vector width, 16 bytes in: the vector path on
        # strided rows (fin + 5 above never is one).
        v = 16 // wide.element_size()
        wide = torch.randn(n, fin + 4 * v, dtype=dtype)
        report(f"blocksum strided vector {dtype} {(n, fin, r)}",
               *both(lambda w_, r_: ops.blocksum_dropout(w_[:, v:fin + v], r_, 0.3, seed), wide, r), dtype)
    # The wide-column path (r-blocks wider than a row's threads) with split rows.
    x = torch.randn(1, 16384, dtype=dtype)
    report(f"blocksum wide split {dtype} (1, 16384, 1024)", *both(ops.blocksum, x, 1024), dtype)
    report(f"blocksum_dropout wide split {dtype} (1, 16384, 1024)",
           *both(lambda x_, r_: ops.blocksum_dropout(x_, r_, 0.3, seed), x, 1024), dtype)
    # tile / tile_dropout / tile_add
    for n, r, feats in [(7, 4, 64), (3, 7, 100), (5, 64, 33), (3, 1, 8), (129, 64, 4096), (2, 16, 60000)]:
        s = torch.randn(n, r, dtype=dtype)
        report(f"tile {dtype} {(n, r, feats)}", *both(ops.tile, s, feats), dtype)
        report(f"tile_dropout {dtype} {(n, r, feats)}",
               *both(lambda s_, f_: ops.tile_dropout(s_, f_, 0.3, seed), s, feats), dtype)
        base = torch.randn(n, feats, dtype=dtype)
        report(f"tile_add {dtype} {(n, r, feats)}", *both(ops.tile_add, base, s), dtype)
    # BAT: r = 1, odd r, small-r path, r in (32, 64) not a multiple of 16, WMMA sizes, r == in;
    # split rows on the small and 32-wide tiled block-grad paths (48, 4096, 16), (64, 2048, 32);
    # WMMA with several tiles and splits (160, 1280, 80).
    for out_f, in_f, r in [(8, 12, 1), (48, 96, 3), (128, 256, 16), (96, 192, 32), (240, 480, 40),
                           (288, 576, 48), (256, 512, 64), (512, 1024, 128), (128, 128, 128),
                           (200, 300, 100), (64, 8192, 64), (48, 4096, 16), (64, 2048, 32),
                           (160, 1280, 80)]:
        w = torch.randn(out_f, in_f, dtype=dtype)
        g = torch.randn(out_f, in_f, dtype=dtype)
        b = 0.1 * torch.randn(out_f // r, r, r, dtype=dtype)
        report(f"bat_transform {dtype} {(out_f, in_f, r)}", *both(ops.bat_transform, w, b), dtype)
        report(f"bat_weight_grad {dtype} {(out_f, in_f, r)}", *both(ops.bat_weight_grad, g, b), dtype)
        report(f"bat_block_grad {dtype} {(out_f, in_f, r)}",
               *both(lambda g_, w_: ops.bat_block_grad(g_, w_, r), g, w), dtype)
    # Weights at an offset, sliced after the move. torch.randn(97, 192)[1:] starts 384 bytes in,
    # 16-byte aligned, so it still takes WMMA; one element (2 bytes) in forces the fallback.
    for name, big, view in [("row-sliced weight", torch.randn(97, 192, dtype=dtype), lambda t: t[1:]),
                            ("misaligned weight", torch.randn(96 * 192 + 1, dtype=dtype),
                             lambda t: t[1:].view(96, 192))]:
        g = torch.randn(96, 192, dtype=dtype)
        b = 0.1 * torch.randn(2, 48, 48, dtype=dtype)
        report(f"bat_transform {name} {dtype} (96, 192, 48)",
               *both(lambda w_, b_: ops.bat_transform(view(w_), b_), big, b), dtype)
        report(f"bat_block_grad {name} {dtype} (96, 192, 48)",
               *both(lambda g_, w_: ops.bat_block_grad(g_, view(w_), 48), g, big), dtype)
    # miss_merge: standard (m = out) and mini (m < out), r not dividing in.
    for out_f, in_f, r, m in [(64, 100, 7, 64), (128, 256, 64, 16), (96, 4096, 128, 96), (10, 3, 5, 5)]:
        w = torch.randn(out_f, in_f, dtype=dtype)
        blk = torch.randn(r, m, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        report(f"miss_merge {dtype} {(out_f, in_f, r, m)}",
               *both(lambda w_, b_: ops.miss_merge(w_, b_, 0.5), w, blk), dtype)
    # miss_gathered_product (serving): runs of rows per adapter, alternating rows, mini blocks,
    # r past one staging chunk, more adapters than one launch takes (40), the layer of issue 12.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for n, out_f, r, k, m in [(37, 300, 40, 3, 12), (19, 64, 7, 4, 16), (80, 32, 4, 40, 0),
                              (1024, 2048, 64, 8, 0), (256, 4096, 16, 5, 64)]:
        base = torch.randn(n, out_f, dtype=dtype)
        s = torch.randn(n, r, dtype=acc)
        blocks = [torch.randn(r, m if (m and i % 2) else out_f, dtype=acc) for i in range(k)]
        index = torch.randint(-1, k, (n,))
        index[: n // 2] = torch.arange(n // 2) * k // max(n // 2, 1)  # runs of rows, as sequences give
        cpu = ops.miss_gathered_product(base, s, blocks, index)
        dev = ops.miss_gathered_product(base.cuda(), s.cuda(), [b.cuda() for b in blocks], index.cuda())
        report(f"miss_gathered_product {dtype} {(n, out_f, r, k, m)}", dev, cpu, dtype)

# Mixed precision (csrc/common/kernels.h): a bf16/fp16 base with float32 blocks, in every op
# that takes it, and the two layers that use them.
wide = torch.float32
for dtype in (torch.bfloat16, torch.float16):
    for n, fin, r in [(7, 64, 4), (3, 100, 7), (2, 60000, 16), (1, 16384, 1024)]:
        x = torch.randn(n, fin, dtype=dtype)
        report(f"blocksum mixed {dtype} {(n, fin, r)}",
               *both(lambda x_, r_: ops.blocksum(x_, r_, dtype=wide), x, r), wide)
        report(f"blocksum_dropout mixed {dtype} {(n, fin, r)}",
               *both(lambda x_, r_: ops.blocksum_dropout(x_, r_, 0.3, seed, dtype=wide), x, r), wide)
    for n, r, feats in [(7, 4, 64), (3, 7, 100), (129, 64, 4096)]:
        s = torch.randn(n, r, dtype=wide)
        report(f"tile mixed {dtype} {(n, r, feats)}", *both(lambda s_, f_: ops.tile(s_, f_, dtype=dtype), s, feats),
               dtype)
        report(f"tile_dropout mixed {dtype} {(n, r, feats)}",
               *both(lambda s_, f_: ops.tile_dropout(s_, f_, 0.3, seed, dtype=dtype), s, feats), dtype)
        report(f"tile_add mixed {dtype} {(n, r, feats)}",
               *both(ops.tile_add, torch.randn(n, feats, dtype=dtype), s), dtype)
    for out_f, in_f, r in [(128, 256, 16), (96, 192, 48), (256, 512, 64)]:
        w = torch.randn(out_f, in_f, dtype=dtype)
        b = 0.1 * torch.randn(out_f // r, r, r, dtype=wide)
        report(f"bat_transform mixed {dtype} {(out_f, in_f, r)}",
               *both(lambda w_, b_: ops.bat_transform(w_, b_, dtype=dtype), w, b), dtype)
        g, x = torch.randn(64, out_f, dtype=dtype), torch.randn(64, in_f, dtype=dtype)
        report(f"bat_io_block_grad {dtype} {(out_f, in_f, r)}",
               *both(lambda g_, x_, w_: ops.bat_io_block_grad(g_, x_, w_, r), g, x, w), wide)
        report(f"bat_linear mixed {dtype} {(out_f, in_f, r)}",
               *both(lambda x_, w_, b_: ops.bat_linear(x_, w_, None, [b_]), x, w, b), dtype)
    base, g = torch.randn(33, 512, dtype=dtype), torch.randn(33, 512, dtype=dtype)
    s, blk = torch.randn(33, 64, dtype=wide), 0.1 * torch.randn(64, 512, dtype=wide)
    report(f"miss_add_product {dtype}", *both(ops.miss_add_product, base, s, blk), dtype)
    report(f"miss_block_grads {dtype}",
           *both(lambda g_, s_, b_: torch.cat([t.flatten() for t in ops.miss_block_grads(g_, s_, b_)]), g, s, blk),
           wide)
    x, w, bias = torch.randn(4, 9, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype), torch.randn(512, dtype=dtype)
    report(f"miss_linear mixed {dtype}",
           *both(lambda x_, w_, c_, b_: ops.miss_linear(x_, w_, c_, b_, 0.0, None)[0], x, w, bias, blk), dtype)

# The dropout mask itself must match the CPU bit for bit.
ones = torch.ones(37, 1000, dtype=torch.float64)
m_dev = ops.tile_dropout(ones[:, :1].contiguous().cuda(), 1000, 0.25, seed).cpu()
m_cpu = ops.tile_dropout(ones[:, :1].contiguous(), 1000, 0.25, seed)
checked += 1
if not torch.equal(m_dev, m_cpu):
    failures.append(f"dropout mask differs from the CPU mask in {(m_dev != m_cpu).sum().item()} places")
    print("FAIL", failures[-1])

# Determinism: the split/partial paths must be bit-identical run to run.
for name, fn in [
    ("blocksum split", lambda: ops.blocksum(torch.randn(2, 60000, generator=torch.Generator().manual_seed(1)).cuda(), 16)),
    ("bat_block_grad split", lambda: ops.bat_block_grad(
        torch.randn(64, 8192, generator=torch.Generator().manual_seed(2)).cuda(),
        torch.randn(64, 8192, generator=torch.Generator().manual_seed(3)).cuda(), 64)),
    ("bat_block_grad bf16 wmma", lambda: ops.bat_block_grad(
        torch.randn(256, 8192, generator=torch.Generator().manual_seed(2)).bfloat16().cuda(),
        torch.randn(256, 8192, generator=torch.Generator().manual_seed(3)).bfloat16().cuda(), 128)),
]:
    a, b = fn(), fn()
    checked += 1
    if not torch.equal(a, b):
        failures.append(f"{name}: not bit-identical across runs")
        print("FAIL", failures[-1])

torch.cuda.synchronize()
print(f"kernel parity: {checked} checks, {len(failures)} failures, {time.time() - t0:.1f}s")
raise SystemExit(1 if failures else 0)
EOF

# --- tests --------------------------------------------------------------------------------------
run_step "pytest -k cuda" 180 "$LOGS/tests.log" \
  "$PY" -m pytest -q -rfE tests -k 'cuda and not cuda_emulation' --junitxml "$LOGS/tests.xml" || STATUS=1

# --- benchmark (informative; its failure does not fail the check) -------------------------------
bench_args=(--device cuda --no-progress --csv "$LOGS/bench.csv" --png "$LOGS/bench.png")
if ! run_step "bench" 200 "$LOGS/bench.log" "$PY" -m bench "${bench_args[@]}"; then
  log "the benchmark did not complete; see $LOGS/bench.log (not counted as a failure)"
fi
# Model level: the step preset (bf16 Llama, fp32 blocks, all-linear and q/v, autocast off and on),
# every row x the frozen model's step, with the floor rows; 8 steps, 3 untimed, to stay near a minute.
train_args=(train --device cuda --steps 8 --train-warmup 3 --no-progress --csv "$LOGS/train_step.csv")
if ! run_step "bench train step" 90 "$LOGS/train_step.log" "$PY" -m bench "${train_args[@]}"; then
  log "the model-level step table did not complete; see $LOGS/train_step.log (not counted as a failure)"
fi
llm_args=(--device cuda --suite llm --dtypes bfloat16 --no-progress --no-png --csv "$LOGS/bench_llm.csv")
if ! run_step "bench llm bf16" 150 "$LOGS/bench_llm.log" "$PY" -m bench "${llm_args[@]}"; then
  log "the LLM-shape benchmark did not complete; see $LOGS/bench_llm.log (not counted as a failure)"
fi

log "done: $([[ $STATUS == 0 ]] && echo PASS || echo FAIL) in $(($(date +%s) - T0))s; logs in $LOGS"
exit "$STATUS"
