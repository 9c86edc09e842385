"""Parity and behaviour tests for the temperature projection (TTM) op and its module.

Criterion (tests/parity.py): against a float64 reference, a backend's max abs error must be at most
2x the error of PyTorch's eager op in the same low precision, plus a floor per dtype.
"""
import importlib
import math

import pytest
import torch
import torch.nn as nn

from helpers import DEVICE
from tgr_kernels import _backend
from tgr_kernels.reference import temperature_projection_ref
from tgr_kernels.temperature_projection import TemperatureMechanism, temperature_projection

# The op's module itself (to patch its internals): a package that re-exports the function
# ``temperature_projection`` shadows the submodule's attribute, so fetch it by name.
tp_module = importlib.import_module("tgr_kernels.temperature_projection")

FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
ON_CUDA = DEVICE == "cuda"
# bf16 arithmetic is wrong under Triton's interpreter: bf16 runs only on a GPU.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.cuda, id="bf16")

# (leading dims, H, T, (clamp_min, clamp_max)): sizes that are not multiples of any block.
CASES = [
    ((1, 1), 65, 1, (0.01, 0.99)),  # H one past a BLOCK_K = 64 boundary
    ((2, 7), 97, 4, (0.2, 0.8)),
    ((3, 113), 40, 8, (0.01, 0.99)),
    ((1, 203), 97, 17, (0.3, 0.7)),
]
CASE_IDS = ["1x1-H65-T1", "2x7-H97-T4", "3x113-H40-T8", "1x203-H97-T17"]


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def make_inputs(lead, H, T, hidden_dtype, weight_dtype=None, bias=True, device=DEVICE,
                requires=(True, True, True), logit_scale=2.0):
    """hidden [*lead, H], weight [T, H], bias [T]; logits ~ N(0, logit_scale²) so some clamp."""
    weight_dtype = weight_dtype or hidden_dtype
    hidden = torch.randn(*lead, H, device=device).to(hidden_dtype)
    weight = (torch.randn(T, H, device=device) * (logit_scale / math.sqrt(H))).to(weight_dtype)
    b = torch.randn(T, device=device).to(weight_dtype) if bias else None
    for t, req in zip((hidden, weight, b), requires, strict=True):
        if t is not None:
            t.requires_grad_(req)
    return hidden, weight, b


def forward_backward(fn, hidden, weight, bias, upstream):
    """Output and the gradients of the inputs that require grad (None for the others)."""
    out = fn(hidden, weight, bias)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, leaves, upstream) if leaves else ())
    return [out.detach()] + [
        next(grads) if (t is not None and t.requires_grad) else None for t in (hidden, weight, bias)
    ]


def float64_copy(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def assert_matches_float64(backend, hidden, weight, bias, clamp, upstream=None):
    """Check output and gradients of ``backend`` against float64, relative to eager's error."""
    clamp_min, clamp_max = clamp
    out_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    floor = max(FLOOR[hidden.dtype], FLOOR[weight.dtype])
    if upstream is None:
        upstream = torch.randn(*hidden.shape[:-1], weight.shape[0], device=hidden.device).to(out_dtype)

    got = forward_backward(
        lambda h, w, b: temperature_projection(h, w, b, clamp_min, clamp_max, backend=backend),
        hidden, weight, bias, upstream,
    )
    eager = forward_backward(
        lambda h, w, b: temperature_projection_ref(h, w, b, clamp_min, clamp_max, upcast=False),
        hidden, weight, bias, upstream,
    )
    exact = forward_backward(
        lambda h, w, b: temperature_projection_ref(h, w, b, clamp_min, clamp_max),
        float64_copy(hidden), float64_copy(weight), float64_copy(bias), upstream.double(),
    )
    assert got[0].dtype == out_dtype and got[0].shape == exact[0].shape
    for name, g, e, x, src in zip(("out", "d_hidden", "d_weight", "d_bias"), got, eager, exact,
                                  (None, hidden, weight, bias), strict=True):
        if x is None:
            assert g is None, f"{name}: expected no gradient"
            continue
        if src is not None:
            assert g.dtype == src.dtype and g.shape == src.shape, f"{name}: {g.dtype} {g.shape}"
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        err = (g.double() - x).abs().max().item()
        eager_err = (e.double() - x).abs().max().item()
        assert err <= 2 * eager_err + floor, f"{name}: error {err:.3g} vs eager {eager_err:.3g} + {floor}"
    return got


def rand_upstream(lead, T, dtype, device=DEVICE):
    return torch.randn(*lead, T, device=device).to(dtype)


# ------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_matches_float64(backend, dtype, case):
    lead, H, T, clamp = case
    hidden, weight, bias = make_inputs(lead, H, T, dtype)
    assert_matches_float64(backend, hidden, weight, bias, clamp)


@pytest.mark.parametrize("hidden_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_mixed_dtypes_half_hidden_fp32_head(backend, hidden_dtype):
    """The model's case: half hidden states from the base, fp32 head weights -> fp32 temperatures.

    Runs under the interpreter too: the kernel only loads bf16 and casts it to fp32.
    """
    hidden, weight, bias = make_inputs((2, 45), 97, 8, hidden_dtype, weight_dtype=torch.float32)
    got = assert_matches_float64(backend, hidden, weight, bias, (0.01, 0.99))
    assert got[0].dtype == torch.float32


_OTHER_MIXES = [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float16),
                (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("hidden_dtype,weight_dtype", _OTHER_MIXES,
                         ids=["fp32h-bf16W", "fp32h-fp16W", "bf16h-fp16W", "fp16h-bf16W"])
def test_mixed_dtypes_with_a_half_operand_multiply_on_tensor_cores(hidden_dtype, weight_dtype):
    """Every other (hidden, weight) pair the op takes: a dot with a half operand runs on tensor cores
    ("tf32x3", or "tf32" when both operands are half and so exact in tf32), never as scalar fp32
    FMAs ("ieee"), whose kernels spilled 8-168 B on sm_90 and sm_80 (python -m tgr_kernels.aot);
    the temperatures still match float64."""
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's default: fp32 dots would be "ieee"
    precision = tp_module._precision(hidden_dtype, weight_dtype)
    both_half = hidden_dtype != torch.float32 and weight_dtype != torch.float32
    assert precision == ("tf32" if both_half else "tf32x3")
    hidden, weight, bias = make_inputs((2, 45), 97, 8, hidden_dtype, weight_dtype=weight_dtype)
    assert_matches_float64("triton", hidden, weight, bias, (0.01, 0.99))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bias_cancelling_a_large_product(backend, dtype):
    """A constant outlier dimension of the hidden states (C = 256 on every token) and a bias that
    cancels its product: z stays O(1) while h·Wᵀ is ~400. The bias must enter before the one
    rounding of a half GEMM, as in eager's F.linear: added after it, the PyTorch path's bf16
    output was 0.23 off (eager 2.5e-3) and its dW 263 (eager 2.4). bf16 under Triton runs on a
    GPU only (the interpreter's bf16 arithmetic); the PyTorch path runs bf16 on this CPU."""
    if backend == "triton" and dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("bf16 under Triton runs on a GPU only")
    hidden, weight, _ = make_inputs((4, 64), 64, 8, torch.float32, requires=(False, False, False))
    hidden[..., 0] = 256.0
    weight[:, 0] = 1.0 + torch.rand(8, device=hidden.device)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = -(hidden[..., 0].float().mean() * weight[:, 0].float()).to(dtype)
    for t in (hidden, weight, bias):
        t.requires_grad_()
    assert_matches_float64(backend, hidden, weight, bias, (0.01, 0.99))


def test_fp32_hidden_fp16_weight_promotes_to_fp32():
    hidden, weight, bias = make_inputs((3, 20), 40, 4, torch.float32, weight_dtype=torch.float16)
    got = assert_matches_float64("triton", hidden, weight, bias, (0.01, 0.99))
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float16


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bias_none(backend):
    hidden, weight, _ = make_inputs((2, 33), 97, 4, torch.float32)
    assert_matches_float64(backend, hidden, weight, None, (0.01, 0.99))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_dim_hidden(backend):
    hidden, weight, bias = make_inputs((), 40, 4, torch.float32)
    got = assert_matches_float64(backend, hidden, weight, bias, (0.01, 0.99))
    assert got[0].shape == (4,)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "column-strided"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend, layout):
    H, T = 40, 8
    if layout == "transposed":  # last dim not unit-stride across leading dims: reshape copies
        hidden = torch.randn(2, H, 9, device=DEVICE).transpose(1, 2)
    elif layout == "sliced":  # a strided view the kernel reads in place (row stride 4H)
        hidden = torch.randn(3, 20, 2 * H, device=DEVICE)[:, ::2, :H]
    else:  # [N, H] with column stride N, read in place
        hidden = torch.randn(H, 70, device=DEVICE).t()
    assert not hidden.is_contiguous()
    hidden.requires_grad_()
    weight = (torch.randn(H, T, device=DEVICE) * (2 / math.sqrt(H))).t().requires_grad_()  # strided W
    assert not weight.is_contiguous()
    bias = torch.randn(T, device=DEVICE).requires_grad_()
    # A transposed upstream gradient: autograd hands the kernel a non-contiguous dt.
    lead = hidden.shape[:-1]
    upstream = torch.randn(T, *reversed(lead), device=DEVICE).permute(*range(len(lead), 0, -1), 0)
    assert upstream.shape == (*lead, T) and not upstream.is_contiguous()
    assert_matches_float64(backend, hidden, weight, bias, (0.01, 0.99), upstream=upstream)


# ------------------------------------------------------------------------------------------
# gradients: which are computed, and the clamp's convention
# ------------------------------------------------------------------------------------------


REQUIRES = [(False, True, True), (True, False, False), (False, True, False), (False, False, True),
            (True, True, True)]


@pytest.mark.parametrize("requires", REQUIRES, ids=lambda r: "+".join(
    n for n, x in zip(("hidden", "weight", "bias"), r, strict=True) if x))
def test_needs_input_grad_combinations(monkeypatch, requires):
    """Only the requested gradients come back, and the kernels skip the work for the others."""
    calls = {"rows": [], "weight": 0}
    launch_rows, launch_weight = tp_module._launch_backward_rows, tp_module._launch_backward_weight

    def spy_rows(*args, **kwargs):
        calls["rows"].append((kwargs["store_grad_logits"], kwargs["hidden_grad"]))
        return launch_rows(*args, **kwargs)

    def spy_weight(*args, **kwargs):
        calls["weight"] += 1
        return launch_weight(*args, **kwargs)

    monkeypatch.setattr(tp_module, "_launch_backward_rows", spy_rows)
    monkeypatch.setattr(tp_module, "_launch_backward_weight", spy_weight)
    hidden, weight, bias = make_inputs((3, 30), 97, 8, torch.float32, requires=requires)
    assert_matches_float64("triton", hidden, weight, bias, (0.01, 0.99))
    hidden_grad, weight_grad, bias_grad = requires
    assert calls["rows"] == [(weight_grad or bias_grad, hidden_grad)]
    assert calls["weight"] == int(weight_grad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_no_grad_inference(backend):
    hidden, weight, bias = make_inputs((2, 9), 40, 4, torch.float32)
    with torch.no_grad():
        out = temperature_projection(hidden, weight, bias, backend=backend)
    assert not out.requires_grad
    expected = temperature_projection_ref(hidden.double(), weight.double(), bias.double())
    assert (out.double() - expected).abs().max().item() <= FLOOR[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_is_zero_where_clamped(backend):
    """Saturated heads (σ outside [min, max]) get no gradient, exactly as through torch.clamp."""
    H = 40
    hidden = torch.randn(4, 11, H, device=DEVICE, requires_grad=True)
    # Zero weights: the logits are the bias alone. σ(5) = 0.9933 > 0.99 and σ(-5) < 0.01 are
    # clamped though σ(1 - σ) is not zero; σ(30) = 1 saturates; σ(0) = 0.5 passes.
    weight = torch.zeros(4, H, device=DEVICE, requires_grad=True)
    bias = torch.tensor([5.0, -5.0, 0.0, 30.0], device=DEVICE, requires_grad=True)
    upstream = torch.randn(4, 11, 4, device=DEVICE)
    got = forward_backward(
        lambda h, w, b: temperature_projection(h, w, b, 0.01, 0.99, backend=backend),
        hidden, weight, bias, upstream,
    )
    eager = forward_backward(lambda h, w, b: temperature_projection_ref(h, w, b, 0.01, 0.99),
                             hidden, weight, bias, upstream)
    out, d_hidden, d_weight, d_bias = got
    assert torch.equal(out[..., 0], torch.full_like(out[..., 0], 0.99))
    assert torch.equal(out[..., 1], torch.full_like(out[..., 1], 0.01))
    for clamped in (0, 1, 3):
        assert d_bias[clamped] == 0 and (d_weight[clamped] == 0).all()
    assert d_bias[2] != 0
    for g, e in zip(got, eager, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gradient_passes_at_clamp_bound(backend):
    """torch.clamp passes the gradient where σ equals a bound: σ(0) = 0.5 = clamp_min = clamp_max."""
    hidden = torch.randn(2, 13, 40, device=DEVICE, requires_grad=True)
    weight = torch.zeros(3, 40, device=DEVICE, requires_grad=True)
    bias = torch.zeros(3, device=DEVICE, requires_grad=True)
    upstream = torch.randn(2, 13, 3, device=DEVICE)
    out, d_hidden, d_weight, d_bias = forward_backward(
        lambda h, w, b: temperature_projection(h, w, b, 0.5, 0.5, backend=backend),
        hidden, weight, bias, upstream,
    )
    assert torch.equal(out, torch.full_like(out, 0.5))
    torch.testing.assert_close(d_bias, 0.25 * upstream.sum(dim=(0, 1)))
    torch.testing.assert_close(d_weight, 0.25 * upstream.reshape(-1, 3).t() @ hidden.detach().reshape(-1, 40))
    assert torch.equal(d_hidden, torch.zeros_like(d_hidden))  # W = 0


# ------------------------------------------------------------------------------------------
# kernel internals: poisoned outputs, split weight-gradient reduction
# ------------------------------------------------------------------------------------------


def test_poisoned_outputs_are_all_written(monkeypatch):
    """Every buffer the kernels write starts as NaN, so an element left unwritten fails.

    conftest poisons every test's outputs; this test makes sure of it, with row splits on.
    """
    monkeypatch.setattr(_backend, "POISON_OUTPUTS", True)
    assert torch.isnan(_backend.new_output((2,), torch.float32, DEVICE)).all()
    monkeypatch.setattr(tp_module, "_num_row_splits", lambda *args: 2)
    hidden, weight, bias = make_inputs((3, 67), 97, 5, torch.float32)
    assert_matches_float64("triton", hidden, weight, bias, (0.01, 0.99))
    with torch.no_grad():
        out = temperature_projection(hidden, weight, bias, backend="triton")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("splits", [1, 3, 4, 100])
def test_weight_gradient_row_splits(monkeypatch, splits):
    """The split reduction used on GPUs (partials summed on the host) gives the same dW."""
    monkeypatch.setattr(tp_module, "_num_row_splits", lambda *args: splits)
    hidden, weight, bias = make_inputs((3, 113), 40, 8, torch.float32, requires=(False, True, True))
    assert_matches_float64("triton", hidden, weight, bias, (0.01, 0.99))


# ------------------------------------------------------------------------------------------
# backends and validation
# ------------------------------------------------------------------------------------------


def test_auto_backend():
    hidden, weight, bias = make_inputs((2, 9), 40, 4, torch.float32)
    expected_backend = "triton" if ON_CUDA else "torch"
    with torch.no_grad():
        auto = temperature_projection(hidden, weight, bias, backend="auto")
        chosen = temperature_projection(hidden, weight, bias, backend=expected_backend)
    assert torch.equal(auto, chosen)


def test_float64_auto_and_torch_backends():
    """float64 has no Triton kernels: "auto" (on CUDA too) takes the torch path."""
    hidden, weight, bias = make_inputs((2, 9), 40, 4, torch.float64)
    for backend in ("auto", "torch"):
        out = temperature_projection(hidden, weight, bias, backend=backend)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, temperature_projection_ref(hidden, weight, bias))


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck_float64(backend):
    hidden, weight, bias = make_inputs((2, 3), 5, 3, torch.float64, logit_scale=1.0)

    def fn(h, w, b):
        if backend == "reference":
            return temperature_projection_ref(h, w, b, 0.2, 0.8)
        return temperature_projection(h, w, b, 0.2, 0.8, backend="torch")

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def _raises(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        temperature_projection(*args, **kwargs)


def test_bad_inputs_raise():
    H, T = 16, 4
    hidden = torch.randn(2, 3, H, device=DEVICE)
    weight = torch.randn(T, H, device=DEVICE)
    bias = torch.randn(T, device=DEVICE)
    _raises(ValueError, "hidden's last dim", torch.randn(2, 3, H + 1, device=DEVICE), weight, bias)
    _raises(ValueError, "weight must be 2-D", hidden, torch.randn(H, device=DEVICE), bias)
    _raises(ValueError, "bias must be", hidden, weight, torch.randn(T + 1, device=DEVICE))
    _raises(ValueError, "bias must be 1-D", hidden, weight, torch.randn(1, T, device=DEVICE))
    _raises(TypeError, "hidden must be float", hidden.to(torch.int32), weight, bias)
    _raises(TypeError, "weight must be a torch.Tensor", hidden, weight.tolist(), bias)
    _raises(TypeError, r"float64.*hidden is torch.float64", hidden.double(), weight.double(), bias.double(),
            backend="triton")
    _raises(TypeError, r"float64.*bias is torch.float64", hidden, weight, bias.double(), backend="triton")
    _raises(ValueError, "clamp_min", hidden, weight, bias, 0.9, 0.1)
    _raises(ValueError, "clamp_min", hidden, weight, bias, -0.1, 0.5)
    _raises(ValueError, "clamp_max", hidden, weight, bias, 0.1, float("nan"))
    for bound in (torch.tensor([0.1]), torch.tensor([0.1, 0.2]), "0.1", None, True):
        _raises(TypeError, "clamp_min must be a real number", hidden, weight, bias, bound, 0.9)
    _raises(TypeError, "clamp_max must be a real number", hidden, weight, bias, 0.1, torch.tensor(0.9))
    _raises(ValueError, "backend must be one of", hidden, weight, bias, backend="cuda")
    _raises(ValueError, "temperature heads", hidden, torch.randn(129, H, device=DEVICE), None,
            backend="triton")
    _raises(ValueError, "empty", hidden[:0], weight, bias)


# ------------------------------------------------------------------------------------------
# module
# ------------------------------------------------------------------------------------------


class SeedTemperatureMechanism(nn.Module):
    """The seed's module, verbatim in behaviour (tgr-seed.md)."""

    def __init__(self, hidden_size, temperature_heads, clamp_min=0.01, clamp_max=0.99):
        super().__init__()
        self.hidden_size = hidden_size
        self.temperature_heads = temperature_heads
        self.proj = nn.Linear(hidden_size, temperature_heads)
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max

    def forward(self, hidden_states):
        return torch.clamp(torch.sigmoid(self.proj(hidden_states)), self.clamp_min, self.clamp_max)


def test_module_attributes_and_state_dict():
    module = TemperatureMechanism(48, 8, 0.05, 0.95, backend="torch")
    assert set(module.state_dict()) == {"proj.weight", "proj.bias"}
    assert module.proj.weight.shape == (8, 48) and module.proj.bias.shape == (8,)
    assert (module.hidden_size, module.temperature_heads) == (48, 8)
    assert (module.clamp_min, module.clamp_max) == (0.05, 0.95)
    text = repr(module)
    assert "hidden_size=48" in text and "temperature_heads=8" in text and "backend='torch'" in text


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        TemperatureMechanism(8, 2, backend="fast")
    with pytest.raises(ValueError, match="clamp_min"):
        TemperatureMechanism(8, 2, 0.7, 0.3)
    # A tensor bound passed the range check and failed only at the first forward.
    with pytest.raises(TypeError, match="clamp_max must be a real number"):
        TemperatureMechanism(8, 2, 0.1, torch.tensor(0.9))
    with pytest.raises(TypeError, match="clamp_min must be a real number"):
        TemperatureMechanism(8, 2, True, 0.9)


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
def test_module_loads_seed_state_dict(backend):
    seed = SeedTemperatureMechanism(97, 8).to(DEVICE)
    module = TemperatureMechanism(97, 8, backend=backend).to(DEVICE)
    module.load_state_dict(seed.state_dict())
    hidden = torch.randn(2, 21, 97, device=DEVICE)
    upstream = torch.randn(2, 21, 8, device=DEVICE)
    expected = seed(hidden)
    got = module(hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    for (name, p_seed), p in zip(seed.named_parameters(), module.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_seed.grad, rtol=1e-4, atol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_model_sized(dtype):
    """A model-sized call (H = 4096, 8 heads): many row blocks and real row splits for dW."""
    hidden, weight, bias = make_inputs((2, 1023), 4096, 8, dtype)
    assert_matches_float64("triton", hidden, weight, bias, (0.01, 0.99))


@pytest.mark.cuda
def test_cuda_frozen_bf16_base_fp32_head():
    hidden, weight, bias = make_inputs((4, 513), 4096, 8, torch.bfloat16, weight_dtype=torch.float32,
                                       requires=(False, True, True))
    got = assert_matches_float64("triton", hidden, weight, bias, (0.01, 0.99))
    assert got[0].dtype == torch.float32 and got[1] is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vmap_runs_the_op_not_the_launcher(backend):
    """Under torch.func.vmap the inputs are BatchedTensors: a call that needs no gradient ran the
    Triton launcher directly on them ("Cannot access storage of BatchedTensorImpl"); it must run
    the custom op, which vmap knows how to batch, and give the per-sample results."""
    weight, bias = torch.randn(4, 33, device=DEVICE), torch.randn(4, device=DEVICE)
    hidden = torch.randn(3, 5, 33, device=DEVICE)
    got = torch.func.vmap(lambda h: temperature_projection(h, weight, bias, 0.1, 0.9, backend=backend))(hidden)
    want = torch.stack([temperature_projection(h, weight, bias, 0.1, 0.9, backend="torch") for h in hidden])
    torch.testing.assert_close(got, want)
