"""Decode path of temperature-guided attention: split-KV kernels (flash-decoding) for a few query
rows against a long key/value cache, forward only.

Design limit: one program holds one query row, one [BLOCK_N, BLOCK_D] K tile and one V tile, so
the head dim is capped at 256 (``attention_flash.FLASH_MAX_HEAD_DIM``, the same limit as the
flash path); the path is taken for at most ``DECODE_MAX_QUERY_ROWS`` query rows and only when no
gradient is needed (decoding has no backward: with a gradient the flash path runs).

Why: with S_q = 1 the flash forward launches one 128-row tile per (batch, head), almost all of it
padding, and only B·H programs, too few to keep a GPU's memory system busy over a long cache.
Here the keys are cut into ``num_splits`` chunks and each (query row, chunk) is one program, so
a single sequence fills the GPU; a second kernel merges the chunks' partial results exactly.
The products are ``tl.sum`` reductions over the head dim (one row: no tensor-core tile to fill).

Grouped-query attention: k and v have ``H_kv`` heads, ``H_q % H_kv == 0``; query head h reads kv
head ``h // (H_q // H_kv)`` in place (no copy of the cache).

Math, per query row i (base-2 logits as in the flash path, ``m_ij`` the masks)::

    S_ij = (t̄_i · scale · (q_i·k_j) + m_ij) · log2(e)
    chunk c (keys J_c):  M_ic = max_{j∈J_c} S_ij,  L_ic = Σ_{j∈J_c} 2^(S_ij − M_ic),
                         A_ic = Σ_{j∈J_c} 2^(S_ij − M_ic) v_j
    combine:             M_i = max_c M_ic,  w_ic = 2^(M_ic − M_i),
                         Y_i = g_i · (Σ_c w_ic A_ic) / (Σ_c w_ic L_ic),   g_i = 1[t̄_i >= τ]

which equals ``softmax_j(S_i) V`` exactly (up to rounding) for any chunking. A chunk with no
visible key has M = −inf, L = 0, A = 0 and weight 0; a row with no visible key at all outputs
zeros. Masks as in ``_masks.logits_tile`` (key padding, additive bias with entries <= −4096
masking like −inf, bottom-right causal: key j visible to query i when ``j <= i + S_k − S_q``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _configs, _gate
from ._backend import new_output
from ._gate import gate_rows
from ._masks import LOG2E, logits_tile, mask_args, online_softmax_step

# The most query rows the dispatcher sends here: one program per query row re-reads its K/V
# chunk for every row (and every query head of a kv group) from L2, while the flash forward
# reads each K/V tile once per 16..128-row tile on tensor cores; decoding steps (1 row) and
# short speculative or chunked steps (a few rows) are the case this path is for. 16 (the smallest
# tensor-core tile's rows) is a design choice; no GPU has timed the crossover yet.
DECODE_MAX_QUERY_ROWS = 16


@triton.jit(do_not_specialize=["gsot_mode"])
def _decode_split_kernel(
    Q, K, V, T_BAR, KPM, BIAS, ACC_PART, M_PART, L_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tb, stride_tm,
    stride_pb, stride_pn,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, S_q, S_k, D, scale, chunk, num_splits, gsot_threshold, gsot_mode,
    HAS_KPM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, HAS_GATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial attention of one query row over one key chunk.

    For row i of query head h and chunk c (keys ``[c·chunk, (c+1)·chunk)``, chunk a multiple of
    BLOCK_N), with base-2 logits ``S_ij = (t̄_i·scale·(q_i·k_j) + m_ij)·log2(e)``::

        M_ic = max_j S_ij,   L_ic = Σ_j 2^(S_ij − M_ic),   A_ic = Σ_j 2^(S_ij − M_ic) v_j

    (online over BLOCK_N-key blocks; M = −inf, L = 0, A = 0 when no key of the chunk is visible).
    When HAS_GATE, a row with ``t̄_i < τ`` under a hard forward gate (gsot_mode "hard" or
    "straight_through", which the combine zeroes) reads no key: M = −inf.
    Q [B, H, S_q, D]; K, V [B, H / GROUP, S_k, D] (kv head h // GROUP); any strides. T_BAR fp32
    [B, S_q]. ACC_PART fp32 [B·H·S_q, num_splits, D], M_PART and L_PART fp32 [B·H·S_q,
    num_splits], contiguous. Grid: (B·H·S_q, num_splits), rows on axis 0 (no 65535 limit).
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    i = row % S_q
    bh = row // S_q
    b = bh // H
    h = bh % H
    kv_h = h // GROUP
    offs_m = i + tl.arange(0, 1)  # the row as a one-element vector, for logits_tile
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + i.to(tl.int64) * stride_qm
                + offs_d.to(tl.int64) * stride_qd, mask=d_ok, other=0.0).to(tl.float32)
    t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + offs_m.to(tl.int64) * stride_tm).to(tl.float32)
    row_scale = t_bar * (scale * LOG2E)

    k_base = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    start = split * chunk
    end = tl.minimum(start + chunk, S_k)
    if CAUSAL:
        # One past the last key row i sees (bottom-right aligned); later keys are not loaded.
        end = tl.maximum(tl.minimum(end, i + (S_k - S_q) + 1), start)
    if HAS_GATE:
        # A pruned row outputs zeros whatever its keys: its chunk is not read at all. (The soft
        # gate, mode 2, prunes nothing: σ(u) > 0.)
        pruned = (tl.max(t_bar, 0) < gsot_threshold) & (gsot_mode != 2)
        end = tl.where(pruned, start, end)
        # ... but a NaN/±inf in its query row stays NaN, as eager's 0 · NaN and the flash kernel's
        # gated output: the chunk's partial starts (and, with no key read, stays) m = 0, l = 1,
        # A = Σ_d q_d · 0, which is 0 or NaN, and the combine's gate 0 keeps it so. (Set before
        # the loop, so nothing of it is live across the loop: after it, 8 B spilled.)
        acc = tl.where(pruned, acc + tl.sum(q * 0.0, 0), acc)
        l_i = tl.where(pruned, 1.0, l_i)
        m_i = tl.where(pruned, 0.0, m_i)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n[:, None] < S_k) & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :].to(tl.int64) * stride_kd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        qk = tl.sum(k * q[None, :], 1)
        s = logits_tile(qk[None, :], row_scale, offs_m, offs_n, b, h, KPM, BIAS,
                        stride_pb, stride_pn, stride_bb, stride_bh, stride_bm, stride_bn,
                        S_q, S_k, HAS_KPM, HAS_BIAS, CAUSAL)
        m_new, p, alpha, l_i = online_softmax_step(m_i, l_i, s)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :].to(tl.int64) * stride_vd,
                    mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(tl.sum(p, 0)[:, None] * v, 0)
        m_i = m_new

    part = row.to(tl.int64) * num_splits + split
    tl.store(ACC_PART + part * D + offs_d, acc, mask=d_ok)
    tl.store(M_PART + part + tl.arange(0, 1), m_i)
    tl.store(L_PART + part + tl.arange(0, 1), l_i)


@triton.jit(do_not_specialize=["gsot_mode"])
def _decode_combine_kernel(
    ACC_PART, M_PART, L_PART, T_BAR, OUT,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tb, stride_tm,
    H, S_q, D, num_splits, gsot_threshold, gsot_mode, gsot_width,
    HAS_GATE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Exact merge of one query row's chunk partials, and the GSoT gate.

    ``M = max_c M_c``, ``w_c = 2^(M_c − M)`` (0 for a chunk with M_c = −inf),
    ``Y = g · (Σ_c w_c A_c) / (Σ_c w_c L_c)`` with the gate g of ``_gate.gate_rows`` when
    HAS_GATE; a row whose chunks saw no key (Σ w_c L_c = 0) or that is pruned writes zeros. Partials as written by
    ``_decode_split_kernel``; BLOCK_S >= num_splits. OUT [B, H, S_q, D] in the output dtype,
    any strides. Grid: (B·H·S_q,).
    """
    row = tl.program_id(0)
    i = row % S_q
    bh = row // S_q
    b = bh // H
    h = bh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    part0 = row.to(tl.int64) * num_splits

    m_c = tl.load(M_PART + part0 + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    l_c = tl.load(L_PART + part0 + offs_s, mask=offs_s < num_splits, other=0.0)
    m = tl.max(m_c, 0)
    m_base = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(tl.exp2(m_c - m_base) * l_c, 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(0, num_splits):
        w = tl.exp2(tl.load(M_PART + part0 + c) - m_base)
        acc += w * tl.load(ACC_PART + (part0 + c) * D + offs_d, mask=d_ok, other=0.0)

    dead = l_sum == 0.0
    out = acc / tl.where(dead, 1.0, l_sum)
    out = tl.where(dead, 0.0, out)
    if HAS_GATE:
        t_bar = tl.load(T_BAR + b.to(tl.int64) * stride_tb + i.to(tl.int64) * stride_tm).to(tl.float32)
        gate, _ = gate_rows(t_bar, gsot_threshold, gsot_mode, gsot_width)
        out = out * gate
    tl.store(OUT + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om
             + offs_d.to(tl.int64) * stride_od, out.to(OUT.dtype.element_ty), mask=d_ok)


def decode_forward(q, k, v, t_bar, key_padding, additive, causal, gate, scale,
                   num_splits: int | None = None):
    """Launch the split and combine kernels; returns the output ``[B, H_q, S_q, D]`` in q's dtype.

    q ``[B, H_q, S_q, D]``; k, v ``[B, H_kv, S_k, D]`` with ``H_q % H_kv == 0``; t_bar fp32
    ``[B, S_q]``; masks as validated by the op (key padding ``[B, S_k]``, additive broadcastable
    to ``[B, H_q, S_q, S_k]``). ``num_splits``: the number of key chunks (default: from
    ``_configs.decode_num_splits``); the result is the same for any value up to rounding.
    No autograd: the caller takes this path only when no gradient is needed.
    """
    B, H, S_q, D = q.shape
    H_kv, S_k = k.shape[1], k.shape[2]
    if H % H_kv:
        raise ValueError(f"query heads must be a multiple of key/value heads, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    config = _configs.decode_config(D)
    block_n = config["BLOCK_N"]
    rows = B * H * S_q
    if num_splits is None:
        num_splits = _configs.decode_num_splits(S_k, rows, block_n, _configs.device_sm_count(q.device))
    # Chunks are whole BLOCK_N blocks; splits that would start past S_k are dropped.
    chunk = triton.cdiv(triton.cdiv(max(S_k, 1), max(1, num_splits)), block_n) * block_n
    num_splits = max(1, triton.cdiv(S_k, chunk))

    # One fp32 workspace for the three partial results (one allocation instead of three).
    work = torch.empty(rows * num_splits * (D + 2), dtype=torch.float32, device=q.device)
    acc_part = work[:rows * num_splits * D].view(rows, num_splits, D)
    m_part = work[rows * num_splits * D:rows * num_splits * (D + 1)].view(rows, num_splits)
    l_part = work[rows * num_splits * (D + 1):].view(rows, num_splits)
    kpm, kpm_strides, bias, bias_strides = mask_args(key_padding, additive, (B, H, S_q, S_k), q.device)
    block_d = _configs.flash_block_d(D)
    threshold, mode, width = _gate.kernel_args(gate)
    _configs.launch(
        _decode_split_kernel, (rows, num_splits), (config,),
        q, k, v, t_bar, kpm, bias, acc_part, m_part, l_part,
        *q.stride(), *k.stride(), *v.stride(), *t_bar.stride(), *kpm_strides, *bias_strides,
        H, H // H_kv, S_q, S_k, D, scale, chunk, num_splits, threshold, mode,
        HAS_KPM=key_padding is not None, HAS_BIAS=additive is not None, CAUSAL=causal,
        HAS_GATE=gate is not None, BLOCK_D=block_d,
    )
    out = new_output(q.shape, q.dtype, q.device)
    _configs.launch(
        _decode_combine_kernel, (rows,), (_configs.decode_combine_config(),),
        acc_part, m_part, l_part, t_bar, out, *out.stride(), *t_bar.stride(),
        H, S_q, D, num_splits, threshold, mode, width,
        HAS_GATE=gate is not None, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )
    return out
