"""Generation from the TGR head's logits, incremental.

The seed generated with the base model alone, so the trained TGR head was never used. Here each
new token comes from ``lm_head(TGR-head(h))``. The TGR attention of the newest token needs the
final hidden states of every token so far (its keys and values), so generation keeps two caches:

- the base's KV cache (a ``DynamicCache``): each step runs the base on the new token only;
- ``hidden``: the base's final hidden states so far, ``[B, capacity, H]``: room for the prompt and
  up to 256 new tokens, doubled when full (memory follows the tokens generated, not
  ``max_new_tokens``, which is an upper bound that EOS usually cuts short).

Each step then costs one base step plus one TGR-attention row (a query of length 1 against the
``S`` cached keys). Only the newest token's logits are needed, and the newest token sees every
earlier (non-padding) token both with ``causal=True`` (bottom-right aligned) and in the seed's
non-causal mode, so incremental decoding equals recomputing the full forward at every step
(``use_cache=False`` does exactly that, as a check).

Batched prompts may be padded on either side: positions come from the attention mask
(``cumsum − 1``) and padding is masked out of both the base's and the TGR head's attention.
"""
from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList
from transformers.utils import ModelOutput

from .data import check_int

__all__ = ["generate", "TGRGenerateOutput", "TGRDecodeState"]

logger = logging.getLogger("tgr")


@dataclass
class TGRGenerateOutput(ModelOutput):
    """Returned by ``generate(..., output_scores=True)``.

    sequences: ``[B, S + n]`` prompt and new tokens.
    scores: n tensors ``[B, V]``: the processed scores each token was chosen from.
    logits: n tensors ``[B, V]``: the TGR head's raw logits at each step (float32).
    """

    sequences: torch.LongTensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class TGRDecodeState:
    """The caches of incremental decoding.

    base_cache: the base's KV cache. hidden: ``[B, capacity, H]`` final hidden states, the first
    ``length`` valid (it grows as needed). positions: ``[B, 1]`` the position id of the last token
    of each row.
    """

    base_cache: object
    hidden: torch.Tensor
    length: int
    positions: torch.Tensor


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 0/1 mask: real tokens count 0, 1, 2, ... whatever the padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _at_last_real(t: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``t [B, S, ...]`` at each row's last real token, ``[B, ...]``: the last column with left
    padding, an earlier one with right padding (the token whose logits predict the first new token)."""
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).argmax(dim=-1)
    return t[torch.arange(t.shape[0], device=t.device), last.to(t.device)]


#: New tokens that the prefill makes room for in the hidden-state cache; past them it doubles.
_INITIAL_ROOM = 256


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int):
    """Run the prompt through the base (filling its KV cache) and the TGR head's last row.

    ``capacity``: the most tokens (prompt included) the sequences can reach; the hidden-state
    cache starts with room for at most :data:`_INITIAL_ROOM` new ones and grows as needed.
    Returns ``(logits [B, V] of each row's last real token, TGRDecodeState)``.
    """
    B, S = input_ids.shape
    positions = _positions(attention_mask)
    cache = model._new_base_cache()
    hidden = model._base_hidden(input_ids, attention_mask, positions, cache)
    buffer = hidden.new_empty((B, max(min(capacity, S + _INITIAL_ROOM), S), hidden.shape[-1]))
    buffer[:, :S] = hidden
    state = TGRDecodeState(cache, buffer, S, positions[:, -1:])
    return _last_logits(model, state, _at_last_real(hidden, attention_mask)[:, None], attention_mask), state


def decode_step(model, state: TGRDecodeState, next_tokens: torch.Tensor, attention_mask: torch.Tensor):
    """Append one token per row (``next_tokens [B]``; ``attention_mask`` covers it) and return the
    logits ``[B, V]`` for the token after it."""
    if state.length >= state.hidden.shape[1]:  # full: double it (amortized O(1) per token)
        grown = state.hidden.new_empty((state.hidden.shape[0], 2 * state.hidden.shape[1], state.hidden.shape[2]))
        grown[:, :state.length] = state.hidden[:, :state.length]
        state.hidden = grown
    state.positions = state.positions + 1
    hidden = model._base_hidden(next_tokens[:, None], attention_mask, state.positions, state.base_cache)
    state.hidden[:, state.length] = hidden[:, 0]
    state.length += 1
    return _last_logits(model, state, hidden, attention_mask)


def _last_logits(model, state: TGRDecodeState, query_hidden: torch.Tensor, attention_mask) -> torch.Tensor:
    y, _, _ = model.tgr_head(query_hidden, state.hidden[:, : state.length], attention_mask)
    return model.lm_head(y)[:, -1].float()


def _as_processor_list(logits_processor) -> LogitsProcessorList:
    if logits_processor is None:
        return LogitsProcessorList()
    if isinstance(logits_processor, LogitsProcessorList):
        return logits_processor
    if callable(logits_processor) and not isinstance(logits_processor, (list, tuple)):
        return LogitsProcessorList([logits_processor])
    processors = list(logits_processor)
    for p in processors:
        if not callable(p):
            raise TypeError(f"logits_processor entries must be callable (input_ids, scores) -> scores, got {p!r}")
    return LogitsProcessorList(processors)


def _sampling_warpers(temperature, top_k, top_p) -> LogitsProcessorList:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def _token_ids(value, name: str) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a token id, a list of token ids or None, got {value!r}")


def _safe_argmax(scores: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(scores, nan=-math.inf).argmax(dim=-1)


def _sample(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Multinomial sampling that never fails: NaN counts as probability 0, and a row with no
    finite score falls back to greedy."""
    # NaN -> -inf before the softmax: one NaN would otherwise make the whole row's softmax NaN
    # (and the row greedy), not just that token's probability 0.
    probs = torch.softmax(torch.nan_to_num(scores.float(), nan=-math.inf), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    dead = probs.sum(dim=-1) <= 0
    if bool(dead.any()):
        probs[dead] = torch.nn.functional.one_hot(_safe_argmax(scores[dead]), probs.shape[-1]).to(probs.dtype)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# What generate() does when neither its arguments nor a GenerationConfig say otherwise.
_DEFAULTS = {"max_new_tokens": 20, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": None}


# GenerationConfig fields that change what HF's generate does and that this loop does not
# implement, with the values that leave them off: a config that sets one is refused, not ignored.
_UNSUPPORTED = {
    "num_beams": (1, None), "num_beam_groups": (1, None), "num_return_sequences": (1, None),
    "penalty_alpha": (None,), "diversity_penalty": (0.0, None), "repetition_penalty": (1.0, None),
    "encoder_repetition_penalty": (1.0, None), "no_repeat_ngram_size": (0, None),
    "encoder_no_repeat_ngram_size": (0, None), "min_length": (0, None), "min_new_tokens": (0, None),
    "bad_words_ids": (None,), "force_words_ids": (None,), "sequence_bias": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "typical_p": (1.0, None), "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None), "min_p": (None, 0.0),
    "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0), "renormalize_logits": (False, None),
    "top_h": (None,), "watermarking_config": (None,), "dola_layers": (None,), "constraints": (None,),
    "token_healing": (False, None), "stop_strings": (None,), "max_time": (None,),
    "remove_invalid_values": (False, None), "output_attentions": (False, None), "output_hidden_states": (False, None),
}


def _check_supported(generation_config) -> None:
    """Refuse a GenerationConfig that asks for what this loop does not do (beam search, penalties, ...)."""
    unsupported = [f"{name}={getattr(generation_config, name)!r}" for name, off in _UNSUPPORTED.items()
                   if getattr(generation_config, name, None) not in off]
    if unsupported:
        raise ValueError(f"generate does not implement {', '.join(unsupported)} of the GenerationConfig (it decodes "
                         f"greedily or samples with temperature, top-k and top-p, and stops at EOS or max_new_tokens); "
                         f"pass a rule on the logits as an HF logits processor in logits_processor=, or unset it")


def _settings(generation_config, **given) -> dict:
    """The sampling settings: each given argument, else the GenerationConfig's value, else the default."""
    out = {}
    for name, value in given.items():
        if value is None and generation_config is not None:
            value = getattr(generation_config, name, None)
        out[name] = _DEFAULTS[name] if value is None else value
    return out


def _check_number(name, value, ok: Callable[[float], bool], want: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be {want}, got {value!r}")


def check_generation_settings(*, max_new_tokens, do_sample: bool, temperature, top_p, top_k) -> None:
    """Raise ``ValueError`` naming the first invalid setting of :func:`generate` (the sampling ones
    only matter, and are only checked, when ``do_sample``)."""
    check_int("max_new_tokens", max_new_tokens, 0, "an integer >= 0")
    if do_sample:
        _check_number("temperature", temperature, lambda v: v > 0, "a positive number")
        _check_number("top_p", top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        if top_k is not None:
            check_int("top_k", top_k, 0, "None or an integer >= 0")


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    generation_config=None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    logits_processor: LogitsProcessorList | Sequence[Callable] | Callable | None = None,
    eos_token_id: int | Iterable[int] | None = None,
    pad_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    output_scores: bool | None = None,
):
    """Generate up to ``max_new_tokens`` tokens per prompt from the TGR head's logits.

    Args:
        model: a :class:`tgr.TGRLlamaModel`.
        generation_config: an HF ``GenerationConfig`` (or None): its ``max_new_tokens`` (else
            its ``max_length``, prompt included, when it sets one), ``do_sample``, ``temperature``,
            ``top_k``, ``top_p``, ``eos_token_id`` and ``pad_token_id`` are the defaults of the
            arguments below, which override them when given. One that asks for what this loop
            does not do (beam search, repetition penalties, ...) is a ``ValueError``. Without
            it the defaults are 20 new tokens, greedy, temperature 1, no top-k/top-p, and the
            model's generation config's EOS and padding.
        input_ids: ``[B, S]`` prompts; ``attention_mask`` ``[B, S]`` 0/1 marks padding (left
            padding is the usual choice for batched prompts; any side works). Every prompt needs
            at least one real token.
        max_new_tokens: how many tokens to add at most.
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) or decode greedily.
        temperature, top_k, top_p: HF's sampling warpers, applied after ``logits_processor``
            when ``do_sample``; ``top_k`` None or 0 and ``top_p`` 1.0 turn them off.
        logits_processor: HF logits processors (a ``LogitsProcessorList``, a list of callables
            ``(input_ids, scores) -> scores``, or one), applied first, in both modes, to float32
            scores, with ``input_ids`` the whole sequence so far. :class:`tgr.ClampLogits` is one.
        eos_token_id: id(s) that end a sequence; None = the base's generation config; ``[]`` =
            none. A finished sequence is filled with ``pad_token_id`` (default: the generation
            config's pad token, else the first EOS id, else 0; one outside the vocabulary is a
            ``ValueError``); generation stops early when every sequence has finished.
        use_cache: incremental decoding (default). False recomputes the full forward for every
            new token: slow, for checking.
        generator: a ``torch.Generator`` for reproducible sampling.
        output_scores: return a :class:`TGRGenerateOutput` with the per-step scores and raw logits
            (None: as the GenerationConfig's ``return_dict_in_generate``, else False).

    Returns:
        ``[B, S + n]`` token ids (prompt, then the n <= max_new_tokens new tokens), or a
        :class:`TGRGenerateOutput` when ``output_scores``.

    Sampling never hits a device-side assert: NaN scores count as probability 0 and a row with
    no finite score falls back to greedy. To clamp extreme logits too, pass ``ClampLogits()``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor [B, S], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: every prompt needs at least one token")
    if generation_config is not None:
        from transformers import GenerationConfig

        if not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers GenerationConfig or None, got "
                            f"{type(generation_config).__name__}")
        _check_supported(generation_config)
    if (max_new_tokens is None and generation_config is not None and generation_config.max_new_tokens is None
            and "max_length" in generation_config.to_diff_dict()):
        # As HF's generate: a config's max_length counts the prompt (max_new_tokens wins when set),
        # and one that leaves no room for a new token is an error, not an empty generation.
        if generation_config.max_length <= input_ids.shape[1]:
            raise ValueError(f"the GenerationConfig's max_length={generation_config.max_length} counts the prompt, "
                             f"which has {input_ids.shape[1]} tokens: no room for a new one (set max_new_tokens)")
        max_new_tokens = generation_config.max_length - input_ids.shape[1]
    if output_scores is None:  # as HF: a config's return_dict_in_generate asks for the output object
        output_scores = bool(generation_config is not None and generation_config.return_dict_in_generate)
    settings = _settings(generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature, top_p=top_p, top_k=top_k)
    max_new_tokens, do_sample = settings["max_new_tokens"], settings["do_sample"]
    temperature, top_p, top_k = settings["temperature"], settings["top_p"], settings["top_k"]
    check_generation_settings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                              top_p=top_p, top_k=top_k)

    device = model.device
    input_ids = input_ids.to(device)
    B, S = input_ids.shape
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and S + max_new_tokens > positions:
        logger.warning("prompts of %d tokens plus %d new tokens go past the base's %d positions "
                       "(max_position_embeddings): the tokens beyond them are out of its training range",
                       S, max_new_tokens, positions)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a tensor [B, S] (or None), got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != (B, S):
            raise ValueError(f"attention_mask must have the shape of input_ids {(B, S)}, "
                             f"got {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if not bool(attention_mask.any(dim=-1).all()):
            raise ValueError("every prompt needs at least one real token (a row of attention_mask is all 0)")

    gen_config = model.generation_config
    if generation_config is not None:
        if eos_token_id is None:
            eos_token_id = generation_config.eos_token_id
        if pad_token_id is None:
            pad_token_id = generation_config.pad_token_id
    if eos_token_id is None and gen_config is not None:
        eos_token_id = gen_config.eos_token_id
    eos_ids = _token_ids(eos_token_id, "eos_token_id")
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None) if gen_config is not None else None
        if pad_token_id is None:
            pad_token_id = eos_ids[0] if eos_ids else 0
    if eos_ids:  # a finished row is filled with the pad token, which is then fed to the model
        embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
        vocab = getattr(embeddings, "num_embeddings", None)
        try:
            pad = None if isinstance(pad_token_id, bool) else operator.index(pad_token_id)  # numpy ints too
        except TypeError:
            pad = None
        if pad is None or pad < 0 or (vocab is not None and pad >= vocab):
            raise ValueError(f"pad_token_id must be a token id in [0, {vocab}) (finished sequences are filled with "
                             f"it and it is fed to the model), got {pad_token_id!r}")
        pad_token_id = pad
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None

    processors = _as_processor_list(logits_processor)
    warpers = _sampling_warpers(temperature, top_k, top_p) if do_sample else LogitsProcessorList()

    tokens, mask = input_ids, attention_mask
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    all_scores, all_logits = [], []
    state = None
    for _ in range(max_new_tokens):
        if not use_cache:
            out = model(tokens, attention_mask=mask, position_ids=_positions(mask))
            logits = _at_last_real(out.logits, mask).float()
        elif state is None:
            logits, state = prefill(model, tokens, mask, S + max_new_tokens)
        else:
            logits = decode_step(model, state, tokens[:, -1], mask)

        scores = processors(tokens, logits.clone())
        if do_sample:
            scores = warpers(tokens, scores)
            next_tokens = _sample(scores, generator)
        else:
            next_tokens = _safe_argmax(scores)
        if output_scores:
            all_scores.append(scores)
            all_logits.append(logits)
        if eos is not None:
            next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones((B, 1))], dim=-1)
        if eos is not None:
            unfinished &= ~torch.isin(next_tokens, eos)
            if not bool(unfinished.any()):
                break

    if output_scores:
        return TGRGenerateOutput(sequences=tokens, scores=tuple(all_scores), logits=tuple(all_logits))
    return tokens
