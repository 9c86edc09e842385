"""torch.compile and autocast: the ops compile with ``fullgraph=True`` (no graph break), forward
and backward equal to eager; the Triton paths are custom ops whose fake implementations and
autograd registrations pass ``torch.library.opcheck``; under autocast the ops compute in the
dtypes they promise, forward and backward."""
import pytest
import torch

import tgr_kernels
from helpers import DEVICE, opcheck_with_fake_outputs
from tgr_kernels import _ops, temperature_guided_attention, temperature_projection

HIDDEN, HEADS = 32, 4


def _make(D, mask_kind, B=2, S=8, H=1, dtype=torch.float32, same_qkv=False):
    hidden = torch.randn(B, S, HIDDEN, device=DEVICE, requires_grad=True)
    weight = (torch.randn(HEADS, HIDDEN, device=DEVICE) * 0.2).requires_grad_()
    bias = torch.randn(HEADS, device=DEVICE, requires_grad=True)
    if same_qkv:
        x = torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, requires_grad=True)
        qkv = [x]
    else:
        qkv = [torch.randn(B, H, S, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]
    mask = None
    if mask_kind == "kpm":
        mask = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
        mask[0, -3:] = False
    elif mask_kind == "additive":  # HF's form: a large finite negative value on masked keys
        mask = torch.zeros(B, 1, S, S, device=DEVICE)
        mask[1, :, :, -2:] = torch.finfo(torch.float32).min
    return [hidden, weight, bias, *qkv], mask


def _tgr_head(backend, causal=True):
    def head(hidden, weight, bias, *qkv_and_mask):
        *qkv, mask = qkv_and_mask
        q, k, v = qkv if len(qkv) == 3 else qkv * 3
        temperatures = temperature_projection(hidden, weight, bias, backend=backend)
        return temperature_guided_attention(q, k, v, temperatures, mask, causal=causal, gsot_threshold=0.3,
                                            backend=backend)
    return head


def _run(fn, leaves, mask, grad_out=None):
    out = fn(*leaves, mask)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, leaves, grad_out), grad_out


def _assert_compiled_equals_eager(backend, D, mask_kind, compile_backend, exact, same_qkv=False):
    torch._dynamo.reset()
    leaves, mask = _make(D, mask_kind, same_qkv=same_qkv)
    head = _tgr_head(backend)
    compiled = torch.compile(head, fullgraph=True, backend=compile_backend)  # a graph break is an error
    out, grads, grad_out = _run(compiled, leaves, mask)
    out_e, grads_e, _ = _run(head, leaves, mask, grad_out)
    pairs = [(out, out_e)] + list(zip(grads, grads_e, strict=True))
    for got, want in pairs:
        if exact:
            assert torch.equal(got, want)
        else:  # inductor fuses and reorders fp32 arithmetic
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- fullgraph compile
@pytest.mark.parametrize("D", [16, 300])
@pytest.mark.parametrize("mask_kind", [None, "kpm", "additive"])
def test_fullgraph_compile_torch_backend(D, mask_kind):
    _assert_compiled_equals_eager("torch", D, mask_kind, "aot_eager", exact=True)


def test_fullgraph_compile_torch_backend_inductor():
    _assert_compiled_equals_eager("torch", 16, "kpm", "inductor", exact=False)


@pytest.mark.parametrize("D,same_qkv", [(16, False), (300, False), (300, True)])
@pytest.mark.parametrize("mask_kind", [None, "additive"])
def test_fullgraph_compile_triton_backend(D, same_qkv, mask_kind):
    """On a CPU the Triton paths run under the interpreter; the compiler sees the custom ops."""
    _assert_compiled_equals_eager("triton", D, mask_kind, "aot_eager", exact=True, same_qkv=same_qkv)


@pytest.mark.parametrize("mode", ["sync", "async", "auto", "off"])
def test_value_checks_do_not_break_the_graph(mode):
    """Inside torch.compile no check branches on data: "sync" becomes a device assertion."""
    with tgr_kernels.value_checks(mode):
        _assert_compiled_equals_eager("torch", 16, "additive", "eager", exact=True)


def test_compiled_value_check_still_fires():
    torch._dynamo.reset()
    leaves, _ = _make(16, None)
    hidden, weight, bias, q, k, v = leaves
    mask = torch.zeros(2, 1, 8, 8, device=DEVICE)
    mask[0, 0, 1, 1] = float("inf")

    def fn(q, k, v, t, mask):
        return temperature_guided_attention(q, k, v, t, mask, backend="torch")

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    with pytest.raises(RuntimeError, match="attn_mask"):
        compiled(q, k, v, torch.rand(2, 8, device=DEVICE), mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_op_recompiles_for_a_new_length(backend):
    """A second length recompiles the graph with dynamic sequence dims: the value checks'
    assertion messages must not format those symbolic shapes (a graph break, an error under
    fullgraph), and the check still fires for a later length."""
    torch._dynamo.reset()

    def fn(q, k, v, t, mask):
        return temperature_guided_attention(q, k, v, t, mask, causal=True, gsot_threshold=0.4, backend=backend)

    def inputs(S):
        q, k, v = (torch.randn(1, 2, S, 16, device=DEVICE) for _ in range(3))
        return q, k, v, torch.rand(1, S, device=DEVICE) + 0.2, torch.zeros(1, 1, 1, S, device=DEVICE)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    with tgr_kernels.value_checks("async"):
        for S in (3, 5, 6):
            args = inputs(S)
            torch.testing.assert_close(compiled(*args), fn(*args))
        if DEVICE == "cpu":  # on a GPU the assertion surfaces only at the next sync
            q, k, v, t, mask = inputs(7)
            t[0, 2] = float("nan")
            with pytest.raises(RuntimeError, match="temperature"):
                compiled(q, k, v, t, mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fullgraph_compile_with_dynamic_shapes(backend):
    """``dynamic=True`` makes Python floats (the gate's width, τ, scale) SymFloats: the input
    checks must not hand them to ``math.isfinite``/``math.isnan`` (a graph break)."""
    torch._dynamo.reset()

    def fn(q, k, v, t):
        return temperature_guided_attention(q, k, v, t, causal=True, gsot_threshold=0.4, gsot_mode="soft",
                                            scale=0.3, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="eager")
    for S in (3, 5):
        q, k, v = (torch.randn(1, 2, S, 16, device=DEVICE, requires_grad=True) for _ in range(3))
        t = (torch.rand(1, S, device=DEVICE) + 0.2).requires_grad_()
        out, grads, grad_out = _run(lambda *a: compiled(*a[:4]), [q, k, v, t], None)
        out_e, grads_e, _ = _run(lambda *a: fn(*a[:4]), [q, k, v, t], None, grad_out)
        for got, want in [(out, out_e)] + list(zip(grads, grads_e, strict=True)):
            torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------- custom ops
_opcheck = opcheck_with_fake_outputs


def _attention_op_args(D, mask_kind, gsot, causal):
    B, H, S = 1, 2, 5
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, requires_grad=True) for _ in range(3))
    t_bar = (torch.rand(B, S, device=DEVICE) * 0.98 + 0.01).requires_grad_()
    key_padding = additive = None
    if mask_kind == "kpm":
        key_padding = torch.tensor([[True, True, False, True, False]], device=DEVICE)
    elif mask_kind == "additive":
        additive = torch.randn(B, 1, S, S, device=DEVICE)
        additive[..., 0, :] = float("-inf")
    # A learning gate (straight-through, mode 1) where GSoT is on: the ops' gate fields in full.
    return q, k, v, t_bar, key_padding, additive, causal, gsot, 0 if gsot is None else 1, 0.05, D ** -0.5


@pytest.mark.parametrize("mask_kind,gsot,causal", [(None, None, False), ("kpm", 0.4, True), ("additive", 0.2, False)])
def test_opcheck_flash_attention(mask_kind, gsot, causal):
    args = _attention_op_args(16, mask_kind, gsot, causal)
    _opcheck(_ops.flash_attention_forward, args)
    q, k, v, t_bar = args[:4]
    with torch.no_grad():
        out, lse = _ops.flash_attention_forward(*args)
    grad_out = torch.randn_like(out)
    for need_dq, need_dkv in ((True, True), (False, True), (False, False)):
        _opcheck(_ops.flash_attention_backward,
                              (*[a.detach() if isinstance(a, torch.Tensor) else a for a in args],
                               lse, grad_out, need_dq, need_dkv),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("mask_kind,gsot,causal", [(None, None, True), ("kpm", 0.4, False)])
@pytest.mark.parametrize("keep_scores,same_qkv,chunk_rows", [
    (True, False, None), (False, False, 2), (True, True, None), (False, True, 2),
])
def test_opcheck_wide_attention(mask_kind, gsot, causal, keep_scores, same_qkv, chunk_rows):
    q, k, v, t_bar, key_padding, additive, causal, *gate, scale = _attention_op_args(272, mask_kind, gsot, causal)
    if same_qkv:
        k = v = q
    B, H, S, _ = q.shape
    chunk_bytes = 64 << 20 if chunk_rows is None else B * H * S * q.element_size() * chunk_rows
    args = (q, k, v, t_bar, key_padding, additive, causal, *gate, scale, chunk_bytes, keep_scores, same_qkv)
    _opcheck(_ops.wide_attention_forward, args)
    with torch.no_grad():
        out, lse, scores = _ops.wide_attention_forward(*args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:12]]
    for need_dq, need_dkv in ((True, True), (False, True), (True, False)):
        _opcheck(_ops.wide_attention_backward,
                              (*detached, lse, scores, torch.randn_like(out), need_dq, need_dkv, same_qkv),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("hidden_dtype,weight_dtype,with_bias", [
    (torch.float32, torch.float32, True), (torch.float16, torch.float32, False), (torch.float16, torch.float16, True),
])
def test_opcheck_temperature_projection(hidden_dtype, weight_dtype, with_bias):
    hidden = torch.randn(7, 40, device=DEVICE, dtype=hidden_dtype, requires_grad=True)
    weight = (torch.randn(3, 40, device=DEVICE) * 0.2).to(weight_dtype).requires_grad_()
    bias = torch.randn(3, device=DEVICE, dtype=weight_dtype, requires_grad=True) if with_bias else None
    for save_sigma in (True, False):  # without σ saved, the backward recomputes it
        _opcheck(_ops.temperature_projection_forward, (hidden, weight, bias, 0.01, 0.99, save_sigma))
    with torch.no_grad():
        out, sigma = _ops.temperature_projection_forward(hidden, weight, bias, 0.01, 0.99, True)
    for need in ((True, True, with_bias), (False, True, False), (True, False, False)):
        _opcheck(_ops.temperature_projection_backward,
                              (torch.randn_like(out), sigma, weight.detach(), hidden.detach(), 0.01, 0.99, *need),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("D", [16, 300])
def test_attention_under_autocast_computes_in_the_autocast_dtype(backend, D):
    """Under autocast q, k, v are cast to the autocast dtype (as PyTorch's attention is) and
    nothing inside is recast, forward or backward, even when backward runs inside the region."""
    leaves, _ = _make(D, None)
    hidden, weight, bias, q, k, v = leaves
    temperature = torch.rand(2, 8, 3, device=DEVICE, requires_grad=True)
    inputs = [q, k, v, temperature]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = temperature_guided_attention(q, k, v, temperature, causal=True, backend=backend)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert out.dtype == torch.bfloat16
    expected = temperature_guided_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), temperature, causal=True,
                                            backend=backend)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    assert torch.equal(out, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        assert g.dtype == e.dtype
        assert torch.equal(g, e)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_projection_is_unchanged_by_autocast(backend, hidden_dtype):
    """The projection computes in its inputs' dtypes with fp32 accumulation and sigmoid: the
    temperatures of an autocast model are as precise as without autocast. The Triton path's
    backward (a custom op) is also unaffected when run inside the autocast region; the torch
    path is plain autograd, whose backward PyTorch runs outside autocast (its documented use)."""
    hidden = torch.randn(2, 9, 48, device=DEVICE).to(hidden_dtype).requires_grad_()
    weight = (torch.randn(5, 48, device=DEVICE) * 0.2).requires_grad_()
    bias = torch.randn(5, device=DEVICE, requires_grad=True)
    leaves = [hidden, weight, bias]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = temperature_projection(hidden, weight, bias, backend=backend)
        grad_out = torch.randn_like(out)
        if backend == "triton":
            grads = torch.autograd.grad(out, leaves, grad_out)
    if backend != "triton":
        grads = torch.autograd.grad(out, leaves, grad_out)
    expected = temperature_projection(hidden, weight, bias, backend=backend)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.equal(g, e)


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("D", [64, 320])
def test_no_host_sync_on_cuda(backend, D):
    """With the default value checks, a forward and backward with masks never synchronises
    the host with the GPU (CUDA's sync debug mode turns any sync into an error)."""
    leaves, mask = _make(D, "additive")
    keep = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    keep[0, -2:] = False
    head = _tgr_head(backend)
    for m in (mask, keep):
        _run(head, leaves, m)  # warm-up: compiles the kernels, fills caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = head(*leaves, m)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 320])
def test_fullgraph_compile_triton_backend_inductor_cuda(D):
    _assert_compiled_equals_eager("triton", D, "additive", "inductor", exact=False)
