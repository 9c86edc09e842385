"""tgr: a Temperature-Guided Reasoning (TGR) Llama model over a 4-bit NF4 base, on the fused
kernels of :mod:`tgr_kernels`.

- :class:`TGRConfig`: the hyperparameters (the seed's, plus ``causal``, ``attention_backend``,
  ``num_tgr_heads``, ``load_in_4bit``, ``compute_dtype``, LoRA), JSON round trip, validation.
- :class:`TGRLlamaModel`: loads and freezes the base, adds the TGR head (TTM, temperature-guided
  attention, GSoT); ``forward`` gives loss, logits, temperatures and the GSoT mask;
  ``generate`` samples from the TGR head with KV and hidden-state caches; ``save_pretrained`` /
  ``from_pretrained`` store the head only.
- :class:`ClampLogits`: the seed's logits clamp, which also removes NaN and ±inf.
- :func:`build_tiny_llama`: a tiny random Llama and an offline tokenizer in a folder.
"""
__version__ = "0.1.0"

from ._tiny import build_tiny_llama, build_tokenizer  # noqa: E402
from .config import TGRConfig  # noqa: E402
from .generation import TGRGenerateOutput, generate  # noqa: E402
from .model import TGRLlamaModel, TGROutput  # noqa: E402
from .processors import ClampLogits  # noqa: E402

__all__ = [
    "TGRConfig",
    "TGRLlamaModel",
    "TGROutput",
    "TGRGenerateOutput",
    "ClampLogits",
    "generate",
    "build_tiny_llama",
    "build_tokenizer",
    "__version__",
]
