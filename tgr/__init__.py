"""tgr: a Temperature-Guided Reasoning (TGR) Llama model over a 4-bit NF4 base, on the fused
kernels of :mod:`tgr_kernels`.

- :class:`TGRConfig`: the hyperparameters (the seed's, plus ``causal``, ``attention_backend``,
  ``num_tgr_heads``, ``load_in_4bit``, ``compute_dtype``, LoRA), a ``PretrainedConfig``.
- :class:`TGRLlamaModel`: a ``PreTrainedModel`` over a frozen base with the TGR head (TTM,
  temperature-guided attention, GSoT); ``forward`` gives loss, logits, temperatures and the GSoT
  mask; ``generate`` samples from the TGR head with KV and hidden-state caches;
  ``save_pretrained`` / ``from_pretrained`` store what TGR trains, not the base.
- :class:`TGROutput`: what ``TGRLlamaModel.forward`` returns; :class:`TGRGenerateOutput`: what
  :func:`generate` (the loop behind ``TGRLlamaModel.generate``) returns with ``output_scores=True`` (or
  a ``GenerationConfig`` with ``return_dict_in_generate``).
- :class:`CheckpointError`: a saved model that is missing or damaged, in one line.
- :class:`ConfigError`: a TGRConfig field that is invalid or does not fit the base, in one line.
- :class:`ClampLogits`: the seed's logits clamp, which also removes NaN and ±inf.
- :func:`apply_tgr` / :func:`remove_tgr`: every-layer TGR on an already-loaded HF causal LM, in
  place (:func:`tgr_layers_disabled` runs a patched model as the unpatched one).
- :func:`build_tiny_llama`: a tiny random Llama and an offline tokenizer in a folder
  (:func:`build_tokenizer`: that tokenizer alone).

The names are imported on first use (PEP 562), so ``import tgr`` and the ``tgr`` command's help
need only the base install; the model, training and generation need the ``model`` extra
(``pip install 'tgr[model]'``: transformers, safetensors, datasets, peft, ...), and a name that
needs it says so when it is missing. Importing :mod:`tgr.model` registers the ``"tgr"`` model
type with transformers' Auto classes (using ``tgr.TGRLlamaModel`` does too).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: Public name -> the submodule of ``tgr`` that defines it. A new public name goes here, in
#: ``__all__`` and under ``TYPE_CHECKING`` (tests/test_packaging.py checks the three agree).
_LAZY_NAMES = {
    "TGRConfig": "config",
    "CheckpointError": "config",
    "ConfigError": "config",
    "TGRLlamaModel": "model",
    "TGROutput": "model",
    "TGRGenerateOutput": "generation",
    "generate": "generation",
    "ClampLogits": "processors",
    "build_tiny_llama": "_tiny",
    "build_tokenizer": "_tiny",
    "apply_tgr": "layers",
    "remove_tgr": "layers",
    "tgr_layers_disabled": "layers",
}

#: Top-level modules that come with ``pip install 'tgr[model]'`` and not with the base install.
MODEL_EXTRA_MODULES = frozenset(
    {"transformers", "safetensors", "datasets", "peft", "accelerate", "bitsandbytes", "tokenizers", "tqdm",
     "huggingface_hub", "pyarrow"}
)

__all__ = [
    "TGRConfig",
    "CheckpointError",
    "ConfigError",
    "TGRLlamaModel",
    "TGROutput",
    "TGRGenerateOutput",
    "ClampLogits",
    "generate",
    "build_tiny_llama",
    "build_tokenizer",
    "apply_tgr",
    "remove_tgr",
    "tgr_layers_disabled",
    "__version__",
]

if TYPE_CHECKING:  # what static checkers and IDEs see; at run time __getattr__ imports these
    from ._tiny import build_tiny_llama, build_tokenizer
    from .config import CheckpointError, ConfigError, TGRConfig
    from .generation import TGRGenerateOutput, generate
    from .layers import apply_tgr, remove_tgr, tgr_layers_disabled
    from .model import TGRLlamaModel, TGROutput
    from .processors import ClampLogits


def missing_model_extra(err: ImportError) -> bool:
    """Whether ``err`` is the import of a module that only the ``model`` extra installs."""
    name = getattr(err, "name", None) or ""
    return isinstance(err, ModuleNotFoundError) and name.partition(".")[0] in MODEL_EXTRA_MODULES


def __getattr__(name: str) -> Any:
    submodule = _LAZY_NAMES.get(name)
    if submodule is None:
        raise AttributeError(f"module 'tgr' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{submodule}", __name__)
    except ImportError as err:
        if missing_model_extra(err):
            raise ImportError(
                f"tgr.{name} needs the model extra ({err.name} is not installed): pip install 'tgr[model]'"
            ) from err
        raise
    value = getattr(module, name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
