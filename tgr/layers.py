"""Every-layer TGR: temperature-guided attention inside the decoder layers of a Hugging Face model.

:func:`apply_tgr` turns an already-loaded causal LM (Llama, Mistral, Qwen2, ...: any model whose
attention modules call transformers' ``AttentionInterface``) into a TGR model in place, and
:func:`remove_tgr` undoes it. No modeling code is copied: a ``"tgr"`` attention function is
registered with ``AttentionInterface`` (and sdpa's mask builder under the same name with
``AttentionMaskInterface``), and the model's own attention modules call it.

Each patched layer ``ℓ`` owns a :class:`tgr_kernels.TemperatureMechanism` (fp32 weights, T
temperature heads) applied to the hidden states ``x`` entering that layer's attention::

    t = clamp(sigmoid(x Wᵀ + b), t_min, t_max)                      [B, S, T]
    t̄_i = mean_T(t_i)
    S_ij = (t̄_i / t_init) · scaling · q_i·k_j + m_ij                  (per head, after RoPE)
    Y_i = g(t̄_i) · softmax_j(S_i) V                                   (GSoT)

with the GSoT gate ``g`` of ``gsot_mode``: the seed's ``1[t̄ ≥ τ]`` ("hard", no gradient), the same
forward with a sigmoid's slope ``σ'((t̄ − τ)/ε)/ε`` in the backward ("straight_through"), or
``σ((t̄ − τ)/ε)`` in both passes ("soft"). A module in eval mode always gates hard.

Identity at start: ``W = 0`` and ``b = logit(t_init)`` give ``t = t_init`` for every token, so
the multiplier ``t̄ / t_init`` is exactly 1 and, with ``τ ≤ t_init``, no row is pruned: a freshly
patched model computes what the unpatched one does (except with the "soft" gate in train mode,
which scales every row by ``σ((t_init − τ)/ε)``, 0.88 at the defaults). (The seed's raw multiplier ``t̄`` would halve
every layer's logits of a pretrained model at ``t_init = 0.5``.) The kernels receive the
temperature ``t / t_init``, the threshold ``τ / t_init`` and the width ``ε / t_init`` (the gate
of ``t̄ / t_init`` against ``τ / t_init`` is then the gate of ``t̄`` against ``τ``, slope included).

The mechanism's input reaches the attention function through the module: a forward pre-hook on
the attention module computes the temperatures from its ``hidden_states`` and leaves them on the
module, where the ``"tgr"`` attention function, which sees only q, k and v, picks them up.
Layers that are not patched go through sdpa's attention function (the mask is sdpa's).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.weak import WeakIdKeyDictionary

from tgr_kernels import TemperatureMechanism, temperature_guided_attention

from .config import DEFAULT_GSOT_MODE, DEFAULT_GSOT_WIDTH, GSOT_MODES

__all__ = ["apply_tgr", "remove_tgr", "is_tgr_applied", "tgr_layer_modules", "tgr_layer_settings",
           "collect_layer_temperatures", "tgr_layers_disabled", "set_layer_backend", "set_layer_gate",
           "ATTENTION_NAME", "MECHANISM_NAME", "TGRLayerSettings", "GSOT_MODES"]

#: The name of the attention implementation (``config._attn_implementation``) of a patched model.
ATTENTION_NAME = "tgr"
#: The child module of each patched attention module that holds its temperature mechanism.
MECHANISM_NAME = "temperature_mechanism"

_BACKENDS = ("auto", "triton", "torch", "reference")
# Attributes apply_tgr sets on a patched attention module (and remove_tgr deletes).
_OPTIONS_ATTR = "_tgr_options"
_PENDING_ATTR = "_tgr_pending_temperature"
# The attribute of the model that records the patch (None when it is not patched).
_STATE_ATTR = "_tgr_layers_state"


@dataclass(frozen=True)
class TGRLayerSettings:
    """What :func:`apply_tgr` was asked for (``model.tgr_layer_settings`` of a patched model)."""

    layers: tuple[int, ...]
    temperature_heads: int
    clamp: tuple[float, float]
    gsot_threshold: float | None
    initial_temperature: float
    backend: str
    gsot_mode: str = DEFAULT_GSOT_MODE
    gsot_width: float = DEFAULT_GSOT_WIDTH


@dataclass
class _PatchState:
    settings: TGRLayerSettings
    original_attn_implementation: str | None
    attention_modules: list[nn.Module]
    hooks: list[Any] = field(default_factory=list)
    # While collect_layer_temperatures is active: every patched layer's temperatures, in call order.
    collector: list[torch.Tensor] | None = None
    # False inside tgr_layers_disabled: the model runs as the unpatched one.
    enabled: bool = True
    # Activation checkpointing: whether the layers were on in each checkpointed forward, keyed by
    # that forward's rotary embeddings, which every layer's recomputation receives again.
    checkpointed_modes: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    # Per recomputed attention call: the mode to restore after it (None: it did not switch).
    recompute_restores: list = field(default_factory=list)


@dataclass(frozen=True)
class _LayerOptions:
    initial_temperature: float
    gsot_threshold: float | None
    backend: str
    gsot_mode: str = DEFAULT_GSOT_MODE
    gsot_width: float = DEFAULT_GSOT_WIDTH


# ----------------------------------------------------------------------------------------------
# Registration with transformers
# ----------------------------------------------------------------------------------------------


def _register() -> None:
    """Register the ``"tgr"`` attention function and mask builder (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, tgr_attention_forward)
    # The op takes what sdpa's builder makes: a 4-D bool mask, or None when causality alone
    # (or nothing) masks.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def tgr_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """The ``"tgr"`` attention function (transformers' ``AttentionInterface`` signature).

    q ``[B, H_q, S_q, D]``, k/v ``[B, H_kv, S_k, D]`` (after RoPE and the cache update), the mask
    from sdpa's builder (4-D bool, true = attend; or a 4-D additive float mask passed by the
    caller; or None, then ``is_causal``). Returns ``([B, S_q, H_q, D], None)``. A module without a
    temperature mechanism (a layer left unpatched) runs sdpa's attention function.
    """
    options: _LayerOptions | None = getattr(module, _OPTIONS_ATTR, None)
    if options is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    temperature = module.__dict__.pop(_PENDING_ATTR, None)
    if temperature is None:
        raise RuntimeError(
            f"TGR attention of layer {getattr(module, 'layer_idx', '?')}: no temperature was computed for this "
            f"call; the attention module must be called through its forward (its pre-hook computes them)"
        )
    if dropout:
        raise ValueError(f"TGR attention has no attention dropout, got dropout={dropout}; set the model's "
                         f"attention_dropout to 0")
    if kwargs.get("softcap") is not None:
        raise ValueError("TGR attention does not support logit soft-capping (softcap)")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("TGR attention does not support attention sinks (s_aux / sinks)")
    if kwargs.get("output_attentions", False):
        raise ValueError("TGR attention does not return attention weights (output_attentions=True)")
    H_q, H_kv = query.shape[1], key.shape[1]
    if H_q % H_kv:
        raise ValueError(f"TGR attention needs the query heads to be a multiple of the key/value heads, "
                         f"got {H_q} and {H_kv}")
    # Grouped k/v go to the op as they come: query head h reads kv head h // (H_q / H_kv) in
    # place (transformers' repeat_kv order), and dK/dV come back summed over each group.

    q_length, kv_length = query.shape[2], key.shape[2]
    causal = False
    mask = attention_mask
    if mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if causal and 1 < q_length < kv_length:
            # sdpa's builder leaves the mask out here only for a prefill into an empty
            # pre-allocated cache: the queries are the first q_length positions (top-left), and
            # the keys after them are unfilled slots.
            key, value = key[:, :, :q_length], value[:, :, :q_length]
    elif mask.shape[-1] != kv_length:
        mask = mask[..., :kv_length]

    t_init = options.initial_temperature
    # The kernel sees t̄ / t_init: threshold and width scale with it, so the gate (and its slope
    # in t̄) is the one asked for in temperature units.
    threshold = None if options.gsot_threshold is None else options.gsot_threshold / t_init
    # The gate stays hard at inference: the learning gates are for training only.
    gsot_mode = options.gsot_mode if module.training else "hard"
    # Divided in fp32 (fp64 kept): a bf16/fp16 mechanism's t / t_init rounded to its dtype would
    # move rows across the threshold (GSoT decides on the fp32 mean, as ``layer_gsot_mask`` does).
    temperature = temperature.to(device=query.device, dtype=torch.promote_types(temperature.dtype, torch.float32))
    out = temperature_guided_attention(
        query, key, value, temperature / t_init, mask, causal=causal, gsot_threshold=threshold,
        scale=scaling, backend=options.backend, gsot_mode=gsot_mode, gsot_width=options.gsot_width / t_init,
    )
    return out.transpose(1, 2).contiguous(), None


def _stash_temperatures(state: _PatchState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a patched attention module: the temperatures of its input, left on the
    module for :func:`tgr_attention_forward` (which sees only q, k and v), and handed to the
    collector of :func:`collect_layer_temperatures` when one is active."""
    if not state.enabled:
        return
    hidden = kwargs.get("hidden_states")
    if hidden is None:
        if not args:
            raise RuntimeError(f"TGR attention of layer {getattr(module, 'layer_idx', '?')}: the attention module "
                               f"was called without hidden_states")
        hidden = args[0]
    mechanism = getattr(module, MECHANISM_NAME)
    temperatures = mechanism(hidden.to(mechanism.proj.weight.device))
    module.__dict__[_PENDING_ATTR] = temperatures
    # Not the recomputation of activation checkpointing, which runs inside the backward (the
    # autograd engine's graph task): that forward was collected when it first ran. (A compiled
    # forward recomputes in its own graph, without this hook; dynamo folds is_compiling().)
    if state.collector is not None and (torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1):
        state.collector.append(temperatures)


_AMBIGUOUS = "ambiguous"  # a forward key seen with the layers on and off


def _forward_key(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """What an attention call's recomputation receives again from its checkpointed forward: the
    cos of the rotary embeddings, made once per forward of the model (None without them)."""
    embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    if isinstance(embeddings, (tuple, list)) and embeddings and isinstance(embeddings[0], torch.Tensor):
        return embeddings[0]
    return None


def _set_enabled(model: nn.Module, state: _PatchState, enabled: bool) -> None:
    state.enabled = enabled
    name = ATTENTION_NAME if enabled else state.original_attn_implementation
    if name is not None:
        model.set_attn_implementation(name)


def _recompute_as_it_ran(state: _PatchState, model_ref, layer: nn.Module, module: nn.Module, args: tuple,
                         kwargs: dict) -> None:
    """Forward pre-hook of every decoder layer's attention (before the temperatures' hook).

    Activation checkpointing recomputes a layer's forward inside the backward. A forward made
    inside :func:`tgr_layers_disabled` whose backward runs after the block (or the other way
    round) would be recomputed in the other mode: other saved tensors, a CheckpointError. So a
    checkpointed forward records the mode it ran in, and its recomputation switches to that mode
    for the attention call (:func:`_restore_after_recompute` switches back). A layer that is not
    checkpointing (inference, generation) returns at once."""
    if not getattr(layer, "gradient_checkpointing", False) or torch.compiler.is_compiling():
        return
    key = _forward_key(args, kwargs)
    if torch._C._current_graph_task_id() == -1:  # a forward, not the backward's recomputation
        if key is not None and layer.training and torch.is_grad_enabled():
            seen = state.checkpointed_modes.get(key)
            state.checkpointed_modes[key] = state.enabled if seen in (None, state.enabled) else _AMBIGUOUS
        return
    mode = state.checkpointed_modes.get(key) if key is not None else None
    if isinstance(mode, str):
        raise RuntimeError("TGR layers: activation checkpointing recomputes a forward whose rotary embeddings "
                           "were passed to two forwards, one inside tgr_layers_disabled and one outside; pass "
                           "each forward its own, or turn checkpointing off")
    switch = mode is not None and mode != state.enabled
    state.recompute_restores.append(state.enabled if switch else None)
    if switch:
        _set_enabled(model_ref(), state, mode)


def _restore_after_recompute(state: _PatchState, model_ref, layer: nn.Module, module: nn.Module, args: tuple,
                             kwargs: dict, output) -> None:
    """Forward hook (always called) paired with :func:`_recompute_as_it_ran`."""
    if not getattr(layer, "gradient_checkpointing", False) or torch.compiler.is_compiling() \
            or torch._C._current_graph_task_id() == -1:
        return
    if state.recompute_restores:
        restore = state.recompute_restores.pop()
        if restore is not None:
            _set_enabled(model_ref(), state, restore)


# ----------------------------------------------------------------------------------------------
# Finding the attention modules and checking the arguments
# ----------------------------------------------------------------------------------------------


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers`` for Llama)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"apply_tgr: model must be a transformers PreTrainedModel (a causal LM such as "
                        f"LlamaForCausalLM), got {type(model).__name__}")
    if isinstance(getattr(model, "hf_base_model", None), nn.Module):  # a TGRLlamaModel
        raise TypeError("apply_tgr: a TGRLlamaModel gets its TGR layers from its config (TGRConfig(tgr_mode='layers' "
                        "or 'both', tgr_layers=...)), not from apply_tgr")
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(f"apply_tgr: {type(model).__name__}'s attention does not go through transformers' "
                        f"AttentionInterface, so a 'tgr' attention cannot be plugged in")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"apply_tgr: cannot find the decoder layers of {type(model).__name__} "
                        f"(expected model.get_decoder().layers)")
    return layers


def _attention_module(layer: nn.Module, index: int) -> nn.Module:
    attn = getattr(layer, "self_attn", None)
    if not isinstance(attn, nn.Module) or not hasattr(attn, "scaling") or not hasattr(attn, "config"):
        raise TypeError(f"apply_tgr: decoder layer {index} has no attention module (self_attn) that calls "
                        f"transformers' AttentionInterface")
    return attn


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_settings(n_layers: int, layers, temperature_heads, clamp, gsot_threshold, initial_temperature,
                    backend, gsot_mode=DEFAULT_GSOT_MODE, gsot_width=DEFAULT_GSOT_WIDTH) -> TGRLayerSettings:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"apply_tgr: layers must be 'all' or a list of layer indices, got {layers!r}")
        chosen = tuple(range(n_layers))
    elif isinstance(layers, Sequence) and layers and all(isinstance(i, int) and not isinstance(i, bool)
                                                         for i in layers):
        if any(not 0 <= i < n_layers for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"apply_tgr: layers must be distinct indices in [0, {n_layers}), got {list(layers)}")
        chosen = tuple(sorted(layers))
    else:
        raise ValueError(f"apply_tgr: layers must be 'all' or a non-empty list of layer indices, got {layers!r}")
    if not (isinstance(temperature_heads, int) and not isinstance(temperature_heads, bool) and temperature_heads >= 1):
        raise ValueError(f"apply_tgr: temperature_heads must be an integer >= 1, got {temperature_heads!r}")
    if not (isinstance(clamp, Sequence) and len(clamp) == 2 and all(_is_number(c) for c in clamp)
            and 0.0 <= clamp[0] <= clamp[1] <= 1.0):
        raise ValueError(f"apply_tgr: clamp must be (min, max) with 0 <= min <= max <= 1, got {clamp!r}")
    if not (_is_number(initial_temperature) and 0.0 < initial_temperature < 1.0):
        raise ValueError(f"apply_tgr: initial_temperature must be a number in (0, 1), got {initial_temperature!r}")
    if not clamp[0] <= initial_temperature <= clamp[1]:
        raise ValueError(f"apply_tgr: initial_temperature={initial_temperature} must lie in the clamp range "
                         f"{tuple(clamp)}, or a freshly patched model would not start as the unpatched one")
    if gsot_threshold is not None:
        if not _is_number(gsot_threshold):
            raise ValueError(f"apply_tgr: gsot_threshold must be a number or None, got {gsot_threshold!r}")
        if gsot_threshold > initial_temperature:
            raise ValueError(f"apply_tgr: gsot_threshold={gsot_threshold} must be <= initial_temperature="
                             f"{initial_temperature}, or a freshly patched model would prune every token")
    if backend not in _BACKENDS:
        raise ValueError(f"apply_tgr: backend must be one of {_BACKENDS}, got {backend!r}")
    if gsot_mode not in GSOT_MODES:
        raise ValueError(f"apply_tgr: gsot_mode must be one of {GSOT_MODES}, got {gsot_mode!r}")
    if not (_is_number(gsot_width) and gsot_width > 0):
        raise ValueError(f"apply_tgr: gsot_width must be a positive finite number, got {gsot_width!r}")
    return TGRLayerSettings(chosen, temperature_heads, (float(clamp[0]), float(clamp[1])),
                            None if gsot_threshold is None else float(gsot_threshold), float(initial_temperature),
                            backend, gsot_mode, float(gsot_width))


def _check_heads(attn: nn.Module, index: int) -> None:
    config = attn.config
    n_q = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    if not (isinstance(n_q, int) and isinstance(n_kv, int) and n_kv > 0 and n_q % n_kv == 0):
        raise ValueError(f"apply_tgr: layer {index} has {n_q} query heads and {n_kv} key/value heads; grouped-query "
                         f"attention needs the query heads to be a multiple of the key/value heads")
    dropout = getattr(attn, "attention_dropout", 0.0) or 0.0
    if dropout:
        raise ValueError(f"apply_tgr: layer {index} has attention_dropout={dropout}; TGR attention has no "
                         f"attention dropout (set config.attention_dropout = 0 before applying)")
    # What such attention adds to the softmax, the "tgr" function would drop: refused, not ignored.
    if getattr(attn, "sinks", None) is not None:
        raise ValueError(f"apply_tgr: layer {index} has attention sinks (GPT-OSS style); TGR attention has none")
    if getattr(attn, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"apply_tgr: layer {index} soft-caps its attention logits (attn_logit_softcapping="
                         f"{attn.attn_logit_softcapping}); TGR attention does not")
    # Multi-head latent attention (DeepSeek-V2/V3 and their kin) reads values narrower than its
    # queries and keys; the op takes one head size for q, k and v.
    qk_dim, v_dim = getattr(attn, "qk_head_dim", None), getattr(attn, "v_head_dim", None)
    if isinstance(qk_dim, int) and isinstance(v_dim, int) and qk_dim != v_dim:
        raise ValueError(f"apply_tgr: layer {index} has value heads of size {v_dim} and query/key heads of size "
                         f"{qk_dim} (multi-head latent attention); TGR attention needs one head size for all three")


def _module_device(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return torch.device("cpu") if param.device.type == "meta" else param.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# The public functions
# ----------------------------------------------------------------------------------------------


def _patched_model(model: nn.Module) -> nn.Module:
    """Where the TGR layers of ``model`` are: a :class:`tgr.TGRLlamaModel` stands for its base."""
    base = getattr(model, "hf_base_model", None)
    if getattr(model, _STATE_ATTR, None) is None and isinstance(base, nn.Module):
        return base
    return model


def is_tgr_applied(model: nn.Module) -> bool:
    """Whether :func:`apply_tgr` patched ``model`` (and :func:`remove_tgr` has not undone it); for a
    :class:`tgr.TGRLlamaModel`, whether its base has TGR layers."""
    return getattr(_patched_model(model), _STATE_ATTR, None) is not None


def tgr_layer_modules(model: nn.Module) -> dict[int, TemperatureMechanism]:
    """The temperature mechanisms of a patched model (or of a :class:`tgr.TGRLlamaModel`'s base),
    by layer index."""
    state = getattr(_patched_model(model), _STATE_ATTR, None)
    if state is None:
        return {}
    return {i: getattr(attn, MECHANISM_NAME) for i, attn in zip(state.settings.layers, state.attention_modules,
                                                                   strict=True)}


def _checked(model: nn.Module, layers, **options) -> tuple[TGRLayerSettings, list[nn.Module]]:
    """What :func:`apply_tgr` checks before it changes anything (``options``: its keyword
    arguments): the settings and the attention modules to patch."""
    layer_list = _decoder_layers(model)
    if is_tgr_applied(model):
        raise ValueError("apply_tgr: the model already has TGR layers; call tgr.remove_tgr(model) first")
    settings = _check_settings(len(layer_list), layers, **options)
    modules = [_attention_module(layer_list[i], i) for i in settings.layers]
    for i, attn in zip(settings.layers, modules, strict=True):
        if hasattr(attn, MECHANISM_NAME):
            raise ValueError(f"apply_tgr: the attention module of layer {i} already has a {MECHANISM_NAME}")
        _check_heads(attn, i)
    return settings, modules


def apply_tgr(model: nn.Module, layers: str | Sequence[int] = "all", *, temperature_heads: int = 8,
              clamp: tuple[float, float] = (0.01, 0.99), gsot_threshold: float | None = 0.4,
              initial_temperature: float = 0.5, backend: str = "auto", gsot_mode: str = DEFAULT_GSOT_MODE,
              gsot_width: float = DEFAULT_GSOT_WIDTH) -> nn.Module:
    """Put temperature-guided attention into the decoder layers of a loaded causal LM, in place.

    Each chosen layer's attention module gets a ``temperature_mechanism`` (a
    :class:`tgr_kernels.TemperatureMechanism` with fp32 weights, on the layer's device) fed the
    hidden states entering that attention; its mean temperature ``t̄`` scales the layer's logits by
    ``t̄ / initial_temperature`` and GSoT zeroes the attention output of rows with
    ``t̄ < gsot_threshold``. The projection starts at weight 0 and bias
    ``logit(initial_temperature)``: every temperature is ``initial_temperature``, the multiplier
    is 1 and nothing is pruned, so the patched model starts as the unpatched one (in train mode
    with ``gsot_mode="soft"``, every row is scaled by ``σ((t_init − τ)/ε)`` instead).

    Args:
        model: a transformers causal LM (``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ...; 4-bit or not) whose attention goes through
            ``AttentionInterface``. Its parameters are left as they are (freeze them yourself);
            the new mechanisms are trainable.
        layers: "all", or a list of decoder layer indices.
        temperature_heads: T, temperatures per token.
        clamp: ``(min, max)`` of the temperatures; must contain ``initial_temperature``.
        gsot_threshold: τ, in temperature units (``≤ initial_temperature``); None: no GSoT.
        initial_temperature: ``t_init`` in (0, 1), the temperature every token starts at.
        backend: the kernels' backend ("auto", "triton", "torch", "reference").
        gsot_mode: how the GSoT gate trains: "hard" (the seed's, no gradient), "straight_through"
            (hard forward, sigmoid slope in the backward) or "soft" (sigmoid in both passes).
            Modules in eval mode gate hard whatever the mode.
        gsot_width: ε > 0 of the learning gates, in temperature units.

    Returns ``model``. Errors (a model whose attention does not go through the interface, a
    model already patched, query heads not a multiple of the key/value heads, attention sinks,
    logit soft-capping, value heads of another size than the query heads, a bad option) are a
    ``TypeError`` or ``ValueError`` raised before anything changes.
    """
    settings, modules = _checked(model, layers, temperature_heads=temperature_heads, clamp=clamp,
                                 gsot_threshold=gsot_threshold, initial_temperature=initial_temperature,
                                 backend=backend, gsot_mode=gsot_mode, gsot_width=gsot_width)
    hidden_size = model.config.hidden_size if hasattr(model.config, "hidden_size") else None
    if not isinstance(hidden_size, int):
        hidden_size = model.get_input_embeddings().weight.shape[-1]

    _register()
    state = _PatchState(settings, model.config._attn_implementation, modules)
    options = _LayerOptions(settings.initial_temperature, settings.gsot_threshold, settings.backend,
                            settings.gsot_mode, settings.gsot_width)
    bias = math.log(settings.initial_temperature / (1.0 - settings.initial_temperature))
    try:
        for attn in modules:
            mechanism = TemperatureMechanism(hidden_size, settings.temperature_heads, clamp_min=settings.clamp[0],
                                             clamp_max=settings.clamp[1], backend=settings.backend)
            with torch.no_grad():
                mechanism.proj.weight.zero_()
                mechanism.proj.bias.fill_(bias)
            attn.add_module(MECHANISM_NAME, mechanism.to(device=_module_device(attn), dtype=torch.float32))
            setattr(attn, _OPTIONS_ATTR, options)
            state.hooks.append(attn.register_forward_pre_hook(functools.partial(_stash_temperatures, state),
                                                              with_kwargs=True))
        model_ref = weakref.ref(model)
        for layer in _decoder_layers(model):
            attn = getattr(layer, "self_attn", None)
            if isinstance(attn, nn.Module):
                state.hooks.append(attn.register_forward_pre_hook(
                    functools.partial(_recompute_as_it_ran, state, model_ref, layer), with_kwargs=True, prepend=True))
                state.hooks.append(attn.register_forward_hook(
                    functools.partial(_restore_after_recompute, state, model_ref, layer), with_kwargs=True,
                    always_call=True))
        model.set_attn_implementation(ATTENTION_NAME)
    except BaseException:
        _undo(model, state)  # whatever failed (out of memory, say), the model is left as it was
        raise
    setattr(model, _STATE_ATTR, state)
    return model


def _undo(model: nn.Module, state: _PatchState) -> None:
    for hook in state.hooks:
        hook.remove()
    for attn in state.attention_modules:
        for name in (MECHANISM_NAME, _OPTIONS_ATTR, _PENDING_ATTR):
            attn.__dict__.get("_modules", {}).pop(name, None)
            attn.__dict__.pop(name, None)
    if model.config._attn_implementation != state.original_attn_implementation \
            and state.original_attn_implementation is not None:
        model.set_attn_implementation(state.original_attn_implementation)


def tgr_layer_settings(model: nn.Module) -> TGRLayerSettings | None:
    """What :func:`apply_tgr` was called with on ``model`` (or on a :class:`tgr.TGRLlamaModel`'s
    base); None when it is not patched."""
    state = getattr(_patched_model(model), _STATE_ATTR, None)
    return None if state is None else state.settings


@contextmanager
def collect_layer_temperatures(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, the temperatures ``[B, S_q, T]`` (fp32, with their autograd graph) of
    every patched layer that runs are appended to the list it yields, in call order (layer
    order for one forward). For the regularizer of a training loss and for statistics; the
    temperatures that activation checkpointing recomputes in the backward are not collected."""
    state: _PatchState | None = getattr(_patched_model(model), _STATE_ATTR, None)
    if state is None:
        raise ValueError("collect_layer_temperatures: the model has no TGR layers (call tgr.apply_tgr first)")
    collected: list[torch.Tensor] = []
    previous, state.collector = state.collector, collected
    try:
        yield collected
    finally:
        state.collector = previous


@contextmanager
def tgr_layers_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, a patched model runs as the unpatched one (its original attention
    implementation, no temperatures): the base's own scores beside the TGR layers', without
    removing and re-creating the mechanisms. ``model`` may be a :class:`tgr.TGRLlamaModel`
    (its base's layers). Under activation checkpointing (``use_reentrant=False``) a forward is
    recomputed in the mode it ran in, wherever its backward runs."""
    patched = _patched_model(model)
    state: _PatchState | None = getattr(patched, _STATE_ATTR, None)
    if state is None:
        raise ValueError("tgr_layers_disabled: the model has no TGR layers (call tgr.apply_tgr first)")
    if not state.enabled:  # nested
        yield model
        return
    state.enabled = False
    if state.original_attn_implementation is not None:
        patched.set_attn_implementation(state.original_attn_implementation)
    try:
        yield model
    finally:
        state.enabled = True
        if getattr(patched, _STATE_ATTR, None) is state:  # not removed by remove_tgr within the block
            patched.set_attn_implementation(ATTENTION_NAME)


def base_only(model: nn.Module):
    """:func:`tgr_layers_disabled` when ``model`` has TGR layers, else a block that changes
    nothing: the base's own model either way."""
    return tgr_layers_disabled(model) if is_tgr_applied(_patched_model(model)) else nullcontext(model)


def set_layer_backend(model: nn.Module, backend: str) -> None:
    """Switch the kernels' backend of every TGR layer of ``model`` ("auto", "triton", "torch",
    "reference"), projection and attention, in place."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("set_layer_backend: the model has no TGR layers (call tgr.apply_tgr first)")
    if backend not in _BACKENDS:
        raise ValueError(f"set_layer_backend: backend must be one of {_BACKENDS}, got {backend!r}")
    for attn in state.attention_modules:
        getattr(attn, MECHANISM_NAME).backend = backend
        setattr(attn, _OPTIONS_ATTR, dataclasses.replace(getattr(attn, _OPTIONS_ATTR), backend=backend))
    state.settings = dataclasses.replace(state.settings, backend=backend)


def set_layer_gate(model: nn.Module, *, gsot_threshold: float | None, gsot_mode: str | None = None,
                   gsot_width: float | None = None) -> None:
    """Switch the GSoT gate of every TGR layer of ``model`` in place: the threshold τ (None: no
    pruning), the training-time mode and the learning gates' width, as :func:`apply_tgr` takes them;
    a mode or width not given keeps the layers' current one."""
    state: _PatchState | None = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError("set_layer_gate: the model has no TGR layers (call tgr.apply_tgr first)")
    current = state.settings
    gsot_mode = current.gsot_mode if gsot_mode is None else gsot_mode
    gsot_width = current.gsot_width if gsot_width is None else gsot_width
    settings = _check_settings(max(current.layers) + 1, list(current.layers), current.temperature_heads,
                               current.clamp, gsot_threshold, current.initial_temperature, current.backend,
                               gsot_mode, gsot_width)
    for attn in state.attention_modules:
        setattr(attn, _OPTIONS_ATTR, dataclasses.replace(
            getattr(attn, _OPTIONS_ATTR), gsot_threshold=settings.gsot_threshold, gsot_mode=settings.gsot_mode,
            gsot_width=settings.gsot_width))
    state.settings = settings


def remove_tgr(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tgr`: the temperature mechanisms and hooks are removed and the model's
    original attention implementation restored; its outputs are again the unpatched model's.
    Returns ``model``. A model that is not patched is a ``ValueError``.

    A :class:`tgr.TGRLlamaModel` in ``tgr_mode="both"`` loses its base's TGR layers and becomes the
    head-only model (its config's ``tgr_mode`` becomes "head", so it saves and loads as one); in
    mode "layers", which has no head, that would leave no TGR at all: a ``ValueError`` (run it
    without them inside :func:`tgr_layers_disabled`)."""
    patched = _patched_model(model)
    state: _PatchState | None = getattr(patched, _STATE_ATTR, None)
    if state is None:
        raise ValueError("remove_tgr: the model has no TGR layers (apply_tgr was not called on it, or they were "
                         "removed already)")
    if patched is not model:  # a TGRLlamaModel: its config records the layers, and must follow
        model._remove_tgr_layers()
        return model
    _undo(model, state)
    del model.__dict__[_STATE_ATTR]
    return model
