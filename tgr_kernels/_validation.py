"""Input checks shared by every backend. They run before any kernel, and their messages name the
argument and the shapes, so a mistake never surfaces as a crash deep inside a kernel."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "triton", "torch", "reference")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t, dims: Optional[tuple] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {_shape(t)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_shape(t)}): nothing to compute")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_projection_inputs(hidden, weight, bias, clamp_min: float, clamp_max: float) -> None:
    check_tensor("hidden", hidden)
    check_tensor("weight", weight, dims=(2,))
    check_float("hidden", hidden)
    check_float("weight", weight)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dim must equal weight.shape[1]: hidden {_shape(hidden)}, weight {_shape(weight)}"
        )
    if bias is not None:
        check_tensor("bias", bias, dims=(1,))
        check_float("bias", bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [{weight.shape[0]}] to match weight {_shape(weight)}, got {_shape(bias)}")
    check_same_device(hidden=hidden, weight=weight, bias=bias)
    if not (0.0 <= clamp_min <= clamp_max <= 1.0):
        raise ValueError(f"need 0 <= clamp_min <= clamp_max <= 1, got clamp_min={clamp_min}, clamp_max={clamp_max}")


@dataclass
class AttentionInputs:
    """Validated attention inputs, with the mask split into its two kinds.

    key_padding: bool ``[B, S_k]``, True = keep (or None).
    additive: float tensor broadcastable to ``[B, H, S_q, S_k]``, −inf = masked (or None).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    temperature: torch.Tensor
    key_padding: Optional[torch.Tensor]
    additive: Optional[torch.Tensor]
    causal: bool
    gsot_threshold: Optional[float]
    scale: float


def _split_mask(attn_mask, B: int, H: int, S_q: int, S_k: int):
    """Return (key_padding, additive) from the user's mask."""
    if attn_mask is None:
        return None, None
    check_tensor("attn_mask", attn_mask, dims=(2, 3, 4))
    if attn_mask.dim() == 2:
        if tuple(attn_mask.shape) != (B, S_k):
            raise ValueError(
                f"a 2-D attn_mask is a key-padding mask and must be [B, S_k] = [{B}, {S_k}], "
                f"got {_shape(attn_mask)}"
            )
        if attn_mask.dtype == torch.bool:
            return attn_mask, None
        if not bool(((attn_mask == 0) | (attn_mask == 1)).all()):
            raise ValueError(
                "a 2-D attn_mask is a key-padding mask: its values must be 0/1 or bool (true = keep); "
                "pass an additive mask as 4-D [B, 1, 1, S_k]"
            )
        return attn_mask != 0, None
    try:
        torch.broadcast_shapes(attn_mask.shape, (B, H, S_q, S_k))
        ok = torch.broadcast_shapes(attn_mask.shape, (B, H, S_q, S_k)) == (B, H, S_q, S_k)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"attn_mask {_shape(attn_mask)} does not broadcast to [B, H, S_q, S_k] = [{B}, {H}, {S_q}, {S_k}]"
        )
    if attn_mask.dtype == torch.bool:
        additive = torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device)
        return None, additive.masked_fill_(~attn_mask, -math.inf)
    if not attn_mask.is_floating_point():
        raise TypeError(f"a {attn_mask.dim()}-D attn_mask must be bool or floating (additive), got {attn_mask.dtype}")
    if bool(torch.isnan(attn_mask).any()):
        raise ValueError("attn_mask contains NaN")
    return None, attn_mask


def check_attention_inputs(
    q, k, v, temperature, attn_mask, causal: bool, gsot_threshold, scale
) -> AttentionInputs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dims=(4,))
        check_float(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_tensor("temperature", temperature, dims=(2, 3))
    check_float("temperature", temperature)
    check_same_device(q=q, k=k, v=v, temperature=temperature, attn_mask=attn_mask)

    B, H, S_q, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(
            f"q, k, v must share batch and heads: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
        )
    if k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"q, k, v must share the head dim D: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length S_k: k {_shape(k)}, v {_shape(v)}")
    S_k = k.shape[2]
    if tuple(temperature.shape[:2]) != (B, S_q):
        raise ValueError(
            f"temperature must be [B, S_q] or [B, S_q, T] = [{B}, {S_q}, ...] for q {_shape(q)}, "
            f"got {_shape(temperature)}"
        )
    if bool(torch.isnan(temperature).any()):
        raise ValueError(f"temperature {_shape(temperature)} contains NaN")

    if gsot_threshold is not None:
        if isinstance(gsot_threshold, bool) or not isinstance(gsot_threshold, (int, float)) or math.isnan(gsot_threshold):
            raise TypeError(f"gsot_threshold must be a number or None, got {gsot_threshold!r}")
        gsot_threshold = float(gsot_threshold)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
    key_padding, additive = _split_mask(attn_mask, B, H, S_q, S_k)
    return AttentionInputs(q, k, v, temperature, key_padding, additive, bool(causal), gsot_threshold, float(scale))
