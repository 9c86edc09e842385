"""PyTorch path of temperature-guided attention for narrow heads: SDPA on the pre-scaled query.

Scaling row i's logits by t̄_i is scaling q_i: ``t̄_i (q_i·k_j) = (t̄_i q_i)·k_j``. So the op is
``scaled_dot_product_attention(t̄ ∘ Q, K, V)`` followed by the GSoT gate, and PyTorch's fused
SDPA kernels (O(S) memory on CPU and GPU) do the work, forward and backward, with autograd
carrying the temperature gradient through the multiplication.

SDPA returns NaN for a row with no visible key; such rows are unmasked before the call and
zeroed after it, so their outputs are zeros and their gradients are zeros, never NaN.

Design limit: a mask SDPA cannot express by itself (causal with S_q ≠ S_k, or causal together
with another mask) is built densely, ``[B, 1, rows, S_k]``; query rows are then processed in
chunks so that buffer stays under ``DENSE_MASK_ELEMENTS``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

DENSE_MASK_ELEMENTS = 1 << 24


def _needs_dense_mask(key_padding, additive, causal: bool, S_q: int, S_k: int) -> bool:
    if not causal:
        return False
    return key_padding is not None or additive is not None or S_q != S_k


def _rows_mask(key_padding, additive, causal: bool, row0: int, row1: int, S_q: int, S_k: int, device):
    """SDPA's attn_mask for query rows row0..row1-1 (None: no mask), and the dead-row mask
    broadcastable to [B, H, rows] (None: no dead rows possible)."""
    keep = None
    if key_padding is not None:
        keep = key_padding[:, None, None, :]
    if causal:
        rows = torch.arange(row0, row1, device=device).view(-1, 1) + (S_k - S_q)
        visible = torch.arange(S_k, device=device).view(1, S_k) <= rows
        keep = visible if keep is None else keep & visible
    if additive is None:
        if keep is None:
            return None, None
        dead = ~keep.any(-1)
        return keep | dead[..., None], dead
    if additive.dim() >= 2 and additive.shape[-2] == S_q:
        additive = additive[..., row0:row1, :]
    mask = additive if keep is None else additive.masked_fill(~keep, -math.inf)
    dead = torch.isneginf(mask).all(-1)
    return mask.masked_fill(dead[..., None], 0.0), dead


def _sdpa_rows(q, k, v, t_bar, key_padding, additive, causal, gsot_threshold, scale, row0, S_q):
    S_k = k.shape[2]
    row1 = row0 + q.shape[2]
    if _needs_dense_mask(key_padding, additive, causal, S_q, S_k):
        mask, dead = _rows_mask(key_padding, additive, causal, row0, row1, S_q, S_k, q.device)
        is_causal = False
    else:  # SDPA's own causal mask (square, so every row sees its diagonal), or no causal at all
        mask, dead = _rows_mask(key_padding, additive, False, row0, row1, S_q, S_k, q.device)
        is_causal = causal
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    q_scaled = q * t_bar[:, None, row0:row1, None].to(q.dtype)
    out = F.scaled_dot_product_attention(q_scaled, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    keep = None
    if dead is not None and bool(dead.any()):
        keep = ~dead
    if gsot_threshold is not None:
        gate = (t_bar[:, row0:row1] >= gsot_threshold)[:, None, :]
        keep = gate if keep is None else keep & gate
    if keep is not None:
        out = out * torch.broadcast_to(keep, out.shape[:3])[..., None].to(out.dtype)
    return out


def sdpa_attention(q, k, v, t_bar, key_padding, additive, causal: bool,
                   gsot_threshold: Optional[float], scale: float) -> torch.Tensor:
    """Inputs validated by the caller; t_bar is [B, S_q] (float32), q, k, v share a dtype."""
    B, _, S_q, _ = q.shape
    S_k = k.shape[2]
    rows = S_q
    if _needs_dense_mask(key_padding, additive, causal, S_q, S_k):
        rows = max(1, min(S_q, DENSE_MASK_ELEMENTS // (B * S_k)))
    outs = [
        _sdpa_rows(q[:, :, row0:row0 + rows], k, v, t_bar, key_padding, additive, causal, gsot_threshold,
                   scale, row0, S_q)
        for row0 in range(0, S_q, rows)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
