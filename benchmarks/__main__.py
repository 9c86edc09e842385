"""``python -m benchmarks``: every provider side by side, with records, a table and plots.

Examples::

    python -m benchmarks --quick --out /tmp/bench              # CI's smoke pass (< 1 min on 2 cores)
    python -m benchmarks --suite attention-wide --seq-lens 512 2048 --modes forward full
    python -m benchmarks --device cuda --dtype bfloat16 --out benchmarks/results/h200-2026-11-30

Writes into ``--out``: ``records.jsonl`` (one JSON record per measurement, the schema in
benchmarks/README.md), ``table.md`` (also printed) and one PNG per op and dtype. ``--append`` adds to the
records already there. See benchmarks/README.md for the conditions every number is taken under.
"""
from __future__ import annotations

import os
import sys

import torch

from tgr_kernels._interpreter import rerun_with_interpreter  # noqa: E402

# Triton's interpreter is chosen when the kernels are defined: re-execute with it set when asked
# for on a machine without a GPU.
if __name__ == "__main__" and "--triton-interpret" in sys.argv:
    rerun_with_interpreter("benchmarks", sys.argv[1:])

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

from . import cases, measure, report  # noqa: E402
from .providers import ALL_PROVIDERS  # noqa: E402

OP_SUITES = list(cases.OPS)
SUITES = OP_SUITES + ["e2e"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

TIMING = {
    "cpu": "wall clock (perf_counter) per call, providers interleaved per repetition, {warmup} warm-up "
           "call(s), median and p20/p80 of {reps} repetitions, inputs rotated over copies > 2× the L3",
    "cuda": "CUDA events per call, providers interleaved per repetition, {warmup} warm-up call(s), "
            "median and p20/p80 of {reps} repetitions, inputs rotated over copies > 2× the L2",
}
MEMORY = {
    "cpu": "tensor allocations during one warm call, replayed from the profiler's memory timeline "
           "(the records' peak_rss_mib: RSS sampled every 0.2 ms, library workspaces included)",
    "cuda": "torch.cuda.max_memory_allocated during one warm call, minus memory_allocated before it",
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", nargs="+", default=["all"], choices=SUITES + ["all"],
                   help="what to measure (default all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if there is one")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                   help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--providers", nargs="+", default=ALL_PROVIDERS, choices=ALL_PROVIDERS, help="default: all")
    p.add_argument("--seq-lens", nargs="+", type=int,
                   help=f"default {cases.DEFAULT_SEQ_LENS} ({cases.QUICK_SEQ_LENS} with --quick; e2e: [512]; "
                        + "; ".join(f"{op}: {full} ({quick} with --quick)"
                                    for op, (full, quick) in cases.OP_SEQ_LENS.items()) + ")")
    p.add_argument("--modes", nargs="+", default=list(cases.MODES), choices=cases.MODES,
                   help="default: all three (e2e: full = the training step, forward = generation)")
    p.add_argument("--causal", choices=["off", "on", "both"], help="attention only (default: both; on with --quick)")
    p.add_argument("--mask", default="padding", choices=["padding", "none"],
                   help="key-padding mask on the attention inputs: the last S/8 keys of the last row (default)")
    p.add_argument("--batch", type=int, help="batch size (default 1)")
    p.add_argument("--reps", type=int, help="timed repetitions (default: 10 CPU, 30 GPU, 3 --quick)")
    p.add_argument("--warmup", type=int, help="warm-up calls per provider (default: 2 CPU, 5 GPU, 1 --quick)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, S=128, causal on, 3 repetitions: checks the runner works (< 1 min)")
    p.add_argument("--out", help="output folder (default benchmarks/results/<device>-<date>)")
    p.add_argument("--append", action="store_true", help="add to the records already in --out")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--time-limit", type=float, help="seconds; cases not started by then are skipped")
    p.add_argument("--compile", default="static", choices=["static", "dynamic"],
                   help="torch-compile: dynamic=False, recompiled for each shape (default), or dynamic=True, "
                        "compiled once for every S (the GPU run's time budget). FlexAttention is always static")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the output check")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    p.add_argument("--no-ceilings", dest="ceilings", action="store_false",
                   help="skip measuring the matmul and copy ceilings")
    p.add_argument("--triton-interpret", action="store_true",
                   help="on a CPU, run tgr-triton under Triton's interpreter (slow: correctness only)")
    p.add_argument("--validate-memory", action="store_true",
                   help="check the CPU peak-memory method on known allocations, then exit")
    args = p.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.suites = SUITES if "all" in args.suite else args.suite
    gpu = args.device == "cuda"
    args.dtypes = [DTYPES[d] for d in (args.dtype or (["bfloat16"] if gpu else ["float32"]))]
    args.causal = args.causal or ("on" if args.quick else "both")
    args.causal_values = {"off": [False], "on": [True], "both": [False, True]}[args.causal]
    if args.reps is not None and args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must not be negative, got {args.warmup}")
    # `is None`, not `or`: --warmup 0 is a choice (the first call, recorded as first_ms, is the only untimed one)
    args.reps = args.reps if args.reps is not None else (3 if args.quick else 30 if gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5 if gpu else 2)
    default_lens = cases.QUICK_SEQ_LENS if args.quick else cases.DEFAULT_SEQ_LENS
    args.seq_lens_for = lambda op: args.seq_lens or default_lens
    if args.out is None:
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        args.out = os.path.join(root, f"{args.device}-{datetime.date.today().isoformat()}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.validate_memory:
        for r in measure.validate_cpu_memory():
            print(f"{r['what']:36s} expected {r['expected_mib']:6.1f} MiB; tensor timeline {r['tensor_mib']:6.1f} MiB, "
                  f"RSS {r['rss_mib']:6.1f} MiB")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default, stated: fp32 means fp32
    measure.fix_malloc_for_timing()
    if args.compile == "dynamic":  # one code object serves every case: let its cache grow
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))

    os.makedirs(args.out, exist_ok=True)
    records_path = os.path.join(args.out, report.RECORDS)
    if not args.append and os.path.exists(records_path):
        os.remove(records_path)
    env = measure.environment(args.device)
    run_id = uuid.uuid4().hex[:8]
    common = {"run_id": run_id, "device": args.device, "device_name": env["device_name"], "date": env["date"],
              "versions": env["versions"], "threads": env["torch_threads"]}
    sink = open(records_path, "a", encoding="utf-8")

    def emit(rec: dict) -> None:
        sink.write(json.dumps({"kind": "measurement", **common, **rec}) + "\n")
        sink.flush()  # a run stopped part way keeps what it measured

    run_rec = {"kind": "run", **common, "env": env, "command": "python -m benchmarks " + shlex.join(argv),
               "timing": TIMING[args.device].format(reps=args.reps, warmup=args.warmup),
               "memory": MEMORY[args.device], "skipped": [], "finished": False}
    sink.write(json.dumps(run_rec) + "\n")  # now, so that a run stopped part way is described
    v = env["versions"]
    print(f"TGR benchmarks on {env['device_name']} ({args.device}, {env['torch_threads']} threads), "
          f"{env['date']}, torch {v['torch']}, triton {v['triton']}, git {v['git']}")
    print(f"  suites {args.suites}, dtypes {[str(d)[6:] for d in args.dtypes]}, modes {args.modes}, "
          f"causal {args.causal}, reps {args.reps}, warm-up {args.warmup}, out {args.out}", flush=True)

    if args.device == "cpu" and (env["load_avg_1m"] or 0) > 0.5:
        print(f"  note: load average {env['load_avg_1m']} before starting: other processes are running, "
              f"CPU timings will be noisy (--threads 1 suffers least)")
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    if args.ceilings:
        for c in measure.measure_ceilings(args.device, reps=3 if args.quick else 10):
            sink.write(json.dumps({"kind": "ceiling", **common, **c}) + "\n")
            rate = f"{c['tflops']:.1f} TFLOP/s" if "tflops" in c else f"{c['gbps']:.0f} GB/s"
            print(f"  ceiling {c['op']} {c['dtype']}: {rate}")
    from . import suite_ops

    run_rec["skipped"] += suite_ops.run(args, emit, deadline)
    if "e2e" in args.suites:
        try:
            from . import suite_e2e
        except ImportError as exc:
            print(f"  e2e: n/a ({exc})")
        else:
            run_rec["skipped"] += suite_e2e.run(args, emit, deadline)
    run_rec["finished"] = True
    run_rec["load_avg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    sink.write(json.dumps(run_rec) + "\n")
    sink.close()
    if run_rec["skipped"]:
        print(f"time limit: {len(run_rec['skipped'])} cases not measured")
    print(report.write_report(args.out, plots=args.plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
