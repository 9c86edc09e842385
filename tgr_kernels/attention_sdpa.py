"""PyTorch path of temperature-guided attention for narrow heads: SDPA on the pre-scaled query.

Scaling row i's logits by t̄_i is scaling q_i: ``t̄_i (q_i·k_j) = (t̄_i q_i)·k_j``. So the op is
``scaled_dot_product_attention(t̄ ∘ Q, K, V)`` followed by the GSoT gate, and PyTorch's fused
SDPA kernels (O(S) memory on CPU and GPU) do the work, forward and backward, with autograd
carrying the temperature gradient through the multiplication.

SDPA returns NaN for a row with no visible key; such rows are unmasked before the call and
zeroed after it, so their outputs are zeros and their gradients are zeros, never NaN.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _sdpa_mask(key_padding, additive, causal: bool, S_q: int, S_k: int, device):
    """(mask for SDPA or None, use is_causal, dead-row mask broadcastable to [B, H, S_q] or None)."""
    if key_padding is None and additive is None:
        if not causal or S_q == S_k:
            return None, causal, None  # SDPA's own causal mask; the diagonal keeps every row alive
    keep = None
    if key_padding is not None:
        keep = key_padding[:, None, None, :]
    if causal:
        rows = torch.arange(S_q, device=device).view(S_q, 1) + (S_k - S_q)
        visible = torch.arange(S_k, device=device).view(1, S_k) <= rows
        keep = visible if keep is None else keep & visible
    if additive is None:
        dead = ~keep.any(-1)
        return keep | dead[..., None], False, dead
    mask = additive if keep is None else additive.masked_fill(~keep, -math.inf)
    dead = torch.isneginf(mask).all(-1)
    return mask.masked_fill(dead[..., None], 0.0), False, dead


def sdpa_attention(q, k, v, t_bar, key_padding, additive, causal: bool,
                   gsot_threshold: Optional[float], scale: float) -> torch.Tensor:
    """Inputs validated by the caller; t_bar is [B, S_q] (float32), q, k, v share a dtype."""
    S_q, S_k = q.shape[2], k.shape[2]
    mask, is_causal, dead = _sdpa_mask(key_padding, additive, causal, S_q, S_k, q.device)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(q.dtype)
    q_scaled = q * t_bar[:, None, :, None].to(q.dtype)
    out = F.scaled_dot_product_attention(q_scaled, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    keep = None
    if dead is not None and bool(dead.any()):
        keep = ~dead
    if gsot_threshold is not None:
        gate = (t_bar >= gsot_threshold)[:, None, :]
        keep = gate if keep is None else keep & gate
    if keep is not None:
        out = out * torch.broadcast_to(keep, out.shape[:3])[..., None].to(out.dtype)
    return out
