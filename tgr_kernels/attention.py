"""Temperature-guided attention with GSoT: the public op, its backend dispatch and its module.

Math (per query row i; the backward of each path is in attention_flash.py and attention_wide.py)::

    S_ij = t̄_i · scale · (q_i·k_j) + m_ij,   P = softmax_j(S),   Y_i = g_i · (P V)_i

with the GSoT gate g_i = 1[t̄_i >= τ] (the seed's), or a gate that learns (``_gate``).

Implementations, chosen by ``backend`` and the head dim D:

    "triton", D <= 256   attention_flash: fused flash kernels, forward and backward
    "triton", D <= 256,  attention_decode: split-KV kernels (flash-decoding), forward only, when
      S_q <= 16          no gradient is needed (decoding against a cache)
    "triton", D >  256   attention_wide: GEMMs + fused Triton row kernels, chunked
    "torch",  D <= 256   attention_sdpa: SDPA on the temperature-scaled query
    "torch",  D >  256   attention_wide with PyTorch row ops (the CPU path for the seed's shape)
    "reference"          reference.temperature_guided_attention_ref: the seed's eager math
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._backend import TRITON_INTERPRET, autocast_dtype, autocast_off, cpu_computes_natively, resolve_backend
from ._gate import DEFAULT_GSOT_WIDTH, make_gate
from ._ops import decode_attention, flash_attention, wide_triton_attention
from ._validation import check_attention_inputs, check_backend
from .attention_decode import DECODE_MAX_QUERY_ROWS
from .attention_flash import FLASH_MAX_HEAD_DIM
from .attention_sdpa import sdpa_attention
from .attention_wide import DEFAULT_CHUNK_BYTES, repeat_kv_heads, wide_attention
from .reference import attention_ref_checked, mean_temperature_fp32

__all__ = ["temperature_guided_attention", "TemperatureGuidedAttention"]

# Widest head the "torch" backend sends to SDPA; wider heads take the chunked GEMM path.
SDPA_MAX_HEAD_DIM = 256


def temperature_guided_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    gsot_threshold: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
    gsot_mode: str = "hard",
    gsot_width: float = DEFAULT_GSOT_WIDTH,
) -> torch.Tensor:
    """Attention whose logits are scaled per query row by its temperature, with GSoT pruning.

    Args:
        q: ``[B, H, S_q, D]``; k, v: ``[B, H, S_k, D]``, or ``[B, H_kv, S_k, D]`` with
            ``H % H_kv == 0`` (grouped-query attention: query head h reads k/v head
            ``h // (H / H_kv)``, in place on the flash and SDPA paths; dK/dV have k's shape).
            float16, bfloat16, float32 (float64 on the "torch" and "reference" backends, and
            "auto", which takes the "torch" one for it). The same tensor may be passed for all three.
        temperature: ``[B, S_q]``, or ``[B, S_q, T]`` whose mean over T is used (the seed's form).
        attn_mask: None; a key-padding mask ``[B, S_k]`` (bool or 0/1, true = keep); or an
            additive float mask broadcastable to ``[B, H, S_q, S_k]`` (the seed's
            ``(1 - mask) * -1e4`` form works unchanged; −inf entries are masked). A bool mask of
            3 or 4 dims is read as keep = true. Masks get no gradient.
        causal: key j is visible to query i when ``j <= i + S_k - S_q`` (bottom-right aligned,
            so a query block at the end of a cache lines up with the last keys).
        gsot_threshold: τ: rows whose (mean) temperature is below it output zeros (GSoT);
            None = off.
        scale: logit scale, default ``1/sqrt(D)``.
        backend: "auto" (Triton on CUDA, "torch" elsewhere), "triton", "torch", "reference".
        gsot_mode: how the gate learns. "hard" (the seed's): ``g = 1[t̄ >= τ]``, no gradient
            through the gate, so a pruned row stays pruned. "straight_through": the same forward,
            and the backward's dg/dt̄ = σ'(u)/ε with ``u = (t̄ − τ)/ε``, so the loss can pull a
            pruned row's temperature back over τ. "soft": ``g = σ(u)`` in both passes (use
            "hard" at inference). Every backend computes the same gradients.
        gsot_width: ε > 0 of the two learning gates, in temperature units.

    Returns:
        ``[B, H, S_q, D]`` in q's dtype. A row with no visible key gives zeros, never NaN.
        Differentiable in q, k, v and temperature; gradients that are not needed are not computed.
    """
    check_backend(backend)
    q, k, v = _autocast_mixed_inputs(q, k, v)
    args = check_attention_inputs(q, k, v, temperature, attn_mask, causal, gsot_threshold, scale,
                                  gsot_mode, gsot_width)
    requested, backend = backend, resolve_backend(backend, q.device)
    if backend == "triton" and q.dtype == torch.float64:
        if requested == "triton":
            raise TypeError("backend='triton' supports float16, bfloat16 and float32 q/k/v, got float64; "
                            "use backend='torch'")
        backend = "torch"  # "auto": float64 goes to the PyTorch path, as the other ops do
    if backend != "reference" and torch.is_grad_enabled() and getattr(attn_mask, "requires_grad", False):
        # The fast paths take the mask as a constant: a learnable bias would silently not learn.
        raise ValueError(f"attn_mask requires grad, but backend={backend!r} does not differentiate the mask; "
                         "use backend='reference' for a learnable bias, or pass attn_mask.detach()")
    if backend == "reference":
        return attention_ref_checked(args, upcast=False)
    q, k, v = _autocast_inputs(q, k, v)
    # One query row, aligned bottom-right, sees every key: causality hides nothing there, and
    # dropping it spares the backends a causal mask of S_q != S_k (the torch path builds it densely).
    causal = args.causal
    if q.shape[2] == 1:  # a branch, not ``and``: under dynamic shapes the test is a SymBool
        causal = False
    options = (args.key_padding, args.additive, causal, args.gate, args.scale)
    # The dtypes are decided above; no op inside may be recast by the caller's autocast.
    with autocast_off(q.device.type):
        t_bar = mean_temperature_fp32(args.temperature)
        if backend == "triton":
            return _triton_attention(q, k, v, t_bar, *options)
        return _torch_attention(q, k, v, t_bar, *options)


def _same_cast(q, k, v, dtype):
    """q, k, v cast to ``dtype``, keeping tensors that were one tensor one tensor."""
    qc = q.to(dtype)
    kc = qc if k is q else k.to(dtype)
    vc = qc if v is q else (kc if v is k else v.to(dtype))
    return qc, kc, vc


def _autocast_mixed_inputs(q, k, v):
    """Under autocast, q/k/v of different floating dtypes (a model's fp32 RoPE'd q and k beside
    its autocast-dtype v) are cast to the autocast dtype, as PyTorch's attention casts them,
    before the inputs are checked; anything else is left to the checks."""
    autocastable = (torch.float16, torch.bfloat16, torch.float32)
    if not all(isinstance(t, torch.Tensor) and t.dtype in autocastable for t in (q, k, v)) \
            or q.dtype == k.dtype == v.dtype:
        return q, k, v
    dtype = autocast_dtype(q.device.type)
    return (q, k, v) if dtype is None else _same_cast(q, k, v, dtype)


def _autocast_inputs(q, k, v):
    """Under autocast, attention runs in the autocast dtype, as PyTorch's own attention and
    matmuls do: floating q/k/v (float64 excepted) are cast to it. The temperature stays fp32."""
    dtype = autocast_dtype(q.device.type)
    if dtype is None or q.dtype == torch.float64:
        return q, k, v
    return (q, k, v) if q.dtype == dtype else _same_cast(q, k, v, dtype)


def _gated_in_fp32(t_bar: torch.Tensor, gate) -> torch.Tensor:
    """t̄ for kernels that load it as fp32 and gate it against an fp32 threshold: an fp64 t̄
    within fp32 rounding of the threshold would land on the other side of it there (0.7 − 1e-9
    rounds to fp32(0.7): kept, where the reference prunes it). Such a row's fp32 value moves by one
    unit to the side its fp64 value is on; the gradient passes through unchanged."""
    if gate is None or t_bar.dtype != torch.float64:
        return t_bar
    t32 = t_bar.float()
    tau = torch.tensor(gate.threshold, dtype=torch.float32, device=t_bar.device)
    keep = t_bar >= gate.threshold
    side = torch.where(keep, tau, torch.nextafter(tau, torch.tensor(-math.inf, device=t_bar.device)))
    fixed = torch.where(keep == (t32 >= tau), t32, side)
    return t32 + (fixed - t32).detach()


def _triton_attention(q, k, v, t_bar, key_padding, additive, *options):
    dtype = q.dtype
    t_bar = _gated_in_fp32(t_bar, options[1])  # options: causal, gate, scale
    if TRITON_INTERPRET and q.device.type == "cpu" and dtype == torch.bfloat16:
        # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584):
        # under it, bf16 is computed in fp32 and the output cast back (autograd casts the
        # gradients back to bf16).
        q, k, v = _same_cast(q, k, v, torch.float32)
        if additive is not None and additive.dtype == torch.bfloat16:
            additive = additive.float()
    if q.shape[-1] <= FLASH_MAX_HEAD_DIM and _decodes(q, k, v, t_bar):
        out = decode_attention(q, k, v, t_bar, key_padding, additive, *options)
    elif q.shape[-1] <= FLASH_MAX_HEAD_DIM:
        out = flash_attention(q, k, v, t_bar, key_padding, additive, *options)
    else:
        k, v = repeat_kv_heads(q, k, v)  # grouped-query attention on the wide path: a copy
        out = wide_triton_attention(q, k, v, t_bar, key_padding, additive, *options,
                                    chunk_bytes=default_chunk_bytes(q.device))
    return out.to(dtype)


def _decodes(q, k, v, t_bar) -> bool:
    """Whether the split-KV decode kernels take this call: a few query rows and nothing that
    needs a gradient (they have no backward). Under torch.compile too: they are the custom op
    ``torch.ops.tgr_kernels.decode_attention_forward``."""
    if q.shape[2] > DECODE_MAX_QUERY_ROWS:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, t_bar)))


def _torch_attention(q, k, v, t_bar, *options):
    """The "torch" backend. On a CPU without native bf16/fp16 GEMMs, half-precision inputs are
    computed in fp32 (emulated half GEMMs are up to ~100x slower than fp32 ones)."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and not cpu_computes_natively(dtype):
        qf = q.float()
        kf = qf if k is q else k.float()
        vf = qf if v is q else (kf if v is k else v.float())
        q, k, v = qf, kf, vf
    if q.shape[-1] <= SDPA_MAX_HEAD_DIM:
        out = sdpa_attention(q, k, v, t_bar, *options)
    else:
        out = wide_attention(q, k, v, t_bar, *options, row_ops="torch")
    return out.to(dtype)


def default_chunk_bytes(device: torch.device) -> int:
    return DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cpu"])


class TemperatureGuidedAttention(nn.Module):
    """Module form of :func:`temperature_guided_attention` (no parameters of its own)."""

    def __init__(self, causal: bool = False, gsot_threshold: float | None = None,
                 scale: float | None = None, *, backend: str = "auto", gsot_mode: str = "hard",
                 gsot_width: float = DEFAULT_GSOT_WIDTH):
        super().__init__()
        check_backend(backend)
        make_gate(gsot_threshold, gsot_mode, gsot_width)  # bad mode or width: fail here, not at the call
        self.causal = causal
        self.gsot_threshold = gsot_threshold
        self.scale = scale
        self.backend = backend
        self.gsot_mode = gsot_mode
        self.gsot_width = gsot_width

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return temperature_guided_attention(
            q, k, v, temperature, attn_mask, causal=self.causal, gsot_threshold=self.gsot_threshold,
            scale=self.scale, backend=self.backend, gsot_mode=self.gsot_mode, gsot_width=self.gsot_width,
        )

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, gsot_threshold={self.gsot_threshold}, gsot_mode={self.gsot_mode!r}, "
                f"scale={self.scale}, backend={self.backend!r}")
