"""Inputs that real models send: Hugging Face's finite additive masks, saturated softmaxes,
bf16 inputs whose GSoT decision sits on a rounding boundary, and NaN hidden states. Each test
here failed on the code before the fix it guards."""
import pytest
import torch

from helpers import DEVICE
from parity import assert_parity, max_err
from tgr_kernels import reference
from tgr_kernels.attention import temperature_guided_attention
from tgr_kernels.reference import temperature_guided_attention_ref
from tgr_kernels.temperature_projection import temperature_projection

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (backend, head dim): the flash kernels, the wide Triton row kernels, SDPA, the wide PyTorch
# row ops and the eager reference.
PATHS = [("triton", 32), ("triton", 264), ("torch", 32), ("torch", 264), ("reference", 32)]


def _inf_mask(B, S_q, S_k, device=DEVICE):
    """An additive [B, 1, S_q, S_k] mask: a padded tail on the last sequence, a causal-like
    pattern of masked keys, and one query row (row 3 of sequence 0) that sees no key at all."""
    bias = torch.randn(B, 1, S_q, S_k, device=device)
    bias[-1, ..., S_k - 4:] = -torch.inf
    bias[torch.rand(B, 1, S_q, S_k, device=device) < 0.3] = -torch.inf
    bias[..., 0] = torch.where(torch.isinf(bias[..., 0]), 0.0, bias[..., 0])
    bias[0, 0, 3] = -torch.inf
    return bias


def _run(backend, qkv, temperature, mask, **kwargs):
    out = temperature_guided_attention(*qkv, temperature, mask, backend=backend, **kwargs)
    grads = torch.autograd.grad(out, list(qkv) + [temperature], torch.ones_like(out) + 0.5 * torch.arange(
        out.shape[-1], device=out.device, dtype=out.dtype) / out.shape[-1])
    return out, grads


@pytest.mark.parametrize("fill", ["-1e9", "min-float16", "min-bfloat16", "min-float32"])
@pytest.mark.parametrize("backend,D", PATHS, ids=[f"{b}-D{d}" for b, d in PATHS])
def test_large_finite_mask_equals_neg_inf(backend, D, fill):
    """HF builds masks with torch.finfo(dtype).min (older code: −1e9), not −inf: the output and
    every gradient must be those of −inf masking, and a row that sees no key gives zeros."""
    B, H, S = 2, 2, 12
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE).requires_grad_() for _ in range(3))
    temperature = (torch.rand(B, S, 2, device=DEVICE) * 0.9 + 0.05).requires_grad_()
    inf_mask = _inf_mask(B, S, S)
    if fill == "-1e9":
        finite_mask = inf_mask.masked_fill(torch.isinf(inf_mask), -1e9)
    else:
        dtype = getattr(torch, fill.split("-")[1])
        finite_mask = inf_mask.to(dtype)
        finite_mask = finite_mask.masked_fill(torch.isinf(finite_mask), torch.finfo(dtype).min)
        inf_mask = finite_mask.masked_fill(finite_mask == torch.finfo(dtype).min, -torch.inf)
    for causal in (False, True):
        want, want_grads = _run(backend, (q, k, v), temperature, inf_mask, causal=causal, gsot_threshold=0.2)
        got, got_grads = _run(backend, (q, k, v), temperature, finite_mask, causal=causal, gsot_threshold=0.2)
        assert torch.equal(want[0, :, 3], torch.zeros_like(want[0, :, 3]))
        assert max_err(got, want) <= 1e-5, f"causal={causal}: output"
        for name, g, gw in zip("qkvt", got_grads, want_grads, strict=True):
            assert torch.isfinite(g).all(), f"causal={causal}: d{name} is not finite"
            assert max_err(g, gw) <= 1e-5 * (1 + gw.abs().max().item()), f"causal={causal}: d{name}"
        assert torch.equal(got_grads[3][0, 3], torch.zeros_like(got_grads[3][0, 3]))


def test_masked_bias_cutoff_is_exact_in_every_format():
    """The cutoff is representable in fp16, bf16 and fp32, and e^cutoff underflows to zero in
    each of them (so a row that sees some key is unchanged by it)."""
    for dtype in (F16, BF16, F32):
        assert torch.tensor(reference.MASKED_BIAS, dtype=dtype).item() == reference.MASKED_BIAS
        assert torch.exp(torch.tensor(reference.MASKED_BIAS, dtype=dtype)).item() == 0.0


def _saturated(kind, D, B=1, H=2, S=24):
    g = torch.Generator(device="cpu").manual_seed(1)
    if kind == "qkv":  # q = k = v with a large norm: each row's self-score dominates
        x = (torch.randn(B, H, S, D, generator=g) * 4.0).to(DEVICE)
        return (x, x, x), True
    factor = float(kind[1:])
    q = torch.randn(B, H, S, D, generator=g) * factor
    k, v = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    return (q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)), False


@pytest.mark.parametrize("frozen", [False, True], ids=["all-grads", "frozen-base"])
@pytest.mark.parametrize("kind", ["x100", "x1000", "qkv"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_temperature_gradient_when_the_softmax_saturates(backend, kind, frozen):
    """Large logits make P nearly one-hot, so dS is a tiny difference of nearly equal terms;
    dt̄ (and everything else) must stay within the library's parity criterion, also with a
    frozen base (only the temperature needs a gradient: another kernel path)."""
    D = 32
    base, same = _saturated(kind, D)
    temperature = (torch.rand(1, base[0].shape[2], 3, device=DEVICE) * 0.9 + 0.05)

    def leaves_for(dtype):
        if same:
            x = base[0].to(dtype).requires_grad_(not frozen)
            return ([] if frozen else [x]), (x, x, x)
        ls = [t.to(dtype).requires_grad_(not frozen) for t in base]
        return ([] if frozen else ls), tuple(ls)

    grad_out = torch.randn(base[0].shape, device=DEVICE)
    results = {}
    for name, dtype, fn in (
        ("fast", F32, lambda qkv, t: temperature_guided_attention(*qkv, t, causal=True, backend=backend)),
        ("eager", F32, lambda qkv, t: temperature_guided_attention_ref(*qkv, t, causal=True, upcast=False)),
        ("truth", torch.float64, lambda qkv, t: temperature_guided_attention_ref(*qkv, t, causal=True)),
    ):
        leaves, qkv = leaves_for(dtype)
        t = temperature.to(dtype).requires_grad_()
        out = fn(qkv, t)
        results[name] = (out, torch.autograd.grad(out, leaves + [t], grad_out.to(dtype)))
    assert_parity("out", results["fast"][0], results["eager"][0], results["truth"][0], F32)
    names = [] if frozen else (["x"] if same else ["q", "k", "v"])
    for i, name in enumerate(names + ["temperature"]):
        assert_parity(f"d{name}", results["fast"][1][i], results["eager"][1][i], results["truth"][1][i], F32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_saturated_flash_and_sdpa_with_masks_and_gsot(backend):
    """The consistent Δ also holds with key padding, fully masked rows and pruned rows."""
    B, H, S, D = 2, 1, 20, 16
    g = torch.Generator(device="cpu").manual_seed(2)
    q = (torch.randn(B, H, S, D, generator=g) * 300).to(DEVICE)
    k, v = (torch.randn(B, H, S, D, generator=g).to(DEVICE) for _ in range(2))
    temperature = (torch.rand(B, S, generator=g) * 0.9 + 0.05).to(DEVICE)
    keep = torch.ones(B, S, dtype=torch.bool, device=DEVICE)
    keep[0] = False
    keep[1, -5:] = False
    grad_out = torch.randn(B, H, S, D, device=DEVICE)
    results = {}
    for name, dtype, kw in (("fast", F32, dict(backend=backend)), ("eager", F32, None), ("truth", torch.float64, {})):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, temperature)]
        if kw is None:
            out = temperature_guided_attention_ref(*leaves, keep, causal=True, gsot_threshold=0.3, upcast=False)
        elif kw:
            out = temperature_guided_attention(*leaves, keep, causal=True, gsot_threshold=0.3, **kw)
        else:
            out = temperature_guided_attention_ref(*leaves, keep, causal=True, gsot_threshold=0.3)
        results[name] = (out, torch.autograd.grad(out, leaves, grad_out.to(dtype)))
    assert_parity("out", results["fast"][0], results["eager"][0], results["truth"][0], F32)
    for i, name in enumerate("qkvt"):
        assert_parity(f"d{name}", results["fast"][1][i], results["eager"][1][i], results["truth"][1][i], F32)


def test_reference_decides_gsot_on_the_fp32_mean_temperature():
    """t̄ = 0.4995 rounds to 0.5 in bf16; with τ = 0.5 every backend prunes that row, the
    reference included (it used to round t̄ to q's dtype first and keep it)."""
    B, H, S, D = 1, 1, 4, 16
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=BF16) for _ in range(3))
    temperature = torch.tensor([[0.4995, 0.7, 0.2, 0.4993]], device=DEVICE)
    assert temperature.to(BF16)[0, 0].item() == 0.5  # the rounding this test is about
    outs = {b: temperature_guided_attention(q, k, v, temperature, gsot_threshold=0.5, backend=b)
            for b in ("reference", "torch")}
    for backend, out in outs.items():
        pruned = (out == 0).all(-1)[0, 0]
        assert pruned.tolist() == [True, False, True, True], backend


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("needs", ["all", "hidden"])
def test_nan_hidden_gives_nan_gradients(backend, needs):
    """A NaN hidden state makes NaN temperatures; its gradients must be NaN too (as autograd's),
    never a silent zero."""
    hidden = torch.randn(3, 5, 40, device=DEVICE)
    hidden[1, 2, 7] = float("nan")
    hidden.requires_grad_()
    weight = (torch.randn(4, 40, device=DEVICE) * 0.1).requires_grad_(needs == "all")
    bias = torch.zeros(4, device=DEVICE).requires_grad_(needs == "all")
    t = temperature_projection(hidden, weight, bias, 0.01, 0.99, backend=backend)
    assert torch.isnan(t[1, 2]).all()
    inputs = [hidden, weight, bias] if needs == "all" else [hidden]
    grads = torch.autograd.grad(t, inputs, torch.ones_like(t))
    assert torch.isnan(grads[0][1, 2]).all(), "d hidden of the NaN row"
    assert not torch.isnan(grads[0][0]).any(), "d hidden of clean rows"
    for g in grads[1:]:
        assert torch.isnan(g).all(), "dW and db see the NaN row"
