"""`TGRConfig`: the hyperparameters of a TGR model, a ``PretrainedConfig`` with model type "tgr".

The seed's fields keep their names (``gsoT_enabled`` included) so that a seed config loads
unchanged. The base model's own sizes (``hidden_size`` and friends) are optional here: the model
fills them in from the base it loads, and a value given by hand that disagrees with the base is an
error rather than a silent surprise.

Serialization is ``PretrainedConfig``'s (``to_dict``, ``to_json_string``, ``config.json``), so
``AutoConfig.from_pretrained(saved_dir)`` returns a ``TGRConfig``. A folder saved by tgr 0.1,
which holds ``tgr_config.json`` instead, still loads with :meth:`TGRConfig.from_pretrained`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import field, fields
from typing import Any, ClassVar

from transformers import AutoConfig, PretrainedConfig

__all__ = ["TGRConfig", "CheckpointError", "CONFIG_NAME", "LEGACY_CONFIG_NAME", "BACKENDS", "COMPUTE_DTYPES",
           "TGR_MODES", "GSOT_MODES", "DEFAULT_GSOT_MODE", "DEFAULT_GSOT_WIDTH"]

#: File name of the config inside a saved model folder (Hugging Face's name).
CONFIG_NAME = "config.json"
#: The config's file name in folders saved by tgr 0.1; still read when ``config.json`` is absent.
LEGACY_CONFIG_NAME = "tgr_config.json"

BACKENDS = ("auto", "triton", "torch", "reference")
#: Where TGR acts: the seed's head on the final hidden state, every (chosen) decoder layer's
#: attention (``tgr.apply_tgr``), or both.
TGR_MODES = ("head", "layers", "both")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
#: How the GSoT gate trains (``tgr_kernels._gate``; named here so that the config needs no kernels
#: to validate): "hard" is the seed's gate, which has no gradient; "straight_through" keeps its
#: forward and gives the backward a sigmoid's slope; "soft" is a sigmoid in both passes. Every
#: mode is the hard gate in eval mode.
GSOT_MODES = ("hard", "straight_through", "soft")
#: The mode new configs (and saved configs from before the field existed) get, chosen from the
#: training curves in benchmarks/results/gsot-curves-cpu-2026-11-30/: in every layer the hard gate
#: pruned 26% of rows for good and ended at 3.4x the loss without GSoT, while both learning gates
#: matched no GSoT; straight-through over soft because its training forward is the inference
#: forward (a freshly patched layer is the identity in training too; soft scales its rows by 0.88).
DEFAULT_GSOT_MODE = "straight_through"
#: ε of the learning gates, in temperature units: the sigmoid ``σ((t̄ − τ)/ε)`` goes from 0.12 to
#: 0.88 within τ ± 2ε.
DEFAULT_GSOT_WIDTH = 0.05

# Keys a saved config holds besides the fields; accepted when reading and never set as attributes.
_META_KEYS = frozenset({"model_type", "tgr_version", "_name_or_path"})
# Keyword arguments that PretrainedConfig.__post_init__ consumes itself.
_HF_INIT_KWARGS = frozenset({"name_or_path", "output_attentions", "attn_implementation", "experts_implementation",
                             "torch_dtype", "num_labels", "per_layer_config", "_commit_hash",
                             "_attn_implementation_internal", "_experts_implementation_internal"})
# Keyword arguments that Hugging Face's loaders pass to ``from_dict`` for their own bookkeeping.
_HF_LOADER_KWARGS = ("_from_auto", "_from_pipeline")


class ConfigError(ValueError):
    """A TGRConfig field is invalid, or does not fit the base model; the one-line message names it."""


class CheckpointError(ValueError):
    """A saved TGR model (or its config) is missing, unreadable or damaged.

    The message is one line that names the file and what is wrong with it.
    """


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class TGRConfig(PretrainedConfig):
    """Configuration of a Temperature-Guided Reasoning (TGR) model over a causal LM base.

    Base model:
        base_model_name_or_path: hub name or local folder of the base causal LM (Llama).
        load_in_4bit: load the base in 4-bit NF4 with double quantization (bitsandbytes);
            False loads it in ``compute_dtype``.
        compute_dtype: dtype of the base's activations (and of bitsandbytes' 4-bit compute):
            "auto" (bfloat16 on CUDA when supported, else float16; float32 on the CPU),
            "float32", "bfloat16" or "float16". The TGR head's weights are float32 always.
            ``dtype=`` (or ``torch_dtype=``), which every ``PretrainedConfig`` takes, sets it.
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
        attention_backend: "auto" (Triton on CUDA GPUs of compute capability 8.0 or newer, optimized
            PyTorch elsewhere), "triton", "torch", or "reference" (the seed's eager math).
        gsoT_enabled: Guided Sequence of Thought: zero the TGR output of tokens whose mean
            temperature is below ``temperature_conf_threshold``.
        temperature_conf_threshold: the GSoT threshold τ.
        gsot_mode: how the GSoT gate trains. "hard" (the seed's): ``g = 1[t̄ >= τ]`` with no
            gradient, so a token that falls under τ stays pruned; "straight_through": the same
            forward, and the backward's ``dg/dt̄ = σ'(u)/ε`` (``u = (t̄ − τ)/ε``) lets the loss lift
            a pruned token back over τ; "soft": ``g = σ(u)`` in both passes. In eval mode every
            mode gates hard. Saved configs without the field load with the current default
            (inference, always hard, is the same either way).
        gsot_width: ε > 0 of the two learning gates, in temperature units.

    Where TGR acts:
        tgr_mode: "head" (default: the seed's TGR head on the final hidden state), "layers"
            (temperature-guided attention inside the base's decoder layers, ``tgr.apply_tgr``;
            the logits are the base's own, no head) or "both".
        tgr_layers: the decoder layers that get TGR in modes "layers" and "both": "all" or a
            list of layer indices. Each takes ``temperature_heads``, the clamp range,
            ``initial_temperature`` (the temperature every token starts at: a freshly patched
            layer multiplies its logits by t̄ / initial_temperature = 1), GSoT
            (``gsoT_enabled``, ``temperature_conf_threshold``, at most ``initial_temperature``)
            and ``attention_backend`` from the fields above; the regularizer pulls its
            temperatures towards ``initial_temperature`` too.

    LoRA (optional, through peft's ``LoraConfig`` and ``get_peft_model``):
        lora_r: rank of LoRA adapters on the base; 0 (default) trains the TGR head only.
        lora_alpha, lora_dropout, lora_target_modules: peft's LoraConfig settings.

    Unknown keyword arguments are a ``TypeError`` and unknown keys in a saved config a
    ``ValueError``: a typo must not silently fall back to a default.
    """

    model_type: ClassVar[str] = "tgr"
    # Trainer's evaluation loop skips these output fields when it gathers predictions (scalars,
    # and a bool mask that its -100 padding cannot pad).
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["lm_loss", "temperature_loss", "gsot_mask",
                                                         "layer_temperatures", "layer_gsot_mask"]

    base_model_name_or_path: str = "meta-llama/Llama-2-7b-hf"

    # The base's sizes (seed fields); filled from the base when None.
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None

    # TTM
    temperature_heads: int = 8
    initial_temperature: float = 0.5
    temperature_regularization_weight: float = 0.01
    temperature_clamp_min: float = 0.01
    temperature_clamp_max: float = 0.99

    # GSoT
    gsoT_enabled: bool = True
    temperature_conf_threshold: float = 0.4
    gsot_mode: str = DEFAULT_GSOT_MODE
    gsot_width: float = DEFAULT_GSOT_WIDTH

    # TGR attention
    causal: bool = True
    attention_backend: str = "auto"
    num_tgr_heads: int = 1

    # Where TGR acts
    tgr_mode: str = "head"
    tgr_layers: str | list[int] = "all"

    # Base loading
    load_in_4bit: bool = True
    compute_dtype: str = "auto"
    device: str | None = None

    # LoRA
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self, **kwargs):
        unknown = sorted(set(kwargs) - _HF_INIT_KWARGS - _META_KEYS)
        if unknown:
            raise TypeError(f"unknown TGRConfig field(s): {', '.join(unknown)}; "
                            f"known fields: {', '.join(sorted(self.tgr_field_names()))}")
        for key in _META_KEYS & set(kwargs):
            if key == "_name_or_path":
                kwargs.setdefault("name_or_path", kwargs[key])
            kwargs.pop(key)
        self._take_inherited_dtype(kwargs.pop("torch_dtype", None))
        super().__post_init__(**kwargs)
        # JSON gives lists; a tuple is accepted for convenience.
        if isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        if isinstance(self.tgr_layers, tuple):
            self.tgr_layers = list(self.tgr_layers)
        self.validate()

    def _take_inherited_dtype(self, torch_dtype) -> None:
        """``dtype=`` (or ``torch_dtype=``), which every ``PretrainedConfig`` accepts, becomes
        ``compute_dtype``: the TGR head is float32 always, so the only dtype a TGR model has to
        choose is the base's. Left as it was, it would be accepted and do nothing."""
        given = torch_dtype if self.dtype is None else self.dtype
        if given is None:
            return
        name = str(given).removeprefix("torch.")
        if name != "auto":
            if name not in COMPUTE_DTYPES:
                raise ConfigError(f"TGRConfig dtype={given!r} must be one of {COMPUTE_DTYPES} "
                                  "(it sets compute_dtype, the base's dtype)")
            if self.compute_dtype not in ("auto", name):
                raise ConfigError(f"TGRConfig got dtype={given!r} and compute_dtype={self.compute_dtype!r}: "
                                  "they name the same thing (the base's dtype); give one")
            self.compute_dtype = name
        self.dtype = None  # compute_dtype is the one field a saved config keeps

    @classmethod
    def tgr_field_names(cls) -> tuple[str, ...]:
        """The fields TGR defines (not those every ``PretrainedConfig`` has), in order."""
        inherited = {f.name for f in fields(PretrainedConfig)}
        return tuple(f.name for f in fields(cls) if f.name not in inherited)

    def __eq__(self, other) -> bool:
        # Two configs are equal when they describe the same TGR model; the bookkeeping that
        # PretrainedConfig adds (transformers_version, name_or_path, ...) does not count.
        if not isinstance(other, TGRConfig):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.tgr_field_names())

    __hash__ = None  # mutable

    # ------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------

    def validate(self) -> TGRConfig:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the first invalid field; return self."""

        def bad(name, want):
            value = getattr(self, name)
            return ConfigError(f"TGRConfig.{name} must be {want}, got {value!r}")

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
            raise ConfigError(
                f"TGRConfig needs temperature_clamp_min <= temperature_clamp_max, got "
                f"{self.temperature_clamp_min!r} > {self.temperature_clamp_max!r}"
            )
        if not (_is_number(self.temperature_regularization_weight) and self.temperature_regularization_weight >= 0):
            raise bad("temperature_regularization_weight", "a finite number >= 0")
        if self.gsot_mode not in GSOT_MODES:
            raise bad("gsot_mode", f"one of {GSOT_MODES}")
        if not (_is_number(self.gsot_width) and self.gsot_width > 0):
            raise bad("gsot_width", "a positive finite number (the learning gates' width in temperature units)")

        for name in ("gsoT_enabled", "causal", "load_in_4bit"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.attention_backend not in BACKENDS:
            raise bad("attention_backend", f"one of {BACKENDS}")
        if not (_is_int(self.num_tgr_heads) and self.num_tgr_heads >= 1):
            raise bad("num_tgr_heads", "an integer >= 1")
        if self.hidden_size is not None and self.hidden_size % self.num_tgr_heads:
            raise ConfigError(
                f"TGRConfig.num_tgr_heads={self.num_tgr_heads} must divide hidden_size={self.hidden_size}"
            )
        self._validate_tgr_layers()
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
        super().validate()  # PretrainedConfig's own checks
        return self

    def _validate_tgr_layers(self) -> None:
        if self.tgr_mode not in TGR_MODES:
            raise ConfigError(f"TGRConfig.tgr_mode must be one of {TGR_MODES}, got {self.tgr_mode!r}")
        layers = self.tgr_layers
        if not (layers == "all" or isinstance(layers, list) and layers
                and all(_is_int(i) and i >= 0 for i in layers) and len(set(layers)) == len(layers)):
            raise ConfigError(f"TGRConfig.tgr_layers must be 'all' or a non-empty list of distinct layer indices "
                             f"(>= 0), got {layers!r}")
        if self.num_hidden_layers is not None and layers != "all" and max(layers) >= self.num_hidden_layers:
            raise ConfigError(f"TGRConfig.tgr_layers={layers} names a layer the base does not have "
                             f"(num_hidden_layers={self.num_hidden_layers})")
        if self.tgr_mode == "head":
            return
        t_init = self.initial_temperature
        if not (0.0 < t_init < 1.0 and self.temperature_clamp_min <= t_init <= self.temperature_clamp_max):
            raise ConfigError(
                f"TGRConfig.initial_temperature={t_init!r} must lie in (0, 1) and in the clamp range "
                f"[{self.temperature_clamp_min}, {self.temperature_clamp_max}] with tgr_mode={self.tgr_mode!r}: "
                f"TGR layers start with every temperature at initial_temperature"
            )
        if self.gsoT_enabled and self.temperature_conf_threshold > t_init:
            raise ConfigError(
                f"TGRConfig.temperature_conf_threshold={self.temperature_conf_threshold!r} must be <= "
                f"initial_temperature={t_init!r} with tgr_mode={self.tgr_mode!r}, or freshly patched layers "
                f"would prune every token"
            )

    # ------------------------------------------------------------------------------------
    # Serialization (PretrainedConfig's, plus the tgr version and unknown-key errors)
    # ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """PretrainedConfig's dict (with ``model_type``), plus ``tgr_version``; validates first."""
        self.validate()
        from . import __version__

        out = super().to_dict()
        # Attributes that code sets on a model's config at run time (Trainer's use_cache, say) are
        # no TGR field: saved, they would be unknown keys when read back.
        keep = {f.name for f in fields(self)} | _META_KEYS | {"output_attentions"}
        out = {k: v for k, v in out.items() if k in keep}
        out["tgr_version"] = __version__
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Build from a dict (as written by :meth:`to_dict`); keyword arguments that name fields
        replace them.

        Unknown keys in ``config_dict`` or ``kwargs`` are a ``ValueError``, except that with
        ``return_unused_kwargs=True`` (how ``AutoConfig`` calls it) unknown keyword arguments come
        back as ``(config, unused)``, as for any ``PretrainedConfig``.
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"TGRConfig.from_dict needs a dict, got {type(config_dict).__name__}")
        return_unused = kwargs.pop("return_unused_kwargs", False)
        for key in _HF_LOADER_KWARGS:
            kwargs.pop(key, None)
        name_or_path = kwargs.pop("name_or_path", None)
        names = {f.name for f in fields(cls)}
        known = names | _META_KEYS | _HF_INIT_KWARGS
        unknown = sorted(k for k in config_dict if k not in known)
        overrides = {k: v for k, v in kwargs.items() if k in names or k == "torch_dtype"}
        unused = {k: v for k, v in kwargs.items() if k not in overrides}
        if any(str(overrides.get(k, "auto")) != "auto" for k in ("dtype", "torch_dtype")) \
                and "compute_dtype" not in overrides:
            # A dtype given when loading sets the base's dtype: it replaces the saved compute_dtype.
            config_dict = {k: v for k, v in config_dict.items() if k != "compute_dtype"}
        if not return_unused:
            unknown += sorted(unused)
        if unknown:
            raise ValueError(f"unknown TGRConfig field(s): {', '.join(unknown)}; "
                             f"known fields: {', '.join(sorted(cls.tgr_field_names()))}")
        values = {k: v for k, v in {**config_dict, **overrides}.items() if k not in _META_KEYS}
        if name_or_path is not None:
            values["name_or_path"] = name_or_path
        config = cls(**values)
        return (config, unused) if return_unused else config

    @classmethod
    def from_json_string(cls, text: str, **overrides) -> TGRConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"TGR config is not valid JSON: {err}") from err
        return cls.from_dict(data, **overrides)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> TGRConfig:
        """Read a config file; a damaged file is a :class:`CheckpointError` naming it."""
        path = os.fspath(path)
        cls._check_overrides(overrides)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise CheckpointError(f"cannot read the TGR config {path!r}: {_one_line(err)}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise CheckpointError(f"the TGR config {path!r} is damaged: not UTF-8 text") from None
        except json.JSONDecodeError as err:
            what = "empty" if not raw.strip() else f"not valid JSON ({err})"
            raise CheckpointError(f"the TGR config {path!r} is damaged: {what}") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"the TGR config {path!r} is damaged: it holds a JSON "
                                  f"{type(data).__name__}, not an object")
        model_type = data.get("model_type")
        tgr_keys = {"base_model_name_or_path", "temperature_heads", "temperature_conf_threshold", "gsoT_enabled"}
        if isinstance(model_type, str) and model_type != cls.model_type and not tgr_keys & data.keys():
            # e.g. a base model's own folder given as the TGR model (seed-era dumps have TGR fields)
            raise CheckpointError(f"{path!r} is the config of a {model_type!r} model, not of a saved TGR model: "
                                  f"a base model is TGRConfig.base_model_name_or_path (tgr: --model)")
        try:
            return cls.from_dict(data, **overrides)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"the TGR config {path!r} is damaged: {_one_line(err)}") from None

    @classmethod
    def _check_overrides(cls, overrides: dict[str, Any]) -> None:
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise ValueError(f"unknown TGRConfig field(s): {', '.join(unknown)}; "
                             f"known fields: {', '.join(sorted(cls.tgr_field_names()))}")

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> str:
        """Write ``config.json`` into ``save_directory`` (created if needed); return its path."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        return os.path.join(os.fspath(save_directory), CONFIG_NAME)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        token: str | bool | None = None, cache_dir: str | None = None,
                        local_files_only: bool = False, **overrides) -> TGRConfig:
        """Read a config from a saved folder (``config.json``, or tgr 0.1's ``tgr_config.json``), a
        JSON file, or a hub repository; ``overrides`` replace fields.

        Anything missing or damaged is a :class:`CheckpointError` with a one-line message.
        """
        cls._check_overrides(overrides)
        file = resolve_config_file(pretrained_model_name_or_path, revision=revision, token=token,
                                   cache_dir=cache_dir, local_files_only=local_files_only)
        config = cls.from_json_file(file, **overrides)
        config.name_or_path = os.fspath(pretrained_model_name_or_path)
        return config

    def copy(self, **overrides) -> TGRConfig:
        """A validated copy with some fields replaced."""
        values = {name: getattr(self, name) for name in self.tgr_field_names()}
        values["lora_target_modules"] = list(values["lora_target_modules"])
        if isinstance(values["tgr_layers"], list):
            values["tgr_layers"] = list(values["tgr_layers"])
        return self.from_dict(values, **overrides, name_or_path=self.name_or_path)


def looks_like_local_path(path: str) -> bool:
    """A name that can only be meant as a path on this machine (a hub id is ``owner/name``)."""
    return os.path.exists(path) or path.startswith((".", "/", "~", "\\")) or os.path.isabs(path) \
        or path.count("/") > 1 or os.sep != "/" and os.sep in path


def resolve_file(name_or_path: str | os.PathLike, filename: str, *, required: bool = True,
                 revision: str | None = None, token=None, cache_dir=None,
                 local_files_only: bool = False) -> str | None:
    """The local path of ``filename`` in a saved folder or hub repository ``name_or_path``.

    A missing folder or file (when ``required``) and a hub that cannot be reached are a
    :class:`CheckpointError` with a one-line message; a file that is not required and absent
    gives None.
    """
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if os.path.isfile(path):
            return path
        if required:
            raise CheckpointError(f"{path!r} does not exist: {name_or_path!r} is not a saved TGR model")
        return None
    if looks_like_local_path(name_or_path):
        raise CheckpointError(f"{name_or_path!r} does not exist (no such folder)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(name_or_path, filename, revision=revision, token=token, cache_dir=cache_dir,
                               local_files_only=local_files_only)
    except LocalEntryNotFoundError as err:  # offline (or local_files_only) and not in the cache
        if not required:
            return None
        raise CheckpointError(f"cannot fetch {filename} of {name_or_path!r} from the Hugging Face hub: "
                              f"{_one_line(err)}") from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"the hub repository {name_or_path!r} has no {filename}: "
                                  f"not a saved TGR model") from None
        return None
    except Exception as err:  # no network, unknown repository, no access, ...: one line, not a traceback
        raise CheckpointError(f"cannot fetch {filename} of {name_or_path!r} from the Hugging Face hub: "
                              f"{_one_line(err)}") from None


def resolve_config_file(name_or_path: str | os.PathLike, **hub_kwargs) -> str:
    """``config.json`` of a saved folder (or tgr 0.1's ``tgr_config.json``), a JSON file given
    directly, or ``config.json`` of a hub repository."""
    name_or_path = os.fspath(name_or_path)
    if os.path.isfile(name_or_path):
        return name_or_path
    if os.path.isdir(name_or_path):
        for name in (CONFIG_NAME, LEGACY_CONFIG_NAME):
            path = os.path.join(name_or_path, name)
            if os.path.isfile(path):
                return path
        raise CheckpointError(f"{os.path.join(name_or_path, CONFIG_NAME)!r} does not exist: "
                              f"{name_or_path!r} is not a saved TGR model")
    return resolve_file(name_or_path, CONFIG_NAME, **hub_kwargs)


AutoConfig.register(TGRConfig.model_type, TGRConfig, exist_ok=True)
