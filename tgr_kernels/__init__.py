"""tgr_kernels: fast, differentiable Triton kernels for Temperature-Guided Reasoning (TGR).

Public ops (each with a PyTorch reference in ``tgr_kernels.reference``):

- :func:`temperature_projection`: ``clamp(sigmoid(hidden @ W.T + b))``, the Token Temperature
  Mechanism, fused forward and backward.
- :func:`temperature_guided_attention`: attention whose logits are scaled per query row by the
  token temperature, with GSoT pruning of cold rows, fused forward and backward.

and their modules :class:`TemperatureMechanism` and :class:`TemperatureGuidedAttention`.
"""
from . import reference  # noqa: F401
from .attention import TemperatureGuidedAttention, temperature_guided_attention
from .temperature_projection import TemperatureMechanism, temperature_projection

__version__ = "0.1.0"

__all__ = [
    "temperature_projection",
    "temperature_guided_attention",
    "TemperatureMechanism",
    "TemperatureGuidedAttention",
    "reference",
]
