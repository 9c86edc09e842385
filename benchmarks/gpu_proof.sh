#!/usr/bin/env bash
# Issue 6's checks that gpu_check.sh does not run: determinism and compute-sanitizer.
#
#   bash benchmarks/gpu_proof.sh OUT_DIR      (device tool: bash benchmarks/gpu_proof.sh "$OUT", timeout_s 420)
#
# 1. determinism: forward + backward of each op 1,000 times, bitwise compared (torch.equal)
# 2. compute-sanitizer memcheck, then racecheck, on one small run of every Triton kernel
# Each step has a time limit; a failure is logged and the next step runs; summary.txt comes
# last. Without CUDA it is a dry run (few repetitions, no sanitizer). Budget: under 6 minutes.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-proof-$(date -u +%Y-%m-%d)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/proof_log.txt"
SUMMARY="$OUT_DIR/proof_summary.txt"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
GPU=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
RESULTS=()

step() {  # step NAME LIMIT COMMAND...
    local name=$1 limit=$2 t=$(date +%s)
    shift 2
    echo "=== $name (limit ${limit}s): $*" >> "$LOG"
    timeout --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$? what="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMED OUT"; elif [ $rc -ne 0 ]; then what="FAILED (rc $rc)"; fi
    RESULTS+=("$(printf '%-22s %-14s %4d s' "$name" "$what" "$(( $(date +%s) - t ))")")
}

if [ "$GPU" = 1 ]; then
    step determinism 150 "$PY" -m benchmarks.determinism --reps 1000 --backend triton
    if command -v compute-sanitizer >/dev/null; then
        step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m benchmarks.sanitize_kernels
        step racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" -m benchmarks.sanitize_kernels
    else
        RESULTS+=("compute-sanitizer      not on PATH")
    fi
else
    step determinism 300 "$PY" -m benchmarks.determinism --reps 2 --backend triton
    step kernels-dry-run 300 "$PY" -m benchmarks.sanitize_kernels
fi

{
    echo "gpu_proof on $(hostname) $(date -u +%FT%TZ), GPU=$GPU"
    "$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")' 2>/dev/null
    printf '%s\n' "${RESULTS[@]}"
    echo "--- determinism"
    grep -E "reps,|^determinism" "$LOG" || true
    echo "--- sanitizer"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported|sanitize_kernels:" "$LOG" || true
} > "$SUMMARY"
cat "$SUMMARY"
