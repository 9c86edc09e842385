"""Wide path of temperature-guided attention: GEMMs plus fused row kernels, for any head dim.

Design limit: this is the path for heads wider than 256 (the seed's single head as wide as the
hidden state, D = 4096), where no flash tile fits in SRAM. While S <= D the S×S score matrix is
no larger than Q itself, so the right shape is library GEMMs (QKᵀ, PV and the backward GEMMs)
with one pass of a fused row kernel between them. Query rows are processed in chunks so the
score buffer stays bounded (``chunk_bytes``); with ``causal`` each chunk multiplies only the
keys its rows can see.

Forward, per chunk of query rows: ``Z = Q_c Kᵀ`` (GEMM), then the row kernel turns Z in place
into ``P = g ∘ softmax(t̄·scale·Z + m)`` (g: the GSoT gate, ``_gate``) and saves each row's
log-sum-exp; ``O_c = P V`` (GEMM).

Backward, per chunk, from the ungated dY (the soft gate's gated, see the backward row kernel):
``Z = Q_c Kᵀ`` (or the forward's, kept when the
problem is one chunk) and ``dP = dY_c Vᵀ`` (GEMMs); the row kernel recomputes
``P = exp(S − lse)``, sums ``Δ_i = Σ_j P_ij dP_ij`` (= Σ_d dY ∘ Ô, which the gate's gradient
needs), stores g ∘ P into Z's buffer, turns dP in place into ``G = g·t̄·scale·dS`` with
``dS = P ∘ (dP − Δ)``, and sums ``dt̄_i = g_i · scale · Σ_j dS_ij Z_ij + g'(t̄_i) Δ_i``; then
``dV += (g ∘ P)ᵀ dY_c``, ``dQ_c = G K``, ``dK += Gᵀ Q_c``. (The flash path's ``Δ = rowsum(dO ∘ O)`` would lose dt̄ to
cancellation when the softmax saturates, as the seed's q = k = v at D = 4096 does.)

Two implementations of the row kernels share the orchestration: Triton (``row_ops="triton"``,
for CUDA) and PyTorch in-place ops (``row_ops="torch"``, the CPU path).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _configs, _gate
from ._backend import autocast_off, new_output, once_differentiable_strict
from ._gate import gate_rows, gated_lse
from ._masks import LOG2E, logits_tile, mask_args, online_softmax_step
from .reference import MASKED_BIAS

DEFAULT_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


# ----------------------------------------------------------------------------- Triton row kernels
@triton.jit
def _row_logits(row_ptr, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                S_q, S_k, HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr):
    """One [1, BLOCK_N] block of a row: the raw products z (fp32, 0 past n_cols) and their
    base-2 logits s (−inf where masked or past n_cols)."""
    col_ok = offs_n[None, :] < n_cols
    z = tl.load(row_ptr + offs_n[None, :], mask=col_ok, other=0.0).to(tl.float32)
    s = logits_tile(z, row_scale, offs_m, offs_n, b, h, KPM, BIAS,
                    stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                    S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
    return z, tl.where(col_ok, s, float("-inf"))


@triton.jit(do_not_specialize=["gsot_mode"])
def _wide_softmax_fwd_kernel(
    Z, T_BAR, KPM, BIAS, LSE,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, M, row0, n_cols, S_q, S_k, scale, gsot_threshold, gsot_mode, gsot_width,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """In place: ``Z_ij <- g_i · exp(t̄_i·scale·Z_ij + m_ij − lse_i)`` for one row of the chunk.

    Z: contiguous [B, H, M, n_cols] raw products q_i·k_j of query rows row0 .. row0+M-1 against
    keys 0 .. n_cols-1. T_BAR fp32 [B, S_q]; KPM, BIAS: masks as in the flash kernels (absolute
    positions). LSE: fp32 [B, H, S_q] contiguous, receives the base-2 log-sum-exp (+inf when the
    row is fully masked, whose probabilities are then all zero). The gate g of
    ``_gate.gate_rows`` (threshold, mode, width) multiplies the row when HAS_GATE.
    Grid: (B * H * M,).
    """
    r = tl.program_id(0)
    bh = r // M
    i = row0 + r % M
    b = bh // H
    h = bh % H
    z_row = Z + r.to(tl.int64) * n_cols
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + i.to(tl.int64) * stride_tm).to(tl.float32)
    offs_m = i + tl.zeros([1], dtype=tl.int32)
    row_scale = (t_bar * (scale * LOG2E)) + tl.zeros([1], dtype=tl.float32)
    offs0 = tl.arange(0, BLOCK_N)

    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        offs_n = start + offs0
        _, s = _row_logits(z_row, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                           stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                           S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        m_i, _p, _alpha, l_i = online_softmax_step(m_i, l_i, s)  # the sum only (not "_": see below)

    dead = l_i == 0.0
    lse = tl.where(dead, float("inf"), m_i + tl.log2(tl.where(dead, 1.0, l_i)))
    # Stored now, so that only one of lse and lse_p stays live across the loop below.
    tl.store(LSE + bh.to(tl.int64) * S_q + i + tl.zeros([1], dtype=tl.int32), lse)
    lse_p = lse
    if HAS_GATE:
        # The gate folded into the lse, exp2(S − lse + log2 g) = g·P: no register held for g.
        # (Not "_" for the unused slope: the loop below assigns "_", and Triton would carry it.)
        gate, _slope = gate_rows(t_bar, gsot_threshold, gsot_mode, gsot_width)
        lse_p = gated_lse(lse, gate)
    for start in range(0, n_cols, BLOCK_N):
        offs_n = start + offs0
        _, s = _row_logits(z_row, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                           stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                           S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        p = tl.exp2(s - lse_p[:, None])
        tl.store(z_row + offs_n[None, :], p.to(Z.dtype.element_ty), mask=offs_n[None, :] < n_cols)


@triton.jit(do_not_specialize=["gsot_mode"])
def _wide_softmax_bwd_kernel(
    Z, DP, T_BAR, KPM, BIAS, LSE, DT,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, M, row0, n_cols, S_q, S_k, scale, gsot_threshold, gsot_mode, gsot_width,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    STORE_P: tl.constexpr, STORE_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row of the backward: recompute P, form dS, the temperature gradient and G.

    Z: contiguous [B, H, M, n_cols] raw q·k products, overwritten by P when STORE_P.
    DP: same shape, dO·vⱼ products, overwritten by ``G = t̄·scale·dS`` when STORE_G, where
    ``dS = P ∘ (dP − Δ)`` with ``Δ_i = Σ_j P_ij dP_ij`` summed here, from the same P and dP
    (not as rowsum(dO ∘ O)), and P renormalised to sum to one (exp(S − lse) misses by the
    rounding of lse): when the softmax saturates, dS is a tiny difference of nearly equal terms,
    and only consistent operands let them cancel. LSE: fp32 [B, H, S_q].
    DT: fp32 [B, H, S_q], receives ``scale · Σ_j dS_ij Z_ij`` (masked entries have P = 0, so
    the −inf logits never enter). With HAS_GATE, dP comes from the ungated dY (hard and
    straight-through gates): the stored P and G and the attention's share of dt̄ are multiplied
    by the row's gate g (through P), and dt̄ gains ``g'(t̄) · Δ`` (``_gate``); for the soft gate dP
    comes from the gated dY, P stays ungated and dt̄ gains ``(1 − g)/ε · Δ``, the same
    ``g'(t̄) · Δ̂`` of the ungated Δ̂ = Δ / g. Grid: (B * H * M,).
    """
    r = tl.program_id(0)
    bh = r // M
    i = row0 + r % M
    b = bh // H
    h = bh % H
    z_row = Z + r.to(tl.int64) * n_cols
    dp_row = DP + r.to(tl.int64) * n_cols
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + i.to(tl.int64) * stride_tm).to(tl.float32)
    offs_m = i + tl.zeros([1], dtype=tl.int32)
    row_scale = (t_bar * (scale * LOG2E)) + tl.zeros([1], dtype=tl.float32)
    row_off = bh.to(tl.int64) * S_q + i + tl.zeros([1], dtype=tl.int32)
    lse = tl.load(LSE + row_off)
    offs0 = tl.arange(0, BLOCK_N)

    row_sum = tl.zeros([1], dtype=tl.float32)
    delta = tl.zeros([1], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        offs_n = start + offs0
        col_ok = offs_n[None, :] < n_cols
        z, s = _row_logits(z_row, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                           stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                           S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        dp = tl.load(dp_row + offs_n[None, :], mask=col_ok, other=0.0).to(tl.float32)
        p = tl.exp2(s - lse[:, None])
        row_sum += tl.sum(p, 1)
        delta += tl.sum(p * dp, 1)
    row_sum = tl.where(row_sum == 0.0, 1.0, row_sum)  # a fully masked row: P = 0 stays 0
    delta = delta / row_sum
    # exp2(S − lse_p) is P summed to one, times the gate g when HAS_GATE: then dS, G, the stored P
    # and dt̄'s attention share come out gated, with no register held for g across the loop.
    lse_p = lse + tl.log2(row_sum)
    if HAS_GATE:
        gate, slope = gate_rows(t_bar, gsot_threshold, gsot_mode, gsot_width)
        # The soft gate's dY came gated (wide_backward): dP and Δ carry g already, P stays ungated,
        # and the gate's share g'·Δ̂ is (1 − g)/ε · Δ (σ' = σ(1 − σ)), with no division by g.
        soft = gsot_mode == 2  # 2: GATE_SOFT
        lse_p = gated_lse(lse_p, tl.where(soft, 1.0, gate))
        slope = tl.where(soft, (1.0 - gate) * tl.fdiv(1.0, gsot_width), slope)
    dt = tl.zeros([1], dtype=tl.float32)
    if HAS_GATE:
        # The gate's own share g'·Δ starts the sum, divided by the scale that multiplies it at the
        # end: nothing of the gate stays live across the loop (the gate and its slope spilled on
        # sm_90 when they did; so did this share, kept apart, 8 B). A zero slope (the hard gate)
        # adds 0 even where a pruned row's ungated dP overflowed a half GEMM (Δ = inf).
        dt = tl.where(slope == 0.0, 0.0, slope * delta / scale)

    for start in range(0, n_cols, BLOCK_N):
        offs_n = start + offs0
        col_ok = offs_n[None, :] < n_cols
        z, s = _row_logits(z_row, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                           stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                           S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        dp = tl.load(dp_row + offs_n[None, :], mask=col_ok, other=0.0).to(tl.float32)
        p = tl.exp2(s - lse_p[:, None])
        # P = 0 (masked, or a pruned row's g = 0) gives dS = 0 even when that dP is inf.
        ds = tl.where(p > 0.0, p * (dp - delta[:, None]), 0.0)
        dt += tl.sum(ds * z, 1)
        if STORE_P:
            tl.store(z_row + offs_n[None, :], p.to(Z.dtype.element_ty), mask=col_ok)
        if STORE_G:
            tl.store(dp_row + offs_n[None, :], (ds * (t_bar * scale)).to(DP.dtype.element_ty), mask=col_ok)
    tl.store(DT + row_off, dt * scale)


def _row_block(n_cols: int):
    """The row kernels' configuration (BLOCK_N, warps) for rows of n_cols scores: chosen in
    ``_configs`` and compiled for sm_90, sm_80 and sm_86 by ``python -m tgr_kernels.aot``."""
    return (_configs.wide_row_config(n_cols),)


def _triton_rows_forward(z, row0, t_bar, key_padding, additive, causal, gate, scale, lse, S_q, S_k):
    B, H, M, n_cols = z.shape
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), z.device)
    _configs.launch(
        _wide_softmax_fwd_kernel, (B * H * M,), _row_block(n_cols),
        z, t_bar, kpm, bias, lse, *t_bar.stride(), *kpm_strides, *bias_strides,
        H, M, row0, n_cols, S_q, S_k, scale, *_gate.kernel_args(gate),
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        HAS_GATE=gate is not None,
    )


def _triton_rows_backward(z, dp, row0, t_bar, key_padding, additive, causal, gate, scale, lse, dt,
                          S_q, S_k, store_p, store_g):
    B, H, M, n_cols = z.shape
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), z.device)
    _configs.launch(
        _wide_softmax_bwd_kernel, (B * H * M,), _row_block(n_cols),
        z, dp, t_bar, kpm, bias, lse, dt, *t_bar.stride(), *kpm_strides, *bias_strides,
        H, M, row0, n_cols, S_q, S_k, scale, *_gate.kernel_args(gate),
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        HAS_GATE=gate is not None, STORE_P=store_p, STORE_G=store_g,
    )


# ----------------------------------------------------------------------------- PyTorch row ops
def _chunk_keep(row0, M, n_cols, key_padding, causal, S_q, S_k, device) -> torch.Tensor | None:
    """Bool keep-mask of the chunk, broadcastable to [B, H, M, n_cols] (None: keep all)."""
    keep = None
    if key_padding is not None:
        keep = key_padding[:, None, None, :n_cols]
    if causal:
        rows = torch.arange(row0, row0 + M, device=device).view(M, 1) + (S_k - S_q)
        visible = torch.arange(n_cols, device=device).view(1, n_cols) <= rows
        keep = visible if keep is None else keep & visible
    return keep


def _torch_logits_(z, row0, t_bar, key_padding, additive, causal, scale, S_q, S_k):
    """In place on fp32 z: ``t̄·scale·z + m`` (natural log units), −inf where masked. A bias
    ``<= MASKED_BIAS`` masks its key like −inf (as in the Triton kernels' ``_masks.logits_tile``)."""
    M, n_cols = z.shape[2], z.shape[3]
    z.mul_((t_bar[:, row0:row0 + M] * scale)[:, None, :, None])
    keep = _chunk_keep(row0, M, n_cols, key_padding, causal, S_q, S_k, z.device)
    if additive is not None:
        bias = torch.broadcast_to(additive, (*additive.shape[:-2], S_q, S_k))[..., row0:row0 + M, :n_cols]
        z.add_(bias)
        # Taken literally, finfo(fp32).min gives a fully masked row an lse of ~−3.4e38, whose
        # base-2 copy overflows to −inf, and the backward's exp(S − lse) becomes inf/inf = NaN.
        unmasked = bias > MASKED_BIAS
        keep = unmasked if keep is None else keep & unmasked
    if keep is not None:
        z.masked_fill_(~keep, -math.inf)
    return z


def _torch_rows_forward(z, row0, t_bar, key_padding, additive, causal, gate, scale, lse, S_q, S_k):
    M = z.shape[2]
    s = z.to(lse.dtype)  # fp32 for half inputs (a copy), in place for fp32 and fp64
    _torch_logits_(s, row0, t_bar, key_padding, additive, causal, scale, S_q, S_k)
    row_lse = torch.logsumexp(s, dim=-1, keepdim=True)
    row_lse.masked_fill_(torch.isneginf(row_lse), math.inf)  # fully masked row: P = 0
    s.sub_(row_lse).exp_()
    if gate is not None:
        s.mul_(_gate.gate_value(t_bar[:, row0:row0 + M], gate)[:, None, :, None])
    if s is not z:
        z.copy_(s)
    lse[:, :, row0:row0 + M] = row_lse.squeeze(-1) * (1.0 / math.log(2.0))


def _torch_rows_backward(z, dp, row0, t_bar, key_padding, additive, causal, gate, scale, lse, dt,
                         S_q, S_k, store_p, store_g):
    M = z.shape[2]
    zf, dpf = z.to(lse.dtype), dp.to(lse.dtype)
    p = zf.clone()  # the raw products stay in zf for dt̄
    _torch_logits_(p, row0, t_bar, key_padding, additive, causal, scale, S_q, S_k)
    p.sub_((lse[:, :, row0:row0 + M] * math.log(2.0))[..., None]).exp_()
    row_sum = p.sum(-1, keepdim=True)
    p.div_(row_sum.masked_fill_(row_sum == 0, 1.0))  # exactly normalised rows (fully masked: 0)
    # Δ from the same P and dP that form dS (see _wide_softmax_bwd_kernel for why).
    delta = torch.einsum("bhmn,bhmn->bhm", p, dpf)
    t_rows = t_bar[:, row0:row0 + M]
    soft = gate is not None and gate.mode == _gate.GATE_SOFT
    if gate is not None and not soft:
        # dP came from the ungated dY: P gated from here on gates dS, G, the stored P and dt̄'s
        # attention share (as the Triton kernel folds g into P); the gate's own g'·Δ is added below.
        # (The soft gate's dY came gated: dP and Δ carry g, P stays as it is.)
        p.mul_(_gate.gate_value(t_rows, gate).to(p.dtype)[:, None, :, None])
    ds = dpf.sub_(delta[..., None]).mul_(p)
    if gate is not None:  # P = 0 (a pruned row) gives dS = 0 even where its ungated dP overflowed
        ds.masked_fill_(p == 0, 0.0)
    dt_rows = torch.einsum("bhmn,bhmn->bhm", ds, zf) * scale
    if gate is not None:  # the hard gate's zero slope adds 0 even where Δ = inf
        slope = _gate.gate_slope(t_rows, gate) if not soft else _soft_slope_over_gate(t_rows, gate)
        slope = slope.to(p.dtype)[:, None, :]
        dt_rows += torch.where(slope == 0, 0.0, slope * delta)
    dt[:, :, row0:row0 + M] = dt_rows
    if store_p:
        z.copy_(p)
    if store_g:
        ds.mul_((t_rows * scale)[:, None, :, None])
        if ds is not dp:
            dp.copy_(ds)


def _soft_slope_over_gate(t_rows: torch.Tensor, gate) -> torch.Tensor:
    """``g'/g = (1 − g)/ε`` of the soft gate: its share of dt̄ from the gated Δ = g·Δ̂."""
    return (1 - _gate.gate_value(t_rows, gate)) / gate.width


def _soft_gated(grad_out: torch.Tensor, t_bar: torch.Tensor, gate) -> torch.Tensor:
    """``g_i · dY_i`` for the soft gate, multiplied in fp32 (fp64 for fp64) one batch element at
    a time and rounded once to dY's dtype. Eager's order: a pruned row's small g keeps dP = (g·dY) Vᵀ in a
    half GEMM's range where the ungated product would overflow (hard and straight-through gates
    need no such care: their pruned rows have P = 0, and their dS is set to 0)."""
    dtype = torch.promote_types(grad_out.dtype, torch.float32)
    g = _gate.gate_value(t_bar, gate).to(dtype)
    out = torch.empty_like(grad_out)
    for b in range(grad_out.shape[0]):
        out[b] = grad_out[b].to(dtype) * g[b][None, :, None]
    return out


_ROW_OPS = {
    "triton": (_triton_rows_forward, _triton_rows_backward),
    "torch": (_torch_rows_forward, _torch_rows_backward),
}


# ----------------------------------------------------------------------------- orchestration
def _stats_dtype(q: torch.Tensor) -> torch.dtype:
    """Per-row statistics (lse, Δ, dt̄) and accumulators: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


# Causal row blocks: rows per block when causal. Block r multiplies its rows against the keys they
# can see, K[:end_r], so the blocks tile the triangle plus one R×R diagonal tile each, half of
# it masked: R / S of the triangle's work wasted. Shorter blocks waste less but lose GEMM
# efficiency (AMD EPYC CPU, D = 4096: GEMMs of M = 128 rows ran at ~70% of the square GEMM's
# rate, 512 at ~90%). Measured there at S = 2048 (q = k = v, fp32 and bf16), 256 rows beat 512
# (causal / non-causal time: forward 0.53 vs 0.57–0.63, forward + backward 0.69–0.71 vs
# 0.70–0.77) and 128 was slower than either.
CAUSAL_ROW_BLOCK = 256
# Where the PyTorch row ops tile the triangle in large blocks (``_causal_blocks``: fp32/fp64 with
# the square score buffer in memory), the row block only sets the diagonal leaves, so shorter
# blocks waste less and cost little GEMM speed. Measured on the AMD EPYC (fp32, q = k = v,
# D = 4096, quiet machine, the variants interleaved, medians of 7), causal / non-causal time with
# row blocks of 256, 128, 64: S = 2048 forward 0.604, 0.572, 0.573, forward + backward 0.700,
# 0.670, 0.664; S = 512 forward 0.82, 0.72, 0.69, forward + backward 0.92, 0.85, 0.81. bf16
# (plain row blocks) stays at 256: S = 2048 forward 0.61, 0.64, 0.76.
CAUSAL_TRIANGLE_ROW_BLOCK = 128


def _chunks(S_q: int, S_k: int, B: int, H: int, elem: int, causal: bool, chunk_bytes: int,
            row_block: int = CAUSAL_ROW_BLOCK):
    """[(row0, row1, n_cols)]: query-row chunks and how many keys each one can see. Causal rows
    come in blocks of at most ``row_block``, each seeing keys up to its last row's
    (bottom-right aligned: row i sees keys j <= i + S_k − S_q)."""
    rows = max(1, min(S_q, chunk_bytes // max(1, B * H * S_k * elem)))
    if causal:
        rows = min(rows, row_block)
    chunks = []
    for row0 in range(0, S_q, rows):
        row1 = min(S_q, row0 + rows)
        n_cols = min(S_k, max(0, row1 + (S_k - S_q))) if causal else S_k
        chunks.append((row0, row1, n_cols))
    return chunks


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None,
          accumulate: bool = False) -> torch.Tensor:
    """``out = a @ b`` (or ``out += a @ b``) over ``[..., m, k] × [..., k, n]``, as one 2-D GEMM per
    leading index, written by BLAS into ``out`` (unit column stride, any row pitch: a block of a
    larger buffer). 2-D GEMMs read transposed slices such as the first n keys' Kᵀ in place; a
    batched matmul copies them first (bf16 on the CPU: the copy of a 2048×4096 Kᵀ took longer
    than its GEMM). Accumulating into an fp32 ``out`` from half operands adds each product after
    it is formed; otherwise BLAS adds (beta = 1, no temporary)."""
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if out is None:
        out = a.new_empty(*a.shape[:-2], a.shape[-2], b.shape[-1])
    out3 = out.view(-1, *out.shape[-2:])  # a view: leading dims of a row slice always merge
    for i in range(a3.shape[0]):
        if not accumulate:
            torch.mm(a3[i], b3[i], out=out3[i])
        elif out.dtype == a.dtype:
            out3[i].addmm_(a3[i], b3[i])
        else:
            out3[i].add_(torch.mm(a3[i], b3[i]))
    return out


def _square_fits(B: int, H: int, S_q: int, S_k: int, elem: int, chunk_bytes: int) -> bool:
    """Whether a whole ``[B, H, S_q, S_k]`` score buffer fits in one chunk's memory."""
    return B * H * S_q * S_k * elem <= chunk_bytes


def _causal_blocks(chunks, key0: int = 0, written: bool = False):
    """GEMM blocks ``(row0, row1, col0, col1, written)`` that tile what causal row ``chunks`` see
    from key ``key0`` on, larger than the chunks where they can be: the chunks split in two, the
    lower half's rows all see the upper half's keys (one square block, as tall as the lower half),
    and each half recurses. Blocks of one row range come out in order, so ``written`` says whether
    an earlier block already wrote those rows' output (accumulate) or not (write).

    Why: on the CPU a GEMM of 256 rows runs at ~80% of a 2048-row one's rate (fp32, D = 4096);
    this tiling does the same multiply-adds as the row blocks in GEMMs up to S/2 rows tall
    (AMD EPYC, S = 2048, fp32: QKᵀ 102–107 ms against 117 ms in row blocks of 256, PV 108 ms
    against 118 ms)."""
    chunks = [c for c in chunks if c[2] > key0]  # a prefix that sees nothing new
    if len(chunks) == 1:
        row0, row1, n_cols = chunks[0]
        yield row0, row1, key0, n_cols, written
    elif chunks:
        upper, lower = chunks[:len(chunks) // 2], chunks[len(chunks) // 2:]
        n_upper = upper[-1][2]
        yield from _causal_blocks(upper, key0, written)
        yield lower[0][0], lower[-1][1], key0, n_upper, written
        yield from _causal_blocks(lower, n_upper, True)


def _triangle_pays(q: torch.Tensor) -> bool:
    """Whether the causal blocks of ``_causal_blocks`` beat plain row blocks: fp32/fp64 GEMMs,
    whose products accumulate in the output's own dtype (half outputs would be rounded once per
    block; in bf16 the row blocks measured as fast)."""
    return q.dtype in (torch.float32, torch.float64)


def _row_chunks(q, k, causal, row_ops, chunk_bytes):
    """The chunks of a call, the same in its forward and backward: causal rows in blocks of
    ``CAUSAL_TRIANGLE_ROW_BLOCK`` where the PyTorch row ops tile the triangle (fp32/fp64, square
    buffer in memory), else ``CAUSAL_ROW_BLOCK``."""
    B, H, S_q, _ = q.shape
    S_k, elem = k.shape[2], q.element_size()
    triangle = causal and row_ops == "torch" and _triangle_pays(q) and _square_fits(B, H, S_q, S_k, elem,
                                                                                   chunk_bytes)
    return _chunks(S_q, S_k, B, H, elem, causal, chunk_bytes,
                   CAUSAL_TRIANGLE_ROW_BLOCK if triangle else CAUSAL_ROW_BLOCK)


def _causal_scores(a, b, out, chunks):
    """``out[rows, keys] = a[rows] b[keys]ᵀ`` over what each causal row chunk sees (Z = Q Kᵀ,
    dP = dO Vᵀ), into a ``[B, H, S_q, S_k]`` buffer; other entries are left as they were."""
    for row0, row1, col0, col1, _ in _causal_blocks(chunks):
        _gemm(a[:, :, row0:row1], b[:, :, col0:col1].transpose(-2, -1), out=out[:, :, row0:row1, col0:col1])


def _causal_rows_product(m, b, out, chunks, accumulate=False):
    """``out[rows] (+)= m[rows, keys] b[keys]`` over the keys each row sees (PV, dQ = G K). Rows
    that see no key are not written."""
    for row0, row1, col0, col1, written in _causal_blocks(chunks):
        _gemm(m[:, :, row0:row1, col0:col1], b[:, :, col0:col1], out=out[:, :, row0:row1],
              accumulate=written or accumulate)


def _causal_keys_product(m, a, out, chunks):
    """``out[keys] += m[rows, keys]ᵀ a[rows]`` over the rows that see each key (dK = Gᵀ Q,
    dV = Pᵀ dO); ``out`` holds zeros (or a sum to add to) beforehand."""
    for row0, row1, col0, col1, _ in _causal_blocks(chunks):
        _gemm(m[:, :, row0:row1, col0:col1].transpose(-2, -1), a[:, :, row0:row1], out=out[:, :, col0:col1],
              accumulate=True)


def _causal_forward_in_square(q, k, v, t_bar, key_padding, additive, gate, scale, rows_forward, lse,
                              chunks, keep_scores):
    """Causal forward with the scores in one ``[B, H, S_q, S_k]`` buffer (PyTorch row ops, fp32/fp64):
    Z and PV in the large blocks of ``_causal_blocks``, the row ops per row chunk. Returns
    (out, lse, saved Z or None); saved Z is zero past each row's keys."""
    B, H, S_q, S_k = *q.shape[:3], k.shape[2]
    z = q.new_zeros(B, H, S_q, S_k) if keep_scores else q.new_empty(B, H, S_q, S_k)
    _causal_scores(q, k, z, chunks)
    saved, p = (z, z.clone()) if keep_scores else (None, z)
    out = new_output(q.shape, q.dtype, q.device)
    for row0, row1, n_cols in chunks:
        if n_cols == 0:  # rows that see no key at all
            out[:, :, row0:row1] = 0
            lse[:, :, row0:row1] = math.inf
        else:
            rows_forward(p[:, :, row0:row1, :n_cols], row0, t_bar, key_padding, additive, True, gate,
                         scale, lse, S_q, S_k)
    _causal_rows_product(p, v, out, chunks)
    return out, lse, saved


def wide_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale, row_ops, chunk_bytes,
                 keep_scores=False):
    """Returns (out, lse, scores). With ``keep_scores``, when a whole ``[B, H, S_q, S_k]`` buffer fits
    in ``chunk_bytes``, the raw products ``Z = Q Kᵀ`` are returned for the backward, which then
    needs no GEMM to recompute them (causal blocks fill only the keys their rows see; the rest of
    the buffer is zero and never read); otherwise scores is None."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    rows_forward = _ROW_OPS[row_ops][0]
    lse = new_output((B, H, S_q), _stats_dtype(q), q.device)
    chunks = _row_chunks(q, k, causal, row_ops, chunk_bytes)
    if len(chunks) == 1:  # one chunk (then it sees every key): no output slices to copy into
        z = _gemm(q, k.transpose(-2, -1))
        saved, z = (z, z.clone()) if keep_scores else (None, z)
        rows_forward(z, 0, t_bar, key_padding, additive, causal, gate, scale, lse, S_q, S_k)
        return _gemm(z, v), lse, saved
    if causal and row_ops == "torch" and _triangle_pays(q) and _square_fits(B, H, S_q, S_k, q.element_size(),
                                                                             chunk_bytes):
        return _causal_forward_in_square(q, k, v, t_bar, key_padding, additive, gate, scale,
                                         rows_forward, lse, chunks, keep_scores)
    out = new_output(q.shape, q.dtype, q.device)
    saved = None
    if keep_scores and causal and _square_fits(B, H, S_q, S_k, q.element_size(), chunk_bytes):
        saved = q.new_zeros(B, H, S_q, S_k)  # zeros past each row's keys: a defined output
    for row0, row1, n_cols in chunks:
        if n_cols == 0:  # rows that see no key at all
            out[:, :, row0:row1] = 0
            lse[:, :, row0:row1] = math.inf
            continue
        q_c, k_c = q[:, :, row0:row1], k[:, :, :n_cols]
        if saved is not None:
            z = _gemm(q_c, k_c.transpose(-2, -1), out=saved[:, :, row0:row1, :n_cols]).clone()
        else:
            z = _gemm(q_c, k_c.transpose(-2, -1))
        rows_forward(z, row0, t_bar, key_padding, additive, causal, gate, scale, lse, S_q, S_k)
        _gemm(z, v[:, :, :n_cols], out=out[:, :, row0:row1])
    return out, lse, saved


def wide_backward(q, k, v, t_bar, key_padding, additive, causal, gate, scale, row_ops, chunk_bytes,
                  lse, scores, grad_out, need_dq, need_dkv, same_qkv=False):
    """Returns (dq, dk, dv, dt̄ [B, S_q]); unneeded gradients are None. ``scores``: the forward's
    saved Z or None; ``same_qkv``: q, k and v are one tensor (then dq holds dQ + dK + dV, and
    dk, dv are None)."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    rows_backward = _ROW_OPS[row_ops][1]
    if gate is not None and gate.mode == _gate.GATE_SOFT:
        grad_out = _soft_gated(grad_out, t_bar, gate)  # the row ops know the soft gate's dY is gated
    stats = _stats_dtype(q)
    dt = new_output((B, H, S_q), stats, q.device)
    chunks = _row_chunks(q, k, causal, row_ops, chunk_bytes)
    if len(chunks) == 1:
        dq, dk, dv = _backward_one_chunk(q, k, v, t_bar, key_padding, additive, causal, gate, scale, rows_backward,
                                         lse, dt, scores, grad_out, need_dq, need_dkv, same_qkv)
        return dq, dk, dv, dt.sum(1)
    if causal and row_ops == "torch" and _square_fits(B, H, S_q, S_k, q.element_size(), chunk_bytes):
        dq, dk, dv = _causal_backward_in_square(q, k, v, t_bar, key_padding, additive, gate, scale, rows_backward,
                                                lse, dt, scores, grad_out, need_dq, need_dkv, same_qkv, chunks)
        return dq, dk, dv, dt.sum(1)
    # dK/dV add up over chunks: accumulate in fp32. With one X = q = k = v (every gradient wanted)
    # they share one accumulator, fed by one GEMM a chunk, ``dK + dV = [G; P]ᵀ [Q_c; dO_c]``:
    # half the accumulations (each a pass over the fp32 rows for half inputs) and a deeper GEMM.
    summed = same_qkv and need_dq and need_dkv
    dq = new_output(q.shape, q.dtype, q.device) if need_dq else None
    dk = torch.zeros(B, H, S_k, D, device=q.device, dtype=stats) if need_dkv else None
    dv = torch.zeros(B, H, S_k, D, device=q.device, dtype=stats) if need_dkv and not summed else None
    for row0, row1, n_cols in chunks:
        if n_cols == 0:
            dt[:, :, row0:row1] = 0
            if dq is not None:
                dq[:, :, row0:row1] = 0
            continue
        q_c, do_c = q[:, :, row0:row1], grad_out[:, :, row0:row1]
        k_c, v_c = k[:, :, :n_cols], v[:, :, :n_cols]
        if scores is not None:  # the forward's causal blocks, in a square buffer
            z = scores[:, :, row0:row1, :n_cols].clone()
        else:
            z = _scores_for_backward(scores, q_c, k_c, store_p=need_dkv)
        dp = _gemm(do_c, v_c.transpose(-2, -1))
        rows_backward(z, dp, row0, t_bar, key_padding, additive, causal, gate, scale, lse, dt,
                      S_q, S_k, store_p=need_dkv, store_g=need_dq or need_dkv)
        if summed:
            g_p, q_do = torch.cat([dp, z], dim=-2), torch.cat([q_c, do_c], dim=-2)
            _gemm(g_p.transpose(-2, -1), q_do, out=dk[:, :, :n_cols], accumulate=True)
        elif need_dkv:
            _gemm(z.transpose(-2, -1), do_c, out=dv[:, :, :n_cols], accumulate=True)
            _gemm(dp.transpose(-2, -1), q_c, out=dk[:, :, :n_cols], accumulate=True)
        if need_dq:
            _gemm(dp, k_c, out=dq[:, :, row0:row1])
    if summed:
        return dk.add_(dq).to(q.dtype), None, None, dt.sum(1)
    if need_dkv:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv, dt.sum(1)


def _causal_backward_in_square(q, k, v, t_bar, key_padding, additive, gate, scale, rows_backward, lse, dt, scores,
                               grad_out, need_dq, need_dkv, same_qkv, chunks):
    """Causal row blocks whose P and G fit in two ``[B, H, S_q, S_k]`` buffers (PyTorch row ops,
    which work on strided blocks): no gradient is accumulated over blocks in half precision.

    ``G = dO Vᵀ`` (and Z = Q Kᵀ when the forward kept none) in the large blocks of
    ``_causal_blocks``; the row ops per row chunk turn them into dS·t̄·scale and P. Then
    ``dQ = G K``, ``dK = Gᵀ Q``, ``dV = Pᵀ dO``: in fp32/fp64 over the same large blocks; in half
    precision dQ per row chunk and dK, dV per key block ``n_{r-1}:n_r`` (seen by rows ``r0:``
    only, zeros where masked), each written once (an accumulation over blocks would cost a pass
    over the fp32 rows per block). When q, k, v are one tensor X, dX = dQ + dK + dV is summed in
    place."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    g = q.new_empty(B, H, S_q, S_k)
    _causal_scores(grad_out, v, g, chunks)
    p = None
    if need_dkv:
        p = q.new_empty(B, H, S_q, S_k)
        if scores is not None:
            p.copy_(scores)
        else:
            _causal_scores(q, k, p, chunks)
    summed = same_qkv and need_dq and need_dkv
    dq = new_output(q.shape, q.dtype, q.device) if need_dq else None
    for row0, row1, n_cols in chunks:
        if n_cols == 0:
            dt[:, :, row0:row1] = 0
            if need_dq:
                dq[:, :, row0:row1] = 0
            continue
        if need_dkv:
            z = p[:, :, row0:row1, :n_cols]
        else:
            z = _scores_for_backward(None if scores is None else scores[:, :, row0:row1, :n_cols],
                                     q[:, :, row0:row1], k[:, :, :n_cols], store_p=False)
        rows_backward(z, g[:, :, row0:row1, :n_cols], row0, t_bar, key_padding, additive, True, gate, scale, lse, dt,
                      S_q, S_k, store_p=need_dkv, store_g=True)
    if _triangle_pays(q):
        if need_dq:
            _causal_rows_product(g, k, dq, chunks)
        if not need_dkv:
            return dq, None, None
        dk = dq if summed else torch.zeros_like(k)
        dv = dq if summed else torch.zeros_like(v)
        _causal_keys_product(g, q, dk, chunks)
        _causal_keys_product(p, grad_out, dv, chunks)
        return (dq, None, None) if summed else (dq, dk, dv)
    if need_dq:
        for row0, row1, n_cols in chunks:
            if n_cols:
                _gemm(g[:, :, row0:row1, :n_cols], k[:, :, :n_cols], out=dq[:, :, row0:row1])
    if not need_dkv:
        return dq, None, None
    dk = dq if summed else new_output(k.shape, k.dtype, k.device)
    dv = dq if summed else new_output(v.shape, v.dtype, v.device)
    key0 = 0
    for row0, _row1, n_cols in chunks:
        if n_cols <= key0:
            continue
        g_c, p_c = g[:, :, row0:, key0:n_cols].transpose(-2, -1), p[:, :, row0:, key0:n_cols].transpose(-2, -1)
        _gemm(g_c, q[:, :, row0:], out=dk[:, :, key0:n_cols], accumulate=summed)
        _gemm(p_c, grad_out[:, :, row0:], out=dv[:, :, key0:n_cols], accumulate=summed)
        key0 = n_cols
    return (dq, None, None) if summed else (dq, dk, dv)


def _scores_for_backward(scores, q_c, k_c, store_p):
    """Z for one chunk: the forward's saved copy (cloned when P will overwrite it, so a second
    backward with retain_graph still sees Z) or a recomputed GEMM."""
    if scores is None:
        return _gemm(q_c, k_c.transpose(-2, -1))
    return scores.clone() if store_p else scores


def _backward_one_chunk(q, k, v, t_bar, key_padding, additive, causal, gate, scale, rows_backward,
                        lse, dt, scores, grad_out, need_dq, need_dkv, same_qkv):
    """The whole problem in one chunk: every GEMM writes its gradient directly. When q, k, v are
    one tensor X the three gradients are summed as ``dX = (G + Gᵀ) X + Pᵀ dO``: two GEMMs, not three."""
    S_q, S_k = q.shape[2], k.shape[2]
    z = _scores_for_backward(scores, q, k, store_p=need_dkv)
    dp = _gemm(grad_out, v.transpose(-2, -1))
    rows_backward(z, dp, 0, t_bar, key_padding, additive, causal, gate, scale, lse, dt,
                  S_q, S_k, store_p=need_dkv, store_g=need_dq or need_dkv)
    if same_qkv and need_dq and need_dkv:
        dx = _gemm(dp + dp.transpose(-2, -1), q)  # dQ + dK = G X + Gᵀ X
        _gemm(z.transpose(-2, -1), grad_out, out=dx, accumulate=True)  # + dV = Pᵀ dO
        return dx, None, None
    dq = _gemm(dp, k) if need_dq else None
    dk = _gemm(dp.transpose(-2, -1), q) if need_dkv else None
    dv = _gemm(z.transpose(-2, -1), grad_out) if need_dkv else None
    return dq, dk, dv


class WideAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked GEMM + PyTorch row-ops path (inputs validated by the
    caller). Forward and backward run with autocast off, whatever the caller's autocast state
    (the custom_fwd/custom_bwd convention, for the device of the inputs; the backward's half is
    in ``once_differentiable_strict``): the dispatcher has already chosen the dtypes, and the
    GEMMs must not be recast."""

    @staticmethod
    def forward(ctx, q, k, v, t_bar, key_padding, additive, causal, gate, scale, row_ops, chunk_bytes):
        with autocast_off(q.device.type):  # wide_attention calls it only for training
            out, lse, scores = wide_forward(q, k, v, t_bar, key_padding, additive, causal, gate,
                                            scale, row_ops, chunk_bytes, keep_scores=True)
        ctx.save_for_backward(q, k, v, t_bar, key_padding, additive, lse, scores)
        ctx.options = (causal, gate, scale, row_ops, chunk_bytes)
        ctx.same_qkv = q is k and k is v
        return out

    @staticmethod
    @once_differentiable_strict("temperature_guided_attention (wide path)")
    def backward(ctx, grad_out):
        q, k, v, t_bar, key_padding, additive, lse, scores = ctx.saved_tensors
        need_q, need_k, need_v, need_t = ctx.needs_input_grad[:4]
        nones = (None,) * 7
        if not (need_q or need_k or need_v or need_t):
            return (None,) * 4 + nones
        dq, dk, dv, dt = wide_backward(q, k, v, t_bar, key_padding, additive, *ctx.options, lse, scores,
                                       grad_out.contiguous(), need_dq=need_q, need_dkv=need_k or need_v,
                                       same_qkv=ctx.same_qkv)
        return (dq, dk if need_k else None, dv if need_v else None, dt if need_t else None) + nones


def repeat_kv_heads(q, k, v):
    """k and v repeated to q's heads for grouped-query attention (query head h reads k/v head
    h // group; autograd sums their gradients over each group), unchanged without grouping.

    Design limit: the wide path (D > 256) takes grouped k/v by this copy, not in place. Heads
    that wide are the seed's single head as wide as the hidden state, never grouped; models with
    grouped-query attention use D <= 256, where the flash and SDPA paths read k/v in place."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    k_rep = k.repeat_interleave(group, dim=1)
    return k_rep, (k_rep if v is k else v.repeat_interleave(group, dim=1))


def wide_attention(q, k, v, t_bar, key_padding, additive, causal, gate, scale,
                   row_ops: str = "triton", chunk_bytes: int | None = None):
    """Differentiable wide attention. With the Triton row kernels it is the
    ``torch.ops.tgr_kernels.wide_attention_forward`` custom op (opaque to torch.compile); with
    PyTorch row ops it is plain PyTorch code that the compiler traces. Grouped k/v are repeated
    to q's heads (:func:`repeat_kv_heads`)."""
    k, v = repeat_kv_heads(q, k, v)
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(q.device.type, DEFAULT_CHUNK_BYTES["cpu"])
    if row_ops == "triton":
        from ._ops import wide_triton_attention  # _ops imports this module's launchers

        return wide_triton_attention(q, k, v, t_bar, key_padding, additive, causal, gate, scale,
                                     chunk_bytes)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, t_bar))):
        # Inference: no autograd node, and no score buffer kept for a backward that never comes
        # (inside Function.forward grad mode is always off, so only the caller can tell).
        with autocast_off(q.device.type):
            return wide_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale,
                                row_ops, chunk_bytes)[0]
    return WideAttentionFunction.apply(q, k, v, t_bar, key_padding, additive, causal, gate, scale,
                                       row_ops, chunk_bytes)
