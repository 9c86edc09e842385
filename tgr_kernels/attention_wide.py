"""Wide path of temperature-guided attention: GEMMs plus fused row kernels, for any head dim.

Design limit: this is the path for heads wider than 256 (the seed's single head as wide as the
hidden state, D = 4096), where no flash tile fits in SRAM. While S <= D the S×S score matrix is
no larger than Q itself, so the right shape is library GEMMs (QKᵀ, PV and the backward GEMMs)
with one pass of a fused row kernel between them. Query rows are processed in chunks so the
score buffer stays bounded (``chunk_bytes``); with ``causal`` each chunk multiplies only the
keys its rows can see.

Forward, per chunk of query rows: ``Z = Q_c Kᵀ`` (GEMM), then the row kernel turns Z in place
into ``P = g ∘ softmax(t̄·scale·Z + m)`` and saves each row's log-sum-exp; ``O_c = P V`` (GEMM).

Backward, per chunk (``dO = g ∘ dY``): ``Z = Q_c Kᵀ`` (or the forward's, kept when the problem
is one chunk) and ``dP = dO_c Vᵀ`` (GEMMs); the row kernel recomputes ``P = exp(S − lse)`` into
Z's buffer, sums ``Δ_i = Σ_j P_ij dP_ij``, turns dP in place into ``G = t̄·scale·dS`` with
``dS = P ∘ (dP − Δ)``, and sums ``dt̄_i = scale · Σ_j dS_ij Z_ij``; then ``dV += Pᵀ dO_c``,
``dQ_c = G K``, ``dK += Gᵀ Q_c``. (The flash path's ``Δ = rowsum(dO ∘ O)`` would lose dt̄ to
cancellation when the softmax saturates, as the seed's q = k = v at D = 4096 does.)

Two implementations of the row kernels share the orchestration: Triton (``row_ops="triton"``,
for CUDA) and PyTorch in-place ops (``row_ops="torch"``, the CPU path).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ._backend import TRITON_INTERPRET, new_output, next_power_of_2
from .attention_flash import _logits_tile, mask_args

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
    s = _logits_tile(z, row_scale, offs_m, offs_n, b, h, KPM, BIAS,
                     stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                     S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
    return z, tl.where(col_ok, s, float("-inf"))


@triton.jit
def _wide_softmax_fwd_kernel(
    Z, T_BAR, KPM, BIAS, LSE,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, M, row0, n_cols, S_q, S_k, scale, gsot_threshold,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """In place: ``Z_ij <- g_i · exp(t̄_i·scale·Z_ij + m_ij − lse_i)`` for one row of the chunk.

    Z: contiguous [B, H, M, n_cols] raw products q_i·k_j of query rows row0 .. row0+M-1 against
    keys 0 .. n_cols-1. T_BAR fp32 [B, S_q]; KPM, BIAS: masks as in the flash kernels (absolute
    positions). LSE: fp32 [B, H, S_q] contiguous, receives the base-2 log-sum-exp (+inf when the
    row is fully masked, whose probabilities are then all zero). Grid: (B * H * M,).
    """
    r = tl.program_id(0)
    bh = r // M
    i = row0 + r % M
    b = bh // H
    h = bh % H
    z_row = Z + r.to(tl.int64) * n_cols
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + i.to(tl.int64) * stride_tm).to(tl.float32)
    offs_m = i + tl.zeros([1], dtype=tl.int32)
    row_scale = (t_bar * (scale * 1.4426950408889634)) + tl.zeros([1], dtype=tl.float32)
    offs0 = tl.arange(0, BLOCK_N)

    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        offs_n = start + offs0
        _, s = _row_logits(z_row, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                           stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                           S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_base) + tl.sum(tl.exp2(s - m_base[:, None]), 1)
        m_i = m_new

    dead = l_i == 0.0
    lse = tl.where(dead, float("inf"), m_i + tl.log2(tl.where(dead, 1.0, l_i)))
    gate = 1.0
    if HAS_GATE:
        gate = tl.where(t_bar >= gsot_threshold, 1.0, 0.0)
    for start in range(0, n_cols, BLOCK_N):
        offs_n = start + offs0
        _, s = _row_logits(z_row, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                           stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                           S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        p = tl.exp2(s - lse[:, None]) * gate
        tl.store(z_row + offs_n[None, :], p.to(Z.dtype.element_ty), mask=offs_n[None, :] < n_cols)
    tl.store(LSE + bh.to(tl.int64) * S_q + i + tl.zeros([1], dtype=tl.int32), lse)


@triton.jit
def _wide_softmax_bwd_kernel(
    Z, DP, T_BAR, KPM, BIAS, LSE, DT,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, M, row0, n_cols, S_q, S_k, scale,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
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
    the −inf logits never enter). Grid: (B * H * M,).
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
    row_scale = (t_bar * (scale * 1.4426950408889634)) + tl.zeros([1], dtype=tl.float32)
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

    dt = tl.zeros([1], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        offs_n = start + offs0
        col_ok = offs_n[None, :] < n_cols
        z, s = _row_logits(z_row, offs_n, n_cols, row_scale, offs_m, b, h, KPM, BIAS,
                           stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                           S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        dp = tl.load(dp_row + offs_n[None, :], mask=col_ok, other=0.0).to(tl.float32)
        p = tl.exp2(s - lse[:, None]) / row_sum[:, None]
        ds = p * (dp - delta[:, None])
        dt += tl.sum(ds * z, 1)
        if STORE_P:
            tl.store(z_row + offs_n[None, :], p.to(Z.dtype.element_ty), mask=col_ok)
        if STORE_G:
            tl.store(dp_row + offs_n[None, :], (ds * (t_bar * scale)).to(DP.dtype.element_ty), mask=col_ok)
    tl.store(DT + row_off, dt * scale)


def _row_block(n_cols: int):
    if TRITON_INTERPRET:
        return min(256, max(16, next_power_of_2(n_cols))), 4
    block = min(4096, max(128, next_power_of_2(n_cols)))
    return block, (8 if block >= 2048 else 4)


def _triton_rows_forward(z, row0, t_bar, key_padding, additive, causal, gsot_threshold, scale, lse, S_q, S_k):
    B, H, M, n_cols = z.shape
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), z.device)
    block, warps = _row_block(n_cols)
    _wide_softmax_fwd_kernel[(B * H * M,)](
        z, t_bar, kpm, bias, lse, *t_bar.stride(), *kpm_strides, *bias_strides,
        H, M, row0, n_cols, S_q, S_k, scale, 0.0 if gsot_threshold is None else gsot_threshold,
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        HAS_GATE=gsot_threshold is not None, BLOCK_N=block, num_warps=warps,
    )


def _triton_rows_backward(z, dp, row0, t_bar, key_padding, additive, causal, scale, lse, dt,
                          S_q, S_k, store_p, store_g):
    B, H, M, n_cols = z.shape
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), z.device)
    block, warps = _row_block(n_cols)
    _wide_softmax_bwd_kernel[(B * H * M,)](
        z, dp, t_bar, kpm, bias, lse, dt, *t_bar.stride(), *kpm_strides, *bias_strides,
        H, M, row0, n_cols, S_q, S_k, scale,
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        STORE_P=store_p, STORE_G=store_g, BLOCK_N=block, num_warps=warps,
    )


# ----------------------------------------------------------------------------- PyTorch row ops
def _chunk_keep(row0, M, n_cols, key_padding, causal, S_q, S_k, device) -> Optional[torch.Tensor]:
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
    """In place on fp32 z: ``t̄·scale·z + m`` (natural log units), −inf where masked."""
    M, n_cols = z.shape[2], z.shape[3]
    z.mul_((t_bar[:, row0:row0 + M] * scale)[:, None, :, None])
    if additive is not None:
        bias = torch.broadcast_to(additive, (*additive.shape[:-2], S_q, S_k))
        z.add_(bias[..., row0:row0 + M, :n_cols])
    keep = _chunk_keep(row0, M, n_cols, key_padding, causal, S_q, S_k, z.device)
    if keep is not None:
        z.masked_fill_(~keep, -math.inf)
    return z


def _torch_rows_forward(z, row0, t_bar, key_padding, additive, causal, gsot_threshold, scale, lse, S_q, S_k):
    M = z.shape[2]
    s = z.to(lse.dtype)  # fp32 for half inputs (a copy), in place for fp32 and fp64
    _torch_logits_(s, row0, t_bar, key_padding, additive, causal, scale, S_q, S_k)
    row_lse = torch.logsumexp(s, dim=-1, keepdim=True)
    row_lse.masked_fill_(torch.isneginf(row_lse), math.inf)  # fully masked row: P = 0
    s.sub_(row_lse).exp_()
    if gsot_threshold is not None:
        s.mul_((t_bar[:, row0:row0 + M] >= gsot_threshold)[:, None, :, None])
    if s is not z:
        z.copy_(s)
    lse[:, :, row0:row0 + M] = row_lse.squeeze(-1) * (1.0 / math.log(2.0))


def _torch_rows_backward(z, dp, row0, t_bar, key_padding, additive, causal, scale, lse, dt,
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
    ds = dpf.sub_(delta[..., None]).mul_(p)
    dt[:, :, row0:row0 + M] = torch.einsum("bhmn,bhmn->bhm", ds, zf) * scale
    if store_p:
        z.copy_(p)
    if store_g:
        ds.mul_((t_bar[:, row0:row0 + M] * scale)[:, None, :, None])
        if ds is not dp:
            dp.copy_(ds)


_ROW_OPS = {
    "triton": (_triton_rows_forward, _triton_rows_backward),
    "torch": (_torch_rows_forward, _torch_rows_backward),
}


# ----------------------------------------------------------------------------- orchestration
def _stats_dtype(q: torch.Tensor) -> torch.dtype:
    """Per-row statistics (lse, Δ, dt̄) and accumulators: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _chunks(S_q: int, S_k: int, B: int, H: int, elem: int, causal: bool, chunk_bytes: int):
    """[(row0, row1, n_cols)]: query-row chunks and how many keys each one can see."""
    rows = max(1, min(S_q, chunk_bytes // max(1, B * H * S_k * elem)))
    chunks = []
    for row0 in range(0, S_q, rows):
        row1 = min(S_q, row0 + rows)
        n_cols = min(S_k, max(0, row1 + (S_k - S_q))) if causal else S_k
        chunks.append((row0, row1, n_cols))
    return chunks


def wide_forward(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale, row_ops, chunk_bytes,
                 keep_scores=False):
    """Returns (out, lse, scores). With ``keep_scores`` and a single chunk, the raw products
    ``Z = Q Kᵀ`` (one chunk's worth of memory) are returned for the backward, which then needs
    no GEMM to recompute them; otherwise scores is None."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    rows_forward = _ROW_OPS[row_ops][0]
    lse = new_output((B, H, S_q), _stats_dtype(q), q.device)
    chunks = _chunks(S_q, S_k, B, H, q.element_size(), causal, chunk_bytes)
    if len(chunks) == 1:  # one chunk (then it sees every key): no output slices to copy into
        z = torch.matmul(q, k.transpose(-2, -1))
        saved, z = (z, z.clone()) if keep_scores else (None, z)
        rows_forward(z, 0, t_bar, key_padding, additive, causal, gsot_threshold, scale, lse, S_q, S_k)
        return torch.matmul(z, v), lse, saved
    out = new_output(q.shape, q.dtype, q.device)
    for row0, row1, n_cols in chunks:
        if n_cols == 0:  # rows that see no key at all
            out[:, :, row0:row1] = 0
            lse[:, :, row0:row1] = math.inf
            continue
        z = torch.matmul(q[:, :, row0:row1], k[:, :, :n_cols].transpose(-2, -1))
        rows_forward(z, row0, t_bar, key_padding, additive, causal, gsot_threshold, scale, lse, S_q, S_k)
        out[:, :, row0:row1] = torch.matmul(z, v[:, :, :n_cols])
    return out, lse, None


def wide_backward(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale, row_ops, chunk_bytes,
                  lse, scores, grad_out, need_dq, need_dkv, same_qkv=False):
    """Returns (dq, dk, dv, dt̄ [B, S_q]); unneeded gradients are None. ``scores``: the forward's
    saved Z (single chunk) or None; ``same_qkv``: q, k and v are one tensor."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    rows_backward = _ROW_OPS[row_ops][1]
    stats = _stats_dtype(q)
    if gsot_threshold is not None:
        grad_out = grad_out * (t_bar >= gsot_threshold)[:, None, :, None].to(grad_out.dtype)
    dt = new_output((B, H, S_q), stats, q.device)
    chunks = _chunks(S_q, S_k, B, H, q.element_size(), causal, chunk_bytes)
    if len(chunks) == 1:
        dq, dk, dv = _backward_one_chunk(q, k, v, t_bar, key_padding, additive, causal, scale, rows_backward,
                                         lse, dt, scores, grad_out, need_dq, need_dkv, same_qkv)
        return dq, dk, dv, dt.sum(1)
    dq = new_output(q.shape, q.dtype, q.device) if need_dq else None
    # dK/dV add up over chunks: accumulate in fp32.
    dk = torch.zeros(B, H, S_k, D, device=q.device, dtype=stats) if need_dkv else None
    dv = torch.zeros(B, H, S_k, D, device=q.device, dtype=stats) if need_dkv else None
    for row0, row1, n_cols in chunks:
        if n_cols == 0:
            dt[:, :, row0:row1] = 0
            if need_dq:
                dq[:, :, row0:row1] = 0
            continue
        q_c, do_c = q[:, :, row0:row1], grad_out[:, :, row0:row1]
        k_c, v_c = k[:, :, :n_cols], v[:, :, :n_cols]
        z = _scores_for_backward(scores, q_c, k_c, store_p=need_dkv)
        dp = torch.matmul(do_c, v_c.transpose(-2, -1))
        rows_backward(z, dp, row0, t_bar, key_padding, additive, causal, scale, lse, dt,
                      S_q, S_k, store_p=need_dkv, store_g=need_dq or need_dkv)
        if need_dkv:
            dv[:, :, :n_cols] += torch.matmul(z.transpose(-2, -1), do_c)
            dk[:, :, :n_cols] += torch.matmul(dp.transpose(-2, -1), q_c)
        if need_dq:
            dq[:, :, row0:row1] = torch.matmul(dp, k_c)
    if need_dkv:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv, dt.sum(1)


def _scores_for_backward(scores, q_c, k_c, store_p):
    """Z for one chunk: the forward's saved copy (cloned when P will overwrite it, so a second
    backward with retain_graph still sees Z) or a recomputed GEMM."""
    if scores is None:
        return torch.matmul(q_c, k_c.transpose(-2, -1))
    return scores.clone() if store_p else scores


def _backward_one_chunk(q, k, v, t_bar, key_padding, additive, causal, scale, rows_backward,
                        lse, dt, scores, grad_out, need_dq, need_dkv, same_qkv):
    """The whole problem in one chunk: every GEMM writes its gradient directly. When q, k, v are
    one tensor X the three gradients are summed as ``dX = (G + Gᵀ) X + Pᵀ dO``: two GEMMs, not three."""
    S_q, S_k = q.shape[2], k.shape[2]
    z = _scores_for_backward(scores, q, k, store_p=need_dkv)
    dp = torch.matmul(grad_out, v.transpose(-2, -1))
    rows_backward(z, dp, 0, t_bar, key_padding, additive, causal, scale, lse, dt,
                  S_q, S_k, store_p=need_dkv, store_g=need_dq or need_dkv)
    if same_qkv and need_dq and need_dkv:
        dx = torch.matmul(dp + dp.transpose(-2, -1), q)  # dQ + dK = G X + Gᵀ X
        dx.add_(torch.matmul(z.transpose(-2, -1), grad_out))  # + dV = Pᵀ dO
        return dx, None, None
    dq = torch.matmul(dp, k) if need_dq else None
    dk = torch.matmul(dp.transpose(-2, -1), q) if need_dkv else None
    dv = torch.matmul(z.transpose(-2, -1), grad_out) if need_dkv else None
    return dq, dk, dv


class WideAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the chunked GEMM + row-kernel path (inputs validated by the caller)."""

    @staticmethod
    def forward(ctx, q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale, row_ops, chunk_bytes):
        need_grad = any(ctx.needs_input_grad[:4])
        out, lse, scores = wide_forward(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale,
                                        row_ops, chunk_bytes, keep_scores=need_grad)
        ctx.save_for_backward(q, k, v, t_bar, key_padding, additive, lse, scores)
        ctx.options = (causal, gsot_threshold, scale, row_ops, chunk_bytes)
        ctx.same_qkv = q is k and k is v
        return out

    @staticmethod
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


def wide_attention(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale,
                   row_ops: str = "triton", chunk_bytes: Optional[int] = None):
    if chunk_bytes is None:
        chunk_bytes = DEFAULT_CHUNK_BYTES.get(q.device.type, DEFAULT_CHUNK_BYTES["cpu"])
    return WideAttentionFunction.apply(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale,
                                       row_ops, chunk_bytes)
