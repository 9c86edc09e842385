"""The implementations being compared ("providers"), each built for one case of one op.

A provider is ``available(case) -> None | reason`` and ``build(case) -> fn``, where ``fn(x)``
maps one set of inputs (:class:`benchmarks.cases.Inputs`) to the op's output. Everything a
model would do once per batch rather than per call (turning the padding mask into the form the
provider's API wants, building a block mask, compiling) happens in ``build`` or in the first
call, outside the timed region, for every provider alike.

Attention (the same q, k, v, temperature ``[B, S, T]`` and key-padding mask for all):

    eager-seed      the seed's ``temperature_guided_attention``, copied verbatim below, computing in
                    the input dtype with the seed's additive ``(1 - mask) * -1e4`` mask, then the
                    seed's GSoT gate (``hidden * (t̄ >= τ)``). The seed has no causal mask: with
                    ``causal`` the same additive form carries the causal part too.
    torch-compile   ``torch.compile(eager-seed, dynamic=False)``: inductor's best on static shapes
                    (``--compile dynamic``: ``dynamic=True``, one graph for every S, compiled once:
                    what fits a GPU run's time budget; FlexAttention stays static).
    sdpa-prescaled  ``F.scaled_dot_product_attention(t̄ ∘ q, k, v, seed mask)``, then the gate
                    (scaling row i's logits by t̄_i is scaling q_i).
    flex-score-mod  ``torch.compile(flex_attention)`` with ``score_mod = score · t̄[b, q_idx]``;
                    padding and causality as a block mask (its ``mask_mod``); then the gate.
    tgr-torch       ``tgr_kernels.temperature_guided_attention(..., backend="torch")``.
    tgr-triton      the same with ``backend="triton"`` (CUDA; on a CPU only under Triton's
                    interpreter, whose speed means nothing: n/a unless asked for).

Grouped-query attention (``attention-gqa``, ``attention-decode``: k and v with fewer heads than
q). The seed's code has none: eager-seed and torch-compile first expand k and v to the query
heads with Hugging Face's ``repeat_kv`` (what transformers' eager Llama attention does), a copy;
sdpa-prescaled passes ``enable_gqa=True`` and flex-score-mod ``enable_gqa=True``, which read
each k/v head in place; tgr-torch and tgr-triton take the grouped k and v as they are (on a GPU,
tgr-triton's decode runs the split-KV kernels). Decode (one query row against a cache) has no
causal part: the row sees every key.

Temperature projection: eager-seed (the seed's ``TemperatureMechanism.forward``: Linear, sigmoid,
clamp, in the input dtype), torch-compile of it, tgr-torch and tgr-triton
(``tgr_kernels.temperature_projection``). SDPA and FlexAttention do not apply.
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgr_kernels import temperature_guided_attention, temperature_projection

# The seed's TGRConfig: temperature_conf_threshold and the clamp of TemperatureMechanism.
GSOT_THRESHOLD = 0.4
CLAMP_MIN, CLAMP_MAX = 0.01, 0.99


# ----------------------------------------------------------------------------- the seed's code
def seed_temperature_guided_attention(query, key, value, temperature, attn_mask=None):
    """The seed's function body, verbatim (tgr-seed.md, "Temperature Mechanism & Attention")."""
    B, num_heads, seq_len, d_k = query.shape
    if temperature.size(-1) > 1:
        temp_mean = temperature.mean(dim=-1)  # [B, seq_len]
    else:
        temp_mean = temperature.squeeze(-1)   # [B, seq_len]

    temp_mean = temp_mean.unsqueeze(1).unsqueeze(-1)  # [B, 1, seq_len, 1]
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(d_k)
    scores = scores * temp_mean

    if attn_mask is not None:
        scores += attn_mask

    attn_probs = F.softmax(scores, dim=-1)
    context = torch.matmul(attn_probs, value)
    return context, attn_probs


def seed_gsot(context, temperature, threshold=GSOT_THRESHOLD):
    """The seed's GSoT block (TGRLlamaModel.forward), on ``[B, H, S, D]`` (the seed has H = 1)."""
    token_temp_avg = temperature.mean(dim=-1)
    confident_mask = (token_temp_avg >= threshold).float()
    confident_mask = confident_mask.unsqueeze(-1).to(context.dtype)
    return context * confident_mask.unsqueeze(1)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' ``repeat_kv`` (modeling_llama): ``[B, H_kv, S, D]`` -> ``[B, H_kv·n_rep, S, D]``,
    query head h reading k/v head h // n_rep."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def seed_attention_with_gate(q, k, v, temperature, attn_mask):
    # grouped-query attention: the seed's code wants every head, so k and v are repeated first
    group = q.shape[1] // k.shape[1]
    context, _ = seed_temperature_guided_attention(q, repeat_kv(k, group), repeat_kv(v, group), temperature,
                                                   attn_mask)
    return seed_gsot(context, temperature)


def seed_temperature_mechanism(hidden, weight, bias):
    """The seed's TemperatureMechanism.forward with its ``nn.Linear`` as ``F.linear``."""
    temp_logits = F.linear(hidden, weight, bias)
    temp_vals = torch.sigmoid(temp_logits)
    temp_vals = torch.clamp(temp_vals, CLAMP_MIN, CLAMP_MAX)
    return temp_vals


def seed_additive_mask(case) -> torch.Tensor | None:
    """The seed's ``(1 - mask) * -1e4`` in the input dtype, [B, 1, 1, S_k] (+ causal: [B, 1, S_q, S_k],
    bottom-right aligned: query i sees key j when j <= i + S_k - S_q)."""
    S_q, S_k = case.q_len, case.shape["seq_len"]
    mask = None
    if case.keep is not None:
        mask = (1.0 - case.keep.to(case.dtype)[:, None, None, :]) * -1e4
    if case.causal:
        above = torch.ones(S_q, S_k, device=case.device, dtype=torch.bool).triu(S_k - S_q + 1)
        causal = above.to(case.dtype) * -1e4
        mask = causal[None, None] if mask is None else mask + causal
    return None if mask is None else mask.to(case.dtype)


# ----------------------------------------------------------------------------- providers
@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable  # case -> fn(inputs) -> tensor
    available: Callable = lambda case: None  # case -> None, or the reason it cannot run


def _compiler_reason(case) -> str | None:
    if case.device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "torch.compile on CPU needs a C++ compiler (none on PATH)"
    return None


def _triton_reason(case) -> str | None:
    if case.device == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1" and case.allow_interpreter:
        return None
    return "Triton needs a GPU (on CPU only its interpreter runs: --triton-interpret)"


def _eager_attention(case):
    mask = seed_additive_mask(case)
    return lambda x: seed_attention_with_gate(x.q, x.k, x.v, x.temperature, mask)


def _compiled_attention(case):
    mask = seed_additive_mask(case)
    compiled = torch.compile(seed_attention_with_gate, dynamic=case.compile_dynamic)
    return lambda x: compiled(x.q, x.k, x.v, x.temperature, mask)


def _sdpa_attention(case):
    mask = seed_additive_mask(case)

    def run(x):
        t_bar = x.temperature.mean(dim=-1)
        q = x.q * t_bar[:, None, :, None].to(x.q.dtype)
        grouped = {"enable_gqa": True} if x.k.shape[1] != x.q.shape[1] else {}
        out = F.scaled_dot_product_attention(q, x.k, x.v, attn_mask=mask, **grouped)
        return seed_gsot(out, x.temperature)

    return run


def _flex_attention(case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Always static: with dynamic=True its kernels ran 5-20x slower (CPU, torch 2.13).
    flex = torch.compile(flex_attention, dynamic=False)
    B, S_q, S_k = case.shape["batch"], case.q_len, case.shape["seq_len"]
    keep, causal = case.keep, case.causal
    grouped = {"enable_gqa": True} if case.kv_heads != case.shape["heads"] else {}
    block_mask = None
    if keep is not None or causal:
        def mask_mod(b, h, q_idx, kv_idx):
            visible = keep[b, kv_idx] if keep is not None else kv_idx >= 0
            return visible & (kv_idx <= q_idx + (S_k - S_q)) if causal else visible

        block_mask = create_block_mask(mask_mod, B if keep is not None else None, None, S_q, S_k,
                                       device=case.device)

    def run(x):
        t_bar = x.temperature.mean(dim=-1)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score * t_bar[b, q_idx]

        out = flex(x.q, x.k, x.v, score_mod=score_mod, block_mask=block_mask, **grouped)
        return seed_gsot(out, x.temperature)

    return run


def _flex_reason(case) -> str | None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:
        return f"no FlexAttention in torch {torch.__version__} ({exc})"
    return _compiler_reason(case)


def _tgr_attention(backend):
    def build(case):
        keep, causal = case.keep, case.causal
        return lambda x: temperature_guided_attention(
            x.q, x.k, x.v, x.temperature, keep, causal=causal, gsot_threshold=GSOT_THRESHOLD,
            backend=backend)

    return build


ATTENTION_PROVIDERS: dict[str, Provider] = {p.name: p for p in [
    Provider("eager-seed", _eager_attention),
    Provider("torch-compile", _compiled_attention, _compiler_reason),
    Provider("sdpa-prescaled", _sdpa_attention),
    Provider("flex-score-mod", _flex_attention, _flex_reason),
    Provider("tgr-torch", _tgr_attention("torch")),
    Provider("tgr-triton", _tgr_attention("triton"), _triton_reason),
]}


def _eager_projection(case):
    return lambda x: seed_temperature_mechanism(x.hidden, x.weight, x.bias)


def _compiled_projection(case):
    compiled = torch.compile(seed_temperature_mechanism, dynamic=case.compile_dynamic)
    return lambda x: compiled(x.hidden, x.weight, x.bias)


def _tgr_projection(backend):
    def build(case):
        return lambda x: temperature_projection(x.hidden, x.weight, x.bias, CLAMP_MIN, CLAMP_MAX,
                                                backend=backend)

    return build


PROJECTION_PROVIDERS: dict[str, Provider] = {p.name: p for p in [
    Provider("eager-seed", _eager_projection),
    Provider("torch-compile", _compiled_projection, _compiler_reason),
    Provider("tgr-torch", _tgr_projection("torch")),
    Provider("tgr-triton", _tgr_projection("triton"), _triton_reason),
]}

# The e2e suite's every-layer rows (benchmarks/suite_e2e.py): a whole model, not an op.
MODEL_PROVIDERS = ["base-sdpa", "tgr-layers"]
ALL_PROVIDERS = list(ATTENTION_PROVIDERS) + MODEL_PROVIDERS  # every name, in table order
