"""Parity and behaviour tests for the fused linear cross-entropy and target log-probabilities.

Criterion (tests/parity.py): against a float64 reference, the op's max abs error is at
most 2x the error of PyTorch's eager ``F.linear`` + ``F.cross_entropy`` in the same precision,
plus a floor per dtype; loss, per-token losses, d hidden, dW and db, random upstream gradients.
The chunk budget is shrunk so that every test runs several row chunks, the last one partial.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICE
from parity import assert_parity
from tgr_kernels import LinearCrossEntropy, linear_cross_entropy, linear_log_probs, value_checks

lce = importlib.import_module("tgr_kernels.linear_cross_entropy")

ON_CUDA = DEVICE == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
REDUCTIONS = ["mean", "sum", "none"]
CHUNK = 7  # rows per chunk in these tests: not a divisor of any N below
V = 203    # not a multiple of any vocabulary block
H = 33


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks of CHUNK rows (and vocabulary blocks of CHUNK columns); the PyTorch row ops on half
    logits take fp32 blocks of 1 row at V = 203 and of 3 rows in a vocabulary block of 7."""
    def rows(n_rows, n_vocab, device, logit_bytes):
        return min(CHUNK, n_rows)

    monkeypatch.setattr(lce, "chunk_rows", rows)
    monkeypatch.setattr(lce, "ROW_BLOCK_BYTES_CPU", 100)


def make_inputs(lead, dtype, *, bias=True, requires=(True, True, True), n_vocab=V, hidden_size=H,
                ignore_fraction=0.2, device=DEVICE):
    """hidden [*lead, H], weight [V, H] (logits ~ N(0, 3²): peaked softmaxes), bias [V], labels
    with ignored entries at both ends and scattered."""
    hidden = torch.randn(*lead, hidden_size, device=device).to(dtype)
    weight = (torch.randn(n_vocab, hidden_size, device=device) * (3.0 / math.sqrt(hidden_size))).to(dtype)
    b = torch.randn(n_vocab, device=device).to(dtype) if bias else None
    labels = torch.randint(0, n_vocab, lead, device=device)
    flat = labels.view(-1)
    flat[torch.rand(flat.shape, device=device) < ignore_fraction] = -100
    flat[0] = -100
    flat[-1] = -100
    for t, req in zip((hidden, weight, b), requires, strict=True):
        if t is not None:
            t.requires_grad_(req)
    return hidden, weight, b, labels


def copy_as(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def loss_and_grads(fn, hidden, weight, bias, upstream):
    """The loss and the gradients of the inputs that require grad (None for the others)."""
    out = fn(hidden, weight, bias)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, leaves, upstream.to(out.dtype)) if leaves else ())
    return [out.detach()] + [next(grads) if (t is not None and t.requires_grad) else None
                             for t in (hidden, weight, bias)]


def assert_matches_float64(backend, hidden, weight, bias, labels, reduction, weight_grad_accumulation="fp32"):
    dtype = hidden.dtype
    upstream_shape = labels.shape if reduction == "none" else ()
    upstream = torch.randn(upstream_shape, device=hidden.device, dtype=torch.float64)

    def ours(h, w, b):
        return linear_cross_entropy(h, w, labels, b, reduction=reduction, backend=backend,
                                    weight_grad_accumulation=weight_grad_accumulation)

    def eager(h, w, b):
        return lce.linear_cross_entropy_ref(h, w, labels, b, reduction=reduction, upcast=False)

    got = loss_and_grads(ours, hidden, weight, bias, upstream)
    truth = loss_and_grads(eager, *(copy_as(t, torch.float64) for t in (hidden, weight, bias)), upstream)
    base = loss_and_grads(eager, *(copy_as(t, dtype) for t in (hidden, weight, bias)), upstream)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, a, e, t, src in zip(("loss", "d hidden", "dW", "db"), got, base, truth,
                                  (None, hidden, weight, bias), strict=True):
        if t is None:
            assert a is None, name
            continue
        if src is not None:
            assert a.dtype == src.dtype, f"{name}: {a.dtype} != {src.dtype}"
        assert_parity(f"{backend} {reduction} {name}", a, e, t, dtype)


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead,bias", [((2, 19), True), ((3, 11), False), ((26,), True)],
                         ids=["2x19-bias", "3x11", "26-bias"])
def test_torch_backend_matches_float64(lead, bias, dtype, reduction):
    hidden, weight, b, labels = make_inputs(lead, dtype, bias=bias)
    assert_matches_float64("torch", hidden, weight, b, labels, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_backend_matches_float64(dtype, reduction):
    # fp16 runs the kernels on the GEMMs' fp16 logits, as on a GPU; bf16 on fp32 logits (the
    # interpreter's bf16 stores truncate). Small sizes: the interpreter is slow.
    hidden, weight, b, labels = make_inputs((2, 9), dtype)
    assert_matches_float64("triton", hidden, weight, b, labels, reduction)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_large_fp32_logits_match_float64(backend, reduction):
    """fp32 logits of magnitude ~100 (std 60): the softmax and the loss are taken from z − max,
    as PyTorch's log_softmax does. Through lse = max + log Σ, whose rounding grows with |lse|,
    every probability carried a relative error of ~1e-5: found by a property-based search, and
    here d hidden was 1.5e-3 and 8.8e-4 off against eager's 5.1e-5 and 1.5e-5 (16x to 60x)."""
    torch.manual_seed(2)
    # H = 2, so that |W| ~ 40 carries the probabilities' error into d hidden above fp32's floor.
    hidden, weight, b, labels = make_inputs((3, 9), torch.float32, hidden_size=2)
    with torch.no_grad():
        weight *= 20.0  # logits ~ N(0, 60²)
    assert_matches_float64(backend, hidden, weight, b, labels, reduction)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_bias_cancelling_a_large_product(backend, dtype):
    """A constant outlier dimension of the hidden states and a bias that cancels its product: the
    bias enters before the one rounding of a half GEMM, as in eager's F.linear, also where the
    chunks take fp32 logits (bf16 under the interpreter; CUDA without fp32-output GEMMs)."""
    hidden, weight, _, labels = make_inputs((3, 11), torch.float32, bias=False, requires=(False, False, False))
    hidden[..., 0] = 256.0
    weight[:, 0] = 1.0 + torch.rand(V, device=hidden.device)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = -(hidden[..., 0].float().mean() * weight[:, 0].float()).to(dtype)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    assert_matches_float64(backend, hidden, weight, bias, labels, "mean")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
def test_weight_dtype_accumulation_matches_float64(dtype, reduction, backend):
    """dW of a half weight summed chunk by chunk in its dtype (one rounding per chunk: 11 chunks of
    7 rows here) still meets the criterion."""
    hidden, weight, b, labels = make_inputs((4, 19) if backend == "torch" else (2, 19), dtype)
    assert_matches_float64(backend, hidden, weight, b, labels, reduction, weight_grad_accumulation="weight-dtype")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_mean_keeps_small_probabilities(backend, monkeypatch):
    """fp16 "mean" over many tokens with flat softmaxes: s·p (here 1/1843 · 1/8000) lies in fp16's
    subnormals, where eager's gradient loses it (measured: 1.3% relative error of d hidden, 0.7%
    of dW); the fused op rounds G unscaled, scales d hidden after its GEMM, puts s on the hidden
    side of dW, in either accumulation, and takes db as Gᵀ s. fp16 GEMMs run in fp16 here (on a CPU they would run in
    fp32), as on a GPU."""
    monkeypatch.setattr(lce, "cpu_computes_natively", lambda dtype: True)
    # Row chunks of 512 (and vocabulary blocks of 512); the interpreter gets one chunk and one
    # step per row (its time is per program and step).
    chunk = 512 if (backend == "torch" or ON_CUDA) else 1 << 20
    monkeypatch.setattr(lce, "chunk_rows", lambda n_rows, n_vocab, device, logit_bytes: min(chunk, n_rows))
    if not ON_CUDA:
        monkeypatch.setattr(lce, "rows_config", lambda: lce._configs._config(4, 1, BLOCK_V=8192))
        monkeypatch.setattr(lce, "vocab_block_config", lambda: lce._configs._config(4, 1, BLOCK_V=8192))
    n_vocab, hidden_size = 8000, 33
    hidden = torch.randn(2048, hidden_size, device=DEVICE).half()
    weight = (torch.randn(n_vocab, hidden_size, device=DEVICE) / math.sqrt(hidden_size)).half()
    bias = (torch.randn(n_vocab, device=DEVICE) * 0.1).half()
    labels = torch.randint(0, n_vocab, (2048,), device=DEVICE)
    labels[::10] = -100

    def grads(fn, dtype):
        h, w, b = (t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias))
        fn(h, w, b).backward()
        return h.grad.double(), w.grad.double(), b.grad.double()

    def eager(h, w, b):
        return F.cross_entropy(F.linear(h, w, b), labels)

    def fused(accumulation):
        return lambda h, w, b: linear_cross_entropy(h, w, labels, b, backend=backend,
                                                    weight_grad_accumulation=accumulation)

    truth = grads(eager, torch.float64)

    def errors(fn):
        return [((g - t).norm() / t.norm()).item() for g, t in zip(grads(fn, torch.float16), truth, strict=True)]

    eager_errors = errors(eager)
    assert min(eager_errors) > 5e-3, eager_errors  # the underflow this test is about
    for accumulation in ("fp32", "weight-dtype"):
        got = errors(fused(accumulation))
        assert all(e < 0.1 * base for e, base in zip(got, eager_errors, strict=True)), (accumulation, got, eager_errors)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_partial_gradients_match_float64(reduction):
    """Frozen weight (the TGR model's lm_head), or frozen hidden with a trainable head."""
    for requires in ((True, False, False), (False, True, True), (False, False, True)):
        hidden, weight, b, labels = make_inputs((2, 13), torch.float32, requires=requires)
        assert_matches_float64("torch", hidden, weight, b, labels, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_gradcheck(reduction):
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = labels[1, -1] = -100
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, labels, b, reduction=reduction, backend="torch"),
        (hidden, weight, bias))


def test_model_call_on_shifted_slices_matches_eager():
    """The model's call: ``hidden[:, :-1]`` (a non-contiguous view) with ``labels[:, 1:]``, summed."""
    hidden = torch.randn(2, 12, H, requires_grad=True)
    weight = torch.randn(V, H) * 0.3  # frozen, as the base model's lm_head
    labels = torch.randint(0, V, (2, 12))
    labels[1, 8:] = -100  # right padding
    loss = linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], reduction="sum")
    (grad,) = torch.autograd.grad(loss, hidden)
    hidden64 = hidden.detach().double().requires_grad_()
    ref = F.cross_entropy((hidden64[:, :-1] @ weight.double().t()).reshape(-1, V), labels[:, 1:].reshape(-1),
                          reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, hidden64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    assert grad[:, -1].abs().max() == 0  # the last position predicts nothing


# --------------------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_log_probs_matches_log_softmax_gather(backend, dtype):
    hidden, weight, b, _ = make_inputs((3, 5), dtype)
    targets = torch.randint(0, V, (3, 5), device=hidden.device)
    upstream = torch.randn(3, 5, dtype=torch.float64, device=hidden.device)

    def ours(h, w, bb):
        return linear_log_probs(h, w, targets, bb, backend=backend)

    def gather(h, w, bb):
        logits = F.linear(h, w, bb)
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    got = loss_and_grads(ours, hidden, weight, b, upstream)
    truth = loss_and_grads(gather, *(copy_as(t, torch.float64) for t in (hidden, weight, b)), upstream)
    base = loss_and_grads(gather, *(copy_as(t, dtype) for t in (hidden, weight, b)), upstream)
    for name, a, e, t in zip(("log p", "d hidden", "dW", "db"), got, base, truth, strict=True):
        assert_parity(f"{backend} {name}", a, e, t, dtype)
    assert (got[0] <= 0).all()


def test_linear_log_probs_ignore_index_gives_zero():
    hidden, weight, b, _ = make_inputs((2, 6), torch.float32, requires=(False, False, False))
    targets = torch.randint(0, V, (2, 6), device=DEVICE)
    targets[0, :2] = -1
    got = linear_log_probs(hidden, weight, targets, b, ignore_index=-1)
    ref = lce.linear_log_probs_ref(hidden.double(), weight.double(), targets, b.double(), ignore_index=-1)
    assert (got[0, :2] == 0).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- ignored labels


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_label_ignored(backend):
    """"mean" is 0/0 = NaN (as F.cross_entropy), with zero gradients; "sum" and "none" are 0."""
    hidden, weight, b, labels = make_inputs((2, 5), torch.float32)
    labels.fill_(-100)
    eager = F.cross_entropy(F.linear(hidden, weight, b).reshape(-1, V), labels.reshape(-1))
    assert math.isnan(eager.item())
    for reduction in REDUCTIONS:
        loss = linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, backend=backend)
        if reduction == "mean":
            assert math.isnan(loss.item())
        else:
            assert (loss == 0).all()
        grads = torch.autograd.grad(loss.sum(), (hidden, weight, b))
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g)), reduction


def test_custom_ignore_index():
    hidden, weight, b, labels = make_inputs((2, 9), torch.float32)
    labels[labels == -100] = 7  # a real token id used as the ignore index
    got = linear_cross_entropy(hidden, weight, labels, b, ignore_index=7)
    ref = lce.linear_cross_entropy_ref(*(t.detach().double() for t in (hidden, weight)), labels,
                                       b.detach().double(), ignore_index=7)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- work and memory


class _CountOps(TorchDispatchMode):
    """Counts GEMM calls and records the shape of every [rows, V] tensor an op produces."""

    def __init__(self, n_vocab):
        super().__init__()
        self.gemms, self.vocab_rows, self.n_vocab = 0, [], n_vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.gemms += 1
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view (W's transpose is [H, V]) holds no new memory
            return out
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == self.n_vocab:
                self.vocab_rows.append(t.shape[0])
        return out


def count_logits(monkeypatch) -> list:
    """Records the number of logits each chunk's (or vocabulary block's) GEMM makes, on both
    backends (the Triton path's custom op hides its GEMMs from a dispatch mode)."""
    made = []
    chunk_logits = lce._chunk_logits

    def counted(x_c, w, bias, act_dtype):
        logits = chunk_logits(x_c, w, bias, act_dtype)
        made.append(logits.numel())
        return logits

    monkeypatch.setattr(lce, "_chunk_logits", counted)
    return made


def kept_chunks(labels) -> int:
    """Row chunks of the rows that take part in the GEMMs: the non-ignored ones (make_inputs
    ignores more than SKIP_IGNORED_MIN_FRACTION of them)."""
    n_kept = int((labels != -100).sum())
    assert labels.numel() - n_kept >= labels.numel() * lce.SKIP_IGNORED_MIN_FRACTION
    return math.ceil(n_kept / CHUNK)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_weight_gets_no_weight_gradient_work(reduction):
    counts = {}
    for weight_trainable in (False, True):
        torch.manual_seed(0)
        hidden, weight, b, labels = make_inputs((2, 19), torch.float32, bias=False,
                                                requires=(True, weight_trainable, False))
        n_chunks = kept_chunks(labels)
        with _CountOps(V) as mode:
            loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend="torch")
            loss.sum().backward()
        counts[weight_trainable] = mode.gemms
        assert (weight.grad is not None) == weight_trainable
    # Logits and d hidden per chunk; dW adds one per chunk ("none": logits and dW once more).
    assert counts[False] == 2 * n_chunks
    assert counts[True] == (3 if reduction == "mean" else 4) * n_chunks


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weight_dtype_accumulation_saves_the_vocabulary_pass(reduction, monkeypatch):
    """A trainable half lm_head: "fp32" recomputes the logits by vocabulary blocks for dW (one
    GEMM more than eager, and a [N, block] pass per block); "weight-dtype" adds each chunk's
    product into dW during the row pass, and dW comes back in the weight's dtype either way.
    bf16 GEMMs as on a GPU or a CPU with bf16 instructions (elsewhere a CPU multiplies in fp32)."""
    monkeypatch.setattr(lce, "cpu_computes_natively", lambda dtype: True)
    n_blocks = math.ceil(V / CHUNK)  # vocabulary blocks take the row chunks' budget
    counts, grads = {}, {}
    for mode_name in ("fp32", "weight-dtype"):
        torch.manual_seed(0)
        hidden, weight, b, labels = make_inputs((2, 19), torch.bfloat16, bias=False, requires=(True, True, False))
        n_chunks = kept_chunks(labels)
        with _CountOps(V) as mode:
            loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend="torch",
                                        weight_grad_accumulation=mode_name)
            loss.sum().backward()
        counts[mode_name], grads[mode_name] = mode.gemms, weight.grad
        assert weight.grad.dtype == torch.bfloat16
    rows_pass = 2 if reduction == "mean" else 3  # "none": the logits once more in the backward
    assert counts["weight-dtype"] == (rows_pass + 1) * n_chunks
    assert counts["fp32"] == rows_pass * n_chunks + 2 * n_blocks
    torch.testing.assert_close(grads["weight-dtype"].float(), grads["fp32"].float(), rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_row_through_the_gemms_matches_float64(dtype, reduction, backend, monkeypatch):
    """The ignored rows kept in the GEMMs (below SKIP_IGNORED_MIN_FRACTION of the rows), where
    the other parity tests leave them out: the same criterion."""
    monkeypatch.setattr(lce, "SKIP_IGNORED_MIN_FRACTION", 2.0)
    hidden, weight, b, labels = make_inputs((3, 11) if backend == "torch" else (2, 9), dtype)
    assert_matches_float64(backend, hidden, weight, b, labels, reduction)
    made = count_logits(monkeypatch)
    linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, backend=backend).sum().backward()
    passes = 2 if reduction == "none" else 1  # "none": dW and db recompute the logits
    # dW of a half GEMM by vocabulary blocks: every row's logits once more
    vocab_pass = lce._gemm_dtype(dtype, hidden.device) in (torch.float16, torch.bfloat16)
    assert sum(made) == (passes + vocab_pass) * labels.numel() * V


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_rows_get_no_gemm(backend, monkeypatch):
    """Half the labels ignored (a masked prompt, padding): only the other rows' logits are
    computed, in the forward and in "none"'s backward; the ignored rows' losses and d hidden are
    exact zeros, the rest matches the float64 reference."""
    torch.manual_seed(1)
    hidden, weight, b, labels = make_inputs((4, 12), torch.float32, ignore_fraction=0.0)
    labels[:, :6] = -100  # the prompt half of every sequence
    n_kept = int((labels != -100).sum())
    made = count_logits(monkeypatch)
    for reduction in REDUCTIONS:
        made.clear()
        loss = linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, backend=backend)
        loss.sum().backward()
        passes = 2 if reduction == "none" else 1  # "none": dW and db recompute the logits
        assert sum(made) == passes * n_kept * V, reduction
        ignored = labels == -100
        if reduction == "none":
            assert torch.equal(loss[ignored], torch.zeros_like(loss[ignored]))
        assert torch.equal(hidden.grad[ignored], torch.zeros_like(hidden.grad[ignored]))
        assert hidden.grad[~ignored].abs().amin(-1).gt(0).all()
        hidden.grad = weight.grad = b.grad = None
    assert_matches_float64(backend, hidden, weight, b, labels, "none")


def test_skipping_ignored_rows_needs_enough_of_them():
    """Below SKIP_IGNORED_MIN_FRACTION ignored rows, or with none kept, every row goes through the
    GEMMs (the gather and the scatter would cost more than they save); no ignore index: no count."""
    labels = torch.arange(64)
    assert lce._kept_rows(labels, -100) is None
    labels[0] = -100  # 1/64 < 1/32
    assert lce._kept_rows(labels, -100) is None
    labels[1] = -100
    assert torch.equal(lce._kept_rows(labels, -100), torch.arange(2, 64))
    assert lce._kept_rows(torch.full((5,), -100), -100) is None
    assert lce._kept_rows(labels, lce._NO_IGNORE) is None
    assert lce._kept_rows(labels.to("meta"), -100) is None


def test_logits_never_exist_whole():
    hidden, weight, b, labels = make_inputs((4, 23), torch.float32)
    with _CountOps(V) as mode:
        for reduction in REDUCTIONS:
            linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, backend="torch").sum().backward()
        linear_log_probs(hidden, weight, labels.clamp(min=0), b).sum().backward()
    assert mode.vocab_rows and max(mode.vocab_rows) <= CHUNK


def test_default_chunk_budget(monkeypatch):
    monkeypatch.undo()  # the real chunk_rows
    cpu = torch.device("cpu")
    # Small vocabularies: as many rows as the byte budget holds.
    rows = lce.chunk_rows(100_000, 8000, cpu, 4)
    assert rows * 8000 * 4 <= lce.CHUNK_BYTES_CPU and rows > lce.MIN_CHUNK_ROWS and rows % 64 == 0
    # Large ones: never fewer rows than the GEMMs need to run at speed.
    assert lce.chunk_rows(100_000, 128_256, cpu, 4) == lce.MIN_CHUNK_ROWS
    assert lce.chunk_rows(100, 128_256, cpu, 4) == 100


def test_row_blocks_cover_the_chunk(monkeypatch):
    """The PyTorch row ops go blocks of rows of about ROW_BLOCK_BYTES_CPU of fp32 on a CPU, that
    cover the chunk once, in order; one block on another device (each op would be a launch)."""
    monkeypatch.undo()
    blocks = lce._row_blocks(torch.empty(1, 32000, dtype=torch.bfloat16).expand(1000, -1))  # no allocation
    step = lce.ROW_BLOCK_BYTES_CPU // (4 * 32000)
    assert blocks[0] == (0, step) and blocks[-1][1] == 1000 and len(blocks) == -(-1000 // step)
    assert all(a[1] == b[0] for a, b in zip(blocks[:-1], blocks[1:], strict=True))
    assert lce._row_blocks(torch.empty(3, 10 ** 7, dtype=torch.bfloat16, device="meta")) == [(0, 3)]
    assert lce._row_blocks(torch.empty(1000, 32000, device="meta")) == [(0, 1000)]


def test_cuda_chunk_budget_is_a_fraction_of_the_logits(monkeypatch):
    """On CUDA a chunk holds at most an eighth of the whole logits, or a quarter while that is
    under CHUNK_MIN_BYTES_CUDA (fewer launches where the GEMMs are short), above MIN_CHUNK_ROWS:
    the op's extra memory stays a small fraction of eager's at every size, and at most the budget."""
    monkeypatch.undo()
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    for n_rows, n_vocab, logit_bytes in ((2048, 32000, 2), (8192, 32000, 2), (8192, 128256, 2), (65536, 128256, 4),
                                         (1024, 32000, 2), (2048, 128256, 2), (4096, 32000, 4)):
        rows = lce.chunk_rows(n_rows, n_vocab, cuda, logit_bytes)
        whole = n_rows * n_vocab * logit_bytes
        assert rows % 64 == 0 and lce.MIN_CHUNK_ROWS <= rows <= n_rows
        assert rows == lce.MIN_CHUNK_ROWS or rows <= n_rows // (4 if whole // 8 < lce.CHUNK_MIN_BYTES_CUDA else 8)
        assert rows * n_vocab * logit_bytes <= max(lce.CHUNK_BYTES_CUDA, lce.MIN_CHUNK_ROWS * n_vocab * logit_bytes)
    assert lce.chunk_rows(2048, 32000, cuda, 2) == 512       # 4 chunks of 31 MiB (8 of 256 rows before)
    assert lce.chunk_rows(8192, 32000, cuda, 2) == 1024      # an eighth: 62.5 MiB
    assert lce.chunk_rows(8192, 128256, cuda, 2) == 1024
    assert lce.chunk_rows(1024, 32000, cuda, 2) == lce.MIN_CHUNK_ROWS


# ------------------------------------------------------------------------------ errors and options


@pytest.mark.parametrize("backend", ["torch", "triton", "reference", "auto"])
@pytest.mark.parametrize("bad_label", [V, -1, 10**6])
def test_label_out_of_range_is_a_clear_error(backend, bad_label):
    """With the value checks on (the default on a CPU; on CUDA they are off by default, and the
    reference backend would then hit eager's device-side assert)."""
    hidden, weight, b, labels = make_inputs((2, 6), torch.float32)
    labels[1, 3] = bad_label
    targets = labels.clamp(min=0)
    targets[1, 3] = bad_label
    with value_checks("sync"):
        with pytest.raises(ValueError,
                           match=rf"labels\[1, 3\] = {bad_label} is outside \[0, {V}\).*ignore_index=-100"):
            linear_cross_entropy(hidden, weight, labels, b, backend=backend)
        with pytest.raises(ValueError, match=rf"targets\[1, 3\] = {bad_label} is outside \[0, {V}\)"):
            linear_log_probs(hidden, weight, targets, b, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_label_out_of_range_without_checks_is_nan_not_a_crash(backend):
    hidden, weight, b, labels = make_inputs((2, 6), torch.float32)
    labels[1, 3] = V + 5
    labels[0, 2] = -7
    with value_checks("off"):
        loss = linear_cross_entropy(hidden, weight, labels, b, reduction="none", backend=backend)
        (grad,) = torch.autograd.grad(loss.sum(), hidden)
    assert torch.isnan(loss[1, 3]) and torch.isnan(loss[0, 2])
    keep = torch.ones_like(loss, dtype=torch.bool)
    keep[1, 3] = keep[0, 2] = False
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(grad[keep]).all()


def _base():
    hidden, weight, b, labels = make_inputs((2, 4), torch.float32)
    return dict(hidden=hidden, weight=weight, labels=labels, bias=b)


BAD_INPUTS = [
    ("labels float", dict(labels=torch.zeros(2, 4, device=DEVICE)), TypeError, "labels must be an integer tensor"),
    ("labels bool", dict(labels=torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)), TypeError,
     "labels must be an integer"),
    ("labels shape", dict(labels=torch.zeros(2, 5, dtype=torch.long, device=DEVICE)), ValueError,
     r"labels must have hidden's leading shape \[2, 4\]"),
    ("labels list", dict(labels=[[0] * 4] * 2), TypeError, "labels must be a torch.Tensor"),
    ("hidden width", dict(hidden=torch.randn(2, 4, H + 1, device=DEVICE)), ValueError,
     r"hidden's last dim must equal weight.shape\[1\]"),
    ("weight 3-D", dict(weight=torch.randn(1, V, H, device=DEVICE)), ValueError, "weight must be 2-D"),
    ("weight int", dict(weight=torch.zeros(V, H, dtype=torch.long, device=DEVICE)), TypeError,
     "weight must be float16"),
    ("dtype mix", dict(weight=torch.randn(V, H, dtype=torch.float16, device=DEVICE)), TypeError,
     "hidden, weight and bias must share a dtype"),
    ("bias dtype", dict(bias=torch.randn(V, dtype=torch.float64, device=DEVICE)), TypeError, "must share a dtype"),
    ("bias shape", dict(bias=torch.randn(V + 1, device=DEVICE)), ValueError, rf"bias must be \[{V}\]"),
    ("empty", dict(hidden=torch.randn(0, H, device=DEVICE), labels=torch.zeros(0, dtype=torch.long, device=DEVICE)),
     ValueError, "hidden is empty"),
    ("device", dict(weight=torch.randn(V, H, device="meta")), ValueError, "weight is on meta but hidden is on"),
    ("labels device", dict(labels=torch.zeros(2, 4, dtype=torch.long, device="meta")), ValueError, "labels is on meta"),
]


@pytest.mark.parametrize("name,change,error,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_are_clear_errors(name, change, error, match):
    args = {**_base(), **change}
    with pytest.raises(error, match=match):
        linear_cross_entropy(args["hidden"], args["weight"], args["labels"], args["bias"], backend="torch")


def test_bad_options_are_clear_errors():
    args = _base()
    call = (args["hidden"], args["weight"], args["labels"], args["bias"])
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(*call, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        linear_cross_entropy(*call, ignore_index=-100.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_cross_entropy(*call, backend="cuda")
    with pytest.raises(TypeError, match="no float64 kernel"):
        linear_cross_entropy(*(t.double() if t.is_floating_point() else t for t in call), backend="triton")
    with pytest.raises(ValueError, match="weight_grad_accumulation must be one of"):
        linear_cross_entropy(*call, weight_grad_accumulation="bf16")
    with pytest.raises(ValueError, match="weight_grad_accumulation must be one of"):
        linear_log_probs(args["hidden"], args["weight"], args["labels"].clamp(min=0), weight_grad_accumulation=None)
    with pytest.raises(ValueError, match="weight_grad_accumulation must be one of"):
        LinearCrossEntropy(weight_grad_accumulation="fp16")


def test_float64_auto_and_int32_labels():
    hidden, weight, b, labels = make_inputs((2, 7), torch.float64)
    got = linear_cross_entropy(hidden, weight, labels.int(), b, backend="auto")
    ref = lce.linear_cross_entropy_ref(hidden, weight, labels, b)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_reference_backend_and_module():
    hidden, weight, b, labels = make_inputs((2, 7), torch.float32)
    ref = lce.linear_cross_entropy_ref(hidden, weight, labels, b, reduction="sum", upcast=False)
    got = linear_cross_entropy(hidden, weight, labels, b, reduction="sum", backend="reference")
    torch.testing.assert_close(got, ref)
    module = LinearCrossEntropy(reduction="sum")
    torch.testing.assert_close(module(hidden, weight, labels, b), ref, rtol=1e-5, atol=1e-4)
    assert "reduction='sum'" in repr(module) and "weight_grad_accumulation='fp32'" in repr(module)
    with pytest.raises(ValueError, match="reduction must be one of"):
        LinearCrossEntropy(reduction="avg")


def test_autocast_runs_the_gemms_in_the_autocast_dtype():
    hidden, weight, b, labels = make_inputs((2, 9), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, b)
        eager = F.cross_entropy(F.linear(hidden, weight, b).reshape(-1, V), labels.reshape(-1))
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    truth = lce.linear_cross_entropy_ref(*(t.detach().double() for t in (hidden, weight)), labels, b.detach().double())
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert abs(loss.item() - truth.item()) <= 2 * abs(eager.item() - truth.item()) + 5e-2


def test_second_derivative_raises():
    hidden, weight, b, labels = make_inputs((2, 4), torch.float32)
    (grad,) = torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, b), hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        grad.sum().backward()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_large_on_gpu(dtype, reduction, monkeypatch):
    """Real chunk sizes and a Llama vocabulary on the GPU (several chunks: 2048 rows of V = 32000
    are 250 MiB of fp32 logits)."""
    monkeypatch.undo()
    hidden, weight, b, labels = make_inputs((2, 1024), dtype, n_vocab=32000, hidden_size=1024)
    monkeypatch.setattr(lce, "CHUNK_BYTES_CUDA", 64 << 20)
    assert_matches_float64("triton", hidden, weight, b, labels, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_twice_with_retain_graph(reduction):
    """The backward scales the saved gradients in place only when the graph is not kept."""
    hidden, weight, b, labels = make_inputs((2, 9), torch.float64)
    upstream = torch.rand(labels.shape if reduction == "none" else (), dtype=torch.float64, device=DEVICE) + 0.5
    loss = linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, backend="torch")
    loss.backward(upstream, retain_graph=True)
    loss.backward(upstream * 3)
    leaves = [copy_as(t, torch.float64) for t in (hidden, weight, b)]
    ref = lce.linear_cross_entropy_ref(leaves[0], leaves[1], labels, leaves[2], reduction=reduction)
    ref_grads = torch.autograd.grad(ref, leaves, upstream * 4)
    for got, want in zip((hidden.grad, weight.grad, b.grad), ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_compile_matches_eager():
    hidden, weight, b, labels = make_inputs((2, 9), torch.float32)
    compiled = torch.compile(lambda h, w, bb: linear_cross_entropy(h, w, labels, bb) * 2)
    got = loss_and_grads(compiled, hidden, weight, b, torch.tensor(1.0, device=DEVICE))
    want = loss_and_grads(lambda h, w, bb: linear_cross_entropy(h, w, labels, bb) * 2, hidden, weight, b,
                          torch.tensor(1.0, device=DEVICE))
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------------------------------ benchmark
def test_benchmark_gpu_providers_and_floor():
    """benchmarks/linear_cross_entropy.py: the GPU-only providers are records with a reason on a
    CPU, and a GPU row is read against the GEMMs alone at the H200's peak."""
    bench = pytest.importorskip("benchmarks.linear_cross_entropy")
    providers = bench.make_providers("cpu")
    for name in ("tgr-triton", "tgr-triton-dw-per-chunk", "liger", "cut-cross-entropy"):
        fn, reason = providers[name]
        assert fn is None and "CUDA" in reason, name
    # Llama-3 at 8192 tokens, frozen lm_head: the logits and d hidden GEMMs, 2·N·V·H FLOPs each.
    frozen = bench.gemm_floor_ms(8192, 4096, 128256, False, "bfloat16")
    assert frozen == pytest.approx(2 * 2 * 8192 * 128256 * 4096 / 989e12 * 1e3)
    assert bench.gemm_floor_ms(8192, 4096, 128256, True, "bfloat16") == pytest.approx(1.5 * frozen)
    shape = dict(op="linear-cross-entropy", tokens=8192, hidden=4096, vocab=128256, dtype="bfloat16",
                 weight="frozen", mode="full", kind="measurement")
    timing = dict(status="ok", p20_ms=1.0, p80_ms=1.0, peak_mib=100.0, check_rel_err=1e-3, check_ok=True)
    records = [dict(shape, device="cuda", provider="eager", median_ms=2 * frozen, **timing),
               dict(shape, device="cuda", provider="tgr-triton", median_ms=1.1 * frozen, **timing),
               dict(shape, device="cuda", provider="liger", status="n/a", reason="liger-kernel is not installed")]
    table = bench.render_table(records)
    assert f"| 8192 | 128256 | frozen | {frozen:.2f} ms |" in table
    assert "1.10× floor" in table and "2.00× floor" in table and "liger-kernel is not installed" in table
    cpu_table = bench.render_table([dict(r, device="cpu") for r in records])
    assert "H200 floor |" not in cpu_table and "× floor" not in cpu_table


def test_benchmark_table_gives_the_memory_beyond_the_returned_gradients():
    """benchmarks/linear_cross_entropy.py: the second table subtracts d hidden and (trainable) dW, which
    every provider returns, from the extra peak: fp32, N = H = 1024, V = 32000 is 4 + 125 MiB."""
    bench = pytest.importorskip("benchmarks.linear_cross_entropy")
    assert bench.returned_gradient_mib(1024, 1024, 32000, True, "float32") == pytest.approx(129.0)
    assert bench.returned_gradient_mib(1024, 1024, 32000, False, "bfloat16") == pytest.approx(2.0)
    shape = dict(op="linear-cross-entropy", tokens=1024, hidden=1024, vocab=32000, dtype="float32",
                 weight="trainable", mode="full", kind="measurement", device="cpu")
    timing = dict(status="ok", median_ms=1.0, p20_ms=1.0, p80_ms=1.0, check_rel_err=None, check_ok=None)
    records = [dict(shape, provider="eager", peak_mib=375.0, **timing),
               dict(shape, provider="tgr-torch", peak_mib=160.0, **timing)]
    table = bench.render_table(records)
    assert "| 1024 | 32000 | trainable | 129 MiB | 246 MiB · 1.00× | 31 MiB · 0.13× |" in table


def test_weight_grad_error_benchmark(monkeypatch):
    """benchmarks/weight_grad_error.py: eager's row first, then fp32 and each chunk count; the
    default summation is within the tests' criterion of eager's error, and the chunk patch is
    undone."""
    monkeypatch.undo()
    bench = pytest.importorskip("benchmarks.weight_grad_error")
    default_chunk_rows = lce.chunk_rows
    rows = bench.measure_errors(96, 300, 32, torch.bfloat16, [2, 8])
    assert lce.chunk_rows is default_chunk_rows
    assert [r[0] for r in rows] == ["eager", "fp32", "weight-dtype, 2 chunks", "weight-dtype, 8 chunks"]
    assert all(worst > 0 and rel > 0 for _, worst, rel in rows)
    assert rows[1][1] <= 2 * rows[0][1]
    assert "| eager | " in bench.render(rows, "title") and "1.00×" in bench.render(rows, "title")


@pytest.mark.parametrize("accumulation", ["fp32", "weight-dtype"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_gradients_take_a_loss_scale_past_fp16s_range(backend, accumulation, monkeypatch):
    """GradScaler starts at a loss scale of 2¹⁶, which is inf in fp16: the saved fp16 d hidden
    and dW are scaled in fp32, so they come back finite where eager's are (fp16 GEMMs as on a GPU).
    "mean": d hidden and dW; "none" (small weights, so that eager's d hidden stays in range): d hidden."""
    monkeypatch.setattr(lce, "cpu_computes_natively", lambda dtype: True)
    monkeypatch.setattr(lce, "SCALE_BLOCK_ELEMENTS", 5 * H)  # several blocks of rows, the last partial
    torch.manual_seed(0)
    hidden, weight, b, labels = make_inputs((3, 13), torch.float32, bias=False)
    scale = 2.0 ** 16
    for reduction, wanted in (("mean", (hidden, weight)), ("none", (hidden,))):
        w = weight if reduction == "mean" else (weight.detach() * 1e-3).requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = linear_cross_entropy(hidden, w, labels, reduction=reduction, backend=backend,
                                        weight_grad_accumulation=accumulation)
            eager = F.cross_entropy(F.linear(hidden, w).reshape(-1, V), labels.reshape(-1),
                                    reduction=reduction).view_as(loss)
        upstream = torch.full_like(loss, scale)
        got = torch.autograd.grad(loss, wanted, upstream)
        want = torch.autograd.grad(eager, wanted, upstream)
        for name, g, e in zip(("d hidden", "dW"), got, want, strict=False):
            assert torch.isfinite(e).all(), f"{reduction} {name}: eager's"
            assert torch.isfinite(g).all(), f"{reduction} {name}"
            torch.testing.assert_close(g / scale, e / scale, rtol=2e-2, atol=2e-3, msg=f"{reduction} {name}")


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_no_gradient_work_without_grad_mode(no_grad):
    """Under no_grad or inference_mode, inputs that require a gradient get no gradient work: one
    GEMM per chunk (the logits), as for inputs that need none (the Triton path's own test:
    test_triton_no_grad_asks_for_no_gradient)."""
    hidden, weight, b, labels = make_inputs((2, 19), torch.float32, bias=False)
    with _CountOps(V) as mode, no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, backend="torch")
    assert not loss.requires_grad
    assert mode.gemms == kept_chunks(labels)


def test_autocast_leaves_float64_alone():
    hidden, weight, b, labels = make_inputs((2, 9), torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, b)
        eager = F.cross_entropy(F.linear(hidden, weight, b).reshape(-1, V), labels.reshape(-1))
    assert loss.dtype == eager.dtype == torch.float64
    torch.testing.assert_close(loss, eager, rtol=1e-12, atol=1e-12)


def test_a_0d_hidden_is_a_clear_error():
    for op in (linear_cross_entropy, linear_log_probs):
        with pytest.raises(ValueError, match="hidden must be \\[..., H\\] \\(at least one dim\\), got a 0-d"):
            op(torch.tensor(1.0), torch.randn(V, 1), torch.tensor(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reference_backend_keeps_the_documented_result_dtype_and_no_ignore_index(dtype):
    hidden, weight, b, labels = make_inputs((2, 7), dtype)
    labels = labels.clamp(min=0)
    for ignore_index in (-100, None):
        loss = linear_cross_entropy(hidden, weight, labels, b, backend="reference", ignore_index=ignore_index)
        fused = linear_cross_entropy(hidden, weight, labels, b, backend="torch", ignore_index=ignore_index)
        assert loss.dtype == fused.dtype == torch.float32
        torch.testing.assert_close(loss, fused, rtol=2e-2, atol=2e-2)
    log_probs = linear_log_probs(hidden, weight, labels, b, backend="reference")
    assert log_probs.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_none_ignores_a_nonfinite_upstream_gradient_at_ignored_tokens(backend):
    """Eager's nll_loss writes 0 at ignored tokens whatever their upstream gradient is: an inf or
    NaN there (a masked per-token loss scaled past range) leaves d hidden's row 0 and dW finite."""
    torch.manual_seed(0)
    hidden, weight, b, labels = make_inputs((3, 11), torch.float32)
    loss = linear_cross_entropy(hidden, weight, labels, b, reduction="none", backend=backend)
    eager = F.cross_entropy(F.linear(hidden, weight, b).reshape(-1, V), labels.reshape(-1),
                            reduction="none").view_as(loss)
    upstream = torch.randn_like(loss)
    ignored = labels == -100
    upstream[ignored] = torch.tensor([float("inf"), float("nan"), -float("inf")]).repeat(labels.numel())[
        :int(ignored.sum())]
    got = torch.autograd.grad(loss, (hidden, weight, b), upstream)
    want = torch.autograd.grad(eager, (hidden, weight, b), upstream)
    for name, g, e in zip(("d hidden", "dW", "db"), got, want, strict=True):
        assert torch.isfinite(e).all(), f"eager's {name}"
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)
    assert (got[0][ignored] == 0).all()


def test_benchmark_check_flags_a_nan_gradient():
    """benchmarks/linear_cross_entropy.py: a provider with the right loss and a NaN d hidden fails its
    check (max() of [finite, NaN, ...] is the finite entry: it passed)."""
    import argparse

    bench = pytest.importorskip("benchmarks.linear_cross_entropy")

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, g):
            return torch.full_like(g, float("nan"))

    def nan_dh(h, w, y):
        return bench.eager_loss(NanGrad.apply(h), w, y)

    args = argparse.Namespace(device="cpu", dtype="float32", hidden=16, ignored=0.1, providers=["eager", "tgr-torch"],
                              reps=1, warmup=1)
    records = []
    bench.run_case(args, {"eager": (bench.eager_loss, None), "tgr-torch": (nan_dh, None)}, 32, 50, True,
                   records.append)
    by = {r["provider"]: r for r in records}
    assert by["eager"]["check_ok"] is True
    assert by["tgr-torch"]["check_ok"] is False and by["tgr-torch"]["check_rel_err"] == math.inf
    assert "**MISMATCH**" in bench.render_table(records)


def test_benchmark_first_call_holds_the_compilation():
    """benchmarks/linear_cross_entropy.py: first_ms ("First call (compilation included)" in the table) is
    the provider's first call; the check ran it before the timing, so a compile was never in it."""
    import argparse
    import time

    bench = pytest.importorskip("benchmarks.linear_cross_entropy")
    calls = []

    def compiles_on_first_call(h, w, y):  # stands for torch.compile: slow once, then fast
        if not calls:
            time.sleep(0.5)
        calls.append(1)
        return bench.eager_loss(h, w, y)

    args = argparse.Namespace(device="cpu", dtype="float32", hidden=16, ignored=0.1, providers=["torch-compile"],
                              reps=2, warmup=1)
    records = []
    bench.run_case(args, {"torch-compile": (compiles_on_first_call, None)}, 32, 50, True, records.append)
    (rec,) = records
    assert rec["status"] == "ok" and rec["check_ok"] is True
    assert rec["first_ms"] >= 500 > rec["median_ms"], rec


def test_benchmark_torch_compile_compiles_every_case():
    """benchmarks/linear_cross_entropy.py: one torch.compile(eager_loss) serves every case; past dynamo's
    recompile limit (8 by default: 9 cases) the next case ran eager, reported as torch-compile."""
    import argparse
    import shutil

    import torch._dynamo.utils

    bench = pytest.importorskip("benchmarks.linear_cross_entropy")
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    torch._dynamo.reset()
    providers = {"torch-compile": bench.make_providers("cpu")["torch-compile"]}
    args = argparse.Namespace(device="cpu", dtype="float32", hidden=16, ignored=0.1, providers=["torch-compile"],
                              reps=1, warmup=1)
    # dynamo's own patch (monkeypatch's undo deleted the option, and every later compile failed)
    with torch._dynamo.config.patch(**{limit: 1}):  # the 2nd case stands for the 9th
        for tokens in (16, 24):
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            bench.run_case(args, providers, tokens, 50, True, lambda rec: None)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before, tokens
    torch._dynamo.reset()


def test_benchmark_records_the_versions_of_the_compared_losses(tmp_path, monkeypatch):
    """benchmarks/linear_cross_entropy.py: a run against Liger-Kernel and cut-cross-entropy names their
    versions (in its record and the table), as it does torch's."""
    import json

    bench = pytest.importorskip("benchmarks.linear_cross_entropy")
    from benchmarks import measure

    fake = {"liger-kernel": "0.6.9", "cut-cross-entropy": "25.1.1"}
    real = measure._version
    monkeypatch.setattr(measure, "_version", lambda dist: fake.get(dist) or real(dist))
    bench.main(["--quick", "--providers", "eager", "--weight", "frozen", "--reps", "1", "--out", str(tmp_path)])
    with open(tmp_path / "records.jsonl", encoding="utf-8") as f:
        (run,) = [r for r in map(json.loads, f) if r["kind"] == "run"]
    assert {k: run["versions"].get(k) for k in fake} == fake
    table = (tmp_path / "table.md").read_text()
    assert "liger-kernel 0.6.9" in table and "cut-cross-entropy 25.1.1" in table


def test_weight_grad_error_benchmark_sums_the_chunks_it_names():
    """benchmarks/weight_grad_error.py: a row "weight-dtype, k chunks" sums dW over k chunk GEMMs (the
    op leaves the ignored 10% of the rows out before chunking: k chunks of tokens / k rows were fewer)."""
    bench = pytest.importorskip("benchmarks.weight_grad_error")
    calls = []
    real = lce._chunk_logits

    def counting(*args):
        calls.append(args[0].shape[0])
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lce, "_chunk_logits", counting)
        bench.measure_errors(640, 64, 16, torch.bfloat16, [])
        fp32_calls = len(calls)  # the fp32 row's
        for k in (16, 64):
            calls.clear()
            rows = bench.measure_errors(640, 64, 16, torch.bfloat16, [k])
            assert rows[-1][0] == f"weight-dtype, {len(calls) - fp32_calls} chunks" == f"weight-dtype, {k} chunks"


def test_benchmark_quick_keeps_the_flags_given():
    """benchmarks/linear_cross_entropy.py: --quick shrinks what is not given; it replaced --reps, --tokens,
    --vocab and --hidden given with it (gpu_run.sh's dry run asked for --quick --reps 1 and got 2)."""
    bench = pytest.importorskip("benchmarks.linear_cross_entropy")
    args = bench.parse_args(["--quick", "--device", "cpu", "--reps", "1", "--warmup", "0", "--tokens", "256",
                             "--vocab", "500", "--hidden", "32"])
    assert (args.reps, args.warmup, args.tokens, args.vocab, args.hidden) == (1, 0, [256], [500], 32)
    quick = bench.parse_args(["--quick", "--device", "cpu"])
    assert (quick.reps, quick.warmup, quick.tokens, quick.vocab, quick.hidden) == (2, 1, [96], [1000], 64)
    full = bench.parse_args(["--device", "cpu"])
    assert (full.reps, full.warmup, full.tokens, full.vocab, full.hidden) == (3, 1, [1024, 4096], [32000, 128256], 1024)


def test_weight_grad_error_says_when_the_dtype_runs_in_fp32(monkeypatch, capsys):
    """benchmarks/weight_grad_error.py: on a CPU without native bf16 GEMMs the fused op computes in fp32,
    so the "weight-dtype, k chunks" rows are fp32 sums (the same numbers as the fp32 row): the table says so."""
    bench = pytest.importorskip("benchmarks.weight_grad_error")
    for native in (False, True):
        monkeypatch.setattr(lce, "cpu_computes_natively", lambda dtype, native=native: native)
        bench.main(["--tokens", "64", "--vocab", "50", "--hidden", "16", "--chunks", "2"])
        out = capsys.readouterr().out
        assert ("no native bfloat16 GEMMs" in out) is (not native), out


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("labels_dtype, value, ignore_index", [
    (torch.uint8, 246, -10),     # -10 is 246 in uint8 (V = 203)
    (torch.int16, -100, 65436),  # 65436 is -100 in int16
    (torch.int8, -56, 200),      # 200 is -56 in int8
])
def test_narrow_label_dtype_out_of_range_label_is_not_taken_for_ignored(backend, labels_dtype, value, ignore_index):
    """Labels are compared with ignore_index in int64, as the ops read them: in the labels' own
    dtype the ignore_index wrapped around, so an out-of-range label passed the check as
    "ignored" and the op, which did not ignore it, returned a NaN loss."""
    hidden, weight = torch.randn(4, H, device=DEVICE), torch.randn(V, H, device=DEVICE)
    labels = torch.tensor([1, 2, value, 3], dtype=labels_dtype, device=DEVICE)
    value_check_mode = "sync"
    with value_checks(value_check_mode), pytest.raises(ValueError, match=rf"labels\[2\] = {value} is outside"):
        linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, backend=backend)
    with value_checks(value_check_mode), pytest.raises(ValueError, match=rf"targets\[2\] = {value} is outside"):
        linear_log_probs(hidden, weight, labels, ignore_index=ignore_index, backend=backend)


@pytest.mark.parametrize("ignore_index", [-100.0, "pad", True])
def test_module_checks_ignore_index_at_construction(ignore_index):
    """As reduction, backend and weight_grad_accumulation are: a bad ignore_index is a TypeError
    when the module is built, not at its first forward."""
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        LinearCrossEntropy(ignore_index=ignore_index)
    LinearCrossEntropy(ignore_index=None)


def test_vmap_of_the_triton_path_gives_the_per_sample_losses():
    """The label check read a BatchedTensor's values under torch.func.vmap (a data-dependent branch
    that vmap refuses); it is skipped there, as the attention op's value checks are."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, 16, generator=gen).to(DEVICE)
    weight = torch.randn(37, 16, generator=gen).to(DEVICE)
    labels = torch.randint(0, 37, (3, 5), generator=gen).to(DEVICE)
    labels[0, 1] = -100

    def loss(h, y):
        return linear_cross_entropy(h, weight, y, reduction="none", backend="triton")

    got = torch.func.vmap(loss)(hidden, labels)
    torch.testing.assert_close(got, torch.stack([loss(h, y) for h, y in zip(hidden, labels, strict=True)]))
