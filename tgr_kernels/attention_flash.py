"""Flash path of temperature-guided attention: fused Triton kernels for head dims D <= 256.

Design limit: one query block's Q, O and dQ tiles live in registers/SRAM, so D is capped at 256
(``FLASH_MAX_HEAD_DIM``); wider heads take the GEMM + row-kernel path in ``attention_wide``.
Memory is O(S): the forward keeps only the output and one log-sum-exp per row.

Forward, per query row i (online softmax over key blocks, base-2 exponentials)::

    S_ij = t̄_i · scale · (q_i·k_j) + m_ij          (m: key padding, causal, additive bias)
    P = softmax_j(S),  O = P V,  Y_i = g_i · O_i      (g_i = 1[t̄_i >= τ], the GSoT gate)

The temperature scales the raw q·k product of each tile in fp32 (rather than a rounded copy of
Q), and the gate is applied in the epilogue. A row whose logits are all −inf gives zeros.

Backward (``dO = g ∘ dY``, ``Δ_i = rowsum(dO_i ∘ Y_i)``)::

    dV = Pᵀ dO      dP = dO Vᵀ      dS = P ∘ (dP − Δ)
    A = scale · dS K     dQ = t̄ ∘ A     dt̄_i = q_i · A_i     dK = (t̄ ∘ scale ∘ dS)ᵀ Q

Two kernels, no atomics: one program per key block owns dK/dV; one program per query block owns
dQ and dt̄ (the temperature gradient is the dQ kernel's epilogue). When only the temperature
needs a gradient (frozen base) the dK/dV kernel is skipped and dQ is not stored.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._backend import TRITON_INTERPRET, new_output, next_power_of_2, triton_dot_precision

FLASH_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _logits_tile(
    qk, row_scale, offs_m, offs_n, b, h,
    KPM, BIAS,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    S_q, S_k,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
):
    """Base-2 logits of one [BLOCK_M, BLOCK_N] tile: ``(t̄·scale·qk + m) · log2(e)``, −inf where masked.

    qk: fp32 raw products q_i·k_j. row_scale: fp32 ``t̄_i · scale · log2(e)`` per row.
    KPM: key-padding mask [B, S_k] (nonzero = keep). BIAS: additive mask with broadcast strides.
    CAUSAL: key j is visible to query i when ``j <= i + S_k - S_q`` (bottom-right aligned).
    """
    s = qk * row_scale[:, None]
    valid = (offs_m[:, None] < S_q) & (offs_n[None, :] < S_k)
    if HAS_BIAS:
        bias_ptrs = (BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
                     + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :].to(tl.int64) * stride_bn)
        bias = tl.load(bias_ptrs, mask=valid, other=0.0).to(tl.float32)
        s = s + bias * 1.4426950408889634
    if HAS_KPM:
        keep = tl.load(KPM + b.to(tl.int64) * stride_pb + offs_n.to(tl.int64) * stride_pn,
                       mask=offs_n < S_k, other=0)
        valid = valid & (keep[None, :] != 0)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (S_k - S_q))
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _causal_key_end(start_m, S_q, S_k, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """One past the last key any row of the query block starting at start_m may see."""
    if CAUSAL:
        last_row = tl.minimum(start_m + BLOCK_M, S_q) - 1
        return tl.maximum(tl.minimum(S_k, last_row + (S_k - S_q) + 1), 0)
    return S_k


@triton.jit
def _load_rows(base, offs_rows, stride_row, offs_d, stride_d, n_rows, D):
    """A [len(offs_rows), BLOCK_D] tile of a [n_rows, D] matrix at ``base``, zeros outside it."""
    return tl.load(base + offs_rows[:, None].to(tl.int64) * stride_row + offs_d[None, :] * stride_d,
                   mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_row_stats(T_BAR, LSE, DELTA, b, stride_tb, stride_tm, row_base, offs_m, S_q):
    """Per query row: t̄ (fp32), the forward's base-2 lse (+inf past the end: P = 0) and Δ."""
    m_ok = offs_m < S_q
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + offs_m.to(tl.int64) * stride_tm,
                    mask=m_ok, other=0.0).to(tl.float32)
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    return t_bar, lse, delta


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, T_BAR, KPM, BIAS, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, S_q, S_k, D, scale, gsot_threshold,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Forward: ``Y = g ∘ softmax(t̄·scale·QKᵀ + m) V`` for one query block of one (batch, head).

    Q [B, H, S_q, D], K and V [B, H, S_k, D], OUT like Q (any strides). T_BAR: fp32 [B, S_q].
    LSE: fp32 [B, H, S_q] contiguous, the base-2 log-sum-exp of each row (+inf for a fully masked
    row) saved for the backward. gsot_threshold τ is used when HAS_GATE.
    Grid: (cdiv(S_q, BLOCK_M), B * H).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < S_q
    d_ok = offs_d < D

    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, stride_qm,
                   offs_d, stride_qd, S_q, D)
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + offs_m.to(tl.int64) * stride_tm,
                    mask=row_ok, other=0.0).to(tl.float32)
    row_scale = t_bar * (scale * 1.4426950408889634)

    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n = _causal_key_end(start_m, S_q, S_k, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, S_k, D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = _logits_tile(qk, row_scale, offs_m, offs_n, b, h, KPM, BIAS,
                         stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                         S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no visible key yet keep m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, S_k, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    keep = row_ok & (~dead)
    if HAS_GATE:
        keep = keep & (t_bar >= gsot_threshold)
    out = tl.where(keep[:, None], out, 0.0)
    o_ptrs = (OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
              + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(dead, float("inf"), m_i + tl.log2(tl.where(dead, 1.0, l_i)))
    tl.store(LSE + pid_bh.to(tl.int64) * S_q + offs_m, lse, mask=row_ok)


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, T_BAR, KPM, BIAS, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, S_q, S_k, D, scale,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward for one key block: ``dV = Pᵀ dO``, ``dK = (t̄·scale·dS)ᵀ Q`` with ``dS = P ∘ (dP − Δ)``.

    DO: the gated upstream gradient g ∘ dY, [B, H, S_q, D] contiguous. LSE, DELTA: fp32
    [B, H, S_q] contiguous (Δ_i = rowsum(dO_i ∘ Y_i)). DK, DV: contiguous [B, H, S_k, D] outputs
    in the input dtype. Grid: (cdiv(S_k, BLOCK_N), B * H).
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S_k
    d_ok = offs_d < D

    k = _load_rows(K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh, offs_n, stride_kn,
                   offs_d, stride_kd, S_k, D)
    v = _load_rows(V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh, offs_n, stride_vn,
                   offs_d, stride_vd, S_k, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    row_base = pid_bh.to(tl.int64) * S_q
    start_m = 0
    if CAUSAL:
        # The first query row that sees key start_n, rounded down to a block.
        start_m = tl.maximum(start_n - (S_k - S_q), 0) // BLOCK_M * BLOCK_M
    for m0 in range(start_m, S_q, BLOCK_M):
        offs_m = m0 + offs_m0
        q = _load_rows(q_base, offs_m, stride_qm, offs_d, stride_qd, S_q, D)
        do = _load_rows(do_base, offs_m, stride_dom, offs_d, stride_dod, S_q, D)
        t_bar, lse, delta = _load_row_stats(T_BAR, LSE, DELTA, b, stride_tb, stride_tm, row_base, offs_m, S_q)

        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = _logits_tile(qk, t_bar * (scale * 1.4426950408889634), offs_m, offs_n, b, h, KPM, BIAS,
                         stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                         S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        p = tl.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds_scaled = p * (dp - delta[:, None]) * (t_bar * scale)[:, None]
        dk += tl.dot(tl.trans(ds_scaled.to(q.dtype)), q, input_precision=PRECISION)

    out_off = (pid_bh.to(tl.int64) * S_k * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :])
    out_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, T_BAR, KPM, BIAS, DO, LSE, DELTA, DQ, DT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, S_q, S_k, D, scale,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, STORE_DQ: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward for one query block: ``A = scale · dS K``, ``dQ = t̄ ∘ A``, ``dt̄_i = q_i · A_i``.

    DQ: contiguous [B, H, S_q, D] in the input dtype (written when STORE_DQ). DT: fp32
    [B, H, S_q] contiguous, this head's share of dt̄ (the caller sums over heads).
    Other arguments as in ``_flash_bwd_dkdv_kernel``. Grid: (cdiv(S_q, BLOCK_M), B * H).
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_q
    d_ok = offs_d < D
    row_base = pid_bh.to(tl.int64) * S_q

    q = _load_rows(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh, offs_m, stride_qm,
                   offs_d, stride_qd, S_q, D)
    do = _load_rows(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh, offs_m, stride_dom,
                    offs_d, stride_dod, S_q, D)
    t_bar, lse, delta = _load_row_stats(T_BAR, LSE, DELTA, b, stride_tb, stride_tm, row_base, offs_m, S_q)
    row_scale = t_bar * (scale * 1.4426950408889634)

    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end_n = _causal_key_end(start_m, S_q, S_k, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, S_k, D)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, S_k, D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = _logits_tile(qk, row_scale, offs_m, offs_n, b, h, KPM, BIAS,
                         stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                         S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    acc = acc * scale
    dt = tl.sum(q.to(tl.float32) * acc, 1)
    tl.store(DT + row_base + offs_m, dt, mask=m_ok)
    if STORE_DQ:
        dq = acc * t_bar[:, None]
        tl.store(DQ + row_base * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _block_config(head_dim: int, backward: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Fixed heuristics: autotuning with several
    configs does not run under the interpreter; issue-level tuning happens on the GPU."""
    if TRITON_INTERPRET:
        return 32, 32, 4, 1
    if backward:
        if head_dim <= 64:
            return 64, 64, 4, 2
        if head_dim <= 128:
            return 64, 64, 8, 2
        return 32, 32, 8, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 64, 8, 2
    return 64, 32, 8, 1


def mask_args(key_padding, additive, shape, device):
    """Tensors and strides for the mask inputs of attention of ``shape = (B, H, S_q, S_k)``;
    a one-element dummy stands in for an absent mask (its pointer is never read)."""
    dummy = torch.empty(1, device=device)
    if key_padding is not None:
        kpm = key_padding.view(torch.uint8) if key_padding.dtype == torch.bool else key_padding
        kpm_strides = (kpm.stride(0), kpm.stride(1))
    else:
        kpm, kpm_strides = dummy, (0, 0)
    if additive is not None:
        # A broadcast view: the kernels read the user's mask through zero strides, never a copy.
        bias = torch.broadcast_to(additive, shape)
        bias_strides = tuple(bias.stride())
    else:
        bias, bias_strides = dummy, (0, 0, 0, 0)
    return kpm, kpm_strides, bias, bias_strides


def flash_forward(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale):
    """Launch the forward kernel. Returns (out, lse)."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((B, H, S_q), torch.float32, q.device)
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), q.device)
    block_m, block_n, num_warps, num_stages = _block_config(D, backward=False)
    grid = (triton.cdiv(S_q, block_m), B * H)
    _flash_fwd_kernel[grid](
        q, k, v, t_bar, kpm, bias, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *t_bar.stride(), *kpm_strides, *bias_strides,
        H, S_q, S_k, D, scale, 0.0 if gsot_threshold is None else gsot_threshold,
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        HAS_GATE=gsot_threshold is not None, PRECISION=triton_dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_power_of_2(D)),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def flash_backward(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale,
                   out, lse, grad_out, need_dq: bool, need_dkv: bool):
    """Launch the backward kernels. Returns (dq or None, dk or None, dv or None, dt̄ [B, S_q] fp32)."""
    B, H, S_q, D = q.shape
    S_k = k.shape[2]
    # dO = g ∘ dY: the gated output is already zero on pruned rows, so gate the gradient to match.
    grad_out = grad_out.contiguous()
    if gsot_threshold is not None:
        grad_out = grad_out * (t_bar >= gsot_threshold)[:, None, :, None].to(grad_out.dtype)
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), q.device)
    block_m, block_n, num_warps, num_stages = _block_config(D, backward=True)
    common = dict(
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        PRECISION=triton_dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(D)), num_warps=num_warps, num_stages=num_stages,
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
               *t_bar.stride(), *kpm_strides, *bias_strides)

    dk = dv = None
    if need_dkv:
        dk = new_output((B, H, S_k, D), k.dtype, q.device)
        dv = new_output((B, H, S_k, D), v.dtype, q.device)
        _flash_bwd_dkdv_kernel[(triton.cdiv(S_k, block_n), B * H)](
            q, k, v, t_bar, kpm, bias, grad_out, lse, delta, dk, dv,
            *strides, H, S_q, S_k, D, scale, **common,
        )
    dq = new_output((B, H, S_q, D), q.dtype, q.device) if need_dq else q.new_empty(1)
    dt = new_output((B, H, S_q), torch.float32, q.device)
    _flash_bwd_dq_kernel[(triton.cdiv(S_q, block_m), B * H)](
        q, k, v, t_bar, kpm, bias, grad_out, lse, delta, dq, dt,
        *strides, H, S_q, S_k, D, scale, STORE_DQ=need_dq, **common,
    )
    return (dq if need_dq else None), dk, dv, dt.sum(1)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the flash kernels. Inputs are validated by the caller; t_bar is fp32
    [B, S_q] (its gradient flows back to the temperature through ordinary autograd)."""

    @staticmethod
    def forward(ctx, q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale):
        out, lse = flash_forward(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale)
        ctx.save_for_backward(q, k, v, t_bar, key_padding, additive, out, lse)
        ctx.options = (causal, gsot_threshold, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, t_bar, key_padding, additive, out, lse = ctx.saved_tensors
        causal, gsot_threshold, scale = ctx.options
        need_q, need_k, need_v, need_t = ctx.needs_input_grad[:4]
        if not (need_q or need_k or need_v or need_t):
            return (None,) * 9
        dq, dk, dv, dt = flash_backward(
            q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale,
            out, lse, grad_out, need_dq=need_q, need_dkv=need_k or need_v,
        )
        return (dq, dk if need_k else None, dv if need_v else None,
                dt if need_t else None, None, None, None, None, None)


def flash_attention(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale):
    return FlashAttentionFunction.apply(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale)
