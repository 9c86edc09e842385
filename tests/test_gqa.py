"""Grouped-query attention: k and v with fewer heads than q (query head h reads k/v head
h // (H_q / H_kv)). Parity of the output and of every gradient against the float64 reference
(which expands k/v), on the flash path and the torch backend; deterministic dK/dV; k/v read in
place by the flash kernels; clear errors for head counts that do not group."""

import math

import pytest
import torch

from helpers import DEVICE, grouped_inputs, make_mask
from parity import assert_attention_parity
from tgr_kernels import _configs, attention_flash
from tgr_kernels.attention import temperature_guided_attention
from tgr_kernels.reference import temperature_guided_attention_ref

F32, BF16 = torch.float32, torch.bfloat16
BACKENDS = ["triton", "torch"]


def gqa_mask(kind, B, H_q, S_q, S_k, dtype):
    """The masks of ``helpers.make_mask``, plus Hugging Face's 4-D additive form (causal and left
    padding with ``finfo(dtype).min``) and a bias that differs per query head."""
    if kind == "hf4d":
        rows = torch.arange(S_q, device=DEVICE).view(S_q, 1) + (S_k - S_q)
        keep = torch.arange(S_k, device=DEVICE).view(1, S_k) <= rows
        keep = keep.expand(B, 1, S_q, S_k).clone()
        keep[-1, :, :, :2] = False  # left padding on the last batch row
        return torch.zeros(B, 1, S_q, S_k, dtype=dtype, device=DEVICE).masked_fill(~keep, torch.finfo(dtype).min)
    if kind == "head_bias":  # [1, H_q, S_q, S_k]: each query head its own bias, some keys −inf
        bias = torch.randn(1, H_q, S_q, S_k, device=DEVICE)
        bias[torch.rand(1, H_q, S_q, S_k, device=DEVICE) < 0.25] = -math.inf
        bias[..., 0] = 0.0
        return bias
    return make_mask(kind, B, H_q, S_q, S_k)


def gqa_inputs(B, H_q, H_kv, S_q, S_k, D, dtype):
    return [t.requires_grad_() for t in grouped_inputs(B, H_q, H_kv, S_q, S_k, D, dtype)]


def check_gqa_parity(backend, B, H_q, H_kv, S_q, S_k, D, mask_kind, causal, thr, dtype):
    inputs = gqa_inputs(B, H_q, H_kv, S_q, S_k, D, dtype)
    mask = gqa_mask(mask_kind, B, H_q, S_q, S_k, dtype)
    kwargs = dict(causal=causal, gsot_threshold=thr)

    out = temperature_guided_attention(*inputs, mask, backend=backend, **kwargs)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    grads, _ = assert_attention_parity(out, inputs, mask, kwargs, dtype)
    return grads


# (B, H_q, H_kv, S_q, S_k, D, mask, causal, gsot_threshold, dtype)
GQA_CASES = [
    (2, 4, 2, 7, 7, 64, None, False, None, F32),
    (1, 4, 1, 9, 13, 20, "kpm", True, 0.5, F32),  # D padded to 32 around the flash kernels
    (2, 6, 3, 5, 11, 16, "hf4d", True, None, F32),  # causal with S_q < S_k, HF's finfo.min mask
    (1, 6, 3, 11, 11, 16, "head_bias", False, 0.5, F32),  # a bias per query head
    (2, 4, 2, 13, 9, 24, "kpm_dead", False, None, F32),
    (1, 4, 2, 40, 70, 16, "kpm", True, 0.5, F32),  # several query and key blocks of the 32-row tiles
    (2, 4, 1, 7, 10, 64, "hf4d", True, 0.45, BF16),
    (1, 6, 3, 9, 9, 20, "additive_inf", True, None, BF16),
]
# Head dims wider than the flash path's: the wide path (k/v expanded to the query heads).
WIDE_GQA_CASES = [
    (1, 4, 2, 5, 7, 264, "kpm", True, 0.5, F32),
]


def _case_id(case):
    B, H_q, H_kv, S_q, S_k, D, mask, causal, thr, dtype = case
    return (f"{B}x{H_q}/{H_kv}x{S_q}x{S_k}x{D}-{mask}-{'causal' if causal else 'full'}-gsot{thr}"
            f"-{str(dtype)[6:]}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GQA_CASES + WIDE_GQA_CASES, ids=_case_id)
def test_gqa_parity_with_reference(backend, case):
    check_gqa_parity(backend, *case)


def test_gqa_reference_equals_expanded_heads():
    """The reference defines GQA as attention on k/v repeated to the query heads."""
    q, k, v, t = gqa_inputs(2, 6, 2, 5, 8, 16, torch.float64)
    mask = gqa_mask("hf4d", 2, 6, 5, 8, torch.float64)
    out = temperature_guided_attention_ref(q, k, v, t, mask, causal=True, gsot_threshold=0.3)
    expanded = temperature_guided_attention_ref(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), t,
                                                mask, causal=True, gsot_threshold=0.3)
    assert torch.equal(out, expanded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gqa_backward_is_deterministic(backend):
    """dK/dV summed over each group in a fixed order: two backward runs are bitwise equal."""
    q, k, v, t = gqa_inputs(2, 6, 2, 9, 11, 16, F32)
    mask = gqa_mask("kpm", 2, 6, 9, 11, F32)
    runs = []
    for _ in range(2):
        out = temperature_guided_attention(q, k, v, t, mask, causal=True, gsot_threshold=0.3, backend=backend)
        runs.append(torch.autograd.grad(out, (q, k, v, t), torch.ones_like(out)))
    for name, first, second in zip("qkvt", *runs, strict=True):
        assert torch.equal(first, second), f"d{name} differs between two backward runs"


def test_flash_kernels_read_k_and_v_in_place(monkeypatch):
    """Every flash kernel gets k's and v's own storage (no repeat_kv copy), and dK/dV come back
    with k's and v's shapes."""
    q, k, v, t = gqa_inputs(1, 4, 2, 8, 8, 64, F32)
    seen = []
    real_launch = _configs.launch

    def spy(kernel, grid, configs, *args, **kwargs):
        seen.append((kernel, args[1].data_ptr(), args[2].data_ptr()))
        return real_launch(kernel, grid, configs, *args, **kwargs)

    monkeypatch.setattr(_configs, "launch", spy)
    out = temperature_guided_attention(q, k, v, t, causal=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    kernels = {kernel for kernel, _, _ in seen}
    assert kernels == {attention_flash._flash_fwd_kernel, attention_flash._flash_bwd_dq_kernel,
                       attention_flash._flash_bwd_dkdv_kernel}
    for kernel, k_ptr, v_ptr in seen:
        assert (k_ptr, v_ptr) == (k.data_ptr(), v.data_ptr()), f"{kernel.__name__} got a copy of k or v"
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_flash_ops_fake_shapes_match_real_for_gqa():
    """The custom ops' fake implementations (torch.compile's view) agree with the real ones:
    dK and dV have k's and v's shapes."""
    q, k, v, t = (x.detach() for x in gqa_inputs(1, 4, 2, 6, 5, 16, F32))
    t_bar = t.mean(-1)
    ops = torch.ops.tgr_kernels
    torch.library.opcheck(ops.flash_attention_forward, (q, k, v, t_bar, None, None, True, None, 0, 0.05, 0.25),
                          test_utils=("test_faketensor",))
    _, lse = ops.flash_attention_forward(q, k, v, t_bar, None, None, True, None, 0, 0.05, 0.25)
    torch.library.opcheck(ops.flash_attention_backward,
                          (q, k, v, t_bar, None, None, True, None, 0, 0.05, 0.25, lse, torch.randn_like(q), True, True),
                          test_utils=("test_faketensor",))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_heads_that_do_not_group_are_named(backend):
    q = torch.randn(1, 6, 4, 8)
    k = v = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match=r"H_q = 6.*H_kv = 4"):
        temperature_guided_attention(q, k, v, torch.rand(1, 4), backend=backend)


def test_k_and_v_heads_must_match():
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="k and v must have the same number of heads"):
        temperature_guided_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), torch.rand(1, 4))
