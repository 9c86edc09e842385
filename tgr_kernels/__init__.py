"""tgr_kernels: fast, differentiable Triton kernels for Temperature-Guided Reasoning (TGR).

Public ops (each with a PyTorch reference in ``tgr_kernels.reference``):

- :func:`temperature_projection`: ``clamp(sigmoid(hidden @ W.T + b))``, the Token Temperature
  Mechanism, fused forward and backward.
- :func:`temperature_guided_attention`: attention whose logits are scaled per query row by the
  token temperature, with GSoT pruning of cold rows, fused forward and backward.
- :func:`linear_cross_entropy` / :func:`linear_log_probs`: the language-model loss
  ``CE(hidden @ W.T + b, labels)`` and per-token ``log p(target)`` in row chunks, without the
  ``[tokens × vocab]`` logits (references beside them in ``linear_cross_entropy``).

and their modules :class:`TemperatureMechanism`, :class:`TemperatureGuidedAttention` and
:class:`LinearCrossEntropy`.

Checks on input values (NaN/±inf) follow :func:`set_value_checks` / :func:`value_checks`
(:func:`get_value_checks` reads the mode): by
default they run on CPU tensors and are skipped on CUDA tensors, where each would be a host sync.
The Triton paths are the custom ops ``torch.ops.tgr_kernels.*``, which torch.compile treats as
opaque ops with their backward.
"""
from tgr._version import __version__  # one version for the distribution

from . import (
    _ops,  # noqa: F401  (registers torch.ops.tgr_kernels.*)
    reference,  # noqa: F401
)
from ._validation import get_value_checks, set_value_checks, value_checks
from .attention import TemperatureGuidedAttention, temperature_guided_attention
from .linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy, linear_log_probs
from .temperature_projection import TemperatureMechanism, temperature_projection

__all__ = [
    "temperature_projection",
    "temperature_guided_attention",
    "TemperatureMechanism",
    "TemperatureGuidedAttention",
    "linear_cross_entropy",
    "linear_log_probs",
    "LinearCrossEntropy",
    "reference",
    "set_value_checks",
    "get_value_checks",
    "value_checks",
    "__version__",
]
