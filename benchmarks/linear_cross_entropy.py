"""``python -m benchmarks.linear_cross_entropy``: the fused linear cross-entropy against eager.

The language-model loss of a [tokens, H] batch of hidden states through an lm_head [V, H], forward
and backward (a training step of the loss), per provider:

- ``gemms``: eager's GEMMs alone (logits, d hidden, and dW when trainable; no softmax, no loss):
  the yardstick the fused op's time is read against (target: within 1.2×); not checked;
- ``eager``: ``F.cross_entropy(F.linear(hidden, weight), labels)`` (the full [tokens, V] logits);
- ``torch-compile``: ``torch.compile`` of that function;
- ``tgr-torch`` / ``tgr-triton``: ``tgr_kernels.linear_cross_entropy`` with that backend
  (tgr-triton on CUDA only: under the interpreter its time means nothing);
- ``tgr-torch-dw-per-chunk`` / ``tgr-triton-dw-per-chunk``: the same with
  ``weight_grad_accumulation="weight-dtype"`` (a half dW summed chunk by chunk in its dtype:
  eager's three GEMMs instead of four); trainable lm_head only (a frozen one is the same op);
- ``liger``, ``cut-cross-entropy``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and
  Apple's ``cut_cross_entropy.linear_cross_entropy``, on CUDA, when installed.

Cases (``--tokens``, ``--vocab``, ``--hidden``): by default H = 1024, V in {32000, 128256},
tokens in {1024, 4096} on a CPU (H = 4096, tokens in {2048, 8192} on a GPU), each with a trainable
lm_head (dW computed) and a frozen one (the TGR model's: only d hidden). Ten percent of the labels
are ignored (-100) by default (``--ignored``: a masked prompt or padding is more; the fused op
leaves ignored rows out of its GEMMs, eager and the GEMMs alone compute them). Every provider's
loss and gradients are checked against eager's (relative error ‖p − e‖ / ‖e‖ of each, within 1e-3
in fp32, 2e-2 in half precision).

The table's ``H200 floor`` column is the time of the op's GEMMs alone on an H200 at its dense
peak (``benchmarks/roofline.py``: 989 TFLOP/s bf16/fp16 on tensor cores, 67 TFLOP/s fp32): the
logits ``h Wᵀ`` and ``d hidden = G W`` (2·N·V·H FLOPs each), plus ``dW = Gᵀ h`` with a trainable
lm_head. A GPU row's cells also give their time over that floor (target: within 1.2×).

Timing and memory are ``benchmarks/measure.py``'s: providers interleaved per repetition after a
warm-up, median and p20/p80; memory is the extra peak of one warm call (outputs, i.e. the
gradients, included), from the profiler's tensor timeline on a CPU. Writes ``records.jsonl`` and
``table.md`` into ``--out``.

``--profile`` measures nothing: for each case and provider it runs one warm call under
``torch.profiler`` and prints where the time goes (the top kernels by device time on a GPU, ops by
CPU time on a CPU), to read a fused loss's time against its GEMMs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys

import torch
import torch.nn.functional as F

from . import measure
from .roofline import H200

MiB = 1 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = ("gemms", "eager", "torch-compile", "tgr-torch", "tgr-torch-dw-per-chunk", "tgr-triton",
             "tgr-triton-dw-per-chunk", "liger", "cut-cross-entropy")
# Providers that differ from another only in how dW is summed: not run with a frozen lm_head.
TRAINABLE_ONLY = ("tgr-torch-dw-per-chunk", "tgr-triton-dw-per-chunk")
# The yardstick, not a loss: its result is not checked against eager's.
UNCHECKED = ("gemms",)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}
IGNORED_FRACTION = 0.1  # default of --ignored
# The other fused losses' distributions: their versions go into the run's record and the table.
COMPARED_PACKAGES = ("liger-kernel", "cut-cross-entropy")


def eager_loss(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100)


class _GemmsAlone(torch.autograd.Function):
    """Eager's GEMMs alone, the yardstick of a fused loss: ``z = h Wᵀ`` in the forward (its sum
    stands for the loss), then ``dh = z W`` and, with a trainable weight, ``dW = zᵀ h`` (z stands
    for the logits' gradient). No softmax, no loss: what the measured GEMMs cost on this device."""

    @staticmethod
    def forward(ctx, hidden, weight):
        logits = hidden @ weight.t()
        ctx.save_for_backward(hidden, weight, logits)
        return logits.sum(dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, logits = ctx.saved_tensors
        grad_weight = logits.t() @ hidden if ctx.needs_input_grad[1] else None
        return logits @ weight, grad_weight


def make_providers(device: str) -> dict:
    """name -> (loss function of (hidden, weight, labels), or None, reason it cannot run)."""
    from tgr_kernels import linear_cross_entropy

    out = {
        "gemms": (lambda h, w, y: _GemmsAlone.apply(h, w), None),
        "eager": (eager_loss, None),
        "torch-compile": (torch.compile(eager_loss, dynamic=False), None),
        "tgr-torch": (lambda h, w, y: linear_cross_entropy(h, w, y, backend="torch"), None),
        "tgr-torch-dw-per-chunk": (lambda h, w, y: linear_cross_entropy(
            h, w, y, backend="torch", weight_grad_accumulation="weight-dtype"), None),
    }
    if device == "cuda":
        out["tgr-triton"] = (lambda h, w, y: linear_cross_entropy(h, w, y, backend="triton"), None)
        out["tgr-triton-dw-per-chunk"] = (lambda h, w, y: linear_cross_entropy(
            h, w, y, backend="triton", weight_grad_accumulation="weight-dtype"), None)
    else:
        out["tgr-triton"] = out["tgr-triton-dw-per-chunk"] = (
            None, "CUDA only (under the interpreter its time means nothing)")
    liger_reason = cce_reason = "CUDA only"
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
            out["liger"] = (lambda h, w, y: liger(w, h, y), None)
        except ImportError:
            liger_reason = "liger-kernel is not installed"
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            out["cut-cross-entropy"] = (lambda h, w, y: cce(h, w, y, ignore_index=-100), None)
        except ImportError:
            cce_reason = "cut-cross-entropy is not installed"
    out.setdefault("liger", (None, liger_reason))
    out.setdefault("cut-cross-entropy", (None, cce_reason))
    return out


def make_case(tokens: int, hidden_size: int, vocab: int, dtype, device: str, seed: int = 0,
              ignored: float = IGNORED_FRACTION):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size ** 0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[torch.rand(tokens, generator=generator) < ignored] = -100
    return hidden, weight, labels.to(device)


def training_step(fn, hidden, weight, labels, weight_trainable: bool):
    """Loss, forward and backward; returns (loss, d hidden, dW or None)."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_(weight_trainable)
    loss = fn(h, w, labels)
    grads = torch.autograd.grad(loss, (h, w) if weight_trainable else (h,))
    return (loss.detach(),) + tuple(grads) + ((None,) if not weight_trainable else ())


def _rel_err(a, ref) -> float:
    a, ref = a.double(), ref.double()
    if not bool(torch.isfinite(a).all()):
        return math.inf  # NaN would slip through max() and the comparison with the tolerance
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(args, providers: dict, tokens: int, vocab: int, weight_trainable: bool, emit) -> None:
    device, dtype = args.device, DTYPES[args.dtype]
    if "torch-compile" in args.providers:
        # One compiled function serves every case: past dynamo's recompile limit (8 graphs: shape and
        # lm_head) the later cases would run eager under its name. Each case compiles afresh.
        torch._dynamo.reset()
    hidden, weight, labels = make_case(tokens, args.hidden, vocab, dtype, device, ignored=args.ignored)
    shape = dict(op="linear-cross-entropy", tokens=tokens, hidden=args.hidden, vocab=vocab, dtype=args.dtype,
                 weight="trainable" if weight_trainable else "frozen", mode="full", device=device,
                 ignored=args.ignored)
    jobs, checks = {}, {}
    for name in args.providers:
        fn, reason = providers[name]
        if name in TRAINABLE_ONLY and not weight_trainable:
            continue  # the same op as without the suffix when there is no dW
        if fn is None:
            emit(dict(shape, kind="measurement", provider=name, status="n/a", reason=reason))
            continue
        jobs[name] = measure.Job(prepare=lambda i: None,
                                 run=lambda _, fn=fn: training_step(fn, hidden, weight, labels, weight_trainable))
    # Timed before the check, so that each provider's first call (first_ms) holds its compilation.
    measure.time_interleaved(jobs, device, reps=args.reps, warmup=args.warmup)
    reference = training_step(eager_loss, hidden, weight, labels, weight_trainable)
    for name, job in jobs.items():
        if job.error is not None:
            continue
        if name in UNCHECKED:
            checks[name] = dict(check_rel_err=None, check_tol=None, check_ok=None)
            continue
        try:
            got = job.run(None)
            errors = [_rel_err(a, r) for a, r in zip(got, reference, strict=True) if r is not None]
            worst = math.inf if any(math.isnan(e) for e in errors) else max(errors)
            checks[name] = dict(check_rel_err=worst, check_tol=TOLERANCE[dtype], check_ok=worst <= TOLERANCE[dtype])
            del got
        except Exception as exc:  # a provider that cannot run this case: reported, not fatal
            job.error = measure.describe_error(exc)
    del reference
    for name, job in jobs.items():
        if job.error is not None:
            emit(dict(shape, kind="measurement", provider=name, status="n/a", reason=job.error))
            continue
        memory = measure.peak_memory_mib(lambda: None, lambda _, job=job: job.run(None), device)
        emit(dict(shape, kind="measurement", provider=name, status="ok", first_ms=job.first_ms,
                  **measure.summarize(job.times_ms), **memory, **checks[name]))


def profile_case(args, providers: dict, tokens: int, vocab: int, weight_trainable: bool, rows: int = 12) -> None:
    """Print, per provider, one warm call's profile: its top ops by self device time (CPU time
    without a GPU), and the totals."""
    from torch.profiler import ProfilerActivity, profile

    device, dtype = args.device, DTYPES[args.dtype]
    hidden, weight, labels = make_case(tokens, args.hidden, vocab, dtype, device, ignored=args.ignored)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort_key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for name in args.providers:
        fn, reason = providers[name]
        if fn is None or (name in TRAINABLE_ONLY and not weight_trainable):
            continue
        title = f"profile {tokens} x {vocab} {'trainable' if weight_trainable else 'frozen'} {name}"
        try:
            training_step(fn, hidden, weight, labels, weight_trainable)  # warm: compiles, autotunes, caches
            sync()
            with profile(activities=activities) as prof:
                training_step(fn, hidden, weight, labels, weight_trainable)
                sync()
        except Exception as exc:  # reported, not fatal, as in the timed runs
            print(f"### {title}: n/a ({measure.describe_error(exc)})", flush=True)
            continue
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events) if device == "cuda" else None
        totals = f"device {device_us / 1e3:.2f} ms" if device_us is not None else "CPU only"
        print(f"### {title}: {totals}", flush=True)
        print(events.table(sort_by=sort_key, row_limit=rows, max_name_column_width=60), flush=True)


def gemm_floor_ms(tokens: int, hidden: int, vocab: int, trainable: bool, dtype: str) -> float:
    """The op's GEMMs alone at an H200's dense peak, in ms: logits and d hidden, and dW when the
    lm_head is trainable (2·N·V·H FLOPs each)."""
    flops = (3 if trainable else 2) * 2.0 * tokens * vocab * hidden
    rate = H200.tensor_half_flops if dtype in ("bfloat16", "float16") else H200.fp32_flops
    return flops / rate * 1e3


def _fmt_ms(ms: float) -> str:
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def render_table(records: list) -> str:
    runs = [r for r in records if r.get("kind") == "run"]
    lines = ["# Fused linear cross-entropy: forward + backward", ""]
    for run in runs:
        others = "".join(f", {name} {run['versions'][name]}" for name in COMPARED_PACKAGES
                         if run["versions"].get(name))
        lines.append(f"- **{run['device_name']}** ({run['device']}, {run['torch_threads']} torch threads, "
                     f"{run['cpu_cores']} cores); torch {run['versions']['torch']}, tgr {run['versions']['tgr']} "
                     f"(git {run['versions']['git']}){others}; {run['date']}, load average {run['load_avg_1m']} → "
                     f"{run.get('load_avg_end', '?')}: `{run['command']}`")
    lines += ["", "Cells: median time (p20–p80) · time / eager's · extra peak memory of one call (gradients "
              "included) · peak / eager's (· time / H200 floor, on a GPU) · time / the measured GEMMs'. Targets: "
              "memory ≤ 0.25× eager's, time ≤ 1.1× eager's (CPU); on the GPU ≤ Liger's time and within 1.2× of "
              "the GEMMs alone. `gemms`: eager's GEMMs alone, measured (logits, d hidden, and dW when trainable; "
              "no softmax, not a loss, not checked). `H200 floor`: those GEMMs at 989 TFLOP/s bf16 (67 fp32). "
              "`check`: max relative error of loss, d hidden (and dW) against eager's.", ""]
    measurements = [r for r in records if r.get("kind") == "measurement"]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in measurements)]
    # The H200 floor column where a GPU ran: a CPU's times are not read against it.
    on_gpu = any(r["device"] == "cuda" for r in measurements)
    floor_head, floor_rule = (" H200 floor |", "---:|") if on_gpu else ("", "")
    fractions = sorted({_ignored(r) for r in measurements})
    # An "ignored" column where the run has several fractions of ignored labels.
    ignored_head, ignored_rule = (" ignored |", "---:|") if len(fractions) > 1 else ("", "")
    lines.append(f"| tokens | V | lm_head |{ignored_head}{floor_head} " + " | ".join(providers) + " |")
    lines.append(f"|---:|---:|---|{ignored_rule}{floor_rule}" + "---|" * len(providers))
    notes: dict = {}

    def case(r):
        return r["dtype"], r["hidden"], r["tokens"], r["vocab"], r["weight"], _ignored(r)

    keys = sorted({case(r) for r in measurements}, key=lambda k: (k[0], k[1], k[4] != "trainable", k[3], k[2], k[5]))
    for key in keys:
        row = {r["provider"]: r for r in measurements if case(r) == key}
        eager = row.get("eager") if row.get("eager", {}).get("status") == "ok" else None
        gemms = row.get("gemms") if row.get("gemms", {}).get("status") == "ok" else None
        dtype, hidden, tokens, vocab, weight, ignored = key
        floor = gemm_floor_ms(tokens, hidden, vocab, weight == "trainable", dtype)
        cells = []
        for p in providers:
            r = row.get(p)
            if r is None:
                cells.append("")
            elif r["status"] != "ok":
                index = notes.setdefault(r["reason"], len(notes) + 1)
                cells.append(f"n/a [{index}]")
            else:
                text = f"{_fmt_ms(r['median_ms'])} ({_fmt_ms(r['p20_ms'])}–{_fmt_ms(r['p80_ms'])})"
                if eager:
                    text += f" · {r['median_ms'] / eager['median_ms']:.2f}×"
                text += f" · {r['peak_mib']:.0f} MiB"
                if eager and eager["peak_mib"]:
                    text += f" · {r['peak_mib'] / eager['peak_mib']:.2f}×"
                if r["device"] == "cuda":
                    text += f" · {r['median_ms'] / floor:.2f}× floor"
                if gemms and p != "gemms":
                    text += f" · {r['median_ms'] / gemms['median_ms']:.2f}× GEMMs"
                if r["check_rel_err"] is not None:
                    text += f" · check {r['check_rel_err']:.0e}" + ("" if r["check_ok"] else " **MISMATCH**")
                cells.append(text)
        floor_cell = f" {floor:.2f} ms |" if on_gpu else ""
        ignored_cell = f" {ignored:.0%} |" if ignored_head else ""
        lines.append(f"| {tokens} | {vocab} | {weight} |{ignored_cell}{floor_cell} " + " | ".join(cells) + " |")
    lines.append("")
    hidden_sizes = ", ".join(str(h) for h in sorted({k[1] for k in keys}))
    lines.append(f"dtype {', '.join(sorted({k[0] for k in keys}))}, H = {hidden_sizes}; "
                 f"{' / '.join(f'{f:.0%}' for f in fractions)} of the labels ignored.")
    for reason, index in notes.items():
        lines.append(f"[{index}] {reason}")
    lines += _beyond_gradients_table(measurements, keys, case, providers, show_ignored=bool(ignored_head))
    firsts = [f"{r['provider']} {r['tokens']}×{r['vocab']} {r['weight']}: {_fmt_ms(r['first_ms'])}"
              for r in measurements if r.get("status") == "ok" and r["provider"] == "torch-compile"]
    if firsts:
        lines += ["", "First call (compilation included): " + "; ".join(firsts) + "."]
    return "\n".join(lines) + "\n"


def returned_gradient_mib(tokens: int, hidden: int, vocab: int, trainable: bool, dtype: str) -> float:
    """What every provider must hand back, in MiB: d hidden [N, H], and dW [V, H] when the lm_head
    is trainable, in the inputs' dtype."""
    elements = tokens * hidden + (vocab * hidden if trainable else 0)
    return elements * torch.finfo(DTYPES[dtype]).bits / 8 / 2**20


def _beyond_gradients_table(measurements, keys, case, providers, show_ignored: bool) -> list[str]:
    """The extra peak less the returned gradients (the op's own working memory), per case and
    provider, and its ratio to eager's: a trainable lm_head's dW is a third of eager's peak at
    1024 tokens, which no implementation that returns dW can go under."""
    shown = [p for p in providers if p != "gemms"]
    lines = ["", "Extra peak less the returned gradients (d hidden, and dW when trainable) · over eager's:", "",
             "| tokens | V | lm_head |" + (" ignored |" if show_ignored else "") + " gradients | "
             + " | ".join(shown) + " |",
             "|---:|---:|---|" + ("---:|" if show_ignored else "") + "---:|" + "---|" * len(shown)]
    for key in keys:
        dtype, hidden, tokens, vocab, weight, ignored = key
        row = {r["provider"]: r for r in measurements if case(r) == key and r["status"] == "ok"}
        grads = returned_gradient_mib(tokens, hidden, vocab, weight == "trainable", dtype)
        eager = row["eager"]["peak_mib"] - grads if "eager" in row else None
        cells = []
        for p in shown:
            if p not in row:
                cells.append("")
                continue
            own = row[p]["peak_mib"] - grads
            cells.append(f"{own:.0f} MiB" + (f" · {own / eager:.2f}×" if eager else ""))
        ignored_cell = f" {ignored:.0%} |" if show_ignored else ""
        lines.append(f"| {tokens} | {vocab} | {weight} |{ignored_cell} {grads:.0f} MiB | " + " | ".join(cells) + " |")
    return lines


def _ignored(record) -> float:
    """The fraction of ignored labels of a record (runs before --ignored existed: the default)."""
    return record.get("ignored", IGNORED_FRACTION)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.linear_cross_entropy", description=__doc__.split("\n\n")[0],
                                epilog="python -m benchmarks.linear_cross_entropy --table DIR: rebuild DIR/table.md "
                                       "from DIR/records.jsonl (no measurement)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on a GPU, float32 on a CPU")
    p.add_argument("--hidden", type=int, default=None, help="H (default 1024 on a CPU, 4096 on a GPU)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="default 1024 4096 (CPU), 2048 8192 (GPU)")
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="default 32000 128256")
    p.add_argument("--weight", nargs="+", default=["trainable", "frozen"], choices=["trainable", "frozen"])
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--ignored", type=float, default=IGNORED_FRACTION,
                   help="fraction of the labels set to -100 (default %(default)s)")
    p.add_argument("--reps", type=int, default=None, help="default 3 (2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="default 1")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (H = 64, 96 tokens, V = 1000, 2 repetitions) where not given: a smoke pass")
    p.add_argument("--out", default=None, help="folder for records.jsonl and table.md")
    p.add_argument("--append", action="store_true", help="add to the records already in --out")
    p.add_argument("--profile", action="store_true", help="print one profiled call per case and provider instead")
    args = p.parse_args(argv)
    if not 0.0 <= args.ignored < 1.0:
        p.error(f"--ignored must be in [0, 1), got {args.ignored}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    # --quick shrinks what is not given; an explicit flag wins over it
    quick = args.quick
    args.hidden = args.hidden or (64 if quick else 4096 if on_gpu else 1024)
    args.tokens = args.tokens or ([96] if quick else [2048, 8192] if on_gpu else [1024, 4096])
    args.vocab = args.vocab or ([1000] if quick else [32000, 128256])
    args.reps = args.reps if args.reps is not None else (2 if quick else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--table"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m benchmarks.linear_cross_entropy --table DIR")
        print(rebuild_table(argv[1]))
        return 0
    args = parse_args(argv)
    if args.profile:
        providers = make_providers(args.device)
        for weight in args.weight:
            for vocab in args.vocab:
                for tokens in args.tokens:
                    profile_case(args, providers, tokens, vocab, weight == "trainable")
        return 0
    measure.fix_malloc_for_timing()
    records = []
    path = os.path.join(args.out, "records.jsonl") if args.out else None
    if path and args.append and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    run = dict(kind="run", command="python -m benchmarks.linear_cross_entropy " + shlex.join(argv),
               **measure.environment(args.device))
    run["versions"].update({name: measure._version(name) for name in COMPARED_PACKAGES})  # what they measured
    records.append(run)
    if path:
        # Each record is written as soon as it is taken: a long run that is stopped keeps its rows.
        os.makedirs(args.out, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")

    def emit(rec):
        rec = dict(rec, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        records.append(rec)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        cell = rec.get("reason", "")
        if rec["status"] == "ok":
            check = rec["check_rel_err"]
            cell = (f"{rec['median_ms']:.1f} ms, {rec['peak_mib']:.0f} MiB, "
                    + ("not checked" if check is None else f"check {check:.1e}"))
        print(f"{rec['tokens']:>6} x {rec['vocab']:<7} {rec['weight']:<9} {rec['provider']:<18} {cell}", flush=True)

    providers = make_providers(args.device)
    for weight in args.weight:
        for vocab in args.vocab:
            for tokens in args.tokens:
                run_case(args, providers, tokens, vocab, weight == "trainable", emit)
    run["load_avg_end"] = round(os.getloadavg()[0], 2)
    table = render_table(records)
    print(table)
    if args.out:
        with open(path, "w", encoding="utf-8") as f:  # again, with the run's closing load average
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as f:
            f.write(table)
    return 0


def rebuild_table(out: str) -> str:
    """``python -m benchmarks.linear_cross_entropy --table DIR``: table.md from DIR's records."""
    with open(os.path.join(out, "records.jsonl"), encoding="utf-8") as f:
        table = render_table([json.loads(line) for line in f if line.strip()])
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    return table


if __name__ == "__main__":
    sys.exit(main())
