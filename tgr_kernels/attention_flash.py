"""Flash path of temperature-guided attention: fused Triton kernels for head dims D <= 256.

Design limit: one query block's Q, O and dQ tiles live in registers/SRAM, so D is capped at 256
(``FLASH_MAX_HEAD_DIM``); wider heads take the GEMM + row-kernel path in ``attention_wide``.
Memory is O(S): the forward keeps only the output and one log-sum-exp per row.

Forward, per query row i (online softmax over key blocks, base-2 exponentials)::

    S_ij = t̄_i · scale · (q_i·k_j) + m_ij          (m: key padding, causal, additive bias)
    P = softmax_j(S),  O = P V,  Y_i = g_i · O_i      (g_i: the GSoT gate of t̄_i, see ``_gate``)

The temperature scales the raw q·k product of each tile in fp32 (rather than a rounded copy of
Q), and the gate is applied in the epilogue. A row whose logits are all −inf gives zeros.

Backward, from the ungated dY (P renormalised to sum to one, ``Δ_i = Σ_j P_ij dP_ij``)::

    dP = dY Vᵀ      dS = P ∘ (dP − Δ)      dV = (g ∘ P)ᵀ dY
    dQ = g · t̄ · scale · dS K     dK = (g ∘ t̄ ∘ scale ∘ dS)ᵀ Q
    dt̄_i = g_i · scale · Σ_j dS_ij (q_i·k_j) + g'(t̄_i) · Δ_i

The gate is applied in the kernels (to the output in the forward's epilogue; in the backward
folded into the renormalised lse that the dQ kernel hands on, ``lse − log2 g``, so exp2(S − lse)
is g·P), so dY is never multiplied by it on the host, and ``Δ_i = Σ_d dY_id Ô_id`` is exactly what a learning gate's
gradient needs: it is computed from P even on a pruned row, whose output was never stored.

Two kernels, no atomics. One program per query block owns dQ and dt̄; its first pass over the
key blocks sums Δ from the same P and dP that form dS (FlashAttention's ``rowsum(dO ∘ O)``
cancels badly when the softmax saturates, so the temperature gradient fell outside the parity
criterion at q×1000) and the row sums of P, and stores both for the second kernel, one program per key block,
which owns dK/dV. The temperature gradient comes from that first pass, as a P-weighted
co-moment of dP and q·k. When only the temperature needs a gradient (frozen base) the dK/dV
kernel and the second pass are skipped: two dots per tile in all.

Grouped-query attention (k/v with H_kv = H / GROUP heads): query head h reads k/v head
h // GROUP in place, with no copy. The forward and dQ kernels run per query head as above; the
dK/dV kernel runs one program per (k/v head, key block), which loops over the GROUP query heads
that read it and sums their contributions in registers, in a fixed order: deterministic, no
atomics.

Masks: an additive entry ``<= MASKED_BIAS`` (−4096; HF's ``finfo(dtype).min``, −1e9) masks its
key exactly like −inf (see ``_masks.logits_tile``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs, _gate
from ._backend import new_output, triton_dot_precision
from ._gate import gate_rows, gated_lse
from ._masks import LOG2E, logits_tile, mask_args, online_softmax_step

FLASH_MAX_HEAD_DIM = 256
# A tile of keys whose share of its row's weight Σ P is below this drops out of the dQ kernel's
# merge (see there): 2⁻¹⁰⁰, far below what an fp32 sum can see, far above the subnormals.
NEGLIGIBLE_TILE_WEIGHT = tl.constexpr(2.0 ** -100)


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


@triton.jit(do_not_specialize=["gsot_mode"])
def _flash_fwd_kernel(
    Q, K, V, T_BAR, KPM, BIAS, OUT, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, S_q, S_k, D, scale, gsot_threshold, gsot_mode, gsot_width,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RELOAD_ROWS: tl.constexpr = 0,
):
    """Forward: ``Y = g ∘ softmax(t̄·scale·QKᵀ + m) V`` for one query block of one (batch, head).

    Q [B, H, S_q, D], K and V [B, H / GROUP, S_k, D], OUT like Q (any strides): query head h
    reads k/v head h // GROUP in place (grouped-query attention; GROUP = 1 without). T_BAR: fp32 [B, S_q].
    LSE: fp32 [B, H, S_q] contiguous, the base-2 log-sum-exp of each row (+inf for a fully masked
    row) saved for the backward. The gate g (``_gate.gate_rows`` of t̄ with gsot_threshold τ,
    gsot_mode, gsot_width ε) is applied when HAS_GATE.
    Grid: (cdiv(S_q, BLOCK_M), B * H). RELOAD_ROWS: load the Q tile at each key block instead of
    holding it across the loop (see ``_flash_bwd_dq_kernel``).
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

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    if not RELOAD_ROWS:
        q = _load_rows(q_base, offs_m, stride_qm, offs_d, stride_qd, S_q, D)
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + offs_m.to(tl.int64) * stride_tm,
                    mask=row_ok, other=0.0).to(tl.float32)
    row_scale = t_bar * (scale * LOG2E)

    kv_h = h // GROUP
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    end_n = _causal_key_end(start_m, S_q, S_k, BLOCK_M, CAUSAL)
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + offs_n0
        if RELOAD_ROWS:
            q = _load_rows(q_base, offs_m, stride_qm, offs_d, stride_qd, S_q, D)
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, S_k, D)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = logits_tile(qk, row_scale, offs_m, offs_n, b, h, KPM, BIAS,
                        stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                        S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        m_new, p, alpha, l_i = online_softmax_step(m_i, l_i, s)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, S_k, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    out = tl.where((row_ok & (~dead))[:, None], out, 0.0)
    if HAS_GATE:
        gate, _ = gate_rows(t_bar, gsot_threshold, gsot_mode, gsot_width)
        out = out * gate[:, None]
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
    H, GROUP, S_q, S_k, D, scale,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUPED: tl.constexpr = 0, RELOAD_ROWS: tl.constexpr = 0,
):
    """Backward for one key block of one k/v head: ``dV = Σ_g (g ∘ P_g)ᵀ dY_g``,
    ``dK = Σ_g (g·t̄·scale·dS_g)ᵀ Q_g`` with ``dS = P ∘ (dP − Δ)``, summed over the GROUP query
    heads g that read this k/v head (GROUP = 1 without grouped-query attention). One program
    owns the sums and accumulates them in registers in a fixed order: no atomics, and two runs
    give the same bits.

    DO: the upstream gradient dY (not gated), [B, H, S_q, D] contiguous (H query heads). LSE,
    DELTA: fp32 [B, H, S_q] contiguous, written by ``_flash_bwd_dq_kernel``: its LSE_BWD makes
    ``exp2(S − LSE_BWD)`` the row's P summed to one and multiplied by the row's GSoT gate g (so
    this kernel needs no gate code, and no register for it), and Δ_i = Σ_j P_ij dP_ij. DK, DV: contiguous
    [B, H / GROUP, S_k, D] outputs in the input dtype. Grid: (cdiv(S_k, BLOCK_N), B * H / GROUP).
    GROUPED: GROUP > 1 (the launcher's flag; without it the loop keeps one head's pointers).
    RELOAD_ROWS: load the K and V tiles at each query block instead of holding them across the
    loop (see ``_flash_bwd_dq_kernel``).
    """
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    H_kv = H // GROUP
    b = pid_bkv // H_kv
    kv_h = pid_bkv % H_kv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S_k
    d_ok = offs_d < D

    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    if not RELOAD_ROWS:
        k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, S_k, D)
        v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, S_k, D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    start_m = 0
    if CAUSAL:
        # The first query row that sees key start_n, rounded down to a block.
        start_m = tl.maximum(start_n - (S_k - S_q), 0) // BLOCK_M * BLOCK_M
    # The group's query heads in order, each over its query blocks, as one flat loop over
    # (head, block) steps: a nested loop, or pointers advanced at each head's last block, keep
    # more values live across the loop, and the static proof showed those spilling. Without
    # grouping (GROUPED false) the head is fixed and its pointers are set once, before the loop.
    h = kv_h * GROUP
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    row_base = (b.to(tl.int64) * H + h) * S_q
    n_blocks_m = tl.cdiv(S_q - start_m, BLOCK_M)
    for step in range(0, GROUP * n_blocks_m):
        if GROUPED:
            g = step // n_blocks_m
            m0 = start_m + (step - g * n_blocks_m) * BLOCK_M
            h_step = kv_h * GROUP + g
            q_step = Q + b.to(tl.int64) * stride_qb + h_step.to(tl.int64) * stride_qh
            do_step = DO + b.to(tl.int64) * stride_dob + h_step.to(tl.int64) * stride_doh
            row_step = (b.to(tl.int64) * H + h_step) * S_q
        else:
            m0 = start_m + step * BLOCK_M
            h_step, q_step, do_step, row_step = h, q_base, do_base, row_base
        offs_m = m0 + offs_m0
        if RELOAD_ROWS:
            k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, S_k, D)
            v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, S_k, D)
        q = _load_rows(q_step, offs_m, stride_qm, offs_d, stride_qd, S_q, D)
        do = _load_rows(do_step, offs_m, stride_dom, offs_d, stride_dod, S_q, D)
        t_bar, lse, delta = _load_row_stats(T_BAR, LSE, DELTA, b, stride_tb, stride_tm, row_step, offs_m, S_q)

        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = logits_tile(qk, t_bar * (scale * LOG2E), offs_m, offs_n, b, h_step, KPM, BIAS,
                        stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                        S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        p = tl.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds_scaled = p * (dp - delta[:, None]) * (t_bar * scale)[:, None]
        dk += tl.dot(tl.trans(ds_scaled.to(q.dtype)), q, input_precision=PRECISION)

    out_off = (pid_bkv.to(tl.int64) * S_k * D + offs_n[:, None].to(tl.int64) * D + offs_d[None, :])
    out_mask = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tile(q, do, k_base, v_base, offs_n, offs_m, offs_d, row_scale, lse, b, h, KPM, BIAS,
             stride_kn, stride_kd, stride_vn, stride_vd, stride_pb, stride_pn,
             stride_bb, stride_bh, stride_bm, stride_bn, S_q, S_k, D,
             HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the dQ kernel's passes: the K tile, the raw products ``qk = q·kᵀ``, the
    unnormalised ``p = exp2(S − lse)`` (0 where masked; q·k stays finite there) and
    ``dp = dO·vᵀ``."""
    k = _load_rows(k_base, offs_n, stride_kn, offs_d, stride_kd, S_k, D)
    v = _load_rows(v_base, offs_n, stride_vn, offs_d, stride_vd, S_k, D)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = logits_tile(qk, row_scale, offs_m, offs_n, b, h, KPM, BIAS,
                    stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                    S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return k, qk, p, dp


@triton.jit(do_not_specialize=["gsot_mode"])
def _flash_bwd_dq_kernel(
    Q, K, V, T_BAR, KPM, BIAS, DO, LSE, DELTA, LSE_BWD, DQ, DT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, S_q, S_k, D, scale, gsot_threshold, gsot_mode, gsot_width,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    STORE_DQ: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    RELOAD_ROWS: tl.constexpr = 0,
):
    """Backward for one query block, two passes over the key blocks.

    Pass 1, with ``P = exp2(S − lse) / r`` (``r_i`` its row sum) and ``z_ij = q_i·k_j``:
    ``Δ_i = Σ_j P_ij dP_ij``, ``z̄_i = Σ_j P_ij z_ij`` and ``dt̄_i = scale · Σ_j P_ij (dP_ij − Δ_i)
    (z_ij − z̄_i)`` (= scale · Σ_j dS_ij z_ij, as Σ_j dS_ij = 0), accumulated in one streaming
    sweep; writes Δ to DELTA, ``lse + log2(r)`` (the lse that makes P sum to one) to LSE_BWD and
    dt̄ to DT. Pass 2, only when STORE_DQ: ``dS = P ∘ (dP − Δ)``, ``dQ = t̄ · scale · dS K``.
    With HAS_GATE (dP from the ungated dY), the attention's share of dt̄ is multiplied by the
    row's gate g and gains ``g'(t̄) · Δ`` (Δ = Σ_d dY ∘ Ô: the gate's own gradient), and g is
    folded into LSE_BWD (``− log2 g``), so pass 2's P, hence dQ, and the dK/dV kernel's are gated.
    A frozen base (no STORE_DQ) thus costs two dots per tile.
    Why not ``Δ = rowsum(dO ∘ O)``: when the softmax saturates (large logits), dS is a tiny
    difference of nearly equal terms, and only a Δ from the same P and dP lets them cancel (O is
    rounded to the output dtype and accumulated in another order). And the forward's
    ``lse = m + log2(l)`` drops log2(l) when |m| is large, so exp2(S − lse) need not sum to one.

    LSE: fp32 [B, H, S_q], the forward's. DELTA, LSE_BWD: fp32 [B, H, S_q] contiguous outputs
    for ``_flash_bwd_dkdv_kernel``. DQ: contiguous [B, H, S_q, D] in the input dtype (written
    when STORE_DQ). DT: fp32 [B, H, S_q] contiguous, this head's share of dt̄ (the caller sums
    over heads). Query head h reads k/v head h // GROUP. Other arguments as in
    ``_flash_bwd_dkdv_kernel``. Grid: (cdiv(S_q, BLOCK_M), B * H).

    RELOAD_ROWS (a launch configuration's choice): load the Q and dO tiles at each key block (from
    L1/L2) instead of holding them across both passes. Held, they occupy registers for the whole
    loop, and fp32 tiles with a wide head dim (D = 256) then spill; reloaded, the same tile
    compiles without spills (``python -m tgr_kernels.aot``) at the cost of one more read per step.
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

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
    if not RELOAD_ROWS:
        q = _load_rows(q_base, offs_m, stride_qm, offs_d, stride_qd, S_q, D)
        do = _load_rows(do_base, offs_m, stride_dom, offs_d, stride_dod, S_q, D)
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + offs_m.to(tl.int64) * stride_tm,
                    mask=m_ok, other=0.0).to(tl.float32)
    # +inf past the end and on fully masked rows: P = 0 there.
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    row_scale = t_bar * (scale * LOG2E)

    kv_h = h // GROUP
    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    end_n = _causal_key_end(start_m, S_q, S_k, BLOCK_M, CAUSAL)
    # Pass 1, one streaming sweep: the P-weighted mean of dP (Δ) and co-moment of dP and q·k,
    # merged tile by tile (Chan et al.'s parallel update). dt̄_i = scale · Σ_j P_ij (dP_ij − Δ_i)
    # (z_ij − z̄_i) is then a sum of products of small terms when the softmax saturates, never a
    # difference of large ones. P = exp2(S − lse) is normalised by the weight sum w.
    w = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean_dp = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean_z = tl.zeros([BLOCK_M], dtype=tl.float32)
    co = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        if RELOAD_ROWS:
            q = _load_rows(q_base, offs_m, stride_qm, offs_d, stride_qd, S_q, D)
            do = _load_rows(do_base, offs_m, stride_dom, offs_d, stride_dod, S_q, D)
        k, qk, p, dp = _dq_tile(q, do, k_base, v_base, start_n + offs_n0, offs_m, offs_d, row_scale, lse, b, h,
                                KPM, BIAS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pb, stride_pn,
                                stride_bb, stride_bh, stride_bm, stride_bn, S_q, S_k, D,
                                HAS_KPM, HAS_BIAS, CAUSAL, PRECISION)
        w_tile = tl.sum(p, 1)
        # A tile whose weight is negligible (every key ~70 nats or more below the row's lse) is
        # dropped: 1 / w_tile of a subnormal weight overflowed to inf, and Δ, dt̄, dQ and then the
        # whole head's dK turned NaN. Its share of the row, < 1e-30, changes no fp32 sum.
        w_tile = tl.where(w_tile < NEGLIGIBLE_TILE_WEIGHT, 0.0, w_tile)
        inv_tile = 1.0 / tl.where(w_tile == 0.0, 1.0, w_tile)
        mean_dp_tile = tl.sum(p * dp, 1) * inv_tile
        mean_z_tile = tl.sum(p * qk, 1) * inv_tile
        co_tile = tl.sum(p * (dp - mean_dp_tile[:, None]) * (qk - mean_z_tile[:, None]), 1)
        w_new = w + w_tile
        frac = w_tile / tl.where(w_new == 0.0, 1.0, w_new)
        d_dp = mean_dp_tile - mean_dp
        d_z = mean_z_tile - mean_z
        co += co_tile + w * frac * d_dp * d_z
        mean_dp += d_dp * frac
        mean_z += d_z * frac
        w = w_new
    inv_sum = 1.0 / tl.where(w == 0.0, 1.0, w)  # a row with no visible key: P = 0, all zeros
    delta = mean_dp
    dt = co * inv_sum * scale
    lse_p = lse - tl.log2(inv_sum)  # exp2(S − lse_p) sums to one
    if HAS_GATE:
        gate, slope = gate_rows(t_bar, gsot_threshold, gsot_mode, gsot_width)
        dt = gate * dt + slope * delta
        # The gate folded into the lse: exp2(S − lse_p) is then g·P (0 on a pruned row), and pass 2
        # and the dK/dV kernel hold no register for g.
        lse_p = gated_lse(lse_p, gate)
    tl.store(DELTA + row_base + offs_m, delta, mask=m_ok)
    tl.store(LSE_BWD + row_base + offs_m, lse_p, mask=m_ok)
    tl.store(DT + row_base + offs_m, dt, mask=m_ok)

    if STORE_DQ:
        # Pass 2: dQ = t̄ · scale · dS K with the renormalised P and the Δ of pass 1.
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, end_n, BLOCK_N):
            if RELOAD_ROWS:
                q = _load_rows(q_base, offs_m, stride_qm, offs_d, stride_qd, S_q, D)
                do = _load_rows(do_base, offs_m, stride_dom, offs_d, stride_dod, S_q, D)
            k, qk, p, dp = _dq_tile(q, do, k_base, v_base, start_n + offs_n0, offs_m, offs_d, row_scale, lse_p,
                                    b, h, KPM, BIAS, stride_kn, stride_kd, stride_vn, stride_vd, stride_pb,
                                    stride_pn, stride_bb, stride_bh, stride_bm, stride_bn, S_q, S_k, D,
                                    HAS_KPM, HAS_BIAS, CAUSAL, PRECISION)
            ds = p * (dp - delta[:, None])
            acc += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = acc * (t_bar * scale)[:, None]
        tl.store(DQ + row_base * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _kernel_setup(kernel: str, q: torch.Tensor):
    """The dot precision and candidate (BLOCK_M, BLOCK_N, warps, stages) configurations of one
    flash kernel for q: chosen in ``_configs`` (one configuration under the interpreter;
    autotuned over on CUDA), each one compiled and checked for sm_90, sm_80 and sm_86 by
    ``python -m tgr_kernels.aot``."""
    D, arch = q.shape[-1], _configs.device_arch(q.device)
    precision = _configs.flash_dot_precision(kernel, D, q.dtype, triton_dot_precision(q.dtype), arch)
    return precision, _configs.flash_configs(kernel, D, q.dtype, precision, arch)


# Triton specialises integer arguments divisible by 16: rows of a head dim that is a multiple of
# 16 load as vectors, other head dims element by element, each element with its own 64-bit
# address, and the static proof shows those spilling in sm_90's 64-row wgmma tiles (the backward
# at 128 < D < 256). Such head dims (rare: models use 64, 80, 96, 128, 256) are zero-padded to
# the next multiple of 16 around the kernels: q·k, P V and every gradient are unchanged on the
# real columns, and the pad costs one copy of q, k, v (and dO).
FLASH_HEAD_DIM_ALIGN = 16


def _pad_head_dim(*tensors):
    """Each tensor zero-padded in its last dim to a multiple of FLASH_HEAD_DIM_ALIGN, contiguous;
    a tensor passed several times (q = k = v) is padded once."""
    D = tensors[0].shape[-1]
    pad = -D % FLASH_HEAD_DIM_ALIGN
    padded = {}
    for t in tensors:
        if id(t) not in padded:
            padded[id(t)] = torch.nn.functional.pad(t, (0, pad))
    return [padded[id(t)] for t in tensors]


def _unpad(t, D):
    return None if t is None else t[..., :D].contiguous()


def flash_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale):
    """Launch the forward kernel (``gate``: a ``_gate.Gate`` or None). Returns (out, lse)."""
    D = q.shape[-1]
    if D % FLASH_HEAD_DIM_ALIGN:
        out, lse = flash_forward(*_pad_head_dim(q, k, v), t_bar, key_padding, additive, causal,
                                 gate, scale)
        return _unpad(out, D), lse
    B, H, S_q, D = q.shape
    S_k, group = k.shape[2], H // k.shape[1]
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((B, H, S_q), torch.float32, q.device)
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), q.device)
    precision, configs = _kernel_setup("fwd", q)
    _configs.launch(
        _flash_fwd_kernel, lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H), configs,
        q, k, v, t_bar, kpm, bias, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *t_bar.stride(), *kpm_strides, *bias_strides,
        H, group, S_q, S_k, D, scale, *_gate.kernel_args(gate),
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        HAS_GATE=gate is not None, PRECISION=precision, BLOCK_D=_configs.flash_block_d(D),
        tune_key=_configs.FLASH_TUNE_KEY, tune_bucket=_configs.flash_tune_bucket(S_q, S_k),
    )
    return out, lse


def flash_backward(q, k, v, t_bar, key_padding, additive, causal, gate, scale,
                   lse, grad_out, need_dq: bool, need_dkv: bool):
    """Launch the backward kernels. Returns (dq or None, dk or None, dv or None, dt̄ [B, S_q] fp32).
    The forward's output is not needed: Δ comes from the dQ kernel's first pass. ``grad_out`` is
    the ungated dY: the kernels apply the gate."""
    D = q.shape[-1]
    if D % FLASH_HEAD_DIM_ALIGN:
        qp, kp, vp, gp = _pad_head_dim(q, k, v, grad_out)
        dq, dk, dv, dt = flash_backward(qp, kp, vp, t_bar, key_padding, additive, causal, gate,
                                        scale, lse, gp, need_dq, need_dkv)
        return _unpad(dq, D), _unpad(dk, D), _unpad(dv, D), dt
    B, H, S_q, D = q.shape
    S_k, H_kv = k.shape[2], k.shape[1]
    group = H // H_kv
    grad_out = grad_out.contiguous()
    # Δ and the renormalised lse come from the dQ kernel's first pass (see its docstring), so
    # it runs before the dK/dV kernel, which reads them.
    delta = new_output((B, H, S_q), torch.float32, q.device)
    lse_bwd = new_output((B, H, S_q), torch.float32, q.device)
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), q.device)
    common = dict(
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        BLOCK_D=_configs.flash_block_d(D),
        tune_key=_configs.FLASH_TUNE_KEY, tune_bucket=_configs.flash_tune_bucket(S_q, S_k),
    )
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(),
               *t_bar.stride(), *kpm_strides, *bias_strides)

    dq = new_output((B, H, S_q, D), q.dtype, q.device) if need_dq else q.new_empty(1)
    dt = new_output((B, H, S_q), torch.float32, q.device)
    precision, configs = _kernel_setup("bwd_dq", q)
    _configs.launch(
        _flash_bwd_dq_kernel, lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), B * H), configs,
        q, k, v, t_bar, kpm, bias, grad_out, lse, delta, lse_bwd, dq, dt,
        *strides, H, group, S_q, S_k, D, scale, *_gate.kernel_args(gate), HAS_GATE=gate is not None,
        STORE_DQ=need_dq, PRECISION=precision, **common,
    )
    dk = dv = None
    if need_dkv:
        # One program per (k/v head, key block) sums over the head's group: deterministic dK/dV.
        dk = new_output((B, H_kv, S_k, D), k.dtype, q.device)
        dv = new_output((B, H_kv, S_k, D), v.dtype, q.device)
        precision, configs = _kernel_setup("bwd_dkdv", q)
        _configs.launch(
            _flash_bwd_dkdv_kernel, lambda meta: (triton.cdiv(S_k, meta["BLOCK_N"]), B * H_kv), configs,
            q, k, v, t_bar, kpm, bias, grad_out, lse_bwd, delta, dk, dv,
            *strides, H, group, S_q, S_k, D, scale, PRECISION=precision, GROUPED=group > 1, **common,
        )
    return (dq if need_dq else None), dk, dv, dt.sum(1)


def flash_attention(q, k, v, t_bar, key_padding, additive, causal, gate, scale):
    """Differentiable flash attention: the ``torch.ops.tgr_kernels.flash_attention_forward``
    custom op (registered in ``_ops``, with its backward), so torch.compile sees one opaque op."""
    from ._ops import flash_attention as op  # _ops imports this module's launchers

    return op(q, k, v, t_bar, key_padding, additive, causal, gate, scale)
