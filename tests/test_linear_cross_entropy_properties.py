"""Property-based parity of the fused linear cross-entropy: many odd configurations at once.

Each example draws a backend, a dtype, the shapes (V and H from 1, one to three leading dims),
bias, which inputs need gradients, the reduction, the ignore index (inside [0, V) too) and how
many labels it hides (none, some, all), the rows per chunk and per PyTorch row block, strided
hidden and weight, int32 or int64 labels, the accumulation of half dW, and the logits' scale (up
to ~N(0, 30²) per H, where the softmax's precision shows). Loss and gradients meet the library's
criterion against float64 (tests/parity.py), plus one unit in the last place at the truth's
magnitude (tests/properties.py: a "sum" dW of magnitude 26 in bf16 has spacing 0.125, above the
floor, and eager's may round onto the truth by luck); ``linear_log_probs`` is exactly minus the
per-token loss. The examples are derandomized: the same on every run.

The eager baseline is the worse of PyTorch's two usual spellings in the input dtype: logits and
the loss in that dtype (``F.cross_entropy`` of half logits returns a half loss, rounded once
more), and half logits with the cross-entropy in fp32 (``logits.float()``, as Hugging Face's
loss does). With a single row, either can be right by luck of rounding.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import properties as props
from helpers import DEVICE
from parity import FLOOR, max_err
from tgr_kernels import linear_cross_entropy, linear_log_probs

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
lce = importlib.import_module("tgr_kernels.linear_cross_entropy")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def cases(draw, backend):
    return dict(
        **props.draw_common(draw, st, backend),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        hidden_size=draw(st.integers(1, 40)),
        n_vocab=draw(st.integers(1, 300)),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, 5])),
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        chunk=draw(st.integers(1, 50)),
        row_block_bytes=draw(st.sampled_from([1, 100, 4096, 2 << 20])),
        accumulation=draw(st.sampled_from(["fp32", "weight-dtype"])),
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        logit_scale=draw(st.sampled_from([0.1, 3.0, 30.0])),
    )


def build(case):
    """fp32 hidden, weight, bias (strided as drawn) and labels, on the test device."""
    g, randn = props.seeded_randn(case["seed"])
    lead, v = case["lead"], case["n_vocab"]
    hidden, weight = props.strided_hidden_and_weight(randn, lead, case["hidden_size"], v, case["logit_scale"],
                                               case["hidden_layout"], case["weight_layout"])
    bias = randn(v) if case["bias"] else None
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < case["ignore_fraction"]] = case["ignore_index"]
    return hidden, weight, bias, labels.to(case["label_dtype"]).to(DEVICE)


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
    requires = case["requires"]
    got = props.value_and_grads(ours, props.leaves(tensors, requires, dtype), upstream)
    truth = props.value_and_grads(eager, props.leaves(rounded, requires, torch.float64), upstream)
    base = props.value_and_grads(eager, props.leaves(tensors, requires, dtype), upstream)
    base_fp32_loss = props.value_and_grads(eager_fp32_loss, props.leaves(tensors, requires, dtype), upstream)
    nothing_counted = reduction == "mean" and bool((labels == ignore_index).all())
    for name, a, e1, e2, t in zip(("loss", "d hidden", "dW", "db"), got, base, base_fp32_loss, truth, strict=True):
        if t is None:
            assert a is None, name
        elif nothing_counted:  # 0 / 0: a NaN loss and zero gradients, as documented
            assert (torch.isnan(a) if name == "loss" else a == 0).all(), name
        else:
            worse = e1 if max_err(e1, t) >= max_err(e2, t) else e2
            props.assert_close_to_truth(f"{case['backend']} {reduction} {name}", a, worse, t, dtype, FLOOR[dtype])
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


@pytest.mark.parametrize("backend,examples", [("torch", 120), ("triton", 50)])
def test_properties(backend, examples):
    props.run_examples(hypothesis, cases(backend), check_with_chunks, examples)
