"""`TGRConfig`: the hyperparameters of a TGR model, validated, and serialized as JSON.

The seed's fields keep their names (``gsoT_enabled`` included) so that a seed config loads
unchanged. The base model's own sizes (``hidden_size`` and friends) are optional here: the model
fills them in from the base it loads, and a value given by hand that disagrees with the base is an
error rather than a silent surprise.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Union

__all__ = ["TGRConfig", "CONFIG_NAME", "BACKENDS", "COMPUTE_DTYPES"]

#: File name of the TGR config inside a saved model folder.
CONFIG_NAME = "tgr_config.json"

BACKENDS = ("auto", "triton", "torch", "reference")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")

# Keys that `to_dict` writes besides the fields, accepted (and ignored) by `from_dict`.
_META_KEYS = ("model_type", "tgr_version")
# The seed's config had these (a dataclass over PretrainedConfig); they carry no meaning here.
_IGNORED_SEED_KEYS = ("transformers_version", "architectures", "_name_or_path")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TGRConfig:
    """Configuration of a Temperature-Guided Reasoning (TGR) model over a causal LM base.

    Base model:
        base_model_name_or_path: hub name or local folder of the base causal LM (Llama).
        load_in_4bit: load the base in 4-bit NF4 with double quantization (bitsandbytes);
            False loads it in ``compute_dtype``.
        compute_dtype: dtype of the base's activations (and of bitsandbytes' 4-bit compute):
            "auto" (bfloat16 on CUDA when supported, else float16; float32 on the CPU),
            "float32", "bfloat16" or "float16". The TGR head's weights are float32 always.
        device: where to load the base ("cuda", "cuda:1", "cpu"); None = CUDA when present, else
            the CPU.
        num_hidden_layers, hidden_size, intermediate_size, num_attention_heads,
        max_position_embeddings: the base's sizes (the seed's fields). None = read from the base
            when the model is built; a given value must match the base.

    Token Temperature Mechanism (TTM):
        temperature_heads: T, the number of temperatures per token (their mean scales attention).
        initial_temperature: the regularizer's target temperature.
        temperature_regularization_weight: λ of ``λ · mean((t - initial_temperature)²)``.
        temperature_clamp_min, temperature_clamp_max: temperatures are clamped into this range.

    TGR attention and GSoT:
        causal: the TGR attention is causal (default). False reproduces the seed, whose token i
            also attends to tokens after i.
        num_tgr_heads: heads of the TGR attention. 1 is the seed (q = k = v = the final hidden
            state, one head as wide as it); n > 1 splits the hidden state into n heads.
        attention_backend: "auto" (Triton on CUDA, optimized PyTorch elsewhere), "triton",
            "torch", or "reference" (the seed's eager math).
        gsoT_enabled: Guided Sequence of Thought: zero the TGR output of tokens whose mean
            temperature is below ``temperature_conf_threshold``.
        temperature_conf_threshold: the GSoT threshold.

    LoRA (optional, through peft):
        lora_r: rank of LoRA adapters on the base; 0 (default) trains the TGR head only.
        lora_alpha, lora_dropout, lora_target_modules: peft's LoraConfig settings.
    """

    model_type: ClassVar[str] = "tgr"
    # Trainer's evaluation loop skips these output fields when it gathers predictions (scalars,
    # and a bool mask that its -100 padding cannot pad).
    keys_to_ignore_at_inference: ClassVar[List[str]] = ["lm_loss", "temperature_loss", "gsot_mask"]

    base_model_name_or_path: str = "meta-llama/Llama-2-7b-hf"

    # The base's sizes (seed fields); filled from the base when None.
    num_hidden_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    max_position_embeddings: Optional[int] = None

    # TTM
    temperature_heads: int = 8
    initial_temperature: float = 0.5
    temperature_regularization_weight: float = 0.01
    temperature_clamp_min: float = 0.01
    temperature_clamp_max: float = 0.99

    # GSoT
    gsoT_enabled: bool = True
    temperature_conf_threshold: float = 0.4

    # TGR attention
    causal: bool = True
    attention_backend: str = "auto"
    num_tgr_heads: int = 1

    # Base loading
    load_in_4bit: bool = True
    compute_dtype: str = "auto"
    device: Optional[str] = None

    # LoRA
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self):
        # JSON gives lists; a tuple is accepted for convenience.
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        self.validate()

    # ------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------

    def validate(self) -> "TGRConfig":
        """Raise ``ValueError`` (or ``TypeError``) naming the first invalid field; return self."""

        def bad(name, want):
            value = getattr(self, name)
            return ValueError(f"TGRConfig.{name} must be {want}, got {value!r}")

        if not isinstance(self.base_model_name_or_path, (str, os.PathLike)) or not str(self.base_model_name_or_path):
            raise bad("base_model_name_or_path", "a non-empty hub name or folder path")
        self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)

        for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and value > 0):
                raise bad(name, "a positive integer or None (read from the base)")

        if not (_is_int(self.temperature_heads) and self.temperature_heads >= 1):
            raise bad("temperature_heads", "an integer >= 1")
        for name in ("temperature_clamp_min", "temperature_clamp_max", "initial_temperature",
                     "temperature_conf_threshold"):
            value = getattr(self, name)
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise bad(name, "a number in [0, 1]")
        if self.temperature_clamp_min > self.temperature_clamp_max:
            raise ValueError(
                f"TGRConfig needs temperature_clamp_min <= temperature_clamp_max, got "
                f"{self.temperature_clamp_min!r} > {self.temperature_clamp_max!r}"
            )
        if not (_is_number(self.temperature_regularization_weight) and self.temperature_regularization_weight >= 0):
            raise bad("temperature_regularization_weight", "a finite number >= 0")

        for name in ("gsoT_enabled", "causal", "load_in_4bit"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.attention_backend not in BACKENDS:
            raise bad("attention_backend", f"one of {BACKENDS}")
        if not (_is_int(self.num_tgr_heads) and self.num_tgr_heads >= 1):
            raise bad("num_tgr_heads", "an integer >= 1")
        if self.hidden_size is not None and self.hidden_size % self.num_tgr_heads:
            raise ValueError(
                f"TGRConfig.num_tgr_heads={self.num_tgr_heads} must divide hidden_size={self.hidden_size}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise bad("compute_dtype", f"one of {COMPUTE_DTYPES}")
        if self.device is not None and not (isinstance(self.device, str) and self.device):
            raise bad("device", "None or a device string such as 'cpu' or 'cuda:0'")
        if self.device is not None:
            import torch  # only to parse the device string

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError) as err:
                raise bad("device", "None or a device string such as 'cpu' or 'cuda:0'") from err

        if not (_is_int(self.lora_r) and self.lora_r >= 0):
            raise bad("lora_r", "an integer >= 0 (0 = no LoRA)")
        if not (_is_number(self.lora_alpha) and self.lora_alpha > 0):
            raise bad("lora_alpha", "a positive number")
        if not (_is_number(self.lora_dropout) and 0.0 <= self.lora_dropout < 1.0):
            raise bad("lora_dropout", "a number in [0, 1)")
        if not (isinstance(self.lora_target_modules, list) and self.lora_target_modules
                and all(isinstance(m, str) and m for m in self.lora_target_modules)):
            raise bad("lora_target_modules", "a non-empty list of module names")
        return self

    # ------------------------------------------------------------------------------------
    # Serialization
    # ------------------------------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict, with ``model_type`` and ``tgr_version``."""
        self.validate()
        from . import __version__

        out: Dict[str, Any] = {"model_type": self.model_type, "tgr_version": __version__}
        for f in dataclasses.fields(self):
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any], **overrides) -> "TGRConfig":
        """Build from a dict (as written by :meth:`to_dict`); ``overrides`` replace fields.

        Unknown keys are an error (a typo must not silently fall back to a default).
        """
        if not isinstance(data, dict):
            raise TypeError(f"TGRConfig.from_dict needs a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        unknown = []
        for key, value in {**data, **overrides}.items():
            if key in names:
                values[key] = value
            elif key not in _META_KEYS + _IGNORED_SEED_KEYS:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown TGRConfig field(s): {', '.join(sorted(unknown))}; "
                             f"known fields: {', '.join(sorted(names))}")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str, **overrides) -> "TGRConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"TGR config is not valid JSON: {err}") from err
        return cls.from_dict(data, **overrides)

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike], **overrides) -> "TGRConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_json_string(f.read(), **overrides)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``tgr_config.json`` into ``save_directory`` (created if needed); return its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        self.to_json_file(path)
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], **overrides) -> "TGRConfig":
        """Read a config from a saved folder (``tgr_config.json``) or a JSON file."""
        path = os.fspath(path)
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no TGR config at {file!r} (a saved TGR model folder has {CONFIG_NAME})")
        return cls.from_json_file(file, **overrides)

    def copy(self, **overrides) -> "TGRConfig":
        """A validated copy with some fields replaced."""
        return self.from_dict(self.to_dict(), **overrides)
