"""Parity of every attention backend against the float64 reference, forward and all gradients,
plus the behaviours the API promises (masks, GSoT, skipped gradients, errors)."""

import pytest
import torch

from helpers import DEVICE, make_inputs, make_mask, rebuild_inputs
from parity import FLOOR, assert_attention_parity, assert_parity, max_err
from tgr_kernels import attention_flash, attention_wide
from tgr_kernels.attention import TemperatureGuidedAttention, temperature_guided_attention
from tgr_kernels.reference import temperature_guided_attention_ref

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BACKENDS = ["triton", "torch"]


def check_parity(backend, B, H, S_q, S_k, D, mask_kind, causal, thr, same_qkv, dtype):
    leaves, (q, k, v), temperature = make_inputs(B, H, S_q, S_k, D, dtype, same_qkv)
    mask = make_mask(mask_kind, B, H, S_q, S_k)
    kwargs = dict(causal=causal, gsot_threshold=thr)

    out = temperature_guided_attention(q, k, v, temperature, mask, backend=backend, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + [temperature], grad_out)

    l64, qkv64, t64 = rebuild_inputs(leaves, temperature, same_qkv, torch.float64)
    truth = temperature_guided_attention_ref(*qkv64, t64, mask, upcast=True, **kwargs)
    truth_grads = torch.autograd.grad(truth, l64 + [t64], grad_out.double())

    le, qkve, te = rebuild_inputs(leaves, temperature, same_qkv, dtype)
    eager = temperature_guided_attention_ref(*qkve, te, mask, upcast=False, **kwargs)
    eager_grads = torch.autograd.grad(eager, le + [te], grad_out)

    names = ["x"] if same_qkv else ["q", "k", "v"]
    assert_parity("out", out, eager, truth, dtype)
    for name, g, ge, gt in zip(names + ["temperature"], grads, eager_grads, truth_grads, strict=True):
        assert_parity(f"d{name}", g, ge, gt, dtype)


# (B, H, S_q, S_k, D, mask, causal, gsot_threshold, q = k = v, dtype)
FLASH_CASES = [
    (1, 1, 1, 1, 16, None, False, None, False, F32),
    (2, 2, 7, 7, 16, "kpm", True, None, True, F32),
    (1, 2, 113, 113, 32, None, True, 0.5, False, F32),
    (2, 2, 45, 37, 64, "additive", False, 0.5, False, F32),
    (2, 1, 23, 23, 72, "kpm_dead", False, None, False, F16),
    (2, 2, 40, 33, 16, "additive_inf", False, None, False, F16),
    (1, 2, 30, 70, 32, "kpm01", True, None, False, F16),
    (2, 2, 20, 20, 16, "bool4d", True, 0.45, False, F32),
    (2, 1, 19, 19, 40, "kpm_dead", True, 2.0, True, F16),  # every row pruned
    (1, 2, 21, 26, 20, "additive_inf", True, 0.5, False, F32),  # D padded to 32 around the kernels
]
WIDE_CASES = [
    (1, 1, 7, 7, 300, None, False, None, True, F32),
    (2, 1, 33, 33, 264, "additive", False, 0.45, True, F32),  # the seed's shape and mask
    (2, 1, 45, 37, 320, "kpm_dead", True, None, False, F16),
    (1, 2, 24, 50, 272, "additive_inf", True, 0.5, False, F16),
]


def _case_id(case):
    B, H, S_q, S_k, D, mask, causal, thr, same, dtype = case
    return (f"{B}x{H}x{S_q}x{S_k}x{D}-{mask}-{'causal' if causal else 'full'}-gsot{thr}"
            f"-{'qkv' if same else 'sep'}-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FLASH_CASES + WIDE_CASES, ids=_case_id)
def test_parity_with_reference(backend, case):
    check_parity(backend, *case)


@pytest.mark.parametrize("case", [c[:-1] + (BF16,) for c in FLASH_CASES[1:5] + WIDE_CASES[1:3]], ids=_case_id)
def test_torch_backend_bf16(case):
    """bf16 runs on the CPU for the torch backend (Triton's interpreter gets bf16 wrong)."""
    check_parity("torch", *case)


@pytest.mark.parametrize("case", FLASH_CASES + WIDE_CASES, ids=_case_id)
def test_reference_backend_is_the_eager_math(case):
    B, H, S_q, S_k, D, mask_kind, causal, thr, same_qkv, dtype = case
    _, (q, k, v), temperature = make_inputs(B, H, S_q, S_k, D, dtype, same_qkv)
    mask = make_mask(mask_kind, B, H, S_q, S_k)
    out = temperature_guided_attention(q, k, v, temperature, mask, causal=causal, gsot_threshold=thr,
                                       backend="reference")
    eager = temperature_guided_attention_ref(q, k, v, temperature, mask, causal=causal, gsot_threshold=thr,
                                             upcast=False)
    assert torch.equal(out, eager)


@pytest.mark.parametrize("row_ops", ["triton", "torch"])
@pytest.mark.parametrize("mask_kind,causal", [(None, True), ("kpm_dead", False), ("additive_inf", True)])
def test_wide_path_across_chunks(row_ops, mask_kind, causal):
    """Chunks of a few query rows: the per-chunk key ranges and fp32 dK/dV accumulation."""
    B, H, S_q, S_k, D = 2, 1, 29, 29, 288
    leaves, (q, k, v), temperature = make_inputs(B, H, S_q, S_k, D, F32, same_qkv=False)
    mask = make_mask(mask_kind, B, H, S_q, S_k)
    from tgr_kernels._validation import check_attention_inputs
    args = check_attention_inputs(q, k, v, temperature, mask, causal, 0.3, None)
    t_bar = temperature.mean(-1)
    chunk_bytes = B * H * S_k * 4 * 6  # six rows a chunk
    out = attention_wide.wide_attention(q, k, v, t_bar, args.key_padding, args.additive, causal, args.gate,
                                        args.scale, row_ops=row_ops, chunk_bytes=chunk_bytes)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + [temperature], grad_out)
    l64, qkv64, t64 = rebuild_inputs(leaves, temperature, False, torch.float64)
    truth = temperature_guided_attention_ref(*qkv64, t64, mask, causal=causal, gsot_threshold=0.3)
    truth_grads = torch.autograd.grad(truth, l64 + [t64], grad_out.double())
    assert max_err(out, truth) < FLOOR[F32]
    for g, gt in zip(grads, truth_grads, strict=True):
        assert max_err(g, gt) < FLOOR[F32]


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("D", [32, 300])
def test_rows_without_visible_keys_are_zero_not_nan(backend, D):
    leaves, (q, k, v), temperature = make_inputs(2, 2, 9, 9, D, F32, same_qkv=False)
    mask = make_mask("kpm_dead", 2, 2, 9, 9)
    out = temperature_guided_attention(q, k, v, temperature, mask, causal=True, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    grads = torch.autograd.grad(out, leaves + [temperature], torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[-1][0], torch.zeros_like(grads[-1][0]))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("S_q,S_k,D", [(5, 5, 32), (1, 5, 32), (9, 9, 32), (9, 9, 300)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_query_row_gives_that_row_nan(backend, causal, S_q, S_k, D, bad):
    """A query row holding NaN or ±inf is NaN in the output, as in eager attention, on every
    path, and the other rows are untouched. PyTorch's CPU SDPA (the torch path of narrow heads,
    without a mask, at batch 1 and 5 keys; the kernel it picks depends on the sizes) returned a
    zero row for it: a silent zero where the model had a NaN."""
    leaves, (q, k, v), temperature = make_inputs(1, 2, S_q, S_k, D, F32, same_qkv=False)
    q = q.detach().clone()
    q[0, 1, S_q - 1, 3] = bad
    out = temperature_guided_attention(q, k, v, temperature, causal=causal and S_q > 1, backend=backend)
    assert torch.isnan(out[0, 1, S_q - 1]).all()
    clean = torch.ones(out.shape[:3], dtype=torch.bool, device=out.device)
    clean[0, 1, S_q - 1] = False
    assert torch.isfinite(out[clean]).all()


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", ["hard", "straight_through"])
@pytest.mark.parametrize("needs_grad", [False, True], ids=["decode", "flash"])
def test_nan_query_row_stays_nan_when_gsot_prunes_it(backend, mode, needs_grad):
    """A pruned row holding NaN is NaN, as eager's 0 · NaN: the decode kernel, which reads no key
    for a pruned row, returned a zero row there (the flash and torch paths gave NaN)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, S, 16, generator=g).to(DEVICE) for S in (3, 40, 40))
    q[0, 1, 0, 3] = float("nan")
    temperature = torch.tensor([[0.1, 0.9, 0.9]], device=DEVICE)  # row 0 pruned at 0.5
    with torch.set_grad_enabled(needs_grad):
        out = temperature_guided_attention(q.requires_grad_(needs_grad), k, v, temperature, backend=backend,
                                           gsot_threshold=0.5, gsot_mode=mode)
    assert torch.isnan(out[0, 1, 0]).all()
    assert (out[0, 0, 0] == 0).all() and torch.isfinite(out[:, :, 1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [16, 264])
def test_all_rows_pruned_gives_zero_output_and_gradients(backend, D):
    leaves, (q, k, v), temperature = make_inputs(1, 2, 11, 11, D, F32, same_qkv=False)
    out = temperature_guided_attention(q, k, v, temperature, gsot_threshold=1.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))
    for g in torch.autograd.grad(out, leaves + [temperature], torch.randn_like(out)):
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("D", [32, 300])
def test_only_temperature_gradient_skips_qkv_work(D, monkeypatch):
    """Frozen base: q, k, v need no gradient, so no dQ/dK/dV is computed, and dt̄ is still right."""
    calls = []
    for module, name in ((attention_flash, "flash_backward"), (attention_wide, "wide_backward")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kw):
            calls.append((kw["need_dq"], kw["need_dkv"]))
            return _real(*args, **kw)

        monkeypatch.setattr(module, name, spy)
    leaves, (q, k, v), temperature = make_inputs(2, 1, 21, 21, D, F32, same_qkv=False)
    for x in leaves:
        x.requires_grad_(False)
    out = temperature_guided_attention(q, k, v, temperature, causal=True, gsot_threshold=0.4, backend="triton")
    grad_out = torch.randn_like(out)
    (dt,) = torch.autograd.grad(out, [temperature], grad_out)
    assert calls == [(False, False)]
    t64 = temperature.detach().double().requires_grad_()
    truth = temperature_guided_attention_ref(q.double(), k.double(), v.double(), t64, causal=True,
                                             gsot_threshold=0.4)
    (dt_truth,) = torch.autograd.grad(truth, [t64], grad_out.double())
    assert max_err(dt, dt_truth) < FLOOR[F32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [32, 300])
def test_non_contiguous_inputs(backend, D):
    B, S, H = 2, 17, 2
    x = torch.randn(B, S, 3, H, D, device=DEVICE)  # a fused QKV projection's layout
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    temperature = torch.rand(B, S, 4, device=DEVICE).transpose(1, 2).contiguous().transpose(1, 2)
    mask = make_mask("kpm", B, H, S, S)[:, :].t().contiguous().t()
    out = temperature_guided_attention(q, k, v, temperature, mask, causal=True, backend=backend)
    truth = temperature_guided_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(),
                                             temperature.contiguous(), mask.contiguous(), causal=True)
    assert max_err(out, truth) < FLOOR[F32]


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_2d_temperature_equals_its_3d_mean(backend):
    _, (q, k, v), temperature = make_inputs(1, 2, 13, 13, 16, F32, same_qkv=False)
    a = temperature_guided_attention(q, k, v, temperature, backend=backend)
    b = temperature_guided_attention(q, k, v, temperature.mean(-1), backend=backend)
    assert max_err(a, b) < 1e-6


def test_module_matches_function():
    _, (q, k, v), temperature = make_inputs(1, 2, 10, 10, 16, F32, same_qkv=False)
    module = TemperatureGuidedAttention(causal=True, gsot_threshold=0.3, backend="torch")
    assert "causal=True" in repr(module)
    expected = temperature_guided_attention(q, k, v, temperature, causal=True, gsot_threshold=0.3, backend="torch")
    assert torch.equal(module(q, k, v, temperature), expected)


def test_reference_gradcheck_float64():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    temperature = (torch.rand(1, 5, 2, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    mask = torch.tensor([[True, True, True, False, True]])

    def fn(q, k, v, t):
        return temperature_guided_attention_ref(q, k, v, t, mask, causal=True, gsot_threshold=0.2)

    assert torch.autograd.gradcheck(fn, (q, k, v, temperature))


@pytest.mark.parametrize("backend", ["torch"])
def test_float64_torch_backend_gradcheck(backend):
    """The fast PyTorch paths (SDPA and chunked) are exact enough for a float64 gradcheck too."""
    for D in (4, 300):
        q, k, v = (torch.randn(1, 1, 4, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
        temperature = (torch.rand(1, 4, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()

        def fn(q, k, v, t):
            return temperature_guided_attention(q, k, v, t, causal=True, backend=backend)

        assert torch.autograd.gradcheck(fn, (q, k, v, temperature))


# ----------------------------------------------------------------------------- bad input
def _good(B=2, H=2, S=5, D=8):
    return (torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.rand(B, S))


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda a: {**a, "q": torch.randn(2, 5, 8)}, ValueError, "q must be 4-D"),
        (lambda a: {**a, "k": torch.randn(2, 2, 5, 9)}, ValueError, "head dim"),
        (lambda a: {**a, "v": torch.randn(2, 2, 6, 8)}, ValueError, "S_k"),
        (lambda a: {**a, "k": torch.randn(3, 2, 5, 8)}, ValueError, "batch and heads"),
        (lambda a: {**a, "q": a["q"].double()}, TypeError, "share a dtype"),
        (lambda a: {**a, "q": a["q"].long()}, TypeError, "q must be float"),
        (lambda a: {**a, "temperature": torch.rand(2, 4)}, ValueError, r"temperature must be \[B, S_q\]"),
        (lambda a: {**a, "temperature": torch.rand(2, 5, 3, 1)}, ValueError, "temperature must be 2-D or 3-D"),
        (lambda a: {**a, "temperature": torch.full((2, 5), float("nan"))}, ValueError, "contains NaN"),
        (lambda a: {**a, "attn_mask": torch.ones(2, 6, dtype=torch.bool)}, ValueError, "key-padding"),
        (lambda a: {**a, "attn_mask": torch.full((2, 5), 3.0)}, ValueError, "0/1"),
        (lambda a: {**a, "attn_mask": torch.zeros(2, 3, 5, 5)}, ValueError, "does not broadcast"),
        (lambda a: {**a, "attn_mask": torch.zeros(2, 1, 5, 5, dtype=torch.long)}, TypeError, "bool or floating"),
        (lambda a: {**a, "q": torch.randn(0, 2, 5, 8), "k": torch.randn(0, 2, 5, 8), "v": torch.randn(0, 2, 5, 8),
                    "temperature": torch.rand(0, 5)}, ValueError, "empty"),
        (lambda a: {**a, "scale": -1.0}, ValueError, "scale"),
        (lambda a: {**a, "attn_mask": torch.zeros(2, 1, 5, 5, requires_grad=True)}, ValueError,
         "attn_mask requires grad"),
        (lambda a: {**a, "scale": 1e300}, ValueError, "scale must lie in float32's normal range"),
        (lambda a: {**a, "scale": 1e-40}, ValueError, "scale must lie in float32's normal range"),
        (lambda a: {**a, "gsot_threshold": 0.5, "gsot_mode": "soft", "gsot_width": 1e-50}, ValueError,
         "gsot_width must lie in float32's normal range"),
        (lambda a: {**a, "gsot_threshold": "high"}, TypeError, "gsot_threshold"),
        (lambda a: {**a, "backend": "cuda"}, ValueError, "backend must be one of"),
        (lambda a: {**a, "q": a["q"].double(), "k": a["k"].double(), "v": a["v"].double(), "backend": "triton"},
         TypeError, "float64"),
    ],
)
def test_bad_input_is_named_before_any_kernel(mutate, error, match):
    q, k, v, t = _good()
    args = mutate(dict(q=q, k=k, v=v, temperature=t, attn_mask=None, scale=None, gsot_threshold=None,
                       backend="triton"))
    with pytest.raises(error, match=match):
        temperature_guided_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("temperature"),
                                     args.pop("attn_mask"), **args)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU-only error")
def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    from tgr_kernels import _backend
    monkeypatch.setattr(_backend, "TRITON_INTERPRET", False)
    q, k, v, t = _good()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        temperature_guided_attention(q, k, v, t, backend="triton")


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("case", [
    (2, 8, 1023, 1023, 128, "kpm", True, 0.5, False),
    (1, 4, 203, 517, 64, "additive", False, None, False),
    (2, 2, 257, 257, 256, "kpm_dead", True, 0.4, True),
    (1, 32, 513, 513, 96, None, True, None, False),
    (2, 1, 1023, 1023, 4096, "additive", False, 0.4, True),
    (2, 1, 600, 700, 1024, "kpm_dead", True, None, False),  # B = 2: sequence 0 sees no key, 1 is padded
], ids=lambda c: "x".join(map(str, c[:5])) + f"-{c[5]}-{c[6]}-{c[7]}-{c[8]}")
def test_cuda_parity_large(dtype, case):
    check_parity("triton", *case, dtype)


@pytest.mark.parametrize("mask_kind", ["kpm_dead", "additive_inf"])
def test_sdpa_path_chunks_query_rows_when_the_mask_is_dense(mask_kind, monkeypatch):
    """Causal + a mask needs a dense [B, 1, rows, S_k] mask: it is built a few rows at a time."""
    from tgr_kernels import attention_sdpa
    monkeypatch.setattr(attention_sdpa, "DENSE_MASK_ELEMENTS", 2 * 23 * 5)  # five rows a chunk
    check_parity("torch", 2, 2, 19, 23, 32, mask_kind, True, 0.4, False, F32)


@pytest.mark.parametrize("backend,dtype", [("torch", F32), ("triton", F32), ("torch", BF16)])
def test_wide_path_temperature_gradient_when_the_softmax_saturates(backend, dtype):
    """The seed's regime: q = k = v = unit-variance hidden states, so each row's self-score
    dominates and dS is a tiny difference of nearly equal terms. dt̄ must stay as accurate as
    PyTorch's eager autograd (it lost three digits with Δ = rowsum(dO ∘ O))."""
    check_parity(backend, 1, 1, 128, 128, 1024, "kpm", False, 0.4, True, dtype)


@pytest.mark.parametrize("dtype", [F32, F16])
def test_flash_backward_with_negligible_key_tiles(dtype):
    """An ALiBi bias (slope 1/2) over 256 keys puts whole tiles of keys 90-130 nats below the row's
    lse: their weight Σ P is subnormal. The dQ kernel divided by it (1 / w overflowed to inf), and
    dQ, dt̄ and the head's whole dK came out NaN; such tiles now drop out of its merge."""
    torch.manual_seed(0)
    B, H, S_q, S_k, D = 1, 1, 4, 256, 16
    q, k, v = (torch.randn(B, H, s, D, device=DEVICE).to(dtype).requires_grad_() for s in (S_q, S_k, S_k))
    temperature = torch.full((B, S_q), 0.9, device=DEVICE, requires_grad=True)
    distance = (torch.arange(S_q, device=DEVICE)[:, None] + (S_k - S_q) - torch.arange(S_k, device=DEVICE)).abs()
    alibi = (-0.5 * distance.float()).to(dtype).view(1, 1, S_q, S_k)
    leaves = [q, k, v, temperature]
    out = temperature_guided_attention(*leaves, alibi, causal=True, backend="triton")
    assert_attention_parity(out, leaves, alibi, dict(causal=True), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t_dtype", [BF16, F16])
def test_half_temperature_is_averaged_in_fp32(backend, t_dtype):
    """A [B, S_q, T] temperature in bf16/fp16 with fp32 q/k/v: t̄ is its mean taken in fp32, as in
    the reference (averaged in bf16 it was 2e-3 off, and so was the output, against eager's 1.5e-7)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    temperature = (torch.rand(1, 16, 3, device=DEVICE) * 0.98 + 0.01).to(t_dtype).requires_grad_()
    leaves = [q, k, v, temperature]
    out = temperature_guided_attention(*leaves, backend=backend)
    assert_attention_parity(out, leaves, None, {}, F32)


@pytest.mark.parametrize("seed", [0, 4])
def test_sdpa_path_frozen_temperature_when_the_softmax_saturates(seed):
    """fp32, a temperature that needs no gradient (a frozen temperature head), logits ~100: the
    PyTorch path's backward is its own (Δ from the same P and dP), not SDPA's, whose
    Δ = rowsum(dO ∘ O) left dV at 10-20x eager's error here (1.4e-4 against 7.2e-6 at seed 4)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, s, 32, generator=g) * 8.0 for s in (128, 16))
    v = torch.randn(1, 2, 16, 32, generator=g)
    temperature = (torch.rand(1, 128, generator=g) * 0.98 + 0.01).to(DEVICE)
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v)]
    grad_out = torch.randn(1, 2, 128, 32, generator=g).to(DEVICE)
    out = temperature_guided_attention(*leaves, temperature, backend="torch")
    grads = torch.autograd.grad(out, leaves, grad_out)
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    truth = temperature_guided_attention_ref(*l64, temperature.double())
    truth_grads = torch.autograd.grad(truth, l64, grad_out.double())
    le = [x.detach().requires_grad_() for x in leaves]
    eager = temperature_guided_attention_ref(*le, temperature, upcast=False)
    eager_grads = torch.autograd.grad(eager, le, grad_out)
    assert_parity("out", out, eager, truth, F32)
    for name, a, e, t in zip("qkv", grads, eager_grads, truth_grads, strict=True):
        assert_parity(f"d{name}", a, e, t, F32)


@pytest.mark.parametrize("needs_grad", [True, False], ids=["flash", "decode"])
def test_float64_temperature_is_gated_in_its_own_precision(needs_grad):
    """An fp64 temperature 1e-9 below the threshold rounds onto fp32(τ): the Triton kernels, which
    gate in fp32, kept the row that the reference prunes (an O(1) output error). Its fp32 value
    now moves one unit to the side its fp64 value is on."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=needs_grad) for _ in range(3))
    temperature = torch.tensor([[0.7 - 1e-9, 0.7, 0.9, 0.7 - 1e-9]], dtype=torch.float64, device=DEVICE)
    out = temperature_guided_attention(q, k, v, temperature, gsot_threshold=0.7, backend="triton")
    truth = temperature_guided_attention_ref(q.double(), k.double(), v.double(), temperature, gsot_threshold=0.7)
    assert (out[:, :, [0, 3]] == 0).all() and (out[:, :, [1, 2]] != 0).all()
    assert max_err(out, truth) < FLOOR[F32]


@pytest.mark.parametrize("mode", ["hard", "straight_through", "soft"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_wide_fp16_pruned_row_with_a_large_gradient_stays_finite(backend, mode, monkeypatch):
    """D > 256 (the wide path) in fp16: the backward's dP = dY Vᵀ is a half GEMM, which a pruned
    row's large upstream overflows when it is ungated (300 × D = 78000 > 65504). With the hard and
    straight-through gates that row's dS is 0 (its P is 0) and the hard gate's zero slope adds
    nothing; the soft gate (g = σ(−6) there, not 0) scales dY before the GEMM, as eager does. So
    dq, dk, dv (and dt̄, but for the straight-through gate) are finite and as eager's. (With the
    straight-through gate eager's dt̄ is inf too: the pruned row's gate gradient is that
    overflowed sum.)"""
    import tgr_kernels.attention as attention_module

    monkeypatch.setattr(attention_module, "cpu_computes_natively", lambda dtype: True)  # half GEMMs, as on a GPU
    torch.manual_seed(0)
    q, k = (torch.randn(1, 1, 4, 260, device=DEVICE) for _ in range(2))
    v = torch.ones(1, 1, 4, 260, device=DEVICE)
    t = torch.tensor([[0.9, 0.9, 0.1, 0.9]], device=DEVICE)  # row 2 is pruned (t < 0.4)
    grad_out = torch.ones(1, 1, 4, 260, device=DEVICE)
    grad_out[:, :, 2] = 300.0
    kwargs = dict(gsot_threshold=0.4, gsot_mode=mode)

    def grads(fn, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [t.to(
            torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()]
        out = fn(*leaves, **kwargs)
        return torch.autograd.grad(out, leaves, grad_out.to(out.dtype))

    got = grads(lambda *a, **kw: temperature_guided_attention(*a, backend=backend, **kw), torch.float16)
    eager = grads(lambda *a, **kw: temperature_guided_attention_ref(*a, upcast=False, **kw), torch.float16)
    truth = grads(temperature_guided_attention_ref, torch.float64)
    names = ("dq", "dk", "dv") if mode == "straight_through" else ("dq", "dk", "dv", "dt")
    for name, a, e, r in zip(names, got, eager, truth, strict=False):
        assert_parity(f"{backend} {mode} {name}", a, e, r, torch.float16)


def test_auto_takes_float64_to_the_torch_path(monkeypatch):
    """On CUDA "auto" means Triton, which has no float64 kernels: float64 goes to the PyTorch path
    (as the projection and the linear cross-entropy do), where an explicit "triton" is an error."""
    import tgr_kernels.attention as attention_module

    monkeypatch.setattr(attention_module, "resolve_backend", lambda backend, device: "triton")  # as on CUDA
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    t = torch.rand(1, 5, dtype=torch.float64)
    got = temperature_guided_attention(q, k, v, t, gsot_threshold=0.3, backend="auto")
    want = temperature_guided_attention_ref(q, k, v, t, gsot_threshold=0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="backend='triton' supports float16, bfloat16 and float32"):
        temperature_guided_attention(q, k, v, t, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
@pytest.mark.parametrize("s_q", [3, 19])  # the decode kernels' rows, then the flash kernels'
def test_vmap_gives_the_per_sample_results(backend, s_q):
    """Under torch.func.vmap the value checks read BatchedTensors on the host ("Cannot access data
    pointer of Tensor that doesn't have storage"), on every backend: they are skipped there, and
    the op gives what a loop over the samples gives."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 1, 2, s_q, 8, generator=gen).to(DEVICE)
    kv = torch.randn(3, 1, 2, 21, 8, generator=gen).to(DEVICE)
    t = torch.rand(3, 1, s_q, 2, generator=gen).to(DEVICE)
    keep = torch.ones(3, 1, 21, dtype=torch.bool, device=DEVICE)
    keep[:, :, -4:] = False

    def attend(q, kv, t, keep):
        return temperature_guided_attention(q, kv, kv, t, keep, causal=True, gsot_threshold=0.4, backend=backend)

    got = torch.func.vmap(attend)(q, kv, t, keep)
    want = torch.stack([attend(*sample) for sample in zip(q, kv, t, keep, strict=True)])
    torch.testing.assert_close(got, want)
