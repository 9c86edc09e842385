"""Property-based parity of the fused linear cross-entropy: many odd configurations at once.

Each example draws a backend, a dtype, the shapes (V and H from 1, one to three leading dims),
bias, which inputs need gradients, the reduction, the ignore index (inside [0, V) too) and how
many labels it hides (none, some, all), the rows per chunk and per PyTorch row block, strided
hidden and weight, int32 or int64 labels, the accumulation of half dW, and the logits' scale (up
to ~N(0, 30²) per H, where the softmax's precision shows). Loss and gradients meet the library's
criterion against float64 (tests/parity.py); ``linear_log_probs`` is exactly minus the per-token
loss. The examples are derandomized: the same on every run.

The eager baseline is the worse of PyTorch's two usual spellings in the input dtype: logits and
the loss in that dtype (``F.cross_entropy`` of half logits returns a half loss, rounded once
more), and half logits with the cross-entropy in fp32 (``logits.float()``, as Hugging Face's
loss does). With a single row, either can be right by luck of rounding.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE
from parity import assert_parity, max_err
from tgr_kernels import linear_cross_entropy, linear_log_probs

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
lce = importlib.import_module("tgr_kernels.linear_cross_entropy")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def cases(draw, backend):
    n_dims = draw(st.integers(1, 3))
    return dict(
        backend=backend,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        lead=tuple(draw(st.lists(st.integers(1, 9), min_size=n_dims, max_size=n_dims))),
        hidden_size=draw(st.integers(1, 40)),
        n_vocab=draw(st.integers(1, 300)),
        bias=draw(st.booleans()),
        requires=tuple(draw(st.lists(st.booleans(), min_size=3, max_size=3))),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, 5])),
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        chunk=draw(st.integers(1, 50)),
        row_block_bytes=draw(st.sampled_from([1, 100, 4096, 2 << 20])),
        hidden_layout=draw(st.sampled_from(["contiguous", "column slice", "leading transpose"])),
        weight_layout=draw(st.sampled_from(["contiguous", "column slice", "transposed storage"])),
        accumulation=draw(st.sampled_from(["fp32", "weight-dtype"])),
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        logit_scale=draw(st.sampled_from([0.1, 3.0, 30.0])),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


def build(case):
    """fp32 hidden, weight, bias (strided as drawn) and labels, on the test device."""
    g = torch.Generator().manual_seed(case["seed"])
    lead, h, v = case["lead"], case["hidden_size"], case["n_vocab"]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    if case["hidden_layout"] == "column slice":
        hidden = randn(*lead, h + 3)[..., 1:h + 1]
    elif case["hidden_layout"] == "leading transpose" and len(lead) >= 2:
        hidden = randn(lead[1], lead[0], *lead[2:], h).transpose(0, 1)
    else:
        hidden = randn(*lead, h)
    weight = randn(v, h) * (case["logit_scale"] / math.sqrt(h))
    if case["weight_layout"] == "column slice":
        weight = torch.cat([weight, randn(v, 2)], 1)[:, :h]
    elif case["weight_layout"] == "transposed storage":
        weight = weight.t().contiguous().t()
    bias = randn(v) if case["bias"] else None
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < case["ignore_fraction"]] = case["ignore_index"]
    return hidden, weight, bias, labels.to(case["label_dtype"]).to(DEVICE)


def leaves(tensors, dtype, requires):
    return [None if t is None else t.detach().to(dtype).requires_grad_(r) for t, r in zip(tensors, requires,
                                                                                          strict=True)]


def loss_and_grads(fn, tensors, upstream):
    out = fn(*tensors)
    needed = [t for t in tensors if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, needed, upstream.to(out.dtype)) if needed else ())
    return [out.detach()] + [next(grads) if (t is not None and t.requires_grad) else None for t in tensors]


def check(case):
    dtype, reduction, ignore_index = DTYPES[case["dtype"]], case["reduction"], case["ignore_index"]
    hidden, weight, bias, labels = build(case)
    upstream = torch.randn(labels.shape if reduction == "none" else (), dtype=torch.float64, device=DEVICE)

    def ours(h, w, b):
        return linear_cross_entropy(h, w, labels, b, ignore_index=ignore_index, reduction=reduction,
                                    backend=case["backend"], weight_grad_accumulation=case["accumulation"])

    def eager(h, w, b):
        return lce.linear_cross_entropy_ref(h, w, labels, b, ignore_index=ignore_index, reduction=reduction,
                                            upcast=False)

    def eager_fp32_loss(h, w, b):
        logits = F.linear(h, w, b).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                               ignore_index=ignore_index, reduction=reduction)
        return loss.reshape(labels.shape) if reduction == "none" else loss

    tensors = (hidden, weight, bias)
    rounded = [None if t is None else t.to(dtype) for t in tensors]
    got = loss_and_grads(ours, leaves(tensors, dtype, case["requires"]), upstream)
    truth = loss_and_grads(eager, leaves(rounded, torch.float64, case["requires"]), upstream)
    base = loss_and_grads(eager, leaves(tensors, dtype, case["requires"]), upstream)
    base_fp32_loss = loss_and_grads(eager_fp32_loss, leaves(tensors, dtype, case["requires"]), upstream)
    nothing_counted = reduction == "mean" and bool((labels == ignore_index).all())
    for name, a, e1, e2, t in zip(("loss", "d hidden", "dW", "db"), got, base, base_fp32_loss, truth, strict=True):
        if t is None:
            assert a is None, name
        elif nothing_counted:  # 0 / 0: a NaN loss and zero gradients, as documented
            assert (torch.isnan(a) if name == "loss" else a == 0).all(), name
        else:
            worse = e1 if max_err(e1, t) >= max_err(e2, t) else e2
            assert_parity(f"{case['backend']} {reduction} {name}", a, worse, t, dtype)
    if reduction == "none":
        log_p = linear_log_probs(*rounded[:2], labels, rounded[2], ignore_index=ignore_index, backend=case["backend"])
        assert torch.equal(log_p, -got[0])


def check_with_chunks(case):
    """``check`` with the drawn rows per chunk and per PyTorch row block (restored after)."""
    saved = lce.chunk_rows, lce.ROW_BLOCK_BYTES_CPU
    lce.chunk_rows = lambda n_rows, n_vocab, device, logit_bytes: min(case["chunk"], n_rows)
    lce.ROW_BLOCK_BYTES_CPU = case["row_block_bytes"]
    try:
        check(case)
    finally:
        lce.chunk_rows, lce.ROW_BLOCK_BYTES_CPU = saved


def run_cases(backend, max_examples):
    # No shrinking: a failing example is printed as drawn (shrinking one took minutes).
    @hypothesis.settings(max_examples=max_examples, derandomize=True, deadline=None, database=None,
                         phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(cases(backend))
    def run(case):
        check_with_chunks(case)

    run()


def test_torch_backend_properties():
    run_cases("torch", 120)


def test_triton_backend_properties():
    run_cases("triton", 50)
