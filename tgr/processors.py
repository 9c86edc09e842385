"""Logits processors for generation."""
from __future__ import annotations

import math

import torch
from transformers import LogitsProcessor

__all__ = ["ClampLogits"]


class ClampLogits(LogitsProcessor):
    """Clamp logits into ``[min_value, max_value]`` and remove non-finite values.

    The seed's processor clamped, but ``clamp(NaN)`` is NaN, and NaN logits make ``softmax`` and
    ``torch.multinomial`` fail (a device-side assert on CUDA). Here::

        NaN  -> min_value     (a token whose logit is garbage gets the least probability)
        +inf -> max_value
        -inf -> min_value
        x    -> clamp(x, min_value, max_value)

    Works with ``TGRLlamaModel.generate`` and with HF ``generate`` (it is a ``LogitsProcessor``).
    Put it before top-k / top-p filtering, which marks removed tokens with −inf: run after them,
    it would give those tokens back a small probability.
    """

    def __init__(self, min_value: float = -50.0, max_value: float = 50.0):
        for name, value in (("min_value", min_value), ("max_value", max_value)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ClampLogits.{name} must be a finite number, got {value!r}")
        if min_value > max_value:
            raise ValueError(f"ClampLogits needs min_value <= max_value, got {min_value} > {max_value}")
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        lo, hi = self.min_value, self.max_value
        if scores.is_floating_point():  # bounds past the dtype's range are its extremes (finite)
            info = torch.finfo(scores.dtype)
            lo, hi = min(max(lo, info.min), info.max), max(min(hi, info.max), info.min)
        scores = torch.nan_to_num(scores, nan=lo, posinf=hi, neginf=lo)
        return scores.clamp(lo, hi)

    def __repr__(self) -> str:
        return f"ClampLogits(min_value={self.min_value}, max_value={self.max_value})"
