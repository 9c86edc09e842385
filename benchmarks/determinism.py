"""Determinism: the same forward and backward, repeated, must give bitwise-identical results.

    python -m benchmarks.determinism [--reps 1000] [--backend triton] [--time-limit SECONDS]

Each case runs forward + backward once for a reference, then ``--reps`` more times on the same
inputs and upstream gradient, and compares every output and gradient with ``torch.equal``. The
kernels use no atomics (one program owns each output tile), so every case should pass; a case
that does not is named with the first repetition that differed. With ``--time-limit`` the
seconds are shared out evenly between the cases and each line says how many repetitions fit.
Prints one line per case and a summary last; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from tgr_kernels._interpreter import rerun_with_interpreter  # noqa: E402

if __name__ == "__main__":
    rerun_with_interpreter("benchmarks.determinism", sys.argv[1:])  # without a GPU, through Triton's interpreter

from tgr_kernels import temperature_guided_attention, temperature_projection  # noqa: E402


def _cases(device: str, small: bool):
    """(name, make_inputs, fn): make_inputs() -> list of leaf tensors; fn(*leaves) -> output."""
    g = torch.Generator(device="cpu").manual_seed(0)
    bf16 = torch.bfloat16 if device == "cuda" else torch.float32

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # small: the dry run on a CPU, where every launch goes through the interpreter
    S_flash, H_flash, D_flash, S_wide, D_wide, S_proj = (
        (40, 2, 32, 24, 264, 24) if small else (1024, 8, 128, 1024, 4096, 4096))
    keep = torch.ones(2, S_flash, dtype=torch.bool, device=device)
    keep[1, S_flash * 3 // 4:] = False
    seed_mask = torch.zeros(1, 1, 1, S_wide, device=device, dtype=bf16)
    seed_mask[..., S_wide * 7 // 8:] = -1e4

    yield (f"projection {str(bf16)[6:]} h, fp32 W", lambda: [rand(4, S_proj, D_wide, dtype=bf16),
                                                 rand(8, D_wide, scale=0.02), rand(8)],
           lambda h, w, b, backend: temperature_projection(h, w, b, backend=backend))
    for dtype in dict.fromkeys((bf16, torch.float32)):  # once each: on a CPU both are fp32
        name = str(dtype).replace("torch.", "")
        yield (f"flash {name} causal+padding+GSoT", lambda dtype=dtype: [
            rand(2, H_flash, S_flash, D_flash, dtype=dtype), rand(2, H_flash, S_flash, D_flash, dtype=dtype),
            rand(2, H_flash, S_flash, D_flash, dtype=dtype), torch.rand(2, S_flash, 4, generator=g).to(device)],
            lambda q, k, v, t, backend: temperature_guided_attention(
                q, k, v, t, keep, causal=True, gsot_threshold=0.4, backend=backend))
        yield (f"wide {name} q=k=v seed mask+GSoT", lambda dtype=dtype: [
            rand(1, 1, S_wide, D_wide, dtype=dtype, scale=0.1), torch.rand(1, S_wide, 4, generator=g).to(device)],
            lambda x, t, backend: temperature_guided_attention(
                x, x, x, t, seed_mask.to(x.dtype), gsot_threshold=0.4, backend=backend))


def _run(fn, leaves, grad_out, backend):
    for leaf in leaves:
        leaf.grad = None
    out = fn(*leaves, backend=backend)
    out.backward(grad_out)
    return [out.detach().clone()] + [leaf.grad.clone() for leaf in leaves]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--small", action="store_true", help="small shapes (default on a CPU)")
    parser.add_argument("--time-limit", type=float,
                        help="seconds for all cases together, shared out evenly (default: no limit)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = args.small or device == "cpu"
    failures = uncompared = 0
    cases = list(_cases(device, small))
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    for index, (name, make_inputs, fn) in enumerate(cases):
        # this case's share of the time left: a slow case cannot starve the ones after it
        case_end = None if deadline is None else \
            time.monotonic() + max(0.0, deadline - time.monotonic()) / (len(cases) - index)
        leaves = [x.requires_grad_() for x in make_inputs()]
        with torch.no_grad():
            out = fn(*leaves, backend=args.backend)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        first = _run(fn, leaves, grad_out, args.backend)
        start, differed, done = time.time(), None, 0
        for rep in range(1, args.reps + 1):
            if case_end is not None and time.monotonic() > case_end:
                break
            again = _run(fn, leaves, grad_out, args.backend)
            done = rep
            if not all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
                differed = rep
                break
        if device == "cuda":
            torch.cuda.synchronize()
        verdict = "bitwise identical" if differed is None else f"DIFFERS at repetition {differed}"
        if done == 0:
            verdict = "not compared: no time left for a repetition"
        failures += differed is not None
        uncompared += done == 0
        cut = f" (time limit: {done} of {args.reps})" if differed is None and done < args.reps else ""
        print(f"{name:40s} {done} reps{cut}, {time.time() - start:6.1f} s: {verdict}", flush=True)
    verdict = f"{failures} case(s) differ" if failures else "all bitwise identical"
    if uncompared:
        verdict += f" ({uncompared} case(s) not compared: time limit)"
    print(f"determinism ({device}, backend {args.backend}): {verdict}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
