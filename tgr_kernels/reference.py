"""Eager PyTorch references: the seed's math, made precise. They define correctness.

Every fast path in this package is tested against these functions, and the benchmarks time them
as the ``eager-seed`` provider. They are written for clarity, not speed: the attention reference
materialises the full ``[B, H, S_q, S_k]`` score matrix.

``upcast=True`` computes in float32 (float64 inputs stay float64) and casts the result back to the
input dtype: that is the "true" answer the tests compare against. ``upcast=False`` computes in
the input dtype, as the seed does; the tests use it to measure PyTorch's own low-precision error.
"""
from __future__ import annotations

import math

import torch

from ._gate import DEFAULT_GSOT_WIDTH, differentiable_gate, make_gate
from ._validation import AttentionInputs, check_attention_inputs, check_projection_inputs

__all__ = [
    "temperature_projection_ref",
    "temperature_guided_attention_ref",
    "mean_temperature",
    "mean_temperature_fp32",
    "gsot_gate",
    "MASKED_BIAS",
]

# An additive mask entry at or below this value marks a masked key, exactly like −inf. Models
# build masks from finite stand-ins for −inf (Hugging Face: ``torch.finfo(dtype).min``; older
# code: −1e9 or −1e4), and taken literally those give a row that sees no key a uniform average
# instead of zeros, and rows whose logits (~1e9) no float format can resolve. −4096 is exact in
# fp16, bf16 and fp32, and e^−4096 is 0 in all of them, so a row that sees some key loses nothing:
# its masked keys already had zero weight.
MASKED_BIAS = -4096.0


def _compute_dtype(tensor: torch.Tensor, upcast: bool) -> torch.dtype:
    dtype = tensor.dtype
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def temperature_projection_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    clamp_min: float = 0.01,
    clamp_max: float = 0.99,
    *,
    upcast: bool = True,
) -> torch.Tensor:
    """Token Temperature Mechanism: ``t = clamp(sigmoid(hidden @ weight.T + bias), min, max)``.

    hidden ``[..., H]``, weight ``[T, H]``, bias ``[T]`` or None; returns ``[..., T]`` in the
    promoted dtype of hidden and weight.
    """
    check_projection_inputs(hidden, weight, bias, clamp_min, clamp_max)
    out_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if out_dtype == torch.float64 or not upcast:
        dtype = out_dtype
    else:
        dtype = torch.float32
    b = None if bias is None else bias.to(dtype)
    z = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), b)
    return torch.clamp(torch.sigmoid(z), clamp_min, clamp_max).to(out_dtype)


def mean_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """The per-row temperature t̄ ``[B, S_q]``: the mean over temperature heads when 3-D."""
    return temperature.mean(dim=-1) if temperature.dim() == 3 else temperature


def mean_temperature_fp32(temperature: torch.Tensor) -> torch.Tensor:
    """t̄ averaged in fp32 (fp64 for an fp64 temperature) whatever the temperature's dtype: the
    precision every backend gates and scales with (a mean of bf16 heads taken in bf16 was 2e-3 off)."""
    return mean_temperature(temperature.double() if temperature.dtype == torch.float64 else temperature.float())


def gsot_gate(t_bar: torch.Tensor, threshold: float | None, mode: str = "hard",
              width: float = DEFAULT_GSOT_WIDTH) -> torch.Tensor | None:
    """GSoT gate g_i of each row (None when disabled): ``1[t̄_i >= threshold]`` with no gradient
    ("hard", the seed's), the same with the surrogate gradient σ'(u)/ε ("straight_through"), or
    σ(u) ("soft"), ``u = (t̄_i − threshold) / width`` (see ``_gate``)."""
    gate = make_gate(threshold, mode, width)
    return None if gate is None else differentiable_gate(t_bar, gate)


def _logit_bias(args: AttentionInputs, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive mask ``m`` of the math, broadcastable to [B, H, S_q, S_k] (−inf = masked)."""
    B, _, S_q, _ = args.q.shape
    S_k = args.k.shape[2]
    device = args.q.device
    bias = None
    if args.key_padding is not None:
        keep = args.key_padding.view(B, 1, 1, S_k)
        bias = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, -math.inf)
    if args.additive is not None:
        add = args.additive.to(dtype)
        add = add.masked_fill(args.additive <= MASKED_BIAS, -math.inf)
        bias = add if bias is None else bias + add
    if args.causal:
        # Bottom-right aligned: query i sits at key position S_k - S_q + i.
        rows = torch.arange(S_q, device=device).view(S_q, 1) + (S_k - S_q)
        cols = torch.arange(S_k, device=device).view(1, S_k)
        causal = torch.zeros(S_q, S_k, dtype=dtype, device=device).masked_fill(cols > rows, -math.inf)
        bias = causal if bias is None else bias + causal
    return bias


def temperature_guided_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    gsot_threshold: float | None = None,
    scale: float | None = None,
    gsot_mode: str = "hard",
    gsot_width: float = DEFAULT_GSOT_WIDTH,
    upcast: bool = True,
) -> torch.Tensor:
    """Temperature-guided attention with GSoT, materialising the scores.

    ``S_ij = t̄_i · (q_i·k_j) · scale + m_ij``, ``P = softmax_j(S)``, ``O = P V``,
    ``Y_i = g_i · O_i`` with the GSoT gate ``g_i`` of ``gsot_mode`` (``1[t̄_i >= τ]`` for the
    seed's "hard" gate; see :func:`gsot_gate`). An additive mask entry ``<= MASKED_BIAS`` (−4096: HF's
    ``finfo(dtype).min``, −1e9) masks its key exactly as −inf does. A row whose every key is
    masked gives zeros. The gate reads t̄ in fp32 even when the logits are computed in q's dtype.
    k and v may have fewer heads than q (grouped-query attention, ``H_q % H_kv == 0``): query
    head h reads k/v head ``h // (H_q / H_kv)``.
    """
    args = check_attention_inputs(q, k, v, temperature, attn_mask, causal, gsot_threshold, scale,
                                  gsot_mode, gsot_width)
    return attention_ref_checked(args, upcast=upcast)


def attention_ref_checked(args: AttentionInputs, *, upcast: bool) -> torch.Tensor:
    """:func:`temperature_guided_attention_ref` on inputs that ``check_attention_inputs`` has
    already validated (the dispatcher's "reference" backend: the value checks run once)."""
    q = args.q
    dtype = _compute_dtype(q, upcast=upcast)
    qc, kc, vc = args.q.to(dtype), args.k.to(dtype), args.v.to(dtype)
    # Grouped-query attention is, by definition, attention on k/v repeated to the query heads
    # (query head h reads k/v head h // group); autograd then sums dK/dV over each group.
    group = qc.shape[1] // kc.shape[1]
    if group > 1:
        kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    t_bar = mean_temperature(args.temperature.to(dtype))

    scores = torch.matmul(qc, kc.transpose(-2, -1)) * args.scale
    scores = scores * t_bar[:, None, :, None]
    bias = _logit_bias(args, dtype)
    if bias is not None:
        scores = scores + bias
    # Safe softmax: a fully masked row (all −inf) gives zero probabilities, not NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    scores = scores.masked_fill(dead, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    out = torch.matmul(probs, vc)

    # GSoT is decided on t̄ in fp32 (fp64 for fp64 temperatures) whatever q's dtype, as every
    # backend does: rounding t̄ to bf16 first would keep rows just below the threshold.
    t_gate = mean_temperature_fp32(args.temperature)
    if args.gate is not None:
        out = out * differentiable_gate(t_gate, args.gate)[:, None, :, None].to(out.dtype)
    return out.to(q.dtype)
