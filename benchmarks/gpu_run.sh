#!/usr/bin/env bash
# The whole GPU run in one command, most valuable work first, inside 540 s on a cold Triton cache.
#
#   bash benchmarks/gpu_run.sh OUT_DIR      (from anywhere; an outer timeout should allow 590 s)
#
# 1. parity       every kernel family in bf16/fp16 against float64 (benchmarks/gpu_parity.py)
#    cuda-tests   the fused loss's test file and the ops' call-route tests, on the GPU (pytest)
#    bench-lce    the fused linear cross-entropy against eager's GEMMs alone, eager, Liger-Kernel and
#                 cut-cross-entropy (those two when importable: bring their wheels on PYTHONPATH), each
#                 provider's loss and gradients checked against eager's (into OUT_DIR/lce/)
#    profile-lce  one profiled call of each, the top kernels by device time (into log.txt)
# 2. bench-*      the benchmark table against SDPA, FlexAttention and torch.compile, few shapes
#                 (bench-gqa: grouped-query attention and decoding), and end to end every-layer
#                 TGR against the same model with sdpa (bench-e2e);
#    report       then the table rebuilt with the fraction of the H200 roofline
#    overhead     where the host time of small calls goes (benchmarks/host_overhead.py)
# 3. determinism  forward + backward repeated, bitwise compared (benchmarks/determinism.py)
#    memcheck, racecheck   compute-sanitizer on benchmarks/sanitize_kernels.py
#
# Budget: GPU_RUN_BUDGET_S seconds (default 540) from the start, for everything. Each step has
# its own time limit, cut to what is left of the budget; a step that cannot have its minimum
# is skipped and logged, so the script always ends in time. A step that fails or times out is
# logged and the next one runs. Results are written as the steps go: a run killed at any point
# leaves what it did, and summary.txt (rewritten before and after every step) says where it was.
# OUT_DIR holds at most 8 files: summary.txt, log.txt (everything the steps print), parity.txt,
# records.jsonl, table.md, host-overhead.txt, and lce/records.jsonl and lce/table.md.
#
# Made for a bare CUDA machine with no network (the H200 machine: torch 2.11, triton 3.6,
# transformers 5.17): it installs nothing and finds the packages through PYTHONPATH=<repo root>.
# Without CUDA it is a dry run: every step in a tiny CPU form (Triton's interpreter, fp32), so
# the script's logic is exercised (benchmarks/test_gpu_run.py runs it).
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
BUDGET=${GPU_RUN_BUDGET_S:-540}
# Seconds kept back from the steps: the report and summary at the end, and timeout's grace.
RESERVE=25
END=$(( T0 + BUDGET ))
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/log.txt"
SUMMARY="$OUT_DIR/summary.txt"
PARITY="$OUT_DIR/parity.txt"
: > "$LOG"
rm -rf "$PARITY" "$OUT_DIR/records.jsonl" "$OUT_DIR/table.md" "$OUT_DIR/lce" "$OUT_DIR/host-overhead.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

PY=${PYTHON:-python3}
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null \
        && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi
# One Python start for the versions and for whether there is a GPU (each start imports torch).
PY_INFO=$(timeout 60 "$PY" - <<'EOF' 2>&1
import importlib.metadata as md, platform, torch
names = ("triton", "transformers", "pytest", "matplotlib", "numpy")
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      *(f"{n} {version(n)}" for n in names))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
print("cuda available:", int(torch.cuda.is_available()))
EOF
)
if echo "$PY_INFO" | grep -qx "cuda available: 1"; then GPU=1; else GPU=0; fi
RESULTS=()
NOW_RUNNING=""

environment() {
    echo "date $(date -u +%FT%TZ), host $(hostname), git $(git log -1 --format=%h 2>/dev/null || echo '?')"
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
        || echo "(no nvidia-smi)"
    echo "$PY_INFO" | grep -v "^cuda available:"
    echo "compute-sanitizer: $(command -v compute-sanitizer || echo 'not on PATH')"
}

write_summary() {  # write_summary STATE: the whole summary, rewritten (a kill leaves the last one)
    local state=$1 tmp="$SUMMARY.tmp"
    {
        echo "gpu_run: $([ $GPU = 1 ] && echo "GPU run" || echo "DRY RUN (no CUDA: tiny CPU versions)"), $state," \
             "$(( $(date +%s) - T0 )) s of a ${BUDGET} s budget"
        echo "$ENVIRONMENT"
        echo "--- steps"
        [ ${#RESULTS[@]} -gt 0 ] && printf '%s\n' "${RESULTS[@]}"
        [ -n "$NOW_RUNNING" ] && echo "$NOW_RUNNING"
        if [ -f "$PARITY" ]; then
            echo "--- parity"
            grep -E "^(FAIL|NOT RUN|gpu_parity:)" "$PARITY" | cut -c1-400
        fi
        local records
        for records in "$OUT_DIR/records.jsonl" "$OUT_DIR/lce/records.jsonl"; do
            [ -f "$records" ] || continue
            echo "--- benchmarks${records#"$OUT_DIR"}"
            timeout 20 "$PY" - "$records" <<'EOF' 2>&1
import collections, json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
meas = [r for r in recs if r.get("kind") == "measurement"]
status = collections.Counter(r.get("status") for r in meas)
bad = sorted({(r["op"], r["provider"]) for r in meas if r.get("check_ok") is False})
print(f"{len(meas)} measurements ({dict(status)}), mismatches: {bad or 'none'}")
skipped = sum(len(r.get("skipped") or []) for r in recs if r.get("kind") == "run" and r.get("finished"))
if skipped:
    print(f"time limit: {skipped} cases not measured")
EOF
        done
        echo "--- determinism and sanitizer"
        local verdicts=" reps.*: (bitwise identical|DIFFERS)|^determinism \(|^sanitize_kernels:|^[0-9]+ (passed|failed)"
        grep -E "$verdicts|ERROR SUMMARY|RACECHECK SUMMARY|Device not supported" "$LOG" | cut -c1-300 || true
        echo "files: $(cd "$OUT_DIR" && ls | grep -v '\.tmp$' | tr '\n' ' ')"
    } > "$tmp" 2>&1
    mv -f "$tmp" "$SUMMARY"
}

# step NAME LIMIT MIN MARGIN COMMAND...: run with a time limit of LIMIT seconds cut to what the
# budget leaves before the reserve; skipped when that is under MIN. MARGIN > 0 appends
# `--time-limit (limit - MARGIN)`: the command stops starting new work that long before its
# limit, so the case in progress can finish. Never stops the script.
step() {
    local name=$1 limit=$2 min=$3 margin=$4
    shift 4
    local start=$(date +%s)
    local left=$(( END - RESERVE - start ))
    if [ "$name" = report ]; then left=$(( END - 5 - start )); fi  # the reserve is for it
    if [ $left -lt "$min" ]; then
        RESULTS+=("$(printf '%-12s %-26s %4d s' "$name" "SKIPPED (${left}s left < ${min}s)" 0)")
        echo "=== $name: SKIPPED, ${left} s left in the budget, needs ${min} s" >> "$LOG"
        write_summary "running"
        return
    fi
    [ $left -lt "$limit" ] && limit=$left
    local extra=()
    if [ "$margin" -gt 0 ]; then
        local inner=$(( limit - margin ))
        [ $inner -lt 1 ] && inner=1
        extra=(--time-limit "$inner")
    fi
    NOW_RUNNING="$(printf '%-12s %-26s' "$name" "RUNNING (stopped here?)")"
    write_summary "running $name"
    echo "=== $name (limit ${limit}s, at $(( start - T0 ))s): $* ${extra[*]-}" >> "$LOG"
    timeout --kill-after=5 "$limit" "$@" ${extra[@]+"${extra[@]}"} >> "$LOG" 2>&1
    local rc=$? what="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        what="TIMED OUT (${limit}s)"
    elif [ $rc -ne 0 ]; then
        what="FAILED (rc $rc)"
    fi
    local dt=$(( $(date +%s) - start ))
    NOW_RUNNING=""
    RESULTS+=("$(printf '%-12s %-26s %4d s' "$name" "$what" "$dt")")
    echo "=== $name: $what in ${dt}s (at $(( $(date +%s) - T0 ))s)" >> "$LOG"
    write_summary "running"
}

if [ $GPU = 1 ]; then
    BENCH_COMMON=(--device cuda --dtype bfloat16 --reps 10 --warmup 2 --compile dynamic)
    FLASH_S=(1024 4096)
    GQA_S=(4096)  # GQA at S = 4096; decode against a 4096-key cache
    GQA_PROVIDERS=(--providers eager-seed sdpa-prescaled flex-score-mod tgr-triton)
    WIDE_S=(1024 4096)
    PROJ_S=(4096 65536)
    E2E=(--reps 5 --warmup 1)  # each generate call is ~1 s of Python per 64 tokens
    E2E_LIMIT=80
    DET_REPS=1000
    # Llama-2 and Llama-3 vocabularies at H = 4096, 2048 and 8192 tokens, trainable and frozen
    # lm_head; no torch.compile provider (a cold compile per case would take the step's time).
    LCE=(--reps 5 --warmup 1 --providers gemms eager tgr-torch tgr-triton tgr-triton-dw-per-chunk liger cut-cross-entropy)
    # where a fused loss's time goes beyond its GEMMs: the launch-bound case and the largest
    LCE_PROFILE=(--tokens 2048 8192 --vocab 32000 128256 --providers gemms eager tgr-triton tgr-triton-dw-per-chunk
                 liger)
    OVERHEAD=()
    CUDA_TESTS=(tests/test_linear_cross_entropy.py tests/test_direct_calls.py)
else  # dry run: the same steps, tiny: one mode, and no torch.compile/FlexAttention (minutes of
      # CPU compiles) nor tgr-triton (the interpreter; the parity step runs it)
    BENCH_COMMON=(--device cpu --dtype float32 --quick --reps 1 --warmup 1 --modes forward --no-ceilings
                  --providers eager-seed sdpa-prescaled tgr-torch)
    FLASH_S=(64)
    GQA_S=(64)
    GQA_PROVIDERS=()
    WIDE_S=(64)
    PROJ_S=(64)
    E2E=(--modes forward full)  # both e2e rows: the train step (full) and generation (forward)
    E2E_LIMIT=150  # two small models' Python on a shared CPU
    DET_REPS=2
    LCE=(--quick --reps 1 --providers gemms eager tgr-torch tgr-torch-dw-per-chunk)
    LCE_PROFILE=(--quick --providers gemms tgr-torch)
    OVERHEAD=(--device cpu --quick)
    # the same files, a few of their tests: under the interpreter the whole files take minutes,
    # and the suite runs them anyway
    CUDA_TESTS=(tests/test_linear_cross_entropy.py tests/test_direct_calls.py
                -k "triton_backend_matches or label_out_of_range or triton_large_on_gpu or direct_calls")
fi
BENCH=("$PY" -m benchmarks "${BENCH_COMMON[@]}" --out "$OUT_DIR" --append --no-plots)

ENVIRONMENT=$(environment 2>&1)
echo "$ENVIRONMENT" >> "$LOG"
write_summary "starting"

# The correctness steps launch each kernel's default configuration (TGR_AUTOTUNE=0): autotuning
# would compile every candidate, cold, within their time; the benchmark steps autotune.
NO_TUNE=(env TGR_AUTOTUNE=0)
# 1. correctness on the GPU
step parity 110 30 20 "${NO_TUNE[@]}" "$PY" -m benchmarks.gpu_parity --out "$PARITY"
# tests that check what only a GPU can: the fused loss's kernels on the GEMMs' half logits, the
# ops' eager and compiled call routes (on a CPU: a few of the same tests under the interpreter)
step cuda-tests 80 20 0 "${NO_TUNE[@]}" "$PY" -m pytest -q -p no:cacheprovider "${CUDA_TESTS[@]}"
# the fused linear cross-entropy (its own records: a table of providers per case, not per S)
step bench-lce 100 40 0 "$PY" -m benchmarks.linear_cross_entropy "${LCE[@]}" --out "$OUT_DIR/lce"
step profile-lce 40 15 0 "$PY" -m benchmarks.linear_cross_entropy --profile "${LCE_PROFILE[@]}"
# 2. the benchmark table (the matmul and copy ceilings are measured once, with the first suite)
step bench-flash 70 25 25 "${BENCH[@]}" --suite attention-flash --seq-lens "${FLASH_S[@]}"
# grouped-query attention (32/8 heads, D = 128, causal) and one decoding step (S_q = 1): decode
# first, as it is the cheaper of the two. The kernels' default configurations: a case's records are
# written when it ends, and autotuning every candidate cold could outlast the step.
step bench-gqa 55 20 20 "${NO_TUNE[@]}" "${BENCH[@]}" --suite attention-decode attention-gqa \
    --seq-lens "${GQA_S[@]}" --no-ceilings ${GQA_PROVIDERS[@]+"${GQA_PROVIDERS[@]}"}
step bench-wide 45 20 20 "${BENCH[@]}" --suite attention-wide --seq-lens "${WIDE_S[@]}" --no-ceilings
step bench-proj 25 15 10 "${BENCH[@]}" --suite projection --seq-lens "${PROJ_S[@]}" --no-ceilings
# end to end: a random GQA Llama (hidden 1024, 8 layers, 16/4 heads) with sdpa against the same
# model with every-layer TGR: training step, peak memory, greedy decoding tokens/s. The kernels'
# default configurations (each compiles once, cold, within the step's time).
step bench-e2e "$E2E_LIMIT" 30 0 "${NO_TUNE[@]}" "${BENCH[@]}" --suite e2e --providers base-sdpa tgr-layers \
    --no-ceilings ${E2E[@]+"${E2E[@]}"}
step overhead 60 30 0 "$PY" -m benchmarks.host_overhead ${OVERHEAD[@]+"${OVERHEAD[@]}"} \
    --out "$OUT_DIR/host-overhead.txt"
if [ -f "$OUT_DIR/records.jsonl" ]; then  # the table again, whole, even if a suite was stopped
    step report 15 5 0 "$PY" -m benchmarks.report --no-plots "$OUT_DIR"
fi
# 3. determinism, then the sanitizer
step determinism 40 20 10 "${NO_TUNE[@]}" "$PY" -m benchmarks.determinism --reps "$DET_REPS" --backend triton
SANITIZED=("$PY" -m benchmarks.sanitize_kernels)
if [ $GPU = 1 ] && command -v compute-sanitizer >/dev/null; then
    SANITIZER=("${NO_TUNE[@]}" compute-sanitizer --error-exitcode 3)
    step memcheck 45 25 0 "${SANITIZER[@]}" --tool memcheck "${SANITIZED[@]}"
    step racecheck 45 25 0 "${SANITIZER[@]}" --tool racecheck "${SANITIZED[@]}"
elif [ $GPU = 1 ]; then
    RESULTS+=("$(printf '%-12s %-26s' sanitizer "SKIPPED (no compute-sanitizer)")")
else
    step kernels 45 25 0 "${NO_TUNE[@]}" "${SANITIZED[@]}"  # the sanitizer's program, without it
fi

write_summary "finished"
cat "$SUMMARY"
exit 0
