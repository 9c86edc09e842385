"""One small forward + backward of every Triton kernel: the program compute-sanitizer watches.

    compute-sanitizer --tool memcheck  python3 -m benchmarks.sanitize_kernels
    compute-sanitizer --tool racecheck python3 -m benchmarks.sanitize_kernels

Shapes are odd (not multiples of any block) so the masked edges of every tile are exercised:
the flash kernels (forward, dK/dV, dQ with dt̄) with padding + causal + GSoT and with an
additive mask, the wide path's row kernels, the temperature projection's three kernels, the
split-KV decode kernels (one query row without a gradient, grouped-query, padding) and the fused
linear cross-entropy's kernels (rows; dW by vocabulary blocks for half inputs).
Without CUDA the same calls run tiny under Triton's interpreter (a dry run of the script).
"""
from __future__ import annotations

import sys

import torch

from tgr_kernels._interpreter import rerun_with_interpreter  # noqa: E402

if __name__ == "__main__":
    # Without a GPU: a dry run of the same calls on the CPU, through Triton's interpreter.
    rerun_with_interpreter("benchmarks.sanitize_kernels", sys.argv[1:])

from tgr_kernels import linear_cross_entropy, temperature_guided_attention, temperature_projection  # noqa: E402


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    # odd sizes on both paths; tiny ones under the interpreter, where every launch is slow
    shapes = ((64, 77, 77), (128, 45, 101), (320, 37, 37)) if device == "cuda" else \
        ((16, 13, 13), (32, 9, 21), (264, 11, 11))
    hidden_shape = (3, 53, 200) if device == "cuda" else (3, 7, 40)
    for D, S_q, S_k in shapes:
        q, k, v = (torch.randn(2, 2, s, D, device=device, dtype=dtype, requires_grad=True)
                   for s in (S_q, S_k, S_k))
        t = torch.rand(2, S_q, 4, device=device, requires_grad=True)
        keep = torch.ones(2, S_k, dtype=torch.bool, device=device)
        keep[1, S_k // 2:] = False
        additive = torch.randn(2, 1, S_q, S_k, device=device)
        for mask, causal in ((keep, True), (additive, False)):
            out = temperature_guided_attention(q, k, v, t, mask, causal=causal, gsot_threshold=0.4,
                                               backend="triton")
            out.backward(torch.randn_like(out))
        print(f"attention D={D} S_q={S_q} S_k={S_k}: ok", flush=True)
    h = torch.randn(*hidden_shape, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(8, hidden_shape[-1], device=device) * 0.05).requires_grad_()
    b = torch.zeros(8, device=device, requires_grad=True)
    temperature_projection(h, w, b, backend="triton").sum().backward()
    print("projection: ok", flush=True)
    # the split-KV decode kernels: a few query rows with no gradient (4 query heads on 2 k/v heads)
    D, S_k = (64, 77) if device == "cuda" else (16, 13)
    with torch.no_grad():
        q = torch.randn(2, 4, 1, D, device=device, dtype=dtype)
        k, v = (torch.randn(2, 2, S_k, D, device=device, dtype=dtype) for _ in range(2))
        keep = torch.ones(2, S_k, dtype=torch.bool, device=device)
        keep[1, S_k // 2:] = False
        t = torch.rand(2, 1, 4, device=device) * 0.5 + 0.5
        temperature_guided_attention(q, k, v, t, keep, gsot_threshold=0.4, backend="triton")
    print(f"decode D={D} S_k={S_k}: ok", flush=True)
    # the fused linear cross-entropy: odd tokens, hidden and vocabulary, some labels ignored
    N, H, V = (53, 200, 1001) if device == "cuda" else (7, 40, 103)
    x = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, device=device) * H ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)
    labels[::5] = -100
    linear_cross_entropy(x, weight, labels, backend="triton").backward()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"linear cross-entropy N={N} H={H} V={V}: ok\nsanitize_kernels: all kernels ran", flush=True)


if __name__ == "__main__":
    main()
