"""PyTorch path of temperature-guided attention for narrow heads: SDPA on the pre-scaled query.

Scaling row i's logits by t̄_i is scaling q_i: ``t̄_i (q_i·k_j) = (t̄_i q_i)·k_j``. So the op is
``scaled_dot_product_attention(t̄ ∘ Q, K, V)`` followed by the GSoT gate (a PyTorch product,
through which autograd gives a learning gate's gradient), and PyTorch's fused
SDPA kernels (O(S) memory on CPU and GPU) do the work, forward and backward, with autograd
carrying the temperature gradient through the multiplication.

SDPA returns NaN for a row with no visible key; such rows are unmasked before the call and
zeroed after it, so their outputs are zeros and their gradients are zeros, never NaN. An
additive mask entry ``<= MASKED_BIAS`` (HF's ``finfo(dtype).min``, −1e9) masks its key like −inf.

Backward: when the temperature needs a gradient, the forward is SDPA and the backward is this
module's own, chunked over query rows (``_SdpaFunction``): per chunk ``Z = Q_c Kᵀ`` and ``dP = dO_c Vᵀ``
(GEMMs), ``P = softmax(t̄·scale·Z + m)``, ``Δ_i = Σ_j P_ij dP_ij``, ``dS = P ∘ (dP − Δ)``,
``dt̄_i = scale · Σ_j dS_ij Z_ij``, then ``dQ_c = G K``, ``dK += Gᵀ Q_c``, ``dV += Pᵀ dO_c``
with ``G = t̄·scale·dS``. SDPA's own backward takes ``Δ = rowsum(dO ∘ O)``: when the softmax
saturates (large logits), dS is a tiny difference of nearly equal terms, Δ and dP then come from
different roundings and do not cancel, so dt̄ and dK come out several times less accurate than
eager autograd's. Δ from the same P and dP cancels as eager autograd does. Without a temperature
gradient, half-precision q/k/v keep SDPA's own (fused, faster) backward (see ``_own_backward``).

Grouped-query attention (k/v with H_kv heads, H_q = group · H_kv): the forward is SDPA with
``enable_gqa``, which reads each k/v head for its group in place. The backward folds a group's
query heads into the rows of one GEMM per k/v head (``[B, H_kv, group · rows, D]``), so dK and
dV come out summed over the group by the GEMM itself, in a fixed order, without copying k or v.

Design limit: a mask SDPA cannot express by itself (causal with S_q ≠ S_k, or causal together
with another mask) is built densely, ``[B, 1, rows, S_k]``; query rows are then processed in
chunks so that buffer stays under ``DENSE_MASK_ELEMENTS``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import once_differentiable_strict
from ._gate import Gate, differentiable_gate
from .reference import MASKED_BIAS

DENSE_MASK_ELEMENTS = 1 << 24
# Elements of one [B, H, rows, S_k] score chunk in the backward (a few such buffers are live).
BACKWARD_CHUNK_ELEMENTS = 1 << 22


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
    masked = additive <= MASKED_BIAS
    masked = masked if keep is None else masked | ~keep
    mask = additive.masked_fill(masked, -math.inf)
    dead = torch.isneginf(mask).all(-1)
    return mask.masked_fill(dead[..., None], 0.0), dead


def _sdpa_forward(q, k, v, t_rows, mask, is_causal: bool, scale: float):
    """SDPA on the temperature-scaled query: ``softmax(scale · (t̄ ∘ Q) Kᵀ + m) V``."""
    q_scaled = q * t_rows[:, None, :, None].to(q.dtype)
    grouped = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return F.scaled_dot_product_attention(q_scaled, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          **grouped)


def _fold_group(x, H_kv: int):
    """``[B, H_q, rows, X]`` → ``[B, H_kv, group · rows, X]``: the query heads that share a k/v
    head (h // group) stacked as rows, so one GEMM against that k/v head serves the group."""
    B, H, rows, X = x.shape
    return x.reshape(B, H_kv, (H // H_kv) * rows, X)


def _unfold_group(x, H: int):
    """The inverse of :func:`_fold_group` (a view)."""
    return x.view(x.shape[0], H, -1, x.shape[-1])


def _sdpa_backward(q, k, v, t_rows, mask, is_causal: bool, scale: float, grad_out, need_dq: bool, need_dkv: bool):
    """The backward of ``_sdpa_forward`` (module docstring), chunked over query rows so each
    score buffer holds at most ``BACKWARD_CHUNK_ELEMENTS``. ``mask``: SDPA's attn_mask (bool
    keep or additive, every row sees at least one key) or None; ``is_causal``: square, top-left.
    Returns (dq, dk, dv, dt̄ [B, rows]); dq/dk/dv are None when not needed."""
    B, H, M, D = q.shape
    S_k, H_kv = k.shape[2], k.shape[1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_out = grad_out.to(q.dtype)
    t_scaled = (t_rows.to(acc_dtype) * scale)[:, None, :, None]  # [B, 1, M, 1]
    mask_rows = mask is not None and mask.dim() >= 2 and mask.shape[-2] == M
    dq = torch.empty_like(q) if need_dq else None
    dk = dv = None  # summed over chunks in fp32 (fp64 for fp64)
    dt = torch.empty(B, H, M, dtype=acc_dtype, device=q.device)
    rows = max(1, min(M, BACKWARD_CHUNK_ELEMENTS // max(1, B * H * S_k)))
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        q_c, do_c = _fold_group(q[:, :, r0:r1], H_kv), _fold_group(grad_out[:, :, r0:r1], H_kv)
        z = _unfold_group(torch.matmul(q_c, k.transpose(-2, -1)), H).to(acc_dtype)
        s = z * t_scaled[:, :, r0:r1]
        if mask is not None:
            m = mask[..., r0:r1, :] if mask_rows else mask
            if m.dtype == torch.bool:
                s.masked_fill_(~m, -math.inf)
            else:
                s.add_(m)
        if is_causal:
            rows_c = torch.arange(r0, r1, device=q.device).view(-1, 1)
            s.masked_fill_(torch.arange(S_k, device=q.device).view(1, S_k) > rows_c, -math.inf)
        p = torch.softmax(s, dim=-1)
        del s
        dp = _unfold_group(torch.matmul(do_c, v.transpose(-2, -1)), H).to(acc_dtype)
        # dS = P ∘ (dP − Δ) with Δ = Σ_j P dP from the same P and dP, in one fused pass
        # (eager softmax's own backward).
        ds = torch._softmax_backward_data(dp, p, -1, acc_dtype)
        del dp
        dt[:, :, r0:r1] = torch.einsum("bhmn,bhmn->bhm", ds, z) * scale
        if need_dq or need_dkv:
            g = _fold_group(ds.mul_(t_scaled[:, :, r0:r1]).to(q.dtype), H_kv)  # G = t̄·scale·dS
            if need_dq:
                dq[:, :, r0:r1] = _unfold_group(torch.matmul(g, k), H)
            if need_dkv:
                # Summed over the group's query heads by the GEMM (they are its rows).
                dk_c = torch.matmul(g.transpose(-2, -1), q_c)
                dv_c = torch.matmul(_fold_group(p.to(v.dtype), H_kv).transpose(-2, -1), do_c)
                dk = dk_c.to(acc_dtype) if dk is None else dk.add_(dk_c)
                dv = dv_c.to(acc_dtype) if dv is None else dv.add_(dv_c)
    if need_dkv:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv, dt.sum(1)


class _SdpaFunction(torch.autograd.Function):
    """SDPA forward with the consistent-Δ backward of ``_sdpa_backward`` (inputs validated and
    masks built by the caller)."""

    @staticmethod
    def forward(ctx, q, k, v, t_rows, mask, is_causal, scale):
        ctx.save_for_backward(q, k, v, t_rows, mask)
        ctx.options = (is_causal, scale)
        return _sdpa_forward(q, k, v, t_rows, mask, is_causal, scale)

    @staticmethod
    @once_differentiable_strict("temperature_guided_attention (SDPA path)")
    def backward(ctx, grad_out):
        q, k, v, t_rows, mask = ctx.saved_tensors
        need_q, need_k, need_v, need_t = ctx.needs_input_grad[:4]
        if not (need_q or need_k or need_v or need_t):
            return (None,) * 7
        dq, dk, dv, dt = _sdpa_backward(q, k, v, t_rows, mask, *ctx.options, grad_out,
                                        need_dq=need_q, need_dkv=need_k or need_v)
        return (dq, dk if need_k else None, dv if need_v else None, dt if need_t else None, None, None, None)


def _own_backward(q, k, v, t_rows) -> bool:
    """Whether the backward is this module's (Δ from the same P and dP) rather than SDPA's own:
    always when the temperature needs a gradient, and for fp32/fp64 q/k/v whenever anything does.
    With a frozen temperature SDPA's fused backward is faster on the CPU (measured on the AMD EPYC,
    causal, forward + backward: fp32 1.4-2.2x, bf16 1.35-1.5x), but its Δ = rowsum(dO ∘ O) left
    fp32 dV and dK at 4-8x eager's error per row once the softmax saturates (logits ~100): in
    half precision the inputs' own rounding hides that, so half inputs keep the fast backward."""
    if t_rows.requires_grad:
        return True
    full_precision = q.dtype in (torch.float32, torch.float64)
    return full_precision and (q.requires_grad or k.requires_grad or v.requires_grad)


def _sdpa_rows(q, k, v, t_bar, key_padding, additive, causal, gate, scale, row0, S_q):
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
    t_rows = t_bar[:, row0:row1]
    if torch.is_grad_enabled() and _own_backward(q, k, v, t_rows):
        out = _SdpaFunction.apply(q, k, v, t_rows, mask, is_causal, scale)
    else:
        out = _sdpa_forward(q, k, v, t_rows, mask, is_causal, scale)
    # Zeroing dead rows unconditionally costs one multiply and no host sync (no dead.any()).
    if dead is not None:
        out = out * torch.broadcast_to(~dead, out.shape[:3])[..., None].to(out.dtype)
    # PyTorch's CPU SDPA (torch 2.13, fp32 and half, without a mask) returns a zero row for a query
    # row that holds NaN or ±inf, where eager attention, the reference and the Triton kernels give
    # NaN: the NaN is put back, so a bad hidden state never turns into a silent zero. One pass
    # over q and one over the output, no host sync.
    out = out.masked_fill(~torch.isfinite(q).all(-1, keepdim=True), float("nan"))
    if gate is not None:
        # Autograd gives the learning gates' dt̄ += g'(t̄) · Σ dY ∘ Ô from this product.
        out = out * differentiable_gate(t_rows, gate)[:, None, :, None].to(out.dtype)
    return out


def sdpa_attention(q, k, v, t_bar, key_padding, additive, causal: bool,
                   gate: Gate | None, scale: float) -> torch.Tensor:
    """Inputs validated by the caller; t_bar is [B, S_q] (float32), q, k, v share a dtype."""
    B, _, S_q, _ = q.shape
    S_k = k.shape[2]
    rows = S_q
    if _needs_dense_mask(key_padding, additive, causal, S_q, S_k):
        rows = max(1, min(S_q, DENSE_MASK_ELEMENTS // (B * S_k)))
    outs = [
        _sdpa_rows(q[:, :, row0:row0 + rows], k, v, t_bar, key_padding, additive, causal, gate,
                   scale, row0, S_q)
        for row0 in range(0, S_q, rows)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
