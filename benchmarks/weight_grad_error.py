"""How far dW of a half-precision lm_head is from the float64 truth, per way of summing it.

    python -m benchmarks.weight_grad_error [--tokens 4096] [--vocab 32000] [--hidden 1024]
                                           [--dtype bfloat16] [--chunks 4 16 64]

The loss is ``F.cross_entropy(F.linear(hidden, weight), labels)`` (mean, 10% of the labels
ignored), hidden ~ N(0, 1), weight ~ N(0, 1/H). Rows, one markdown row each:

- ``eager``: PyTorch in the half dtype (the full logits; dW is one GEMM, rounded once);
- ``fp32``: ``tgr_kernels.linear_cross_entropy`` with ``weight_grad_accumulation="fp32"`` (dW by
  vocabulary blocks, accumulated over every token in fp32, rounded once);
- ``weight-dtype, k chunks``: ``weight_grad_accumulation="weight-dtype"`` with the rows split into
  k chunks: each chunk's product is added into dW in the half dtype (k roundings).

Columns: the max absolute error of dW against float64 eager on the same (rounded) inputs, that
error over eager's (the tests' criterion allows 2× eager's, plus a floor), and ‖dW − truth‖ / ‖truth‖.
The torch backend on this device: the summation, not the device, is what is measured.
"""
from __future__ import annotations

import argparse
import importlib
import math

import torch
import torch.nn.functional as F

from tgr_kernels import linear_cross_entropy

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def make_inputs(tokens: int, vocab: int, hidden: int, dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator).to(dtype)
    w = (torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden)).to(dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[torch.rand(tokens, generator=generator) < 0.1] = -100
    return h, w, labels


def weight_grad(loss_fn, h, w, dtype) -> torch.Tensor:
    weight = w.detach().to(dtype).requires_grad_()
    loss_fn(h.detach().to(dtype), weight).backward()
    return weight.grad.double()


def measure_errors(tokens: int, vocab: int, hidden: int, dtype, chunk_counts) -> list:
    """``[(name, max abs error, relative norm error)]``, eager's first."""
    lce = importlib.import_module("tgr_kernels.linear_cross_entropy")
    h, w, labels = make_inputs(tokens, vocab, hidden, dtype)

    def eager(a, b):
        return F.cross_entropy(F.linear(a, b), labels)

    truth = weight_grad(eager, h, w, torch.float64)

    def errors(name, grad):
        diff = grad - truth
        return name, diff.abs().max().item(), (diff.norm() / truth.norm()).item()

    rows = [errors("eager", weight_grad(eager, h, w, dtype))]
    rows.append(errors("fp32", weight_grad(
        lambda a, b: linear_cross_entropy(a, b, labels, backend="torch", weight_grad_accumulation="fp32"),
        h, w, dtype)))
    default_chunk_rows = lce.chunk_rows
    try:
        for k in chunk_counts:
            chunked = []  # the rows the op splits: the ignored ones are left out first

            def k_chunks(n_rows, n_vocab, device, logit_bytes, k=k, chunked=chunked):
                chunked.append((n_rows, math.ceil(n_rows / k)))
                return math.ceil(n_rows / k)

            lce.chunk_rows = k_chunks
            grad = weight_grad(lambda a, b: linear_cross_entropy(a, b, labels, backend="torch",
                                                                 weight_grad_accumulation="weight-dtype"), h, w, dtype)
            n_rows, per_chunk = chunked[0]
            rows.append(errors(f"weight-dtype, {math.ceil(n_rows / per_chunk)} chunks", grad))
    finally:
        lce.chunk_rows = default_chunk_rows
    return rows


def computes_in_fp32(dtype) -> bool:
    """Whether the torch backend multiplies ``dtype`` in fp32 on this CPU (no native instructions
    for it: ``_gemm_dtype``): its dW is then an fp32 sum whatever ``weight_grad_accumulation``."""
    lce = importlib.import_module("tgr_kernels.linear_cross_entropy")
    return lce._gemm_dtype(dtype, torch.device("cpu")) != dtype


def render(rows: list, title: str, note: str | None = None) -> str:
    eager_max = rows[0][1]
    lines = [title, "", "| dW summed | max abs error | / eager's | relative norm error |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {worst:.3e} | {worst / eager_max:.2f}× | {rel:.3e} |" for name, worst, rel in rows]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.weight_grad_error", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--chunks", type=int, nargs="+", default=[4, 16, 64])
    args = p.parse_args(argv)
    dtype = DTYPES[args.dtype]
    rows = measure_errors(args.tokens, args.vocab, args.hidden, dtype, args.chunks)
    note = None
    if computes_in_fp32(dtype):
        note = (f"Note: this CPU has no native {args.dtype} GEMMs, so the fused op computes in fp32 here: its dW "
                f"is an fp32 sum in every row, and the weight-dtype rows measure no {args.dtype} rounding.")
    print(render(rows, f"dW error, {args.dtype}, tokens {args.tokens}, V {args.vocab}, H {args.hidden}", note))


if __name__ == "__main__":
    main()
