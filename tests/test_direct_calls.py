"""How the Triton paths' custom ops are called. Eager calls that need no gradient run the Triton
launchers directly, without the ops' dispatch (about 0.1 ms a call on an H200's host); every
other call goes through the ops: with a gradient to track, under torch.compile and under a
dispatch mode (an export or a tracer sees the op). Both routes give the same numbers. And the
backward of an op never receives zero tensors for its extra outputs (lse, Z, σ, the fused loss's
saved gradients): autograd would allocate one of each."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DEVICE, grouped_inputs
from tgr_kernels import linear_cross_entropy, temperature_guided_attention, temperature_projection

_ops = importlib.import_module("tgr_kernels._ops")


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _spy(monkeypatch, name):
    calls = []
    real = getattr(_ops, name)

    def spy(*args):
        calls.append(name)
        return real(*args)

    monkeypatch.setattr(_ops, name, spy)
    return calls


def _attention(q, k, v, t, **kw):
    return temperature_guided_attention(q, k, v, t, causal=True, gsot_threshold=0.3, backend="triton", **kw)


@pytest.mark.parametrize("S_q,op", [(40, "flash_attention_forward"), (1, "decode_attention_forward")],
                         ids=["flash", "decode"])
def test_attention_without_grad_skips_the_op(monkeypatch, S_q, op):
    calls = _spy(monkeypatch, op)
    q, k, v, t = grouped_inputs(1, 4, 2, S_q, 9, 16, torch.float32)
    with torch.no_grad():
        direct = _attention(q, k, v, t)
    assert calls == []
    with _OpNames() as mode, torch.no_grad():
        through_op = _attention(q, k, v, t)
    assert calls == [op] and any(op in name for name in mode.names), mode.names
    torch.testing.assert_close(direct, through_op, rtol=0, atol=0)


def test_flash_with_grad_goes_through_the_op(monkeypatch):
    calls = _spy(monkeypatch, "flash_attention_forward")
    q, k, v, t = grouped_inputs(1, 4, 2, 40, 45, 16, torch.float32)
    q.requires_grad_()
    _attention(q, k, v, t).sum().backward()
    assert calls == ["flash_attention_forward"] and q.grad is not None
    calls.clear()
    _attention(q.detach(), k, v, t)  # grad mode on, but nothing requires a gradient
    assert calls == []


def test_projection_without_grad_skips_the_op(monkeypatch):
    calls = _spy(monkeypatch, "temperature_projection_forward")
    hidden = torch.randn(2, 3, 40, device=DEVICE)
    weight = torch.nn.Parameter(torch.randn(4, 40, device=DEVICE) * 0.1)
    bias = torch.nn.Parameter(torch.zeros(4, device=DEVICE))
    with torch.no_grad():
        direct = temperature_projection(hidden, weight, bias, backend="triton")
    assert calls == []  # parameters are plain tensors: only the grad mode decides
    with _OpNames():
        through_op = temperature_projection(hidden, weight, bias, backend="triton")
    assert calls == ["temperature_projection_forward"]
    torch.testing.assert_close(direct, through_op.detach(), rtol=0, atol=0)


def test_compiled_calls_use_the_op():
    q, k, v, t = grouped_inputs(1, 4, 2, 1, 9, 16, torch.float32)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    with torch.no_grad():
        compiled = torch.compile(_attention, backend=backend, fullgraph=True)(q, k, v, t)
        torch.testing.assert_close(compiled, _attention(q, k, v, t), rtol=0, atol=0)
    assert any("decode_attention_forward" in name for name in seen), seen


class _Zeros(TorchDispatchMode):
    """The shapes of the zero-filled tensors made while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "zero" in str(func) and isinstance(out, torch.Tensor):
            self.shapes.append(tuple(out.shape))
        return out


def _backward_zeros(loss):
    with _Zeros() as mode:
        loss.backward()
    return mode.shapes


def test_fused_loss_backward_makes_no_zero_gradients():
    hidden = torch.randn(16, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(300, 32, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 300, (16,), device=DEVICE)
    zeros = _backward_zeros(linear_cross_entropy(hidden, weight, labels, backend="triton"))
    assert not {(16, 32), (300, 32)} & set(zeros), zeros


@pytest.mark.parametrize("D", [16, 300], ids=["flash", "wide"])
def test_attention_backward_makes_no_zero_gradients(D):
    """Flash: no zero lse gradient [B, H, S_q]; wide: none for Z [B, H, S_q, S_k] either."""
    q, k, v, t = grouped_inputs(1, 2, 2, 7, 7, D, torch.float32)
    q.requires_grad_()
    zeros = _backward_zeros(temperature_guided_attention(q, k, v, t, backend="triton").sum())
    assert not {(1, 2, 7), (1, 2, 7, 7)} & set(zeros), zeros


def test_projection_backward_makes_no_zero_gradients():
    hidden = torch.randn(5, 40, device=DEVICE, requires_grad=True)
    weight = torch.randn(4, 40, device=DEVICE, requires_grad=True)
    zeros = _backward_zeros(temperature_projection(hidden, weight, backend="triton").sum())
    assert (5, 4) not in zeros, zeros
