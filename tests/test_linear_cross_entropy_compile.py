"""torch.compile of the fused linear cross-entropy and target log-probabilities: ``fullgraph=True``
(a graph break is an error), forward and backward equal to eager, on the PyTorch path (traced) and
the Triton path (the custom ops ``tgr_kernels::linear_cross_entropy_{forward,backward}``, opaque to
the compiler; on a CPU through the interpreter). The custom ops' fake implementations and
autograd registrations pass ``torch.library.opcheck``."""
import importlib
import math

import pytest
import torch

import tgr_kernels
from helpers import DEVICE, opcheck_with_fake_outputs
from tgr_kernels import linear_cross_entropy, linear_log_probs

lce = importlib.import_module("tgr_kernels.linear_cross_entropy")

V, H = 67, 33  # V not a multiple of the interpreter's vocabulary block (128 columns: one partial block)
CHUNK = 7


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Several row chunks, the last one partial."""
    monkeypatch.setattr(lce, "chunk_rows", lambda n_rows, n_vocab, device, half_gemm: min(CHUNK, n_rows))


def _inputs(lead=(2, 9), *, bias=True, weight_grad=True, dtype=torch.float32):
    hidden = torch.randn(*lead, H, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) * (3.0 / math.sqrt(H))).to(dtype).requires_grad_(weight_grad)
    b = torch.randn(V, device=DEVICE).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, lead, device=DEVICE)
    labels.view(-1)[::4] = -100
    labels.view(-1)[-1] = -100
    return hidden, weight, b, labels


def _loss_fn(backend, reduction):
    def fn(hidden, weight, bias, labels):
        return linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, backend=backend)
    return fn


def _log_probs_fn(backend):
    def fn(hidden, weight, bias, labels):
        return linear_log_probs(hidden, weight, labels.clamp(min=0), bias, backend=backend)
    return fn


def _outputs_and_grads(fn, hidden, weight, bias, labels, upstream):
    out = fn(hidden, weight, bias, labels)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, leaves, upstream)]


class _GraphRecorder:
    """A compile backend that keeps the FX graphs it is given (then runs them as they are)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> set:
        return {str(node.target) for gm in self.graphs for node in gm.graph.nodes if node.op == "call_function"}


def _assert_compiled_equals_eager(fn, compile_backend, exact, **inputs_kwargs):
    torch._dynamo.reset()
    hidden, weight, bias, labels = _inputs(**inputs_kwargs)
    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)  # a graph break raises
    eager_out = fn(hidden, weight, bias, labels)
    upstream = torch.randn_like(eager_out)
    got = _outputs_and_grads(compiled, hidden, weight, bias, labels, upstream)
    want = _outputs_and_grads(fn, hidden, weight, bias, labels, upstream)
    assert len(got) == len(want)
    for a, e in zip(got, want, strict=True):
        if exact:
            assert torch.equal(a, e)
        elif a.dtype in (torch.float16, torch.bfloat16):  # a reordered fp32 sum may round the other way
            torch.testing.assert_close(a, e)
        else:  # the compiler decomposes log_softmax, and inductor fuses and reorders fp32 arithmetic
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- fullgraph compile
# The PyTorch path is traced (the compiler decomposes its ops: equal to rounding); the Triton
# path is one opaque op per direction that runs the same code as in eager: equal bit for bit.
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fullgraph_compile_linear_cross_entropy(backend, reduction):
    _assert_compiled_equals_eager(_loss_fn(backend, reduction), "aot_eager", exact=backend == "triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_linear_log_probs(backend):
    _assert_compiled_equals_eager(_log_probs_fn(backend), "aot_eager", exact=backend == "triton", bias=False)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_frozen_weight(backend):
    """The model's case: a frozen lm_head (only d hidden and db)."""
    _assert_compiled_equals_eager(_loss_fn(backend, "mean"), "aot_eager", exact=backend == "triton",
                                  weight_grad=False)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fullgraph_compile_half_inputs(dtype, weight_grad, compile_backend):
    """Half inputs on the PyTorch path: the CPU-feature probe is a constant to the compiler (it
    reads /proc/cpuinfo), and dW by vocabulary blocks has no data-dependent shape (both broke the
    trace)."""
    _assert_compiled_equals_eager(_loss_fn("torch", "mean"), compile_backend, exact=False,
                                  weight_grad=weight_grad, dtype=dtype)


def test_fullgraph_compile_inductor():
    _assert_compiled_equals_eager(_loss_fn("torch", "mean"), "inductor", exact=False)


def test_compiled_triton_path_is_one_custom_op_per_direction():
    """The compiler sees the Triton path as the registered ops, not as a launcher to trace."""
    torch._dynamo.reset()
    hidden, weight, bias, labels = _inputs()
    recorder = _GraphRecorder()
    from torch._dynamo.backends.common import aot_autograd

    compiled = torch.compile(_loss_fn("triton", "none"), fullgraph=True,
                             backend=aot_autograd(fw_compiler=recorder, bw_compiler=recorder))
    out = compiled(hidden, weight, bias, labels)
    torch.autograd.grad(out, (hidden, weight, bias), torch.randn_like(out))
    targets = recorder.targets()
    assert "tgr_kernels.linear_cross_entropy_forward.default" in targets
    assert "tgr_kernels.linear_cross_entropy_backward.default" in targets  # "none": dW, db recomputed


def test_compiled_value_check_still_fires():
    """Inside a graph the label check is a device assertion (a RuntimeError at once on a CPU)."""
    torch._dynamo.reset()
    hidden, weight, bias, labels = _inputs()
    labels[1, 3] = V
    compiled = torch.compile(_loss_fn("torch", "mean"), fullgraph=True, backend="eager")
    with tgr_kernels.value_checks("sync"), pytest.raises(RuntimeError, match="labels has a value outside"):
        compiled(hidden, weight, bias, labels)


# ----------------------------------------------------------------------------- the Triton path in eager
def test_triton_second_derivative_raises():
    hidden, weight, bias, labels = _inputs()
    loss = linear_cross_entropy(hidden, weight, labels, bias, backend="triton")
    (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        grad.sum().backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_triton_backward_twice_with_retain_graph(reduction):
    """The saved gradients are scaled in place only when the graph is not kept."""
    hidden, weight, bias, labels = _inputs()
    upstream = torch.rand(labels.shape if reduction == "none" else (), device=DEVICE) + 0.5
    loss = linear_cross_entropy(hidden, weight, labels, bias, reduction=reduction, backend="triton")
    loss.backward(upstream, retain_graph=True)
    loss.backward(upstream * 3)
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = lce.linear_cross_entropy_ref(leaves[0], leaves[1], labels, leaves[2], reduction=reduction)
    for got, want in zip((hidden.grad, weight.grad, bias.grad),
                         torch.autograd.grad(ref, leaves, upstream.double() * 4), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_triton_no_grad_asks_for_no_gradient(monkeypatch):
    """Under no_grad (scoring) the forward op computes the losses only."""
    hidden, weight, bias, labels = _inputs()
    asked = []
    original = lce._forward_work

    def spy(*args, hidden_grad, weight_grad, bias_grad, **kwargs):
        asked.append((hidden_grad, weight_grad, bias_grad))
        return original(*args, hidden_grad=hidden_grad, weight_grad=weight_grad, bias_grad=bias_grad, **kwargs)

    monkeypatch.setattr(lce, "_forward_work", spy)
    with torch.no_grad():
        linear_log_probs(hidden, weight, labels.clamp(min=0), bias, backend="triton")
    assert asked == [(False, False, False)]


# ----------------------------------------------------------------------------- custom ops
_opcheck = opcheck_with_fake_outputs


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,with_bias,needs,per_chunk", [
    (torch.float32, True, (True, True, True), False),
    (torch.float32, False, (True, False, False), False),
    (torch.float16, True, (False, True, True), False),
    (torch.float16, True, (True, True, False), True),   # half dW summed chunk by chunk
    (torch.float32, True, (False, False, False), False),
])
def test_opcheck_linear_cross_entropy_forward(reduction, dtype, with_bias, needs, per_chunk):
    hidden, weight, bias, labels = _inputs((11,), bias=with_bias)
    hidden, weight = hidden.detach().to(dtype), weight.detach().to(dtype)
    bias = None if bias is None else bias.detach().to(dtype)
    for t, need in zip((hidden, weight, bias), needs, strict=True):
        if t is not None:
            t.requires_grad_(need)
    args = (hidden, weight, bias, labels.long(), -100, reduction, *needs[:2], needs[2] and with_bias, per_chunk)
    _opcheck(lce.linear_cross_entropy_forward, args)


def test_opcheck_linear_cross_entropy_forward_on_a_transposed_hidden():
    """d hidden comes back contiguous whatever hidden's strides, as the fake implementation says."""
    _, weight, bias, labels = _inputs((11,))
    hidden = torch.randn(H, 11, device=DEVICE).t().requires_grad_()
    _opcheck(lce.linear_cross_entropy_forward,
             (hidden, weight, bias, labels.long(), -100, "sum", True, True, True, False))


@pytest.mark.parametrize("dtype,weight_grad,bias_grad,per_chunk", [
    (torch.float32, True, True, False),
    (torch.float32, True, False, False),
    (torch.float32, False, True, False),
    (torch.float16, True, True, False),
    (torch.float16, True, False, True),   # half dW summed chunk by chunk
])
def test_opcheck_linear_cross_entropy_backward(dtype, weight_grad, bias_grad, per_chunk):
    hidden, weight, bias, labels = (t.detach().to(dtype) if t.is_floating_point() else t for t in _inputs((11,)))
    args = (hidden, weight, bias, labels.long(), torch.randn(11, device=DEVICE), -100, weight_grad, bias_grad,
            per_chunk)
    _opcheck(lce.linear_cross_entropy_backward, args,
             test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile_triton_inductor_cuda(reduction):
    _assert_compiled_equals_eager(_loss_fn("triton", reduction), "inductor", exact=False)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_with_a_changing_ignore_index(backend, mode):
    """A second ignore_index recompiles with it as a SymInt (so does ``dynamic=True`` from the
    start): the label check's assertion message must not format it (BUILD_STRING of a SymInt
    is a graph break, an error under fullgraph)."""
    def fn(hidden, weight, labels, ignore_index):
        return linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, backend=backend)

    with tgr_kernels.value_checks(mode):
        for dynamic in (None, True):
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="eager")
            for ignore_index in (-100, 3, 5):
                hidden = torch.randn(6, H, device=DEVICE)
                weight = torch.randn(V, H, device=DEVICE)
                labels = torch.randint(0, V, (6,), device=DEVICE)
                labels[0] = ignore_index
                torch.testing.assert_close(compiled(hidden, weight, labels, ignore_index),
                                           fn(hidden, weight, labels, ignore_index))
            if DEVICE == "cpu":  # on a GPU the assertion surfaces only at the next sync
                labels[1] = V + 2
                with pytest.raises(RuntimeError, match="labels has a value outside"):
                    compiled(hidden, weight, labels, 7)
