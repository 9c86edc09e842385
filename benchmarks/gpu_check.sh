#!/usr/bin/env bash
# The GPU tests and benchmarks in one command, results in one folder.
#
#   bash benchmarks/gpu_check.sh OUT_DIR        (from anywhere; it works in the repository root)
#
# Made for a bare CUDA machine with torch, triton, transformers, pytest and matplotlib installed
# and no network (the H200 machine: torch 2.11, triton 3.6): it installs nothing, and finds the
# packages through PYTHONPATH=<repo root>. Without CUDA it is a dry run: every step runs in a tiny
# CPU form (tests collected, not run; quick benchmark shapes), so the script's logic is exercised.
#
# Budget: under 8 minutes (the step limits add up to 450 s). Each step has its own time limit (the benchmark steps also stop
# starting new cases a little before theirs); a step that fails or times out is logged and the
# next one runs. Everything the steps print goes to OUT_DIR/log.txt; summary.txt comes last.
# OUT_DIR ends up with at most 8 files (the device tool's limit): log.txt, summary.txt,
# records.jsonl, table.md and the plots (tarred into plots.tar if there are more than 4).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/log.txt"
SUMMARY="$OUT_DIR/summary.txt"
: > "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ "$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)" = "1" ]; then
    GPU=1
else
    GPU=0
fi
T0=$(date +%s)
RESULTS=()

# step NAME LIMIT_SECONDS COMMAND...: run, log, time, never stop the script
step() {
    local name=$1 limit=$2
    shift 2
    local t=$(date +%s) part="$OUT_DIR/.step.log"
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --kill-after=15 "$limit" "$@" > "$part" 2>&1
    local rc=$?
    cat "$part" >> "$LOG"
    local what="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then what="TIMED OUT"; elif [ $rc -ne 0 ]; then what="FAILED (rc $rc)"; fi
    if [ "$what" != "ok" ]; then tail -n 25 "$part"; fi
    rm -f "$part"
    local dt=$(( $(date +%s) - t ))
    RESULTS+=("$(printf '%-20s %-16s %4d s' "$name" "$what" "$dt")")
    echo "=== $name: $what in ${dt}s (total $(( $(date +%s) - T0 ))s)" | tee -a "$LOG"
}

if [ $GPU = 1 ]; then
    # torch-compile with dynamic=True: one compilation for every S instead of one per shape
    DEV=(--device cuda --dtype bfloat16 --reps 20 --warmup 3 --compile dynamic)
    TESTS=(-m "not slow" tests)
    FLASH_S=(512 1024 2048 4096 8192)
    WIDE_S=(128 256 512 1024 2048 4096)
    PROJ_S=(1024 4096 16384 65536)
    E2E_S=(1024 4096)
else  # dry run: the same steps, tiny
    DEV=(--device cpu --dtype float32 --quick --reps 2 --warmup 1 --compile dynamic)
    TESTS=(--collect-only -m "not slow" tests)
    FLASH_S=(64 128)
    WIDE_S=(64 128)
    PROJ_S=(64 128)
    E2E_S=(64)
fi
BENCH=("$PY" -m benchmarks "${DEV[@]}" --out "$OUT_DIR" --append --no-plots)

environment() {
    date -u
    nvidia-smi || echo "(no nvidia-smi)"
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
for dist in ("triton", "transformers", "pytest", "pytest-benchmark", "matplotlib", "numpy"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "MISSING")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), f"{p.multi_processor_count} SMs", f"L2 {getattr(p, 'L2_cache_size', 0) >> 20} MiB",
          f"{p.total_memory / 2**30:.0f} GiB")
EOF
    git log -1 --oneline 2>/dev/null || echo "(no git)"
}
export -f environment
export PY

rm -f "$OUT_DIR/records.jsonl"
step environment 20 bash -c environment
step tests 120 "$PY" -m pytest -q -p no:cacheprovider --durations=10 "${TESTS[@]}"
step bench-flash 110 "${BENCH[@]}" --suite attention-flash --seq-lens "${FLASH_S[@]}" --time-limit 85
step bench-wide 90 "${BENCH[@]}" --suite attention-wide --seq-lens "${WIDE_S[@]}" --no-ceilings --time-limit 65
step bench-projection 30 "${BENCH[@]}" --suite projection --seq-lens "${PROJ_S[@]}" --no-ceilings --time-limit 18
if [ -f benchmarks/suite_e2e.py ]; then
    step bench-e2e 50 "${BENCH[@]}" --suite e2e --seq-lens "${E2E_S[@]}" --no-ceilings --time-limit 30
fi
step report 30 "$PY" -m benchmarks.report "$OUT_DIR"

# The device tool brings back at most 8 files: keep the plots in one archive if there are many.
PNGS=("$OUT_DIR"/*.png)
if [ -e "${PNGS[0]}" ] && [ ${#PNGS[@]} -gt 4 ]; then
    tar -C "$OUT_DIR" -cf "$OUT_DIR/plots.tar" $(cd "$OUT_DIR" && ls *.png) && rm -f "$OUT_DIR"/*.png
fi

{
    echo "gpu_check: $([ $GPU = 1 ] && echo "GPU run" || echo "DRY RUN (no CUDA: tiny CPU versions)"), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - T0 )) s"
    printf '%s\n' "${RESULTS[@]}"
    echo "tests: $(grep -E '^[0-9]+ (passed|failed|error)|[0-9]+ tests? collected|(passed|failed).* in [0-9.]+s' "$LOG" | tail -n 1)"
    "$PY" - "$OUT_DIR/records.jsonl" <<'EOF'
import collections, json, os, sys
path = sys.argv[1]
if not os.path.exists(path):
    print("records: none")
    sys.exit()
recs = [json.loads(l) for l in open(path) if l.strip()]
meas = [r for r in recs if r.get("kind") == "measurement"]
status = collections.Counter(r.get("status") for r in meas)
bad = sorted({(r["op"], r["provider"]) for r in meas if r.get("check_ok") is False})
print(f"records: {len(meas)} measurements ({dict(status)}), mismatches: {bad or 'none'}")
for r in recs:
    if r.get("kind") == "ceiling":
        rate = f"{r['tflops']:.3g} TFLOP/s" if r.get("tflops") else f"{r['gbps']:.3g} GB/s"
        print(f"ceiling {r['op']} {r['dtype']}: {rate}")
    if r.get("kind") == "run" and r.get("skipped"):
        print(f"time limit: {len(r['skipped'])} cases skipped in {r['command']}")
EOF
    echo "files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
} > "$SUMMARY" 2>&1
cat "$SUMMARY"
echo
[ -f "$OUT_DIR/table.md" ] && head -c 6000 "$OUT_DIR/table.md"
exit 0
