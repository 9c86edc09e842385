"""GPU parity of every kernel family in bf16 and fp16, in one short run that compiles few kernels.

    python -m benchmarks.gpu_parity [--out FILE] [--time-limit SECONDS]

Each case runs one Triton kernel family (flash forward + both backward kernels, the wide path's
row kernels around its GEMMs, the projection's three kernels) on a shape that is not a multiple
of any block, then checks the output and every gradient against the float64 reference with the
library's criterion (tests/parity.py: error <= 2 x eager PyTorch's own error in the same dtype
+ a floor). Kernel outputs are poisoned (NaN-filled) before launch, so an unwritten element
fails. The cases are ordered by value: the model's own shapes first. Each case is a new set of
kernel specialisations (mask kind, causal, GSoT, dtype, head dim): about 28 cold compiles in all,
the cost of the first call, which each line reports.

One line per case is printed and appended to ``--out`` as soon as it is known, so a run that is
stopped part way keeps what it checked. Cases not started before ``--time-limit`` are listed as
not run. Exits 1 if any case fails.

Without CUDA it is a dry run: the same cases shrunk to tiny fp32 shapes under Triton's
interpreter (bf16 is not computed correctly there), which exercises the script, not the GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

from tgr_kernels._interpreter import rerun_with_interpreter  # noqa: E402

if __name__ == "__main__":
    rerun_with_interpreter("benchmarks.gpu_parity", sys.argv[1:])  # without a GPU, through Triton's interpreter

from tgr_kernels import _backend, temperature_guided_attention, temperature_projection  # noqa: E402
from tgr_kernels.reference import temperature_guided_attention_ref, temperature_projection_ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _load_parity():
    """tests/parity.py, the criterion every kernel test uses (one definition, not a copy)."""
    spec = importlib.util.spec_from_file_location("tgr_tests_parity", os.path.join(ROOT, "tests", "parity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class ParityCase:
    family: str  # "flash", "wide" or "projection"
    dtype: torch.dtype
    B: int
    H: int  # heads (attention) or hidden size (projection)
    S_q: int
    S_k: int = 0  # attention only; projection: unused
    D: int = 0  # head dim (attention) or temperature heads (projection)
    mask: str | None = None  # None, "kpm", "kpm_dead", "additive" (the seed's -1e4), "additive_inf"
    causal: bool = False
    gsot: float | None = None
    same_qkv: bool = False
    weight_dtype: torch.dtype | None = None  # projection: W's dtype (the model keeps it fp32)

    def label(self) -> str:
        d = str(self.dtype)[6:]
        if self.family == "projection":
            w = str(self.weight_dtype or self.dtype)[6:]
            return f"projection {d} h, {w} W, N={self.B}x{self.S_q} hidden={self.H} T={self.D}"
        parts = [f"{self.family} {d} B={self.B} H={self.H} S_q={self.S_q} S_k={self.S_k} D={self.D}",
                 f"mask={self.mask}", "causal" if self.causal else "full"]
        if self.gsot is not None:
            parts.append(f"gsot={self.gsot}")
        if self.same_qkv:
            parts.append("q=k=v")
        return " ".join(parts)


# Most valuable first: the model's multi-head shape, the seed's wide head, the model's TTM mix.
GPU_CASES: list[ParityCase] = [
    ParityCase("flash", BF16, 2, 8, 1023, 1023, 128, "kpm", causal=True, gsot=0.5),
    ParityCase("wide", BF16, 1, 1, 1023, 1023, 4096, "additive", gsot=0.4, same_qkv=True),
    ParityCase("projection", BF16, 2, 4096, 1000, D=8, weight_dtype=F32),
    ParityCase("flash", F16, 1, 4, 203, 517, 64, "additive"),
    ParityCase("flash", BF16, 2, 2, 257, 257, 256, "kpm_dead", causal=True, gsot=0.4, same_qkv=True),
    ParityCase("wide", F16, 2, 1, 600, 700, 1024, "kpm_dead", causal=True),  # B = 2: one row lives
    ParityCase("projection", F16, 2, 4096, 1000, D=8),
    ParityCase("flash", F16, 1, 8, 513, 513, 96, None, causal=True),
    ParityCase("flash", BF16, 1, 2, 300, 300, 64, "additive_inf"),
    ParityCase("wide", BF16, 2, 1, 257, 257, 320, "additive_inf", causal=True, gsot=0.5),
    ParityCase("projection", BF16, 2, 4096, 1000, D=8),
]


def dry_run_case(case: ParityCase) -> ParityCase:
    """The same case, tiny and fp32: flash heads stay <= 256 and wide ones > 256 (the same path)."""
    if case.family == "projection":
        return replace(case, dtype=F32, weight_dtype=None, B=2, S_q=13, H=72)
    D = 16 if case.family == "flash" else 264
    S_q, S_k = (min(case.S_q, 19), min(case.S_k, 23 if case.S_k != case.S_q else 19))
    return replace(case, dtype=F32, B=min(case.B, 2), H=min(case.H, 2), S_q=S_q, S_k=S_k, D=D)


def _mask(case: ParityCase, device):
    B, S_q, S_k = case.B, case.S_q, case.S_k
    g = torch.Generator().manual_seed(1)
    if case.mask is None:
        return None
    if case.mask in ("kpm", "kpm_dead"):
        keep = torch.ones(B, S_k, dtype=torch.bool)
        keep[-1, max(1, S_k - S_k // 3):] = False  # right padding on the last row
        if case.mask == "kpm_dead":
            keep[0] = False  # a sequence with no visible key at all
        return keep.to(device)
    if case.mask == "additive":  # the seed's (1 - attention_mask) * -1e4, [B, 1, 1, S_k]
        keep = torch.ones(B, S_k)
        keep[-1, max(1, S_k - S_k // 3):] = 0
        return ((1.0 - keep) * -1e4)[:, None, None, :].to(device)
    if case.mask == "additive_inf":  # a bias with −inf entries and one fully masked row
        bias = torch.randn(B, 1, S_q, S_k, generator=g)
        bias[torch.rand(B, 1, S_q, S_k, generator=g) < 0.3] = -math.inf
        bias[0, 0, S_q // 2] = -math.inf
        return bias.to(device)
    raise ValueError(f"unknown mask kind {case.mask!r}")


def _attention_run(case: ParityCase, device):
    """(leaves in the case's dtype, fn(leaves, backend, upcast) -> output)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(case.B, case.H, case.S_q, case.D)] if case.same_qkv else \
        [(case.B, case.H, case.S_q, case.D), (case.B, case.H, case.S_k, case.D), (case.B, case.H, case.S_k, case.D)]
    tensors = [torch.randn(*s, generator=g) for s in shapes]
    if case.family == "wide" and case.same_qkv:
        tensors = [t * 0.25 for t in tensors]  # a softmax neither one-hot nor flat (cases.py says why)
    temperature = torch.rand(case.B, case.S_q, 3, generator=g) * 0.98 + 0.01
    mask = _mask(case, device)

    def fn(leaves, backend, upcast=False):
        *xs, t = leaves
        q, k, v = (xs[0],) * 3 if case.same_qkv else xs
        kwargs = dict(causal=case.causal, gsot_threshold=case.gsot)
        if backend == "reference":
            return temperature_guided_attention_ref(q, k, v, t, mask, upcast=upcast, **kwargs)
        return temperature_guided_attention(q, k, v, t, mask, backend=backend, **kwargs)

    return tensors + [temperature], fn


def _projection_run(case: ParityCase, device):
    g = torch.Generator().manual_seed(0)
    hidden, T = case.H, case.D
    tensors = [torch.randn(case.B, case.S_q, hidden, generator=g), torch.randn(T, hidden, generator=g) * hidden ** -0.5,
               torch.randn(T, generator=g) * 0.1]

    def fn(leaves, backend, upcast=False):
        h, w, b = leaves
        if backend == "reference":
            return temperature_projection_ref(h, w, b, upcast=upcast)
        return temperature_projection(h, w, b, backend=backend)

    return tensors, fn


def _leaves(tensors, case: ParityCase, dtype, device):
    """Fresh leaves in ``dtype``: q/k/v or hidden in it; temperature fp32 (fp64 for the truth);
    the projection's W and b in the case's weight dtype (fp64 for the truth)."""
    out = []
    for i, t in enumerate(tensors):
        if dtype == torch.float64:
            d = torch.float64
        elif case.family == "projection":
            d = dtype if i == 0 else (case.weight_dtype or dtype)
        else:
            d = dtype if i < len(tensors) - 1 else F32
        out.append(t.to(device=device, dtype=d).requires_grad_())
    return out


def check_case(case: ParityCase, device: str, parity) -> str:
    """One line: PASS/FAIL, the case, each tensor's error against its bound, first-call time."""
    tensors, fn = (_projection_run if case.family == "projection" else _attention_run)(case, device)
    leaves = _leaves(tensors, case, case.dtype, device)
    start = time.perf_counter()
    out = fn(leaves, "triton")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=out.dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    if device == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start

    l64 = _leaves(tensors, case, torch.float64, device)
    truth = fn(l64, "reference", upcast=True)
    truth_grads = torch.autograd.grad(truth, l64, grad_out.double())
    le = _leaves(tensors, case, case.dtype, device)
    eager = fn(le, "reference", upcast=False)
    eager_grads = torch.autograd.grad(eager, le, grad_out)

    if case.family == "projection":
        names = ["dhidden", "dweight", "dbias"]
    else:
        names = (["dx"] if case.same_qkv else ["dq", "dk", "dv"]) + ["dtemperature"]
    failures, parts = [], []
    for name, got, ref_eager, ref_true in zip(["out"] + names, [out, *grads], [eager, *eager_grads],
                                              [truth, *truth_grads], strict=True):
        # The verdict is tests/parity.py's, with the case's dtype's floor as the kernel tests use
        # it (for the projection's fp32 W too: its tests take the looser floor of h and W).
        floor = parity.FLOOR[case.dtype]
        err, bound = parity.max_err(got, ref_true), 2 * parity.max_err(ref_eager, ref_true) + floor
        parts.append(f"{name} {err:.1e}/{bound:.1e}")
        try:
            parity.assert_parity(name, got, ref_eager, ref_true, case.dtype)
        except AssertionError as exc:
            failures.append(str(exc))
    verdict = "PASS" if not failures else "FAIL"
    line = f"{verdict} {case.label()}: first call {first_s:.1f} s; error/bound " + ", ".join(parts)
    if failures:
        line += "\n    " + "\n    ".join(failures)
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="append one line per case to this file as it is checked")
    parser.add_argument("--time-limit", type=float, help="seconds; cases not started by then are not run")
    args = parser.parse_args(argv)
    start = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # dry run: shrunk cases, each once (several GPU cases differ only in dtype or size)
    cases = GPU_CASES if device == "cuda" else list(dict.fromkeys(dry_run_case(c) for c in GPU_CASES))
    torch.backends.cuda.matmul.allow_tf32 = False  # the criterion assumes full-precision fp32 GEMMs
    _backend.POISON_OUTPUTS = True
    parity = _load_parity()
    sink = open(args.out, "a", encoding="utf-8") if args.out else None

    def say(line: str) -> None:
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    name = torch.cuda.get_device_name() if device == "cuda" else "no CUDA: DRY RUN, tiny fp32 cases, interpreter"
    say(f"gpu_parity on {name}, torch {torch.__version__}")
    failed = not_run = 0
    for case in cases:
        if args.time_limit is not None and time.monotonic() - start > args.time_limit:
            say(f"NOT RUN (time limit) {case.label()}")
            not_run += 1
            continue
        try:
            line = check_case(case, device, parity)
        except Exception as exc:  # a compile error or a crash: say which case, go on
            line = f"FAIL {case.label()}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        failed += line.startswith("FAIL")
        say(line)
    passed = len(cases) - failed - not_run
    say(f"gpu_parity: {passed} passed, {failed} failed, {not_run} not run, {time.monotonic() - start:.0f} s")
    if sink:
        sink.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
