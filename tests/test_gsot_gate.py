"""The GSoT gates that learn ("straight_through", "soft"): the math of the reference checked by
hand, then every path (flash, wide with Triton and PyTorch row ops, SDPA, decode) against the
float64 reference, forward and every gradient, with the library's parity criterion."""

import pytest
import torch

from helpers import DEVICE, make_mask
from parity import assert_attention_parity, leaves_as
from tgr_kernels import attention_wide
from tgr_kernels._gate import GATE_HARD, GATE_SOFT, GATE_STRAIGHT_THROUGH, Gate, gate_slope, gate_value
from tgr_kernels._validation import check_attention_inputs
from tgr_kernels.attention import TemperatureGuidedAttention, temperature_guided_attention
from tgr_kernels.reference import temperature_guided_attention_ref

F32, BF16 = torch.float32, torch.bfloat16
MODES = ["straight_through", "soft"]
THRESHOLD, WIDTH = 0.5, 0.1


def _inputs(B, H, H_kv, S_q, S_k, D, dtype, seed=0):
    """Leaves q, k, v (k/v with H_kv heads) and temperatures [B, S_q, 3] around the threshold, so
    that some rows are pruned and some kept, with nonzero surrogate slopes."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S_q, D, generator=gen)
    k = torch.randn(B, H_kv, S_k, D, generator=gen)
    v = torch.randn(B, H_kv, S_k, D, generator=gen)
    t = torch.rand(B, S_q, 3, generator=gen) * 0.6 + 0.2
    return [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)] + [t.to(DEVICE).requires_grad_()]


def check_gate_parity(run, B, H, H_kv, S_q, S_k, D, mask_kind, causal, mode, dtype=F32):
    """``run(q, k, v, t, mask, **kwargs)`` against the float64 reference: out, dq, dk, dv, dt."""
    leaves = _inputs(B, H, H_kv, S_q, S_k, D, dtype)
    mask = make_mask(mask_kind, B, H, S_q, S_k)
    kwargs = dict(causal=causal, gsot_threshold=THRESHOLD, gsot_mode=mode, gsot_width=WIDTH)
    out = run(*leaves, mask, **kwargs)
    _, truth_grads = assert_attention_parity(out, leaves, mask, kwargs, dtype)
    return truth_grads[3]


def _backend(backend):
    return lambda *a, **kw: temperature_guided_attention(*a[:4], a[4], backend=backend, **kw)


# ----------------------------------------------------------------------------- the math
@pytest.mark.parametrize("mode", ["hard"] + MODES)
def test_reference_gate_gradient_is_slope_times_dy_dot_unpruned_output(mode):
    """dt̄ through the gate is g'(t̄) · Σ_h Σ_d dY ∘ Ô, with Ô the ungated output; the attention's
    own share is g · (its ungated dt̄). Checked by hand on float64 against the reference."""
    q, k, v, t = leaves_as(_inputs(2, 2, 2, 7, 7, 8, torch.float64), torch.float64)
    dy = torch.randn(q.shape, dtype=torch.float64)
    out = temperature_guided_attention_ref(q, k, v, t, causal=True, gsot_threshold=THRESHOLD, gsot_mode=mode,
                                           gsot_width=WIDTH)
    (dt,) = torch.autograd.grad(out, [t], dy)

    t_bar = t.detach().mean(-1)
    gate = Gate(THRESHOLD, ("hard", "straight_through", "soft").index(mode), WIDTH)
    ungated = temperature_guided_attention_ref(q, k, v, t, causal=True)
    g = gate_value(t_bar, gate)[:, None, :, None]
    (dt_attn,) = torch.autograd.grad(ungated, [t], dy * g)  # the attention's share, gated
    gate_share = gate_slope(t_bar, gate) * (dy * ungated.detach()).sum(dim=(1, 3))
    expected = dt_attn + gate_share[..., None] / t.shape[-1]  # t̄ is the mean of 3 heads
    torch.testing.assert_close(dt, expected, rtol=1e-10, atol=1e-12)

    pruned = t_bar < THRESHOLD
    assert pruned.any() and (~pruned).any()
    per_row = dt.abs().sum(-1)
    if mode == "hard":  # the seed's gate: a pruned row's temperature gets no gradient at all
        assert (per_row[pruned] == 0).all()
    else:  # a learning gate: the loss reaches a pruned row's temperature
        assert (per_row[pruned] > 0).all()


def test_gate_values_and_slopes():
    t = torch.tensor([0.3, 0.5, 0.7])
    assert gate_value(t, Gate(0.5, GATE_HARD)).tolist() == [0.0, 1.0, 1.0]
    assert gate_value(t, Gate(0.5, GATE_STRAIGHT_THROUGH)).tolist() == [0.0, 1.0, 1.0]
    torch.testing.assert_close(gate_value(t, Gate(0.5, GATE_SOFT, 0.1)), torch.sigmoid((t - 0.5) / 0.1))
    assert gate_slope(t, Gate(0.5, GATE_HARD)).tolist() == [0.0, 0.0, 0.0]
    s = torch.sigmoid((t - 0.5) / 0.1)
    torch.testing.assert_close(gate_slope(t, Gate(0.5, GATE_SOFT, 0.1)), s * (1 - s) / 0.1)
    torch.testing.assert_close(gate_slope(t, Gate(0.5, GATE_STRAIGHT_THROUGH, 0.1)), s * (1 - s) / 0.1)


# ----------------------------------------------------------------------------- every path
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape,mask_kind,causal", [
    ((2, 2, 2, 9, 9, 16), "kpm_dead", True),       # flash / SDPA, a sequence with no visible key
    ((1, 4, 2, 7, 11, 40), "additive_inf", False),  # grouped-query attention, odd head dim
    ((2, 1, 1, 6, 6, 272), "kpm", True),            # wide path (D > 256)
])
def test_learning_gate_parity(backend, mode, shape, mask_kind, causal):
    dt = check_gate_parity(_backend(backend), *shape, mask_kind, causal, mode)
    assert dt.abs().sum() > 0


@pytest.mark.parametrize("row_ops", ["triton", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_learning_gate_wide_path_across_chunks(row_ops, mode):
    """Chunks of a few rows each: the gate per chunk, dK/dV accumulated over chunks."""
    B, H, S, D = 1, 1, 13, 264

    def run(q, k, v, t, mask, causal, gsot_threshold, gsot_mode, gsot_width):
        args = check_attention_inputs(q, k, v, t, mask, causal, gsot_threshold, None, gsot_mode, gsot_width)
        return attention_wide.wide_attention(q, k, v, t.mean(-1), args.key_padding, args.additive, causal,
                                             args.gate, args.scale, row_ops=row_ops,
                                             chunk_bytes=B * H * S * 4 * 4)

    check_gate_parity(run, B, H, H, S, S, D, "kpm", True, mode)


@pytest.mark.parametrize("mode", MODES)
def test_learning_gate_causal_blocks_in_one_square(mode):
    """The PyTorch wide path's causal blocks (more rows than one causal block, scores in one
    square buffer): P and G gated in place across the blocks."""
    B, H, S, D = 1, 1, attention_wide.CAUSAL_ROW_BLOCK + 21, 264

    def run(q, k, v, t, mask, causal, gsot_threshold, gsot_mode, gsot_width):
        args = check_attention_inputs(q, k, v, t, mask, causal, gsot_threshold, None, gsot_mode, gsot_width)
        return attention_wide.wide_attention(q, k, v, t.mean(-1), args.key_padding, args.additive, causal,
                                             args.gate, args.scale, row_ops="torch")

    check_gate_parity(run, B, H, H, S, S, D, None, True, mode)


@pytest.mark.parametrize("shape", [(1, 2, 1, 5, 5, 32), (1, 1, 1, 6, 6, 288)])
def test_learning_gate_torch_backend_bf16(shape):
    check_gate_parity(_backend("torch"), *shape, "kpm", True, "straight_through", dtype=BF16)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_frozen_base_learns_only_the_temperature(backend):
    """q, k, v frozen (the 4-bit base): only dt̄ is computed, and it carries the gate's share."""
    q, k, v, t = _inputs(1, 2, 2, 8, 8, 16, F32)
    q, k, v = (x.detach() for x in (q, k, v))
    kwargs = dict(causal=True, gsot_threshold=THRESHOLD, gsot_mode="straight_through", gsot_width=WIDTH)
    out = temperature_guided_attention(q, k, v, t, backend=backend, **kwargs)
    dy = torch.randn_like(out)
    (dt,) = torch.autograd.grad(out, [t], dy)
    t64 = t.detach().double().requires_grad_()
    truth = temperature_guided_attention_ref(q.double(), k.double(), v.double(), t64, **kwargs)
    (dt_truth,) = torch.autograd.grad(truth, [t64], dy.double())
    torch.testing.assert_close(dt.double(), dt_truth, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["hard"] + MODES)
def test_decode_kernels_apply_every_gate(mode):
    """The split-KV decode path (a few query rows, no gradient): a pruned row is zero under the
    hard forward gates and σ(u)·Ô under the soft one."""
    B, H, H_kv, S_q, S_k, D = 2, 4, 2, 2, 40, 32
    q, k, v, t = (x.detach() for x in _inputs(B, H, H_kv, S_q, S_k, D, F32))
    kwargs = dict(causal=True, gsot_threshold=THRESHOLD, gsot_mode=mode, gsot_width=WIDTH)
    with torch.no_grad():
        out = temperature_guided_attention(q, k, v, t, backend="triton", **kwargs)
    truth = temperature_guided_attention_ref(q.double(), k.double(), v.double(), t.double(), **kwargs)
    torch.testing.assert_close(out.double(), truth, rtol=1e-4, atol=1e-5)
    pruned = t.mean(-1) < THRESHOLD
    assert pruned.any()
    rows = out.abs().sum(dim=(1, 3))[pruned]
    assert (rows == 0).all() if mode != "soft" else (rows > 0).all()


# ----------------------------------------------------------------------------- API
def test_module_carries_the_gate():
    q, k, v, t = (x.detach() for x in _inputs(1, 2, 2, 5, 5, 16, F32))
    module = TemperatureGuidedAttention(causal=True, gsot_threshold=THRESHOLD, backend="torch", gsot_mode="soft",
                                        gsot_width=WIDTH)
    expected = temperature_guided_attention(q, k, v, t, causal=True, gsot_threshold=THRESHOLD, backend="torch",
                                            gsot_mode="soft", gsot_width=WIDTH)
    assert torch.equal(module(q, k, v, t), expected)
    assert "gsot_mode='soft'" in repr(module)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(gsot_mode="sigmoid"), ValueError, "gsot_mode"),
    (dict(gsot_mode=None), ValueError, "gsot_mode"),
    (dict(gsot_width=0.0), ValueError, "gsot_width"),
    (dict(gsot_width=float("nan")), ValueError, "gsot_width"),
    (dict(gsot_width="wide"), TypeError, "gsot_width"),
    (dict(gsot_width="0.05"), TypeError, "gsot_width"),  # float() would take it
    (dict(gsot_width=True), TypeError, "gsot_width"),
    (dict(gsot_width=torch.tensor(0.05)), TypeError, "gsot_width"),
])
def test_bad_gate_settings_are_named(kwargs, error, match):
    q, k, v, t = (x.detach() for x in _inputs(1, 1, 1, 3, 3, 8, F32))
    with pytest.raises(error, match=match):
        temperature_guided_attention(q, k, v, t, gsot_threshold=0.5, backend="torch", **kwargs)
    with pytest.raises(error, match=match):
        TemperatureGuidedAttention(gsot_threshold=0.5, **kwargs)
