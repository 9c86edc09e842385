"""Logits and masks shared by the flash kernels (``attention_flash``) and the wide path's row
kernels (``attention_wide``): one definition of how a score becomes a base-2 logit and when a key
is masked, so both paths mask alike.

Both paths work in base 2 (``exp2``/``log2`` are the GPU's native instructions): a natural-log
logit ``x`` becomes ``x · log2(e)``, and ``exp(x − m) = exp2((x − m) · log2(e))``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import MASKED_BIAS

# log2(e): the factor that turns natural-log logits into base-2 ones.
LOG2E = tl.constexpr(1.4426950408889634)
# Additive mask entries at or below this mask their key like −inf (see reference.MASKED_BIAS).
MASKED_BIAS_CONSTEXPR = tl.constexpr(MASKED_BIAS)


@triton.jit
def logits_tile(
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
    A bias ``<= MASKED_BIAS`` (HF's finfo(dtype).min, −1e9) masks its key exactly like −inf: taken
    literally it would put logits near −1e9 whose fp32 spacing (64) swallows the q·k term, so a
    row that sees no key would average V instead of giving zeros.
    """
    s = qk * row_scale[:, None]
    valid = (offs_m[:, None] < S_q) & (offs_n[None, :] < S_k)
    if HAS_BIAS:
        bias_ptrs = (BIAS + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh
                     + offs_m[:, None].to(tl.int64) * stride_bm + offs_n[None, :].to(tl.int64) * stride_bn)
        bias = tl.load(bias_ptrs, mask=valid, other=0.0).to(tl.float32)
        valid = valid & (bias > MASKED_BIAS_CONSTEXPR)
        s = s + bias * LOG2E
    if HAS_KPM:
        keep = tl.load(KPM + b.to(tl.int64) * stride_pb + offs_n.to(tl.int64) * stride_pn,
                       mask=offs_n < S_k, other=0)
        valid = valid & (keep[None, :] != 0)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (S_k - S_q))
    return tl.where(valid, s, float("-inf"))


_DUMMIES: dict = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """One element per device, made once: an allocation per call shows in a decoding step's host time."""
    dummy = _DUMMIES.get(device)
    if dummy is None:
        dummy = _DUMMIES[device] = torch.empty(1, device=device)
    return dummy


def mask_args(key_padding, additive, shape, device):
    """Tensors and strides for the mask inputs of attention of ``shape = (B, H, S_q, S_k)``;
    a one-element dummy stands in for an absent mask (its pointer is never read)."""
    dummy = _dummy(device) if key_padding is None or additive is None else None
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


@triton.jit
def online_softmax_step(m_i, l_i, s):
    """One block of an online softmax over base-2 logits ``s`` ``[rows, cols]``, given the running
    row max ``m_i`` and sum ``l_i``: returns ``(m_new, p, alpha, l_new)`` with
    ``p = exp2(s − m_new)``, ``alpha = exp2(m_i − m_new)`` (the factor that rescales what was summed
    before) and ``l_new = l_i · alpha + Σ p``. A row with no visible key yet keeps m = −inf; 0 is
    subtracted instead, so exp2 gives 0, not NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_base[:, None])
    alpha = tl.exp2(m_i - m_base)
    return m_new, p, alpha, l_i * alpha + tl.sum(p, 1)
