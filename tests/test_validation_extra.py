"""Inputs real callers send: clear errors for the wrong ones, no silent NaN rows, the value-check
switch (and that it really removes the host syncs), double backward, bf16 under the interpreter."""
import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tgr_kernels
from helpers import DEVICE
from parity import assert_parity
from tgr_kernels import _backend, temperature_guided_attention, temperature_projection
from tgr_kernels._validation import check_attention_inputs
from tgr_kernels.reference import temperature_guided_attention_ref, temperature_projection_ref

BACKENDS = ["triton", "torch", "reference"]
interpreter_only = pytest.mark.skipif(DEVICE != "cpu" or not _backend.TRITON_INTERPRET,
                                      reason="checks the Triton interpreter on a CPU")


def _inputs(B=2, H=1, S=6, D=16, dtype=torch.float32, T=3):
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype) for _ in range(3))
    temperature = torch.rand(B, S, T, device=DEVICE) * 0.98 + 0.01
    return q, k, v, temperature


class _HostSyncs(TorchDispatchMode):
    """Records the ops that copy a value to the host (``.item()``, ``bool(t)``, boolean indexing)."""

    SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC_OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- errors that name the argument
@pytest.mark.parametrize("backend", BACKENDS)
def test_python_list_mask_is_a_type_error_naming_attn_mask(backend):
    q, k, v, temperature = _inputs()
    mask = [[1] * 6, [1] * 6]
    with pytest.raises(TypeError, match="attn_mask"):
        temperature_guided_attention(q, k, v, temperature, mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_temperature_is_a_value_error(backend, bad):
    q, k, v, temperature = _inputs()
    temperature[1, 2, 0] = bad
    with pytest.raises(ValueError, match="temperature"):
        temperature_guided_attention(q, k, v, temperature, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_plus_inf_or_nan_in_additive_mask_is_a_value_error(backend, bad):
    q, k, v, temperature = _inputs()
    mask = torch.zeros(2, 1, 6, 6, device=DEVICE)
    mask[0, 0, 3, 1] = -math.inf  # allowed: masks one key
    mask[1, 0, 2, 4] = bad
    with pytest.raises(ValueError, match="attn_mask"):
        temperature_guided_attention(q, k, v, temperature, mask, backend=backend)


def test_minus_inf_in_additive_mask_is_accepted():
    q, k, v, temperature = _inputs()
    mask = torch.zeros(2, 1, 1, 6, device=DEVICE)
    mask[..., -2:] = -math.inf
    out = temperature_guided_attention(q, k, v, temperature, mask, backend="torch")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_for_gsot_threshold_and_scale(backend):
    q, k, v, temperature = _inputs()
    expected = temperature_guided_attention(q, k, v, temperature, gsot_threshold=0.5, scale=0.25,
                                            backend=backend)
    for gsot, scale in ((np.float32(0.5), np.float32(0.25)), (np.float64(0.5), np.float64(0.25))):
        out = temperature_guided_attention(q, k, v, temperature, gsot_threshold=gsot, scale=scale,
                                           backend=backend)
        assert torch.equal(out, expected)


def test_bools_are_still_not_numbers():
    q, k, v, temperature = _inputs()
    with pytest.raises(ValueError, match="scale"):
        temperature_guided_attention(q, k, v, temperature, scale=np.bool_(True))
    with pytest.raises(TypeError, match="gsot_threshold"):
        temperature_guided_attention(q, k, v, temperature, gsot_threshold=True)


# ----------------------------------------------------------------------------- the value-check switch
def test_value_check_modes_and_context_manager():
    assert tgr_kernels.get_value_checks() == "auto"
    with pytest.raises(ValueError, match="value-check mode"):
        tgr_kernels.set_value_checks("sometimes")
    with tgr_kernels.value_checks("off"):
        assert tgr_kernels.get_value_checks() == "off"
        with tgr_kernels.value_checks("async"):
            assert tgr_kernels.get_value_checks() == "async"
        assert tgr_kernels.get_value_checks() == "off"
    assert tgr_kernels.get_value_checks() == "auto"
    previous = tgr_kernels.set_value_checks("sync")
    try:
        assert previous == "auto"
    finally:
        tgr_kernels.set_value_checks(previous)


def test_off_skips_value_checks_and_async_asserts_on_device():
    q, k, v, temperature = _inputs()
    temperature[0, 0, 0] = math.inf
    with tgr_kernels.value_checks("off"):
        check_attention_inputs(q, k, v, temperature, None, False, None, None)  # no error: not checked
    with tgr_kernels.value_checks("async"), pytest.raises(RuntimeError, match="temperature"):
        # A device assertion: on a CPU it fails at once, on a GPU at the next synchronising call.
        check_attention_inputs(q, k, v, temperature, None, False, None, None)


def test_auto_reads_no_values_off_the_cpu():
    """"auto" on a non-CPU device reads no values. Meta tensors have none to read: any value
    check would fail on them, so this stands in for a GPU, where a read is a host sync."""
    q, k, v, temperature = (t.to("meta") for t in _inputs())
    mask = torch.zeros(2, 1, 6, 6, device="meta")
    args = check_attention_inputs(q, k, v, temperature, mask, True, 0.5, None)
    assert args.additive is mask
    with tgr_kernels.value_checks("sync"), pytest.raises(NotImplementedError, match="meta tensor"):
        check_attention_inputs(q, k, v, temperature, mask, True, 0.5, None)


@pytest.mark.parametrize("mode", ["off", "async"])
@pytest.mark.parametrize("D", [16, 300])
@pytest.mark.parametrize("mask_kind", ["bool2d", "float2d", "additive"])
def test_no_host_sync_in_attention_forward_and_backward(mode, D, mask_kind):
    q, k, v, temperature = _inputs(D=D)
    q.requires_grad_()
    temperature.requires_grad_()
    keep = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    keep[1, -2:] = False
    mask = {"bool2d": keep, "float2d": keep.float(),
            "additive": ((~keep).float() * -1e9)[:, None, None, :]}[mask_kind]
    with tgr_kernels.value_checks(mode), _HostSyncs() as syncs:
        out = temperature_guided_attention(q, k, v, temperature, mask, causal=True, gsot_threshold=0.3,
                                           backend="torch")
        torch.autograd.grad(out, [q, temperature], torch.ones_like(out))
    assert syncs.seen == []


def test_sync_mode_is_one_transfer_and_reports_the_bad_input():
    q, k, v, temperature = _inputs()
    mask = torch.zeros(2, 1, 6, 6, device=DEVICE)
    mask[0, 0, 0, 0] = math.inf
    with tgr_kernels.value_checks("sync"), pytest.raises(ValueError, match=r"attn_mask .*\+inf"):
        temperature_guided_attention(q, k, v, temperature, mask, backend="torch")


def test_training_statistics_need_no_host_sync():
    from tgr.train import step_statistics

    B, S, T = 3, 7, 4
    temperatures = torch.rand(B, S, T)
    gsot_mask = torch.rand(B, S) > 0.4
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[1, -3:] = 0
    lm_loss = torch.tensor(2.5)
    with _HostSyncs() as syncs:
        stats = step_statistics(temperatures, gsot_mask, lm_loss, attention_mask)
    assert syncs.seen == []
    # The formulas of the boolean-indexed version they replace.
    real = attention_mask.bool()
    values = temperatures.float().mean(-1)[real]
    assert stats["temperature_mean"].item() == pytest.approx(values.mean().item(), rel=1e-6)
    assert stats["temperature_std"].item() == pytest.approx(values.std().item(), rel=1e-5)
    assert stats["gsot_pruned"].item() == pytest.approx(1.0 - gsot_mask[real].float().mean().item(), rel=1e-6)
    assert stats["lm_loss"].item() == 2.5
    one = step_statistics(temperatures[:1, :1], gsot_mask[:1, :1], lm_loss, None)
    assert one["temperature_std"].item() == 0.0


# ----------------------------------------------------------------------------- double backward
def _second_derivative(fn, leaves):
    out = fn(*leaves)
    weight = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, weight, create_graph=True)
    # Weighted so that a missing dependence on the inputs cannot hide behind a zero.
    total = sum((g * torch.randn_like(g)).sum() for g in grads) + leaves[0].sum()
    return torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("D", [16, 300])
def test_attention_double_backward_raises_clearly(backend, D):
    """The fused paths do not implement second derivatives: a RuntimeError that says so,
    never silently wrong values (including when the incoming gradient is a constant)."""
    q, k, v, temperature = _inputs(D=D)
    leaves = [t.requires_grad_() for t in (q, k, v, temperature)]

    def fn(q, k, v, t):
        return temperature_guided_attention(q, k, v, t, causal=True, backend=backend)

    with pytest.raises(RuntimeError, match="second derivatives"):
        _second_derivative(fn, leaves)


@pytest.mark.parametrize("D", [16, 300])
def test_attention_triton_double_backward_error_suggests_a_backend_that_works(D):
    """The Triton attention paths' error named backend='torch', whose attention paths refuse
    second derivatives as well: the advice must name only backends that differentiate twice."""
    q, k, v, temperature = _inputs(B=1, S=3, D=D)
    leaves = [t.requires_grad_() for t in (q, k, v, temperature)]
    with pytest.raises(RuntimeError, match="second derivatives") as raised:
        _second_derivative(lambda q, k, v, t: temperature_guided_attention(q, k, v, t, backend="triton"), leaves)
    suggested = [b for b in ("torch", "reference") if f"backend='{b}'" in str(raised.value)]
    assert suggested
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    for backend in suggested:
        _second_derivative(lambda q, k, v, t, b=backend: temperature_guided_attention(q, k, v, t, backend=b), leaves64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_second_derivative_with_a_frozen_lm_head_raises(reduction):
    """A gradient penalty on d loss / d hidden with a frozen lm_head (the model's case): the PyTorch
    path kept no tensor that leads back to hidden, so the second-order term was silently dropped."""
    hidden = torch.randn(3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, device=DEVICE)
    labels = torch.tensor([1, 2, 3], device=DEVICE)
    loss = tgr_kernels.linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend="torch").sum()
    (dh,) = torch.autograd.grad(loss, [hidden], create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(loss + dh.square().sum(), [hidden])


@pytest.mark.parametrize("op", ["attention", "wide attention", "linear_cross_entropy"])
def test_jvp_through_the_torch_paths_raises_not_zeros(op):
    """``torch.autograd.functional.jvp`` differentiates the backward with respect to the incoming
    gradient, and reads a missing path as zeros: the fused paths' jvp came back all zeros."""
    if op == "linear_cross_entropy":
        weight = torch.randn(5, 4, dtype=torch.float64, device=DEVICE)
        labels = torch.tensor([1, 2, 3], device=DEVICE)
        x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)

        def fn(h):
            return tgr_kernels.linear_cross_entropy(h, weight, labels, reduction="none", backend="torch")
    else:
        q, k, v, temperature = _inputs(B=1, S=3, D=300 if op == "wide attention" else 8, dtype=torch.float64)
        x = q

        def fn(q):
            return temperature_guided_attention(q, k, v, temperature, backend="torch")
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.functional.jvp(fn, x, torch.ones_like(x))


def test_attention_double_backward_reference_matches_gradgradcheck():
    q, k, v, temperature = _inputs(B=1, S=4, D=8, dtype=torch.float64)
    temperature = temperature.double()
    leaves = [t.requires_grad_() for t in (q, k, v, temperature)]
    assert torch.autograd.gradgradcheck(
        lambda q, k, v, t: temperature_guided_attention(q, k, v, t, causal=True, backend="reference"), leaves)


def test_projection_double_backward_torch_is_correct():
    hidden = torch.randn(5, 12, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 12, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    # Clamp bounds wide enough that no σ sits on a kink.
    assert torch.autograd.gradgradcheck(
        lambda h, w, b: temperature_projection(h, w, b, 0.0, 1.0, backend="torch"), (hidden, weight, bias))


def test_projection_double_backward_triton_raises_clearly():
    hidden = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    weight = torch.randn(3, 12, device=DEVICE, requires_grad=True)
    bias = torch.randn(3, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        _second_derivative(lambda h, w, b: temperature_projection(h, w, b, backend="triton"),
                           [hidden, weight, bias])


# ----------------------------------------------------------------------------- bf16 under the interpreter
@interpreter_only
@pytest.mark.parametrize("D", [32, 300])
def test_bf16_attention_under_the_interpreter_is_correct(D):
    B, H, S = 2, 1, 12
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    temperature = (torch.rand(B, S, 3) * 0.98 + 0.01).requires_grad_()
    leaves = [q, k, v, temperature]
    out = temperature_guided_attention(q, k, v, temperature, causal=True, backend="triton")
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    eager = temperature_guided_attention_ref(q, k, v, temperature, causal=True, upcast=False)
    eager_grads = torch.autograd.grad(eager, leaves, grad_out)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = temperature_guided_attention_ref(*l64, causal=True)
    truth_grads = torch.autograd.grad(truth, l64, grad_out.double())
    assert_parity("out", out, eager, truth, torch.bfloat16)
    for name, g, ge, gt in zip("qkvt", grads, eager_grads, truth_grads, strict=True):
        assert g.dtype == leaves["qkvt".index(name)].dtype
        assert_parity(f"d{name}", g, ge, gt, torch.bfloat16 if name != "t" else torch.float32)


@interpreter_only
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_bf16_projection_under_the_interpreter_is_correct(weight_dtype):
    hidden = torch.randn(3, 10, 96, dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(8, 96) * 0.1).to(weight_dtype).requires_grad_()
    bias = torch.randn(8).to(weight_dtype).requires_grad_()
    leaves = [hidden, weight, bias]
    out = temperature_projection(hidden, weight, bias, backend="triton")
    assert out.dtype == torch.promote_types(torch.bfloat16, weight_dtype)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    eager = temperature_projection_ref(hidden, weight, bias, upcast=False)
    eager_grads = torch.autograd.grad(eager, leaves, grad_out)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    truth = temperature_projection_ref(*l64)
    truth_grads = torch.autograd.grad(truth, l64, grad_out.double())
    assert_parity("t", out, eager, truth, torch.bfloat16)
    for name, g, ge, gt, leaf in zip(("dh", "dW", "db"), grads, eager_grads, truth_grads, leaves, strict=True):
        assert g.dtype == leaf.dtype
        assert_parity(name, g, ge, gt, torch.bfloat16)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_meta_tensors_give_shapes(backend):
    """Meta tensors (shape inference, models built on the meta device) run through the PyTorch
    paths: no autocast query on a device type that has none, no value check that reads data."""
    meta = torch.device("meta")
    hidden = torch.empty(2, 3, 16, device=meta, dtype=torch.bfloat16)
    weight, bias = torch.empty(4, 16, device=meta), torch.empty(4, device=meta)
    assert temperature_projection(hidden, weight, bias, backend=backend).shape == (2, 3, 4)
    q = torch.empty(1, 2, 5, 8, device=meta)
    out = temperature_guided_attention(q, q, q, torch.empty(1, 5, device=meta), backend=backend)
    assert out.shape == (1, 2, 5, 8) and out.device == meta
    lm_head = torch.empty(50, 16, device=meta, dtype=torch.bfloat16)
    labels = torch.zeros(2, 3, dtype=torch.long, device=meta)
    assert tgr_kernels.linear_cross_entropy(hidden, lm_head, labels, backend=backend).shape == ()
    assert tgr_kernels.linear_log_probs(hidden, lm_head, labels, backend=backend).shape == (2, 3)


@pytest.mark.parametrize("capability,auto", [(70, "torch"), (75, "torch"), (80, "triton"), (86, "triton"),
                                             (89, "triton"), (90, "triton"), (120, "triton")])
def test_gpus_older_than_ampere_run_the_torch_backend(monkeypatch, capability, auto):
    """The Triton tiles are checked for sm_80, sm_86 and sm_90 only: on a V100 or T4 (less shared
    memory per block, no bf16 tensor cores) "auto" chose them anyway."""
    monkeypatch.setitem(_backend._CAPABILITIES, 0, capability)
    cuda = torch.device("cuda", 0)
    assert _backend.resolve_backend("auto", cuda) == auto
    assert _backend.resolve_backend("torch", cuda) == "torch"
    if auto == "triton":
        assert _backend.resolve_backend("triton", cuda) == "triton"
    else:
        with pytest.raises(RuntimeError, match=r"compute capability 8\.0 or newer.*is 7\.\d.*backend='torch'"):
            _backend.resolve_backend("triton", cuda)
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_the_flash_tiles_follow_the_compute_capability():
    """Cards with 99 KiB of shared memory per block get the sm_86 tile set, Hopper sm_90's, the rest sm_80's."""
    from tgr_kernels import _configs

    assert [_configs._arch_name(cc) for cc in (80, 86, 87, 89, 90, 100, 120, 121)] == [
        "sm_80", "sm_86", "sm_80", "sm_86", "sm_90", "sm_80", "sm_86", "sm_86"]
