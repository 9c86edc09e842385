"""The op suites (projection, attention-wide, attention-flash, attention-gqa, attention-decode): every
provider on the same inputs.

Per case (one op, shape, dtype, causal): build each provider; check its output (and gradients)
against the seed's math; then per mode time all providers interleaved and measure each one's
peak memory; one record per (provider, mode).

Modes: ``forward`` is inference (under ``torch.no_grad``); ``backward`` times the gradient
computation alone, after an untimed forward; ``full`` times forward + backward, a training step
of the op (attention-decode has the forward alone). Gradients are taken with
``torch.autograd.grad`` with respect to every input that requires one, for a random upstream
gradient (never accumulated into ``.grad``).

Rotating inputs: each provider cycles through enough copies of the inputs that together they
exceed twice the last-level cache (GPU L2), at most 16, so that small shapes are not measured
out of a warm cache.
"""
from __future__ import annotations

import math
import time

import torch

from .cases import OPS, Case, Inputs, default_seq_lens, op_cases, op_modes
from .measure import Job, cache_bytes, describe_error, peak_memory_mib, summarize, time_interleaved
from .providers import ATTENTION_PROVIDERS, PROJECTION_PROVIDERS, Provider

MAX_COPIES = 16
# Relative-error floors of the output check, by dtype; a provider passes when each of its
# tensors is within max(floor, 4 × eager-seed's own error) of the seed's math in float32.
CHECK_FLOOR = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def providers_for(op: str) -> dict[str, Provider]:
    return PROJECTION_PROVIDERS if op == "projection" else ATTENTION_PROVIDERS


# ----------------------------------------------------------------------------- jobs per mode
def make_job(fn, copies: list[Inputs], mode: str) -> Job:
    if mode == "forward":
        def prepare(i):
            return copies[i]

        def run(x):
            with torch.no_grad():
                return fn(x)
    elif mode == "full":
        def prepare(i):
            return copies[i]

        def run(x):
            return torch.autograd.grad(fn(x), x.leaves, x.grad_out)
    elif mode == "backward":
        def prepare(i):
            x = copies[i]
            return fn(x), x

        def run(state):
            out, x = state
            return torch.autograd.grad(out, x.leaves, x.grad_out)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return Job(prepare=prepare, run=run, n_copies=len(copies))


# ----------------------------------------------------------------------------- correctness check
def _outputs(fn, x: Inputs, with_grads: bool) -> list[torch.Tensor]:
    if not with_grads:
        with torch.no_grad():
            return [fn(x.detached())]
    out = fn(x)
    return [out.detach(), *torch.autograd.grad(out, x.leaves, x.grad_out)]


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def check_providers(case: Case, fns: dict[str, object], x: Inputs, with_grads: bool) -> dict[str, dict]:
    """Each provider's relative error against the seed's math in float32, on the same inputs.

    Returns {provider: {"rel_err", "tol", "ok", "what"}}; a provider that cannot compute
    gradients (FlexAttention on CPU) is checked on its output alone.
    """
    eager = providers_for(case.op)["eager-seed"]
    ref_case = case.with_dtype(torch.float32)
    ref = _outputs(eager.build(ref_case), x.cast(torch.float32), with_grads)
    floor = CHECK_FLOOR.get(case.dtype, 5e-3)
    eager_errs = [_rel_err(o, r) for o, r in zip(_outputs(eager.build(case), x, with_grads), ref, strict=True)]
    results = {}
    for name, fn in fns.items():
        try:
            outs, what = _outputs(fn, x, with_grads), "output and gradients" if with_grads else "output"
        except Exception:
            try:
                outs, what = _outputs(fn, x, False), "output"
            except Exception as exc:
                results[name] = {"ok": None, "rel_err": None, "tol": None, "what": describe_error(exc)}
                continue
        worst = None
        ok = True
        # An output-only provider (``what == "output"``) is compared on the first entry alone.
        for o, r, e in zip(outs, ref, eager_errs, strict=False):
            err, tol = _rel_err(o, r), max(floor, 4 * e)
            ok &= err <= tol
            if worst is None or err / tol > worst[0] / worst[1]:
                worst = (err, tol)
        results[name] = {"ok": bool(ok), "rel_err": worst[0], "tol": worst[1], "what": what}
    return results


# ----------------------------------------------------------------------------- one case
def _n_copies(x: Inputs, device: str) -> int:
    return max(1, min(MAX_COPIES, math.ceil(2 * cache_bytes(device) / max(1, x.nbytes()))))


def run_case(case: Case, provider_names: list[str], modes: list[str], reps: int, warmup: int,
             check: bool, emit) -> None:
    """Measure one case and ``emit`` one record per (provider, mode)."""
    if not case.compile_dynamic:
        torch._dynamo.reset()  # static shapes: each case compiles afresh (its first call says how long)
    available = providers_for(case.op)
    base = {**case.record_fields(), "device": case.device,
            "compile": "dynamic" if case.compile_dynamic else "static"}
    fns, reasons = {}, {}
    for name in provider_names:
        if name not in available:
            continue  # e.g. SDPA for the projection: not applicable, not listed
        reason = available[name].available(case)
        if reason is None:
            try:
                fns[name] = available[name].build(case)
            except Exception as exc:
                reason = describe_error(exc)
        if reason is not None:
            reasons[name] = reason

    x0 = case.make_inputs(seed=0)
    copies = [x0] + [case.make_inputs(seed=i) for i in range(1, _n_copies(x0, case.device))]
    records = []
    modes = [m for m in modes if m in op_modes(case.op)]
    for mode in modes:
        # inference inputs need no gradient (FlexAttention on CPU refuses inputs that require one)
        inputs = [x.detached() for x in copies] if mode == "forward" else copies
        jobs = {name: make_job(fn, inputs, mode) for name, fn in fns.items()}
        time_interleaved(jobs, case.device, reps, warmup)
        flops, nbytes = case.flops(mode), case.bytes(mode)
        for name in provider_names:
            if name not in available:
                continue
            rec = {**base, "provider": name, "mode": mode, "n_copies": len(copies)}
            job = jobs.get(name)
            if job is None or job.error is not None:
                rec.update(status="n/a", reason=reasons.get(name) or job.error)
                records.append(rec)
                continue
            stats = summarize(job.times_ms)
            rec.update(status="ok", **stats, first_ms=job.first_ms, flops=flops, bytes=nbytes)
            if name == "tgr-triton" and case.device == "cpu":
                rec["note"] = "Triton's interpreter: checks the wiring; its time is not a kernel's speed"

            seconds = stats["median_ms"] * 1e-3
            rec["tflops"] = flops / seconds / 1e12 if flops else None
            rec["gbps"] = nbytes / seconds / 1e9 if nbytes else None
            try:
                rec.update(peak_memory_mib(lambda job=job: job.prepare(0), job.run, case.device))
            except Exception as exc:
                rec.update(peak_mib=None, memory_method=describe_error(exc))
            records.append(rec)

    # The check runs after the timing, so that each mode's first call (``first_ms``) holds the
    # compilation; a provider is timed even when it fails the check, and its records say so.
    # Each mode's records are checked on the call it timed: forward (no_grad, where the ops take other
    # paths than with autograd) on its output alone, backward and full with the gradients.
    if check and fns:
        checks = {}
        for with_grads in sorted({m != "forward" for m in modes}):
            try:
                checks[with_grads] = check_providers(case, fns, x0, with_grads=with_grads)
            except Exception as exc:  # e.g. no memory for the float32 reference: say so, keep the times
                checks[with_grads] = {name: {"ok": None, "rel_err": None, "tol": None,
                                             "what": f"check failed: {describe_error(exc)}"} for name in fns}
        for rec in records:
            chk = checks[rec["mode"] != "forward"].get(rec["provider"])
            if chk is not None and rec["status"] == "ok":
                rec.update(check_ok=chk["ok"], check_rel_err=chk["rel_err"], check_tol=chk["tol"],
                           check_what=chk["what"])
    for rec in records:
        emit(rec)
    del copies, fns
    if case.device == "cuda":
        torch.cuda.empty_cache()


def run(args, emit, deadline: float | None) -> list[str]:
    """Run the op suites named in ``args.suites``; returns the labels of cases skipped for time."""
    skipped = []
    for op in [s for s in args.suites if s in OPS]:
        if not any(m in op_modes(op) for m in args.modes):
            print(f"  {op}: none of the modes {args.modes} applies (it has {list(op_modes(op))})")
            continue
        cases = op_cases(op, args.seq_lens or default_seq_lens(op, args.quick), args.dtypes, args.device,
                         args.causal_values, args.mask, args.quick, args.batch, args.triton_interpret,
                         args.compile == "dynamic")
        for case in cases:
            if deadline is not None and time.monotonic() > deadline:
                skipped.append(case.label())
                continue
            start = time.monotonic()
            print(f"  {case.label()} ...", flush=True)
            run_case(case, args.providers, args.modes, args.reps, args.warmup, args.check, emit)
            print(f"    done in {time.monotonic() - start:.1f} s", flush=True)
    return skipped
