"""`TGRLlamaModel`: the seed's Temperature-Guided Reasoning model over a frozen 4-bit base.

Forward (per batch, hidden size H, TGR heads n, D = H / n, temperature heads T)::

    h = base.model(input_ids).last_hidden_state           [B, S, H]  (base frozen, 4-bit NF4)
    t = clamp(sigmoid(h Wᵀ + b), t_min, t_max)             [B, S, T]  TTM (fused op, fp32 weights)
    y = TGR-attention(q = k = v = h split in n heads, t)    [B, S, H]  (fused op, GSoT fused in)
    logits = base.lm_head(y)
    loss = CE(logits[:, :-1], labels[:, 1:]) + λ · mean over real tokens of (t − t_init)²

That is mode "head" (``TGRConfig.tgr_mode``, the default). Modes "layers" and "both" also put
temperature-guided attention into the base's decoder layers (:func:`tgr.layers.apply_tgr`, after
LoRA): "layers" has no head (``logits = base.lm_head(h)``), "both" keeps it; the regularizer then
sums over the head's and every layer's temperatures, and the layers' mechanisms are part of the
state dict.

With ``attention_backend="reference"`` and ``causal=False`` this is the seed's math, the seed's
additive ``(1 − mask) · −1e4`` padding mask included. The base runs in ``compute_dtype`` (float32
on the CPU by default); the head's weights stay float32.

The model is a ``PreTrainedModel`` registered with ``AutoConfig`` / ``AutoModelForCausalLM``
(model type "tgr"). It owns the base but never serializes it: its state dict holds only what TGR
trains (the head, plus LoRA adapters when enabled), so Trainer checkpoints and
:meth:`TGRLlamaModel.save_pretrained` hold a few tensors, and loading rebuilds the base from the
name the config records. LoRA is peft's: ``get_peft_model`` with a ``LoraConfig`` (after
``prepare_model_for_kbit_training`` on a 4-bit base), and the adapters are also saved in peft's
format, so ``PeftModel.from_pretrained(base, folder)`` loads them without tgr.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from tgr_kernels import (
    TemperatureMechanism,
    linear_cross_entropy,
    linear_log_probs,
    temperature_guided_attention,
)

from . import layers as tgr_layers
from .config import (
    CONFIG_NAME,
    CheckpointError,
    ConfigError,
    TGRConfig,
    _one_line,
    resolve_file,
)
from .data import IGNORE_INDEX

__all__ = ["TGRLlamaModel", "TGROutput", "CheckpointError", "WEIGHTS_NAME", "ADAPTER_CONFIG_NAME",
           "ADAPTER_WEIGHTS_NAME", "MODEL_CARD_NAME", "load_base_model", "resolve_device", "resolve_compute_dtype"]

logger = logging.getLogger("tgr")

#: File name of the head's weights inside a saved model folder (the name HF Trainer also uses for
#: the state dict of a model, so a Trainer checkpoint holds the same file).
WEIGHTS_NAME = "model.safetensors"
#: peft's file names for the LoRA adapters (written beside the head when ``lora_r > 0``).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
MODEL_CARD_NAME = "README.md"
# The first line of the model card this module writes: a card without it is the user's, and kept.
_MODEL_CARD_MARK = "<!-- tgr model card -->"

# The seed's additive padding mask value.
SEED_MASK_VALUE = -1e4

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_BASE_PREFIX = "base_llama_model."
# Where get_peft_model puts the base's own modules inside the PeftModel.
_PEFT_PREFIX = "base_model.model."
# The sizes a TGRConfig may record about its base, and their names in the base's config.
_BASE_SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "max_position_embeddings")
# Keyword arguments of Hugging Face's loaders (AutoModelForCausalLM passes them on) that carry no
# meaning for a TGR folder.
_HF_LOADER_KWARGS = ("_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision")
# Keyword arguments of PreTrainedModel.save_pretrained (Trainer and push_to_hub pass some) that a
# TGR save does not need: its few tensors are always one safetensors file.
_HF_SAVE_KWARGS = ("safe_serialization", "max_shard_size", "variant", "token", "save_peft_format",
                   "save_original_format")


@dataclass
class TGROutput(ModelOutput):
    """Output of :meth:`TGRLlamaModel.forward`.

    Indexable by name like the seed's dict (``out["loss"]`` is None without labels, rather than a
    KeyError), and by position like any ``ModelOutput`` (None fields skipped).

    Attributes:
        loss: ``lm_loss + temperature_loss`` when labels are given.
        logits: ``[B, S, V]`` from the base's lm_head applied to the TGR output.
        temperatures: ``[B, S, T]`` float32 token temperatures (in the head's dtype when the head
            was cast, e.g. by ``model.to(torch.bfloat16)``; GSoT still decides on their fp32 mean).
        gsot_mask: ``[B, S]`` bool, True where a token's mean temperature is at least the GSoT
            threshold (its TGR output is kept); all True when GSoT is disabled.
        lm_loss: the cross-entropy part of the loss.
        temperature_loss: the weighted temperature regularizer part of the loss (over the head's
            temperatures and those of every TGR layer).
        layer_temperatures: ``[L, B, S, T]`` float32 temperatures of the L TGR layers (modes
            "layers" and "both"), in layer order; None in mode "head".
        layer_gsot_mask: ``[L, B, S]`` bool, True where a TGR layer keeps a token's attention
            output (its mean temperature is at least the GSoT threshold).

    In mode "layers" there is no head: ``temperatures`` and ``gsot_mask`` are None.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    temperatures: torch.Tensor | None = None
    gsot_mask: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    temperature_loss: torch.Tensor | None = None
    layer_temperatures: torch.Tensor | None = None
    layer_gsot_mask: torch.Tensor | None = None

    def __getitem__(self, key):
        if isinstance(key, str) and key in self.__dataclass_fields__:
            return getattr(self, key)
        return super().__getitem__(key)


# ----------------------------------------------------------------------------------------------
# Loading the base
# ----------------------------------------------------------------------------------------------


def resolve_device(config: TGRConfig) -> torch.device:
    """``config.device``, or the current CUDA device when there is one, else the CPU."""
    if config.device is not None:
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_compute_dtype(config: TGRConfig, device: torch.device) -> torch.dtype:
    """``config.compute_dtype`` as a torch dtype ("auto": bf16/fp16 on CUDA, fp32 elsewhere)."""
    if config.compute_dtype != "auto":
        return _DTYPES[config.compute_dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_base_model(config: TGRConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Load the causal LM named by ``config.base_model_name_or_path`` on ``device``: 4-bit NF4 with
    double quantization (bitsandbytes) when ``config.load_in_4bit``, else in ``dtype``."""
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": str(device)}}
    if config.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "TGRConfig.load_in_4bit=True needs bitsandbytes (pip install bitsandbytes); "
                "or set load_in_4bit=False to load the base in compute_dtype"
            ) from err
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    logger.info("loading base %s on %s (%s, %s)", config.base_model_name_or_path, device,
                "4-bit NF4" if config.load_in_4bit else "unquantized", dtype)
    return AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, **kwargs)


def _is_4bit(base: nn.Module) -> bool:
    return bool(getattr(base, "is_loaded_in_4bit", False))


def _base_compute_dtype(base: nn.Module) -> torch.dtype:
    """The dtype a loaded base computes in: bitsandbytes' compute dtype for a 4-bit base, else the
    dtype of its output embeddings."""
    quantization = getattr(base.config, "quantization_config", None)
    if _is_4bit(base) and quantization is not None:
        dtype = getattr(quantization, "bnb_4bit_compute_dtype", None)
        if dtype is None and isinstance(quantization, dict):
            dtype = quantization.get("bnb_4bit_compute_dtype")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.is_floating_point():
        return weight.dtype
    return base.dtype


def _head_device(base: nn.Module) -> torch.device:
    """Where the TGR head goes: beside the base's lm_head, which turns its output into logits."""
    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None)
    device = weight.device if weight is not None else next(base.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device  # offloaded to disk: compute on the CPU


def _keep_cpu_4bit_weights_unpacked(base: nn.Module) -> None:
    """Stop bitsandbytes (0.50) from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, the first no-grad forward of a ``Linear4bit`` in eval mode repacks
    its weight for good, with bf16 block scales (the double quantization is undone). From then
    on the base computes differently (logits move by ~1e-3, in train mode too), and its matmul
    has no autograd: gradients through the base (LoRA) silently go missing after any evaluation.
    Keeping the training layout makes eval and train compute the same thing.
    """
    n = 0
    for module in base.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    if n:
        logger.debug("bitsandbytes CPU inference repacking turned off on %d 4-bit layers", n)


def lora_config(config: TGRConfig):
    """peft's ``LoraConfig`` from the config's lora fields (a causal LM task)."""
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise ImportError("TGRConfig.lora_r > 0 needs peft (pip install peft)") from err
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def _add_lora(base: nn.Module, config: TGRConfig) -> nn.Module:
    """peft's recipe: ``prepare_model_for_kbit_training`` on a 4-bit base (QLoRA), then
    ``get_peft_model``; returns the ``PeftModel``. The adapters train in fp32, like the head."""
    lora = lora_config(config)
    from peft import get_peft_model, prepare_model_for_kbit_training

    names = [n for n, _ in base.named_modules()]
    if not any(n.split(".")[-1] in config.lora_target_modules for n in names):
        raise ValueError(f"TGRConfig.lora_target_modules={config.lora_target_modules} matched no module of the base")
    if _is_4bit(base):
        # Activation checkpointing stays the caller's choice (TrainingArguments' flag, or
        # activation_checkpointing_enable): the recipe would otherwise switch it on for good.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    with warnings.catch_warnings():
        # peft reads transformers' deprecated alias is_gradient_checkpointing: its FutureWarning is
        # peft's to act on, not the user's (printed before a command's one-line error, it broke it).
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(base, lora, autocast_adapter_dtype=True)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    return peft_model


def _unwrap_peft(base: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (LoRA layers in place), or ``base`` itself."""
    get_base_model = getattr(base, "get_base_model", None)
    return get_base_model() if callable(get_base_model) and hasattr(base, "peft_config") else base


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class TGRLlamaModel(PreTrainedModel, GenerationMixin):
    """Temperature-Guided Reasoning over a frozen (4-bit) causal LM base.

    ``TGRLlamaModel(config)`` loads the base named by ``config.base_model_name_or_path`` and freezes
    it; :meth:`from_base` wraps a base already loaded (any ``device_map``, quantization or
    revision). The trainable parameters are the TTM projection (and LoRA adapters when
    ``lora_r > 0``). Attribute names follow the seed (``base_llama_model``,
    ``temperature_mechanisms``), so the seed's head tensors (``temperature_mechanisms.0.proj.weight``
    / ``.bias``, fp16 there) load with :meth:`load_state_dict`. With LoRA, ``base_llama_model`` is
    peft's ``PeftModel`` around the base.
    """

    config_class = TGRConfig
    # HF's ``base_model`` is ``getattr(self, base_model_prefix)``: the seed's base LM attribute.
    base_model_prefix = "base_llama_model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # the base's layers (see activation_checkpointing_enable)
    # device_map planning: the head is small and must stay whole; the base's own decoder layers
    # are added by post_init from the base.
    _no_split_modules = ["TemperatureMechanism"]

    def __init__(self, config: TGRConfig, *, base: nn.Module | None = None):
        if not isinstance(config, TGRConfig):
            raise TypeError(f"TGRLlamaModel needs a TGRConfig, got {type(config).__name__}")
        config = config.copy()  # validated, and not shared with the caller
        base_path = config.base_model_name_or_path
        if not os.path.isabs(base_path) and os.path.isdir(base_path):
            # A base folder relative to the working directory: config.json names the base, and a
            # saved model must load from any working directory.
            config.base_model_name_or_path = os.path.abspath(base_path)
        if base is None:
            device = resolve_device(config)
            dtype = resolve_compute_dtype(config, device)
            base = load_base_model(config, device, dtype)
        self._fill_base_sizes(config, base.config)
        super().__init__(config)

        layer_options = dict(
            temperature_heads=config.temperature_heads,
            clamp=(config.temperature_clamp_min, config.temperature_clamp_max),
            gsot_threshold=_gsot_threshold(config), initial_temperature=config.initial_temperature,
            backend=config.attention_backend, gsot_mode=config.gsot_mode, gsot_width=config.gsot_width,
        )
        if config.tgr_mode != "head":
            # A base the TGR layers refuse is refused before anything (freezing, LoRA) changes it.
            tgr_layers._checked(base, config.tgr_layers, **layer_options)
        for param in base.parameters():
            param.requires_grad_(False)
        _keep_cpu_4bit_weights_unpacked(base)
        head_device = _head_device(base)
        hf_base = base
        if config.lora_r > 0:
            base = _add_lora(base, config)
        self.base_llama_model = base
        # generate() reads EOS and padding from the base's generation config, as the seed's did.
        self.generation_config = getattr(hf_base, "generation_config", None)

        hidden_size = hf_base.config.hidden_size
        # The seed's layout: one temperature mechanism in a ModuleList (empty in mode "layers",
        # which has no head). Its weights stay fp32.
        self.temperature_mechanisms = nn.ModuleList([
            TemperatureMechanism(
                hidden_size,
                config.temperature_heads,
                clamp_min=config.temperature_clamp_min,
                clamp_max=config.temperature_clamp_max,
                backend=config.attention_backend,
            )
        ] if config.tgr_mode != "layers" else []).to(device=head_device, dtype=torch.float32)
        if config.tgr_mode != "head":
            # After LoRA: peft's recipe freezes every parameter it finds, and its target names
            # must not meet the mechanisms' projections.
            tgr_layers.apply_tgr(_unwrap_peft(base), config.tgr_layers, **layer_options)

        decoder = self._decoder()
        params = inspect.signature(decoder.forward).parameters
        # transformers renamed the decoder's cache argument (past_key_values -> cache) in 5.2x.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

        # The state dict holds what TGR owns (see state_dict): a load needs no base tensors.
        self.register_load_state_dict_post_hook(_ignore_missing_base_keys)
        self.post_init()
        # post_init collects its direct children's unsplittable modules; with LoRA the base's
        # sit one level further down, inside the PeftModel.
        self._no_split_modules.update(getattr(hf_base, "_no_split_modules", None) or ())
        self.train()  # one mode for every part (a loaded base comes in eval mode, the head in train)
        logger.info("TGR model ready: %d trainable parameters (%s%s), base frozen",
                    sum(p.numel() for p in self.parameters() if p.requires_grad),
                    {"head": "head", "layers": "TGR layers", "both": "head + TGR layers"}[config.tgr_mode],
                    " + LoRA" if config.lora_r else "")

    @classmethod
    def from_base(cls, base: nn.Module, config: TGRConfig | None = None, **config_fields) -> TGRLlamaModel:
        """Wrap a causal LM base that is already loaded; nothing is reloaded.

        The base may come with any ``device_map``, quantization, revision or token: it is used
        as it is (frozen). The head goes on the device of the base's lm_head, where the logits
        are made. The config records what describes the base (its ``name_or_path``, whether it
        is 4-bit, its compute dtype), so :meth:`from_pretrained` can rebuild it by name later.
        Rebuilt by name, a 4-bit base is quantized the TGR way (NF4, double quantization) at the
        latest revision; to keep a quantization or revision of your own, load the base yourself
        again and pass it: ``from_pretrained(folder, base=base)``.

        Args:
            base: a transformers causal LM (``AutoModelForCausalLM.from_pretrained(...)``), not
                yet wrapped by peft (LoRA comes from the config's lora fields).
            config: the TGR settings (default: ``TGRConfig()``'s).
            config_fields: fields to set, e.g. ``temperature_heads=4, lora_r=8``;
                ``base_model_name_or_path`` here overrides the name read from the base.
        """
        if not isinstance(base, nn.Module) or not hasattr(base, "get_output_embeddings"):
            raise TypeError(f"TGRLlamaModel.from_base needs a transformers causal LM, got {type(base).__name__}")
        if hasattr(base, "peft_config"):
            raise TypeError("TGRLlamaModel.from_base needs the base without peft adapters: pass the base "
                            "model and set lora_r (and lora_*) in the TGR config")
        if base.get_output_embeddings() is None:
            raise TypeError(f"TGRLlamaModel.from_base needs a causal LM with an lm_head, got {type(base).__name__}")
        if config is not None and not isinstance(config, TGRConfig):
            raise TypeError(f"TGRLlamaModel.from_base: config must be a TGRConfig or None, got {type(config).__name__}")
        described: dict[str, Any] = {"load_in_4bit": _is_4bit(base)}
        name = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
        if name:
            described["base_model_name_or_path"] = str(name)
        dtype_name = _DTYPE_NAMES.get(_base_compute_dtype(base))
        if dtype_name is not None:
            described["compute_dtype"] = dtype_name
        config = (config or TGRConfig()).copy(**{**described, **config_fields})
        return cls(config, base=base)

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialise: the head is initialised by its constructor (the seed's
        ``nn.Linear`` initialisation) and the base is pretrained (post_init must not touch it)."""

    def initialize_weights(self) -> None:
        """A TGR model's weights are the pretrained base and the constructed head: nothing to draw."""

    # ------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------

    @property
    def base_model(self) -> nn.Module:
        """The base causal LM (the seed's accessor; a ``PeftModel`` around it with LoRA)."""
        return self.base_llama_model

    @property
    def hf_base_model(self) -> nn.Module:
        """The transformers model of the base (inside the ``PeftModel`` with LoRA)."""
        return _unwrap_peft(self.base_llama_model)

    @property
    def device(self) -> torch.device:
        """The TGR head's device (the base's lm_head's in mode "layers"): inputs and outputs of
        :meth:`forward` and :meth:`generate` live here."""
        if len(self.temperature_mechanisms):
            return self.temperature_mechanisms[0].proj.weight.device
        return _head_device(self.hf_base_model)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the base computes in now (bitsandbytes' compute dtype for a 4-bit base, else
        its lm_head's dtype, so a ``.half()`` shows); the head's weights are float32 unless cast."""
        return _base_compute_dtype(self.hf_base_model)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base computes in now (as :attr:`dtype`); ``config.compute_dtype`` is what
        it was loaded in, and :meth:`save_pretrained` records a cast made since."""
        return self.dtype

    @property
    def hidden_size(self) -> int:
        return self.hf_base_model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.hf_base_model.get_output_embeddings().weight.shape[0]

    def set_attention_backend(self, backend: str) -> None:
        """Switch the head's backend ("auto", "triton", "torch", "reference") in place."""
        self.config = self.config.copy(attention_backend=backend)
        for mechanism in self.temperature_mechanisms:
            mechanism.backend = backend
        if self.config.tgr_mode != "head":
            tgr_layers.set_layer_backend(self.hf_base_model, backend)

    def _remove_tgr_layers(self) -> None:
        """:func:`tgr.remove_tgr` of this model: its base's TGR layers go, and mode "both" becomes
        "head"; mode "layers" (no head) is refused before anything changes."""
        if self.config.tgr_mode == "layers":
            raise ValueError("remove_tgr: this TGRLlamaModel has tgr_mode='layers' and no TGR head, so removing its "
                             "TGR layers would leave no TGR at all; run it without them inside "
                             "tgr.tgr_layers_disabled(model), or use its base (model.hf_base_model)")
        tgr_layers.remove_tgr(self.hf_base_model)
        self.config = self.config.copy(tgr_mode="head")

    def _decoder(self) -> nn.Module:
        base = self.hf_base_model
        decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        return decoder if isinstance(decoder, nn.Module) else base.get_decoder()

    @staticmethod
    def _fill_base_sizes(config: TGRConfig, base_config) -> None:
        for name in _BASE_SIZE_FIELDS:
            actual = getattr(base_config, name, None)
            given = getattr(config, name)
            if given is not None and actual is not None and given != actual:
                raise ConfigError(
                    f"TGRConfig.{name}={given} but the base {config.base_model_name_or_path!r} has {name}={actual}; "
                    f"a saved TGR model loads only onto a base of its sizes (in a new TGRConfig, leave {name} None "
                    f"to read it from the base)"
                )
            if actual is not None:
                setattr(config, name, actual)
        config.validate()  # num_tgr_heads must divide the base's hidden size

    # ------------------------------------------------------------------------------------------
    # Training conveniences (HF Trainer looks for these)
    # ------------------------------------------------------------------------------------------

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False):
        """Checkpoint the base's layers (worth it only with LoRA: a frozen base keeps no activations).

        HF Trainer calls this for ``--gradient_checkpointing``; the deprecated
        ``gradient_checkpointing_enable`` of transformers 5 comes here too.
        """
        hf_base = self.hf_base_model
        if self.config.tgr_mode != "head" and (activation_checkpointing_kwargs or {}).get("use_reentrant"):
            raise ValueError("activation checkpointing with use_reentrant=True runs the TGR layers' first forward "
                             "without autograd, so their temperature regulariser would get no gradient; use "
                             "use_reentrant=False (the default)")
        hf_base.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                                offload=offload)
        if self.config.lora_r > 0 and hasattr(hf_base, "enable_input_require_grads"):
            hf_base.enable_input_require_grads()  # checkpointed LoRA layers need a graph from the input

    def activation_checkpointing_disable(self):
        self.hf_base_model.activation_checkpointing_disable()

    def get_input_embeddings(self) -> nn.Module:
        return self.hf_base_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.hf_base_model.get_output_embeddings()

    # ------------------------------------------------------------------------------------------
    # The pieces of the forward (generation reuses them)
    # ------------------------------------------------------------------------------------------

    def _base_hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        """The base's final hidden state ``[B, S, H]`` (after its final norm), nothing else."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        # A frozen base needs no autograd graph; with LoRA or TGR layers it does while training.
        if self.config.tgr_mode != "head":
            self._sync_layer_gate()
        track = torch.is_grad_enabled() and (self.config.lora_r > 0 or self.config.tgr_mode != "head")
        with torch.set_grad_enabled(track):
            out = self._decoder()(**kwargs)
        return out.last_hidden_state

    def _sync_layer_gate(self) -> None:
        """The TGR layers gate as the config says now, as the head does: an edit of
        ``model.config.gsoT_enabled``, ``temperature_conf_threshold``, ``gsot_mode`` or
        ``gsot_width`` after construction reaches them too (and what is saved is what ran)."""
        settings = tgr_layers.tgr_layer_settings(self.hf_base_model)
        if settings is None:
            return
        config = self.config
        threshold = _gsot_threshold(config)
        if (settings.gsot_threshold, settings.gsot_mode, settings.gsot_width) != (
                threshold, config.gsot_mode, config.gsot_width):
            tgr_layers.set_layer_gate(self.hf_base_model, gsot_threshold=threshold, gsot_mode=config.gsot_mode,
                                      gsot_width=config.gsot_width)

    def _new_base_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.hf_base_model.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S, H]`` → ``[B, n, S, D]`` (a view)."""
        n = self.config.num_tgr_heads
        if n == 1:
            return x.unsqueeze(1)
        B, S, H = x.shape
        return x.view(B, S, n, H // n).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, n, S, D]`` → ``[B, S, H]``."""
        if x.shape[1] == 1:
            return x.squeeze(1)
        B, n, S, D = x.shape
        return x.transpose(1, 2).reshape(B, S, n * D)

    def _head_mask(self, attention_mask: torch.Tensor | None, dtype: torch.dtype):
        """The key-padding mask in the form the backend wants."""
        if attention_mask is None:
            return None
        if self.config.attention_backend == "reference":
            # The seed's additive mask, exactly.
            mask = attention_mask[:, None, None, :].to(dtype)
            return ((1.0 - mask) * SEED_MASK_VALUE).to(dtype)
        keep = attention_mask.bool()
        # Dropping an all-true mask saves the backends its work, but testing for it reads the
        # data: done only where that is free (CPU tensors, eager). On a GPU it would be a host
        # sync every forward, and under torch.compile a data-dependent branch.
        if keep.device.type == "cpu" and not torch.compiler.is_compiling() and bool(keep.all()):
            return None
        return keep

    def tgr_head(self, query_hidden: torch.Tensor, kv_hidden: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None):
        """The TGR head on final hidden states: TTM, temperature-guided attention, GSoT.

        Args:
            query_hidden: ``[B, S_q, H]``: the tokens whose outputs are wanted.
            kv_hidden: ``[B, S_k, H]``: every token so far (keys and values), ending with the
                queries; None = ``query_hidden`` (the full forward). Causal attention lines the
                queries up with the last keys.
            attention_mask: ``[B, S_k]`` 0/1 key-padding mask, or None.

        Returns:
            ``(y [B, S_q, H], temperatures [B, S_q, T] fp32, gsot_mask [B, S_q] bool)``. In mode
            "layers" there is no head: ``(query_hidden, None, None)``.
        """
        config = self.config
        if config.tgr_mode == "layers":
            return query_hidden, None, None
        # With a base spread over devices, its final hidden state may live elsewhere than the head.
        query_hidden = query_hidden.to(self.device)
        if kv_hidden is not None:
            kv_hidden = kv_hidden.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        temperatures = self.temperature_mechanisms[0](query_hidden)
        q = self._split_heads(query_hidden)
        kv = q if kv_hidden is None or kv_hidden is query_hidden else self._split_heads(kv_hidden)
        threshold = _gsot_threshold(config)
        out = temperature_guided_attention(
            q, kv, kv, temperatures, self._head_mask(attention_mask, query_hidden.dtype),
            causal=config.causal, gsot_threshold=threshold, backend=config.attention_backend,
            # The gate stays hard at inference: the learning gates are for training only.
            gsot_mode=config.gsot_mode if self.training else "hard", gsot_width=config.gsot_width,
        )
        if threshold is None:
            gsot_mask = torch.ones(temperatures.shape[:2], dtype=torch.bool, device=temperatures.device)
        else:
            gsot_mask = _mean_temperature_fp32(temperatures) >= threshold
        return self._merge_heads(out), temperatures, gsot_mask

    def lm_head(self, y: torch.Tensor) -> torch.Tensor:
        """The base's own lm_head on the TGR output (as the seed)."""
        head = self.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is not None and weight.is_floating_point():
            y = y.to(weight.dtype)
        else:
            y = y.to(self.compute_dtype)
        return head(y)

    def _fused_loss_applies(self) -> bool:
        """The fused loss needs the lm_head to be a plain linear layer with a floating weight (not
        a 4-bit or adapter-wrapped one); otherwise the loss goes through the logits."""
        head = self.get_output_embeddings()
        return type(head) is nn.Linear and head.weight.is_floating_point()

    def _fused_shifted_cross_entropy(self, y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """:func:`_shifted_cross_entropy` of ``lm_head(y)`` without the logits: the fused op."""
        head = self.get_output_embeddings()
        weight = head.weight
        if y.shape[1] < 2:  # no next token to predict: 0, as through the logits
            return y[:, :0].float().sum()
        shift_labels = labels[:, 1:].to(weight.device)
        total = linear_cross_entropy(y[:, :-1].to(weight.dtype), weight, shift_labels, head.bias,
                                     ignore_index=IGNORE_INDEX, reduction="sum")
        count = (shift_labels != IGNORE_INDEX).sum()
        return total / count.clamp(min=1)

    def target_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                         head: str = "tgr", scored: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(input_ids[:, s + 1] | input_ids[:, :s + 1])`` at every position: ``[B, S − 1]``,
        fp32, for scoring candidates (``tgr eval``) without the ``[B, S, V]`` logits.

        The final hidden states that feed the lm_head (the TGR head's output in modes "head" and
        "both", the base's last hidden state in mode "layers") go through
        :func:`tgr_kernels.linear_log_probs` with the lm_head's weight and bias, in chunks of
        rows. An lm_head that is not a plain linear layer (4-bit, adapter-wrapped) goes through
        its logits, as the fused loss does.

        Args:
            input_ids: ``[B, S]`` token ids; attention_mask: ``[B, S]`` 1 = real token, or None.
            head: "tgr" (what :meth:`forward`'s logits give) or "base" (the base's own model as
                loaded: TGR layers off, LoRA adapters off, no TGR head).
            scored: optional bool ``[B, S − 1]``, the positions whose log-probability is wanted
                (an answer's, not its prompt's or the padding's). The others are 0 and take no
                lm_head work: the fused op leaves them out of its GEMMs, the logits path makes
                logits for the scored rows only. The model itself still runs over every token.
        """
        if head not in ("tgr", "base"):
            raise ValueError(f"head must be 'tgr' or 'base', got {head!r}")
        targets, scored = self._scoring_inputs(input_ids, attention_mask, scored)
        if head == "tgr":
            y = self._tgr_head_hidden(self._base_hidden(input_ids, attention_mask), attention_mask)
        else:
            with self._base_only():
                y = self._base_hidden(input_ids, attention_mask)
        return self._log_probs_of_hidden(y, targets, scored)

    def heads_target_log_probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                               scored: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`target_log_probs` of both heads, ``{"tgr": ..., "base": ...}``, as ``tgr eval``
        compares them. Without TGR layers in the base (mode "head") and without LoRA the TGR head
        reads the base's own final hidden state, so the base runs once for both; with them, once
        with and once without (the "base" is the base as loaded)."""
        targets, scored = self._scoring_inputs(input_ids, attention_mask, scored)
        hidden = self._base_hidden(input_ids, attention_mask)
        y_tgr = self._tgr_head_hidden(hidden, attention_mask)
        if tgr_layers.is_tgr_applied(self.hf_base_model) or self._has_adapters():
            with self._base_only():
                hidden = self._base_hidden(input_ids, attention_mask)
        return {"tgr": self._log_probs_of_hidden(y_tgr, targets, scored),
                "base": self._log_probs_of_hidden(hidden, targets, scored)}

    def _has_adapters(self) -> bool:
        return self.config.lora_r > 0 and callable(getattr(self.base_llama_model, "disable_adapter", None))

    @contextlib.contextmanager
    def _base_only(self):
        """A block in which the base runs as it was loaded: its TGR layers off and, with LoRA, its
        adapters off (they are trained with the TGR loss, so they are not the base's)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(tgr_layers.base_only(self.hf_base_model))
            if self._has_adapters():
                stack.enter_context(self.base_llama_model.disable_adapter())
            yield self

    def _scoring_inputs(self, input_ids, attention_mask, scored):
        """The checked inputs of :meth:`target_log_probs`: ``(targets [B, S − 1], scored or None)``."""
        self._check_inputs(input_ids, attention_mask, None)
        targets = input_ids[:, 1:]
        if scored is not None:
            if not isinstance(scored, torch.Tensor) or scored.dtype != torch.bool or scored.shape != targets.shape:
                raise ValueError(f"scored must be a bool tensor [B, S - 1] = {tuple(targets.shape)}, got "
                                 f"{getattr(scored, 'dtype', type(scored).__name__)} "
                                 f"{tuple(getattr(scored, 'shape', ()))}")
            scored = scored.to(input_ids.device)
        return targets, scored

    def _tgr_head_hidden(self, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
        """The TGR head's output on the base's final hidden state (that state itself in mode "layers")."""
        y, _, _ = self.tgr_head(hidden, None, attention_mask)
        return y

    def _log_probs_of_hidden(self, y: torch.Tensor, targets: torch.Tensor,
                             scored: torch.Tensor | None) -> torch.Tensor:
        """``log p(targets)`` from the final hidden states ``y [B, S, H]`` (the last position
        predicts nothing): the fused op, or the lm_head's logits where it does not apply."""
        y = y[:, :-1]
        if y.shape[1] == 0:  # one token per sequence: nothing to predict, [B, 0] as through the logits
            return y[..., 0].float()
        if not self._fused_loss_applies():
            return self._log_probs_through_logits(y, targets, scored)
        lm_head = self.get_output_embeddings()
        weight = lm_head.weight
        if scored is not None:
            targets = targets.masked_fill(~scored, IGNORE_INDEX)
        return linear_log_probs(y.to(device=weight.device, dtype=weight.dtype), weight, targets.to(weight.device),
                                lm_head.bias, ignore_index=None if scored is None else IGNORE_INDEX)

    def _log_probs_through_logits(self, y: torch.Tensor, targets: torch.Tensor,
                                  scored: torch.Tensor | None) -> torch.Tensor:
        """:meth:`target_log_probs` through the lm_head's logits (of the scored rows only)."""
        if scored is None:
            logits = self.lm_head(y).float()
            return torch.log_softmax(logits, dim=-1).gather(-1, targets.to(logits.device).unsqueeze(-1)).squeeze(-1)
        logits = self.lm_head(y[scored.to(y.device)]).float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[scored].to(logits.device).unsqueeze(-1))
        out = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
        return out.masked_scatter_(scored.to(logits.device), picked.squeeze(-1))

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                return_logits: bool = True) -> TGROutput:
        """Logits, temperatures and GSoT mask of every token; the loss when labels are given.

        Args:
            input_ids: ``[B, S]`` token ids.
            attention_mask: ``[B, S]`` 1 = real token, 0 = padding (any side), or None.
            labels: ``[B, S]`` next-token targets (shifted inside, −100 ignored), or None.
            position_ids: ``[B, S]`` for the base, or None for the base's default (as the seed).
            return_logits: False (with labels) computes the cross-entropy with
                :func:`tgr_kernels.linear_cross_entropy`, in chunks of rows, so the
                ``[B, S, V]`` logits and their gradient never exist whole; ``logits`` is then None.
                Training (``tgr train``) passes False.
        """
        self._check_inputs(input_ids, attention_mask, labels)
        config = self.config
        layer_temperatures = layer_gsot_mask = None
        if config.tgr_mode == "head":
            hidden = self._base_hidden(input_ids, attention_mask, position_ids)
        else:
            with tgr_layers.collect_layer_temperatures(self.hf_base_model) as collected:
                hidden = self._base_hidden(input_ids, attention_mask, position_ids)
            if collected:  # none inside tgr_layers_disabled: the base runs as the unpatched one
                layer_temperatures = torch.stack([t.to(self.device) for t in collected])
                threshold = _gsot_threshold(config)
                layer_gsot_mask = (torch.ones(layer_temperatures.shape[:3], dtype=torch.bool, device=self.device)
                                   if threshold is None else _mean_temperature_fp32(layer_temperatures) >= threshold)
        y, temperatures, gsot_mask = self.tgr_head(hidden, None, attention_mask)
        fused = labels is not None and not return_logits and self._fused_loss_applies()
        logits = None if fused else self.lm_head(y)

        loss = lm_loss = temperature_loss = None
        if labels is not None:
            if fused:
                lm_loss = self._fused_shifted_cross_entropy(y, labels)
            else:
                lm_loss = _shifted_cross_entropy(logits, labels.to(logits.device))
            mask = None if attention_mask is None else attention_mask.to(self.device)
            # The regularizer of every temperature mechanism (head and layers), each a mean over
            # the real tokens, summed.
            terms = [_temperature_regularizer(t, config.initial_temperature, mask)
                     for t in ([temperatures] if temperatures is not None else [])
                     + (list(layer_temperatures) if layer_temperatures is not None else [])]
            # None in mode "layers" inside tgr_layers_disabled: the base alone, as unpatched.
            regularizer = sum(terms) if terms else lm_loss.new_zeros(())
            temperature_loss = config.temperature_regularization_weight * regularizer
            loss = lm_loss + temperature_loss.to(lm_loss.device)
        return TGROutput(loss=loss, logits=logits, temperatures=temperatures, gsot_mask=gsot_mask,
                         lm_loss=lm_loss, temperature_loss=temperature_loss,
                         layer_temperatures=layer_temperatures, layer_gsot_mask=layer_gsot_mask)

    @staticmethod
    def _check_inputs(input_ids, attention_mask, labels) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [B, S], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: need at least one token per sequence")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(t.shape)}")
        if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
            raise ValueError(f"labels must be an integer tensor of token ids (-100 ignored), got {labels.dtype}")

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 generation_config=None, max_new_tokens: int | None = None, do_sample: bool | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 logits_processor=None, eos_token_id=None, pad_token_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None,
                 output_scores: bool | None = None):
        """Generate from the TGR head's logits, incrementally (base KV cache + hidden-state cache).

        Returns ``[B, S + n]`` token ids. See :func:`tgr.generation.generate` for the arguments
        (``generation_config``: an HF ``GenerationConfig`` whose settings the keyword arguments
        override). This, not ``GenerationMixin.generate``, is what runs: the TGR head's next-token
        logits need the hidden-state cache that HF's loop does not keep.
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask, generation_config=generation_config,
                        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        top_k=top_k, logits_processor=logits_processor, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, use_cache=use_cache, generator=generator,
                        output_scores=output_scores)

    # ------------------------------------------------------------------------------------------
    # Save and load
    # ------------------------------------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """What TGR owns: the head's tensors and LoRA adapters, never the (4-bit) base.

        HF Trainer saves this (``model.safetensors`` in each checkpoint) and loads it back on
        resume. The base's modules are not visited, so a save neither serializes nor touches the
        4-bit weights. ``load_state_dict`` accepts it back, strict included.
        """
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (tuple(args) + (destination, prefix, keep_vars)[len(args):])[:3]
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()
        self.temperature_mechanisms.state_dict(destination=destination, prefix=prefix + "temperature_mechanisms.",
                                               keep_vars=keep_vars)
        if self.config.lora_r > 0 or self.config.tgr_mode != "head":
            for name, param in self.base_llama_model.named_parameters():
                if "lora_" in name or _is_tgr_layer_key(name):
                    destination[prefix + _BASE_PREFIX + name] = param if keep_vars else param.detach()
        return destination

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What :meth:`save_pretrained` writes: the head's (and LoRA adapters') tensors."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def _cast_since_loading(self) -> dict[str, str]:
        """``{"compute_dtype": name}`` when the base computes in another dtype than the config
        resolves to (a ``.half()`` or ``.to(dtype)`` since loading), so a reload computes as this
        model does; ``{}`` otherwise (an "auto" that still holds stays "auto")."""
        live = self.dtype
        if live == resolve_compute_dtype(self.config, self.device) or live not in _DTYPE_NAMES:
            return {}
        return {"compute_dtype": _DTYPE_NAMES[live]}

    def save_pretrained(self, save_directory: str | os.PathLike, *, state_dict: dict | None = None,
                        is_main_process: bool = True, push_to_hub: bool = False, **kwargs) -> str:
        """Write what TGR trains, the config naming the base, and a model card; never the base.

        Files: ``config.json`` (the :class:`TGRConfig`), ``model.safetensors`` (the state dict:
        the head, and the LoRA adapters when ``lora_r > 0``), with LoRA also
        ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format, for
        ``PeftModel.from_pretrained(base, folder)``), and ``README.md`` (a short model card; a
        card that tgr did not write is kept).

        Files are written into a temporary folder next to the target first and only then moved
        into place, each with an atomic rename: an interrupted save never leaves a half-written
        file where a good one was. Other files in the folder (a tokenizer, say) are kept.
        ``state_dict`` (as HF Trainer passes it) replaces :meth:`state_dict`; a process other than
        the main one (``is_main_process=False``) writes nothing. Returns the folder's path.
        """
        hub_kwargs = ("repo_id", "commit_message", "commit_description", "private", "create_pr")
        unknown = sorted(set(kwargs) - set(_HF_SAVE_KWARGS) - set(hub_kwargs))
        if unknown:
            raise TypeError(f"TGRLlamaModel.save_pretrained got unexpected argument(s): {', '.join(unknown)}")
        if kwargs.get("variant") is not None:
            raise ValueError(f"TGRLlamaModel.save_pretrained writes one {WEIGHTS_NAME} and from_pretrained reads it: "
                             f"variant={kwargs['variant']!r} is not supported")
        target = os.path.abspath(os.fspath(save_directory))
        if not is_main_process:
            return target
        if os.path.exists(target) and not os.path.isdir(target):
            raise NotADirectoryError(f"cannot save a TGR model to {target!r}: it is a file")
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
        try:
            state = self.trainable_state_dict() if state_dict is None else state_dict
            tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
            names = [WEIGHTS_NAME]
            if self.config.lora_r > 0:
                # peft's files hold the adapters of the state dict written above (a given one too).
                adapters = {k[len(_BASE_PREFIX):]: v for k, v in tensors.items()
                            if k.startswith(_BASE_PREFIX) and "lora_" in k}
                self.base_llama_model.save_pretrained(tmp, safe_serialization=True, state_dict=adapters)
                names += [ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME]
            card = os.path.join(target, MODEL_CARD_NAME)
            if not os.path.exists(card) or _is_tgr_model_card(card):
                with open(os.path.join(tmp, MODEL_CARD_NAME), "w", encoding="utf-8") as f:
                    f.write(self.model_card())
                names.append(MODEL_CARD_NAME)
            config = self.config.copy(**self._cast_since_loading())
            config.architectures = [type(self).__name__]
            config.save_pretrained(tmp)
            names.append(CONFIG_NAME)  # last: the config that describes the other files lands last
            for name in names:
                _fsync(os.path.join(tmp, name))
            if not os.path.exists(target):
                for extra in set(os.listdir(tmp)) - set(names):  # what peft writes besides its files
                    os.remove(os.path.join(tmp, extra))
                # mkdtemp makes the folder 0700: give it the mode os.makedirs would (0777 less the
                # umask), so that a saved model is as readable as transformers' own saves.
                os.chmod(tmp, 0o777 & ~_umask())
                os.rename(tmp, target)  # the whole folder appears at once
            else:
                for name in names:
                    os.replace(os.path.join(tmp, name), os.path.join(target, name))
                if self.config.lora_r == 0:  # adapters of an earlier save would describe another model
                    for stale in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
                        if os.path.exists(os.path.join(target, stale)):
                            os.remove(os.path.join(target, stale))
            _fsync_dir(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("saved TGR head (%d tensors) to %s", len(tensors), target)
        if push_to_hub:
            self.push_to_hub(kwargs.get("repo_id") or os.path.basename(target), token=kwargs.get("token"),
                             commit_message=kwargs.get("commit_message"), private=kwargs.get("private"),
                             commit_description=kwargs.get("commit_description"),
                             create_pr=bool(kwargs.get("create_pr", False)))
        return target

    def model_card(self) -> str:
        """The ``README.md`` that :meth:`save_pretrained` writes: what the folder holds and how to load it."""
        config = self.config
        base = config.base_model_name_or_path
        lora = (f"LoRA adapters on the base (r = {config.lora_r}, alpha = {config.lora_alpha:g}, on "
                f"{', '.join(config.lora_target_modules)}), also in peft's format "
                f"(`{ADAPTER_CONFIG_NAME}`, `{ADAPTER_WEIGHTS_NAME}`)" if config.lora_r else "no LoRA adapters")
        tags = ["tgr", "temperature-guided-reasoning"] + (["peft", "lora"] if config.lora_r else [])
        base_line = f"base_model: {base}\n" if not os.path.isabs(base) else ""
        return (
            "---\n" + base_line + "library_name: transformers\npipeline_tag: text-generation\ntags:\n"
            + "".join(f"- {t}\n" for t in tags) + "---\n" + _MODEL_CARD_MARK + "\n\n"
            + f"# Temperature-Guided Reasoning head for `{base}`\n\n"
            "A TGR model: a token temperature mechanism (TTM), temperature-guided attention and GSoT "
            "pruning on the final hidden states of the base causal LM, whose own lm_head makes the "
            "logits. This folder holds only what TGR trains: the head "
            f"({config.temperature_heads} temperature heads, {config.num_tgr_heads} TGR attention "
            f"head(s), {'causal' if config.causal else 'non-causal'}, GSoT "
            f"{'at ' + format(config.temperature_conf_threshold, 'g') if config.gsoT_enabled else 'off'}) in "
            f"`{WEIGHTS_NAME}`, {lora}, and `{CONFIG_NAME}`, which names the base. "
            + ("" if config.tgr_mode == "head" else
               f"TGR mode {config.tgr_mode!r}: temperature-guided attention in decoder layers "
               f"{config.tgr_layers if config.tgr_layers != 'all' else '(all)'} of the base, whose temperature "
               f"mechanisms are in `{WEIGHTS_NAME}` too"
               + (" (no head: the logits are the base's own). " if config.tgr_mode == "layers" else ". "))
            + "The base "
            f"(`{base}`, {'4-bit NF4' if config.load_in_4bit else 'unquantized'}) is loaded from its own "
            "repository.\n\n"
            "## Load\n\n"
            "```python\nimport tgr.model  # registers the \"tgr\" model type with transformers' Auto classes\n"
            "from transformers import AutoModelForCausalLM\n\n"
            "model = AutoModelForCausalLM.from_pretrained(\"PATH_OR_REPO\")  # or tgr.TGRLlamaModel.from_pretrained\n"
            "ids = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32)\n```\n\n"
            "With a base you loaded yourself (any device_map, quantization or revision): "
            "`tgr.TGRLlamaModel.from_pretrained(\"PATH_OR_REPO\", base=base)`.\n"
        )

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None,
                    create_pr: bool = False, commit_description: str | None = None,
                    max_shard_size: int | str | None = None, **kwargs) -> Any:
        """Upload what :meth:`save_pretrained` writes (head, adapters, config, model card) to a hub
        repository, created if needed. A hub that cannot be reached (or refuses the upload) is a
        :class:`CheckpointError` with a one-line message naming the repository.

        ``max_shard_size`` is accepted as transformers' ``push_to_hub`` takes it and changes
        nothing: the few tensors TGR saves are one file. Other keyword arguments are a ``TypeError``.
        """
        if kwargs:
            raise TypeError(f"TGRLlamaModel.push_to_hub got unexpected argument(s): {', '.join(sorted(kwargs))}")
        from huggingface_hub import HfApi

        if not isinstance(repo_id, str) or not repo_id:
            raise ValueError(f"push_to_hub needs a repository id such as 'user/tgr-llama', got {repo_id!r}")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            try:
                api = HfApi(token=token)
                repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
                return api.upload_folder(repo_id=repo, folder_path=folder, revision=revision, create_pr=create_pr,
                                         commit_message=commit_message or "Upload TGR model",
                                         commit_description=commit_description)
            except Exception as err:  # offline, no token, no access, ...: one line, not a traceback
                raise CheckpointError(f"cannot push to the Hugging Face hub repository {repo_id!r}: "
                                      f"{_one_line(err)}") from None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                        config: TGRConfig | None = None, base: nn.Module | None = None,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False,
                        **overrides) -> TGRLlamaModel:
        """Rebuild a saved model: read its config, load the base it names, load the head.

        ``AutoModelForCausalLM.from_pretrained(folder)`` comes here too.

        Args:
            pretrained_model_name_or_path: a folder written by :meth:`save_pretrained` (or a
                Trainer checkpoint folder, which holds the same files), or a hub repository id.
            config: use this config instead of the folder's ``config.json``.
            base: a base already loaded (see :meth:`from_base`) to wrap instead of loading the
                one the config names.
            revision, token, cache_dir, local_files_only: for a hub repository.
            overrides: config fields to replace, e.g. ``attention_backend="torch"`` or
                ``base_model_name_or_path=`` a new location of the base.

        A missing or damaged file is a :class:`CheckpointError` whose one-line message names the
        file; it is found before the base is loaded.
        """
        if model_args:
            raise TypeError(f"TGRLlamaModel.from_pretrained takes one positional argument, got {1 + len(model_args)}")
        for key in _HF_LOADER_KWARGS:
            overrides.pop(key, None)
        # transformers' dtype argument is the base's compute dtype here (the head stays fp32).
        dtype = overrides.pop("dtype", None)
        dtype = overrides.pop("torch_dtype", None) if dtype is None else dtype
        if dtype is not None and dtype != "auto":
            overrides.setdefault("compute_dtype", str(dtype).removeprefix("torch."))
        unknown = sorted(set(overrides) - set(TGRConfig.tgr_field_names()))
        if unknown:
            raise TypeError(
                f"TGRLlamaModel.from_pretrained got unexpected argument(s) {', '.join(unknown)}: it takes TGRConfig "
                f"fields ({', '.join(TGRConfig.tgr_field_names())}); to load the base another way, load it "
                f"yourself and pass base="
            )
        path = os.fspath(pretrained_model_name_or_path)
        hub = dict(revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
        if config is None:
            config = TGRConfig.from_pretrained(path, **hub, **overrides)
        elif not isinstance(config, TGRConfig):
            raise TypeError(f"TGRLlamaModel.from_pretrained: config must be a TGRConfig, got {type(config).__name__}")
        elif overrides:
            config = config.copy(**overrides)
        weights_file = resolve_file(path, WEIGHTS_NAME, **hub)
        state = _read_weights(weights_file)  # before the base loads: a damaged file fails fast
        if base is None:
            model = cls(config)
            model._load_state(state, weights_file)
        else:
            trainable = [p.requires_grad for p in base.parameters()]
            model = cls.from_base(base, config)
            try:
                model._load_state(state, weights_file)
            except BaseException:
                # The caller's base is theirs: give it back without the TGR layers, adapters and
                # freezing that wrapping it put in, so that it can be passed again.
                model._unwrap_base(trainable)
                raise
        model._keep_a_cast_of_the_saved_model(state)
        model.name_or_path = path
        return model.eval()  # as transformers' from_pretrained: a loaded model is for inference

    def _unwrap_base(self, trainable: list[bool]) -> None:
        """Undo what wrapping did to a base the caller passed in: its TGR layers, its LoRA adapters
        (peft's ``unload``) and the freezing (``trainable``: each parameter's ``requires_grad``
        before). What peft's ``prepare_model_for_kbit_training`` did to a 4-bit base stays."""
        hf_base = self.hf_base_model
        if tgr_layers.is_tgr_applied(hf_base):
            tgr_layers.remove_tgr(hf_base)
        if self._has_adapters():
            hf_base = self.base_llama_model.unload()
        for param, flag in zip(hf_base.parameters(), trainable, strict=False):
            param.requires_grad_(flag)

    def _keep_a_cast_of_the_saved_model(self, state: dict[str, torch.Tensor]) -> None:
        """A model saved after a cast (``model.to(torch.bfloat16)``) held its head, TGR layers and
        adapters in the dtype it computed in, which ``compute_dtype`` now records: they get that
        dtype back, so the reload computes as the saved model did (not in fp32, as a new model's
        head does). Tensors in another dtype than the one the model computes in are left as built."""
        live = self.dtype
        params = dict(self.named_parameters())
        for key, value in state.items():
            param = params.get(key)
            if param is not None and value.dtype == live != param.dtype and value.is_floating_point():
                param.data = param.data.to(live)

    def load_weights(self, file: str | os.PathLike) -> None:
        """Load head (and LoRA) tensors from a safetensors file; every one must be present."""
        file = os.fspath(file)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file!r} does not exist: no TGR weights there")
        self._load_state(_read_weights(file), file)

    def _load_state(self, state: dict[str, torch.Tensor], file: str) -> None:
        own = self.state_dict()
        state = _rename_legacy_lora_keys(state, own)
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} here"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"TGR weights in {file!r} do not fit this model's config: missing {missing}, "
                f"unexpected {unexpected}, shape mismatches {shapes}"
            )
        self.load_state_dict({k: v.to(own[k].device) for k, v in state.items()}, strict=True)


AutoModelForCausalLM.register(TGRConfig, TGRLlamaModel, exist_ok=True)


def _read_weights(file: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on the CPU; a damaged file is a one-line CheckpointError."""
    try:
        return load_file(file, device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{file!r} does not exist: no TGR weights there") from None
    except Exception as err:  # safetensors' SafetensorError, and OSError for an unreadable file
        raise CheckpointError(f"the TGR weights {file!r} are damaged: {_one_line(err)}") from None


def _rename_legacy_lora_keys(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tgr 0.1 injected LoRA into the bare base (``base_llama_model.model.layers...``); peft's
    ``get_peft_model`` puts it under ``base_llama_model.base_model.model.``."""
    renamed = {}
    for key, value in state.items():
        if key not in own and key.startswith(_BASE_PREFIX) and "lora_" in key:
            new = _BASE_PREFIX + _PEFT_PREFIX + key[len(_BASE_PREFIX):]
            if new in own:
                key = new
        renamed[key] = value
    return renamed


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask sets it: set it back at once
    os.umask(mask)
    return mask


def _is_tgr_model_card(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return _MODEL_CARD_MARK in f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _ignore_missing_base_keys(module, incompatible_keys):
    # Keys here carry the prefix of the module load_state_dict was called on (e.g. "module.").
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing
                  if not (f".{_BASE_PREFIX}" in f".{k}" and "lora_" not in k and not _is_tgr_layer_key(k))]


def _is_tgr_layer_key(name: str) -> bool:
    """Whether a parameter name of the base belongs to a TGR layer's temperature mechanism."""
    return f".{tgr_layers.MECHANISM_NAME}." in f".{name}"


def _gsot_threshold(config: TGRConfig) -> float | None:
    """The GSoT threshold the head and the layers gate with: None when GSoT is off."""
    return config.temperature_conf_threshold if config.gsoT_enabled else None


def _mean_temperature_fp32(temperatures: torch.Tensor) -> torch.Tensor:
    """The mean over the temperature heads (last dim) in fp32 (fp64 for fp64), detached: GSoT is
    decided on it on every backend, so a bf16/fp16 head (a model cast with ``.to``) reports in
    ``gsot_mask`` the rows the kernels prune, not a comparison rounded to the half dtype."""
    t = temperatures.detach()
    return (t if t.dtype == torch.float64 else t.float()).mean(dim=-1)


def _shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != −100 (0 when there are none)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].long()  # int32 labels too, as the fused loss takes them
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = (shift_labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1)


def _temperature_regularizer(temperatures: torch.Tensor, target: float,
                             attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``mean((t − target)²)`` over real tokens (attention_mask 1) and all temperature heads."""
    sq = (temperatures.float() - target) ** 2
    if attention_mask is None:
        return sq.mean()
    real = attention_mask.to(sq.dtype).unsqueeze(-1)
    return (sq * real).sum() / (real.sum() * sq.shape[-1]).clamp(min=1)


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
