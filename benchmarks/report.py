"""Records in, tables out: ``records.jsonl`` -> ``table.md`` (and the same text on the console).

``python -m benchmarks.report [--no-plots] DIR`` rebuilds DIR/table.md and DIR/*.png from
DIR/records.jsonl, e.g. after a run that was stopped part way (records are written as they are
measured).

One table per (op, shape, dtype, mode, causal): a row per sequence length, a column per
provider. A cell holds the median time, the speed-up over eager-seed (eager-seed's median over
the provider's: 2.0× = twice as fast), the extra peak memory, and on a GPU the achieved
TFLOP/s (GB/s for the projection and decode). "n/a" cells name their reason below the table; a provider
whose output or gradients disagree with the seed's math is marked MISMATCH, whatever its speed.
Records measured on an H200 get a roofline column (the least time the kernels as designed can
take there, ``benchmarks.roofline``) and each cell the fraction of it that was reached (roofline
time / measured time: 100% is the limit).
"""
from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict

from . import roofline
from .providers import ALL_PROVIDERS

RECORDS = "records.jsonl"
TABLE = "table.md"
SHAPE_KEYS = ("batch", "heads", "kv_heads", "q_len", "seq_len", "head_dim", "hidden", "temp_heads", "layers",
              "vocab")
# Memory-bound ops, whose cells show achieved GB/s on a GPU (the others: TFLOP/s).
BANDWIDTH_OPS = ("projection", "attention-decode")


def load_records(path: str) -> list[dict]:
    """Records of a records.jsonl, the last one winning where a measurement was repeated."""
    latest: OrderedDict[tuple, dict] = OrderedDict()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                latest.pop(record_key(rec), None)
                latest[record_key(rec)] = rec
    return list(latest.values())


def record_key(rec: dict) -> tuple:
    return (rec.get("kind", "measurement"), rec.get("op"), rec.get("provider"), rec.get("mode"),
            rec.get("dtype"), rec.get("device_name"), rec.get("causal"), rec.get("mask"),
            *(rec.get(k) for k in SHAPE_KEYS), rec.get("run_id") if rec.get("kind") == "run" else None)


def fmt_ms(v: float) -> str:
    if v < 1:
        return f"{v:.3f}"
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def _group_key(rec: dict) -> tuple:
    shape = tuple((k, rec[k]) for k in SHAPE_KEYS if k != "seq_len" and rec.get(k) is not None)
    return (rec["op"], shape, rec["dtype"], rec["mode"], rec.get("causal"), rec.get("mask"), rec.get("device_name"))


def _cell(rec: dict, eager: dict, notes: dict[str, int], on_gpu: bool, bound: dict | None = None) -> str:
    if rec.get("status") != "ok":
        reason = rec.get("reason") or rec.get("status", "?")
        mark = notes.setdefault(reason, len(notes) + 1)
        return f"n/a [{mark}]"
    parts = [f"{fmt_ms(rec['median_ms'])} ms"]
    if eager and eager.get("status") == "ok":
        parts.append(f"{eager['median_ms'] / rec['median_ms']:.2f}×")
    if rec.get("tokens_per_s"):
        parts.append(f"{rec['tokens_per_s']:.3g} tok/s")
    if rec.get("peak_mib") is not None:
        parts.append(f"{rec['peak_mib']:.0f} MiB")
    # the rate that bounds the op: FLOP/s for attention, bytes/s for the projection and decode
    if on_gpu and rec.get("gbps") and rec["op"] in BANDWIDTH_OPS:
        parts.append(f"{rec['gbps']:.0f} GB/s")
    elif on_gpu and rec.get("tflops") and rec["op"] not in BANDWIDTH_OPS:
        parts.append(f"{rec['tflops']:.0f} TF/s" if rec["tflops"] >= 10 else f"{rec['tflops']:.2g} TF/s")
    if bound is not None:
        parts.append(f"{bound['roofline_ms'] / rec['median_ms']:.0%} of roofline")
    if rec.get("note"):
        parts.append(f"[{notes.setdefault(rec['note'], len(notes) + 1)}]")
    if rec.get("check_ok") is False:
        parts.append(f"**MISMATCH** (rel. err {rec['check_rel_err']:.1e} > {rec['check_tol']:.1e})")
    return " · ".join(parts)


def _loaded(load_start, load_end, cores) -> bool:
    """Whether a CPU run shared its cores: a 1-minute load average above half the cores."""
    loads = [x for x in (load_start, load_end) if x is not None]
    return bool(cores) and any(x > 0.5 * cores for x in loads)


def header_lines(runs: list[dict], ceilings: list[dict]) -> list[str]:
    """The conditions: device, versions, threads, timing and memory methods, each run's command."""
    lines, said = [], set()
    for run in runs:
        env = run["env"]
        v = env["versions"]
        threads = (f", {env['torch_threads']} torch threads of {env['cpu_cores']} cores"
                   if env["device"] == "cpu" else "")
        about = (f"- **{env['device_name']}** ({env['device']}{threads}); torch {v['torch']}, triton {v['triton']}, "
                 f"python {v['python']}, tgr {v['tgr']} (git {v['git']})")
        for text in (about, f"- timing: {run['timing']}", f"- memory: {run['memory']}"):
            if text not in said:
                said.add(text)
                lines.append(text)
        load = (f", load average {env.get('load_avg_1m')} → {run.get('load_avg_1m_end')}"
                if env["device"] == "cpu" and run.get("finished") else "")
        if env["device"] == "cpu" and _loaded(env.get("load_avg_1m"), run.get("load_avg_1m_end"), env.get("cpu_cores")):
            load += (" (**a loaded machine**: other processes shared the cores, so these CPU times are slower and "
                     "noisier than a quiet machine's; compare providers within a table, not across runs)")
        stopped = "" if run.get("finished", True) else " (**stopped before the end**: only what it measured is here)"
        lines.append(f"- run {env['date']}{load}: `{run.get('command', '')}`{stopped}")
        if run.get("skipped"):
            lines.append(f"  - not measured (time limit): {len(run['skipped'])} cases, from {run['skipped'][0]}")
    for c in ceilings:
        rate = f"{c['tflops']:.3g} TFLOP/s" if c.get("tflops") else f"{c['gbps']:.0f} GB/s"
        if "matmul" in c["op"]:
            what = f"{c['op']} {c['dtype']}"
        else:
            what = f"{c['op']} ({c['shape']['bytes'] >> 20} MiB, read + write)"
        lines.append(f"- ceiling measured in this run on {c['device_name']}: {what}: **{rate}** "
                     f"(median {fmt_ms(c['median_ms'])} ms)")
    return lines


def render_markdown(records: list[dict]) -> str:
    runs = [r for r in records if r.get("kind") == "run"]
    ceilings = [r for r in records if r.get("kind") == "ceiling"]
    meas = [r for r in records if r.get("kind", "measurement") == "measurement"]
    out = ["# TGR benchmarks", ""]
    out += header_lines(runs, ceilings)
    out += ["", "Cells: median time · speed-up over eager-seed (its time / this one's) · extra peak memory "
            "of one call (outputs included)"
            + (" · achieved TFLOP/s or GB/s" if any(r.get("device") == "cuda" for r in meas) else "")
            + ". Modes: forward = inference (no_grad), backward = gradients alone, full = forward + backward.", ""]
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for rec in meas:
        groups.setdefault(_group_key(rec), []).append(rec)
    for key, recs in groups.items():
        op, shape, dtype, mode, causal, mask, device_name = key
        providers = [p for p in ALL_PROVIDERS if any(r["provider"] == p for r in recs)]
        dims = ", ".join(f"{k}={v}" for k, v in shape)
        extra = "" if op == "projection" else f", causal={causal}" + (f", mask={mask}" if mask else "")
        if any(r.get("compile") == "dynamic" for r in recs):
            extra += ", torch-compile with dynamic=True"
        if any(r.get("q_len") is not None for r in recs):
            extra += "; S = the KV cache's length"
        out.append(f"### {op}, {mode}, {dtype} ({dims}{extra}) on {device_name}")
        out.append("")
        bounds = {S: roofline.estimate(next(r for r in recs if r["seq_len"] == S))
                  for S in sorted({r["seq_len"] for r in recs})}
        with_bounds = any(b is not None for b in bounds.values())
        first = "| S | roofline (H200) | " if with_bounds else "| S | "
        out.append(first + " | ".join(providers) + " |")
        out.append("|---:|" + ("---:|" if with_bounds else "") + "---|" * len(providers))
        notes: dict[str, int] = {}
        on_gpu = recs[0].get("device") == "cuda"
        for S in sorted({r["seq_len"] for r in recs}):
            row = {r["provider"]: r for r in recs if r["seq_len"] == S}
            eager = row.get("eager-seed")
            bound = bounds[S]
            cells = [_cell(row[p], eager, notes, on_gpu, bound) if p in row else "" for p in providers]
            if with_bounds:
                cells.insert(0, f"{bound['roofline_ms']:.3g} ms ({bound['bound']} bound)" if bound else "")
            out.append(f"| {S} | " + " | ".join(cells) + " |")
        for reason, mark in notes.items():
            out.append(f"\n[{mark}] {reason}")
        # the first call holds compilation (torch.compile, FlexAttention, Triton's JIT)
        largest = max(r["seq_len"] for r in recs)
        firsts = [f"{r['provider']} {fmt_ms(r['first_ms'])} ms" for p in providers for r in recs
                  if r["provider"] == p and r["seq_len"] == largest and r.get("status") == "ok"
                  and r.get("first_ms", 0) > 2 * r["median_ms"] + 1]
        if firsts:
            out.append(f"\nFirst call at S={largest} (compilation included): " + ", ".join(firsts) + ".")
        out.append("")
    return "\n".join(out) + "\n"


def write_report(out_dir: str, plots: bool = True) -> str:
    records = load_records(os.path.join(out_dir, RECORDS))
    text = render_markdown(records)
    with open(os.path.join(out_dir, TABLE), "w", encoding="utf-8") as f:
        f.write(text)
    if plots:
        try:
            from .plots import draw_plots
        except ImportError as exc:  # matplotlib missing: tables still come out
            print(f"plots skipped: {exc}")
        else:
            for path in draw_plots(records, out_dir):
                print(f"wrote {path}")
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plots = "--no-plots" not in argv
    argv = [a for a in argv if a != "--no-plots"]
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m benchmarks.report [--no-plots] DIR   "
              "(rebuilds DIR/table.md and plots from DIR/records.jsonl)")
        return 2
    print(write_report(argv[0], plots=plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
