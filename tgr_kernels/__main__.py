"""``python -m tgr_kernels``: a parity-and-speed report of the kernels on this device.

Parity: every backend against the float64 reference (forward and all gradients) on small odd
shapes of both attention paths and of the temperature projection. Speed: median wall time of
the backends on the seed's shapes (one head of width 4096; 32 heads of width 128).

Without a GPU, the Triton kernels run under Triton's interpreter for the parity part (the
report re-executes itself with ``TRITON_INTERPRET=1``, which must be set before triton is
imported); their speed there means nothing, so only the PyTorch paths are timed.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from tgr_kernels._interpreter import rerun_with_interpreter

if __name__ == "__main__":
    rerun_with_interpreter("tgr_kernels", sys.argv[1:])

from tgr_kernels import temperature_guided_attention, temperature_projection  # noqa: E402
from tgr_kernels._backend import usable_cpu_cores  # noqa: E402
from tgr_kernels.reference import temperature_guided_attention_ref, temperature_projection_ref  # noqa: E402


def _max_errors(fn, ref, inputs, grad_seed=0):
    """Max-abs error of fn's output and input gradients against ref on float64 copies."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    out64 = ref(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, grad_out.double())
    errs = [(out.double() - out64).abs().max().item()]
    errs += [(g.double() - g64).abs().max().item() for g, g64 in zip(grads, grads64, strict=True)]
    return errs


def parity_report(device: str, backends) -> bool:
    print(f"\nParity against the float64 reference (max |error|; forward, then each gradient), {device}")
    gen = torch.Generator().manual_seed(0)
    ok = True
    cases = [  # (B, H, S, D, causal, gsot)
        (2, 2, 113, 64, True, 0.5),
        (1, 1, 37, 300, False, 0.4),
    ]
    for B, H, S, D, causal, thr in cases:
        q, k, v = (torch.randn(B, H, S, D, generator=gen).to(device) for _ in range(3))
        t = (torch.rand(B, S, 4, generator=gen) * 0.98 + 0.01).to(device)
        keep = torch.ones(B, S, dtype=torch.bool, device=device)
        keep[-1, S * 2 // 3:] = False
        for backend in backends:
            def fn(q, k, v, t, backend=backend):
                return temperature_guided_attention(q, k, v, t, keep, causal=causal, gsot_threshold=thr,
                                                    backend=backend)

            def ref(q, k, v, t):
                return temperature_guided_attention_ref(q, k, v, t, keep, causal=causal, gsot_threshold=thr)

            errs = _max_errors(fn, ref, [q, k, v, t])
            good = max(errs) < 1e-4
            ok &= good
            print(f"  attention   B={B} H={H} S={S:4d} D={D:4d} causal={causal!s:5} {backend:7s} "
                  f"out {errs[0]:.1e}  dq {errs[1]:.1e}  dk {errs[2]:.1e}  dv {errs[3]:.1e}  "
                  f"dt {errs[4]:.1e}  {'ok' if good else 'FAIL'}")
    h = torch.randn(3, 41, 300, generator=gen).to(device)
    w = (torch.randn(8, 300, generator=gen) * 0.05).to(device)
    b = torch.randn(8, generator=gen).to(device)
    for backend in backends:
        errs = _max_errors(lambda h, w, b, backend=backend: temperature_projection(h, w, b, backend=backend),
                           temperature_projection_ref, [h, w, b])
        good = max(errs) < 1e-4
        ok &= good
        print(f"  projection  N=3x41 H=300 T=8 {backend:7s} out {errs[0]:.1e}  dh {errs[1]:.1e}  "
              f"dW {errs[2]:.1e}  db {errs[3]:.1e}  {'ok' if good else 'FAIL'}")
    return ok


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def speed_report(device: str, backends, seq_len: int, reps: int) -> None:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"\nSpeed: median of {reps} after a warm-up, {device}, {str(dtype)[6:]}, B=1, S={seq_len}, "
          f"q = k = v, key-padding mask, GSoT on")
    for H, D in ((1, 4096), (32, 128)):
        x = torch.randn(1, H, seq_len, D, device=device, dtype=dtype) * 0.1
        t = torch.rand(1, seq_len, 4, device=device)
        keep = torch.ones(1, seq_len, dtype=torch.bool, device=device)
        row = []
        for backend in backends:
            xg, tg = x.clone().requires_grad_(), t.clone().requires_grad_()

            def forward(backend=backend):
                with torch.no_grad():
                    temperature_guided_attention(x, x, x, t, keep, gsot_threshold=0.4, backend=backend)

            def train_step(backend=backend):
                out = temperature_guided_attention(xg, xg, xg, tg, keep, gsot_threshold=0.4, backend=backend)
                out.backward(torch.ones_like(out))

            row.append((backend, _median_ms(forward, reps), _median_ms(train_step, reps)))
        cells = "   ".join(f"{b:9s} fwd {f:8.1f} ms  fwd+bwd {fb:8.1f} ms" for b, f, fb in row)
        print(f"  H={H:2d} D={D:4d}   {cells}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tgr_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=512, help="sequence length of the speed part (default: 512)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (default: 5)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"tgr_kernels report on {name} ({usable_cpu_cores()} CPU cores), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    torch.backends.cuda.matmul.allow_tf32 = False
    ok = parity_report(device, ["triton", "torch"])
    timed = ["triton", "torch", "reference"] if device == "cuda" else ["torch", "reference"]
    speed_report(device, timed, args.seq_len, args.reps)
    print("\nparity: all ok" if ok else "\nparity: FAILURES above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
