"""`TGRLlamaModel`: the seed's Temperature-Guided Reasoning model over a frozen 4-bit base.

Forward (per batch, hidden size H, TGR heads n, D = H / n, temperature heads T)::

    h = base.model(input_ids).last_hidden_state           [B, S, H]  (base frozen, 4-bit NF4)
    t = clamp(sigmoid(h Wᵀ + b), t_min, t_max)             [B, S, T]  TTM (fused op, fp32 weights)
    y = TGR-attention(q = k = v = h split in n heads, t)    [B, S, H]  (fused op, GSoT fused in)
    logits = base.lm_head(y)
    loss = CE(logits[:, :-1], labels[:, 1:]) + λ · mean over real tokens of (t − t_init)²

With ``attention_backend="reference"`` and ``causal=False`` this is the seed's math, the seed's
additive ``(1 − mask) · −1e4`` padding mask included. The base runs in ``compute_dtype`` (float32
on the CPU by default); the head's weights stay float32.

The model is an ``nn.Module`` that owns the base: HF ``Trainer`` accepts it, and its state dict
holds only what TGR trains (the head, plus LoRA adapters when enabled), so Trainer checkpoints and
:meth:`TGRLlamaModel.save_pretrained` never serialize the 4-bit base.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers.utils import ModelOutput

from tgr_kernels import TemperatureMechanism, temperature_guided_attention

from .config import CONFIG_NAME, TGRConfig

__all__ = ["TGRLlamaModel", "TGROutput", "WEIGHTS_NAME", "load_base_model", "resolve_device",
           "resolve_compute_dtype"]

logger = logging.getLogger("tgr")

#: File name of the head's weights inside a saved model folder (the name HF Trainer also uses for
#: the state dict of a plain module, so a Trainer checkpoint holds the same file).
WEIGHTS_NAME = "model.safetensors"

# The seed's additive padding mask value.
SEED_MASK_VALUE = -1e4

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BASE_PREFIX = "base_llama_model."
# The sizes a TGRConfig may record about its base, and their names in the base's config.
_BASE_SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "max_position_embeddings")


@dataclass
class TGROutput(ModelOutput):
    """Output of :meth:`TGRLlamaModel.forward`.

    Indexable by name like the seed's dict (``out["loss"]`` is None without labels, rather than a
    KeyError), and by position like any ``ModelOutput`` (None fields skipped).

    Attributes:
        loss: ``lm_loss + temperature_loss`` when labels are given.
        logits: ``[B, S, V]`` from the base's lm_head applied to the TGR output.
        temperatures: ``[B, S, T]`` float32 token temperatures.
        gsot_mask: ``[B, S]`` bool, True where a token's mean temperature is at least the GSoT
            threshold (its TGR output is kept); all True when GSoT is disabled.
        lm_loss: the cross-entropy part of the loss.
        temperature_loss: the weighted temperature regularizer part of the loss.
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    temperatures: Optional[torch.Tensor] = None
    gsot_mask: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    temperature_loss: Optional[torch.Tensor] = None

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
    from transformers import AutoModelForCausalLM

    kwargs: Dict[str, Any] = {"dtype": dtype, "device_map": {"": str(device)}}
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


def _inject_lora(base: nn.Module, config: TGRConfig) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as err:
        raise ImportError("TGRConfig.lora_r > 0 needs peft (pip install peft)") from err
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
    )
    inject_adapter_in_model(lora_config, base)
    n_adapters = 0
    for name, param in base.named_parameters():
        if "lora_" in name:
            # Adapters train in fp32, like the head (peft casts the input to their dtype).
            param.data = param.data.float()
            param.requires_grad_(True)
            n_adapters += 1
    if n_adapters == 0:
        raise ValueError(f"TGRConfig.lora_target_modules={config.lora_target_modules} matched no module of the base")


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class TGRLlamaModel(nn.Module):
    """Temperature-Guided Reasoning over a frozen (4-bit) causal LM base.

    ``TGRLlamaModel(config)`` loads the base named by ``config.base_model_name_or_path`` and freezes
    it; the trainable parameters are the TTM projection (and LoRA adapters when ``lora_r > 0``).
    Attribute names follow the seed (``base_llama_model``, ``temperature_mechanisms``), so the
    seed's head tensors (``temperature_mechanisms.0.proj.weight`` / ``.bias``, fp16 there) load
    with :meth:`load_state_dict`.
    """

    def __init__(self, config: TGRConfig):
        super().__init__()
        if not isinstance(config, TGRConfig):
            raise TypeError(f"TGRLlamaModel needs a TGRConfig, got {type(config).__name__}")
        config = config.copy()  # validated, and not shared with the caller
        device = resolve_device(config)
        dtype = resolve_compute_dtype(config, device)

        base = load_base_model(config, device, dtype)
        self._fill_base_sizes(config, base.config)
        for param in base.parameters():
            param.requires_grad_(False)
        _keep_cpu_4bit_weights_unpacked(base)
        if config.lora_r > 0:
            _inject_lora(base, config)
        self.base_llama_model = base
        self.config = config
        self.compute_dtype = dtype

        hidden_size = base.config.hidden_size
        # The seed's layout: one temperature mechanism in a ModuleList. Its weights stay fp32.
        self.temperature_mechanisms = nn.ModuleList([
            TemperatureMechanism(
                hidden_size,
                config.temperature_heads,
                clamp_min=config.temperature_clamp_min,
                clamp_max=config.temperature_clamp_max,
                backend=config.attention_backend,
            )
        ]).to(device=device, dtype=torch.float32)

        decoder = self._decoder()
        params = inspect.signature(decoder.forward).parameters
        # transformers renamed the decoder's cache argument (past_key_values -> cache) in 5.2x.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

        # The state dict holds what TGR owns (see state_dict): a load needs no base tensors.
        self.register_load_state_dict_post_hook(_ignore_missing_base_keys)
        logger.info("TGR model ready: %d trainable parameters (%s), base frozen",
                    sum(p.numel() for p in self.parameters() if p.requires_grad),
                    "head + LoRA" if config.lora_r else "head only")

    # ------------------------------------------------------------------------------------------
    # Properties
    # ------------------------------------------------------------------------------------------

    @property
    def base_model(self) -> nn.Module:
        """The base causal LM (the seed's accessor)."""
        return self.base_llama_model

    @property
    def device(self) -> torch.device:
        return self.temperature_mechanisms[0].proj.weight.device

    @property
    def hidden_size(self) -> int:
        return self.base_llama_model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.base_llama_model.get_output_embeddings().weight.shape[0]

    @property
    def generation_config(self):
        return getattr(self.base_llama_model, "generation_config", None)

    def set_attention_backend(self, backend: str) -> None:
        """Switch the head's backend ("auto", "triton", "torch", "reference") in place."""
        self.config = self.config.copy(attention_backend=backend)
        self.temperature_mechanisms[0].backend = backend

    def _decoder(self) -> nn.Module:
        base = self.base_llama_model
        decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        return decoder if isinstance(decoder, nn.Module) else base.get_decoder()

    @staticmethod
    def _fill_base_sizes(config: TGRConfig, base_config) -> None:
        for name in _BASE_SIZE_FIELDS:
            actual = getattr(base_config, name, None)
            given = getattr(config, name)
            if given is not None and actual is not None and given != actual:
                raise ValueError(
                    f"TGRConfig.{name}={given} but the base {config.base_model_name_or_path!r} has {name}={actual}; "
                    f"leave it None to read it from the base"
                )
            if actual is not None:
                setattr(config, name, actual)
        config.validate()  # num_tgr_heads must divide the base's hidden size

    # ------------------------------------------------------------------------------------------
    # Training conveniences (HF Trainer looks for these)
    # ------------------------------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Checkpoint the base's layers (worth it only with LoRA: a frozen base keeps no activations)."""
        self.base_llama_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if self.config.lora_r > 0 and hasattr(self.base_llama_model, "enable_input_require_grads"):
            self.base_llama_model.enable_input_require_grads()

    def gradient_checkpointing_disable(self):
        self.base_llama_model.gradient_checkpointing_disable()

    def get_input_embeddings(self) -> nn.Module:
        return self.base_llama_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base_llama_model.get_output_embeddings()

    # ------------------------------------------------------------------------------------------
    # The pieces of the forward (generation reuses them)
    # ------------------------------------------------------------------------------------------

    def _base_hidden(self, input_ids, attention_mask=None, position_ids=None, cache=None) -> torch.Tensor:
        """The base's final hidden state ``[B, S, H]`` (after its final norm), nothing else."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": cache is not None}
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        # A frozen base needs no autograd graph; with LoRA it does while training.
        track = torch.is_grad_enabled() and self.config.lora_r > 0
        with torch.set_grad_enabled(track):
            out = self._decoder()(**kwargs)
        return out.last_hidden_state

    def _new_base_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.base_llama_model.config)
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

    def _head_mask(self, attention_mask: Optional[torch.Tensor], dtype: torch.dtype):
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

    def tgr_head(self, query_hidden: torch.Tensor, kv_hidden: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None):
        """The TGR head on final hidden states: TTM, temperature-guided attention, GSoT.

        Args:
            query_hidden: ``[B, S_q, H]``: the tokens whose outputs are wanted.
            kv_hidden: ``[B, S_k, H]``: every token so far (keys and values), ending with the
                queries; None = ``query_hidden`` (the full forward). Causal attention lines the
                queries up with the last keys.
            attention_mask: ``[B, S_k]`` 0/1 key-padding mask, or None.

        Returns:
            ``(y [B, S_q, H], temperatures [B, S_q, T] fp32, gsot_mask [B, S_q] bool)``.
        """
        config = self.config
        temperatures = self.temperature_mechanisms[0](query_hidden)
        q = self._split_heads(query_hidden)
        kv = q if kv_hidden is None or kv_hidden is query_hidden else self._split_heads(kv_hidden)
        threshold = config.temperature_conf_threshold if config.gsoT_enabled else None
        out = temperature_guided_attention(
            q, kv, kv, temperatures, self._head_mask(attention_mask, query_hidden.dtype),
            causal=config.causal, gsot_threshold=threshold, backend=config.attention_backend,
        )
        if threshold is None:
            gsot_mask = torch.ones(temperatures.shape[:2], dtype=torch.bool, device=temperatures.device)
        else:
            gsot_mask = temperatures.detach().mean(dim=-1) >= threshold
        return self._merge_heads(out), temperatures, gsot_mask

    def lm_head(self, y: torch.Tensor) -> torch.Tensor:
        """The base's own lm_head on the TGR output (as the seed)."""
        head = self.base_llama_model.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is not None and weight.is_floating_point():
            y = y.to(weight.dtype)
        else:
            y = y.to(self.compute_dtype)
        return head(y)

    # ------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None) -> TGROutput:
        """Logits, temperatures and GSoT mask of every token; the loss when labels are given.

        Args:
            input_ids: ``[B, S]`` token ids.
            attention_mask: ``[B, S]`` 1 = real token, 0 = padding (any side), or None.
            labels: ``[B, S]`` next-token targets (shifted inside, −100 ignored), or None.
            position_ids: ``[B, S]`` for the base, or None for the base's default (as the seed).
        """
        self._check_inputs(input_ids, attention_mask, labels)
        hidden = self._base_hidden(input_ids, attention_mask, position_ids)
        y, temperatures, gsot_mask = self.tgr_head(hidden, None, attention_mask)
        logits = self.lm_head(y)

        loss = lm_loss = temperature_loss = None
        if labels is not None:
            lm_loss = _shifted_cross_entropy(logits, labels.to(logits.device))
            temperature_loss = self.config.temperature_regularization_weight * _temperature_regularizer(
                temperatures, self.config.initial_temperature, attention_mask)
            loss = lm_loss + temperature_loss
        return TGROutput(loss=loss, logits=logits, temperatures=temperatures, gsot_mask=gsot_mask,
                         lm_loss=lm_loss, temperature_loss=temperature_loss)

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

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: Optional[int] = None, logits_processor=None, eos_token_id=None,
                 pad_token_id: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None, output_scores: bool = False):
        """Generate from the TGR head's logits, incrementally (base KV cache + hidden-state cache).

        Returns ``[B, S + n]`` token ids. See :func:`tgr.generation.generate` for the arguments.
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, top_k=top_k, logits_processor=logits_processor,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=use_cache,
                        generator=generator, output_scores=output_scores)

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
        if self.config.lora_r > 0:
            for name, param in self.base_llama_model.named_parameters():
                if "lora_" in name:
                    destination[prefix + _BASE_PREFIX + name] = param if keep_vars else param.detach()
        return destination

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        """What :meth:`save_pretrained` writes: the head's (and LoRA adapters') tensors."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``tgr_config.json`` and the head's weights (``model.safetensors``), not the base.

        Files are written into a temporary folder next to the target first and only then moved
        into place, each with an atomic rename: an interrupted save never leaves a half-written
        file where a good one was. Other files in the folder (a tokenizer, say) are kept.
        Returns the folder's path.
        """
        target = os.path.abspath(os.fspath(save_directory))
        if os.path.exists(target) and not os.path.isdir(target):
            raise NotADirectoryError(f"cannot save a TGR model to {target!r}: it is a file")
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
        try:
            tensors = {k: v.cpu() for k, v in self.trainable_state_dict().items()}
            weights_tmp = os.path.join(tmp, WEIGHTS_NAME)
            save_file(tensors, weights_tmp, metadata={"format": "pt", "tgr_config": self.config.to_json_string()})
            self.config.save_pretrained(tmp)
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                _fsync(os.path.join(tmp, name))
            if not os.path.exists(target):
                os.rename(tmp, target)  # the whole folder appears at once
            else:
                # Weights first: the config that describes them lands last.
                for name in (WEIGHTS_NAME, CONFIG_NAME):
                    os.replace(os.path.join(tmp, name), os.path.join(target, name))
            _fsync_dir(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("saved TGR head (%d tensors) to %s", len(tensors), target)
        return target

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], config: Optional[TGRConfig] = None,
                        **overrides) -> "TGRLlamaModel":
        """Rebuild a saved model: read its config, load the base it names, load the head.

        Args:
            path: a folder written by :meth:`save_pretrained` (or a Trainer checkpoint folder,
                whose ``model.safetensors`` holds the same tensors: then pass ``config``).
            config: use this config instead of the folder's ``tgr_config.json``.
            overrides: config fields to replace, e.g. ``attention_backend="torch"`` or
                ``base_model_name_or_path=`` a new location of the base.
        """
        path = os.fspath(path)
        if config is None:
            config = TGRConfig.from_pretrained(path, **overrides)
        elif overrides:
            config = config.copy(**overrides)
        model = cls(config)
        model.load_weights(os.path.join(path, WEIGHTS_NAME))
        return model

    def load_weights(self, file: Union[str, os.PathLike]) -> None:
        """Load head (and LoRA) tensors from a safetensors file; every one must be present."""
        file = os.fspath(file)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no TGR weights at {file!r}")
        state = load_file(file, device=str(self.device))
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k}: {list(state[k].shape)} in the file, {list(own[k].shape)} here"
                        for k in set(own) & set(state) if state[k].shape != own[k].shape)
        if missing or unexpected or shapes:
            raise ValueError(
                f"TGR weights in {file!r} do not fit this model's config: missing {missing}, "
                f"unexpected {unexpected}, shape mismatches {shapes}"
            )
        self.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _ignore_missing_base_keys(module, incompatible_keys):
    # Keys here carry the prefix of the module load_state_dict was called on (e.g. "module.").
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (f".{_BASE_PREFIX}" in f".{k}" and "lora_" not in k)]


def _shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != −100 (0 when there are none)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    count = (shift_labels != -100).sum()
    return total / count.clamp(min=1)


def _temperature_regularizer(temperatures: torch.Tensor, target: float,
                             attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
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
