"""WikiQA answer-sentence selection: rank each question's candidates by the model's conditional
log-likelihood ``log p(answer | "Q: <question>\\nA:")`` and report MAP and MRR.

The prompt and the answer are tokenized separately, so the answer's tokens are exactly those
scored, whatever the tokenizer does at the boundary. Any model can be scored through a
``logits_fn(input_ids, attention_mask) -> logits [B, S, V]``, or, without the logits, through a
``log_probs_fn(input_ids, attention_mask) -> log p(input_ids[:, 1:]) [B, S − 1]``. A
``log_probs_fn`` that takes a ``scored`` keyword is given the answers' positions, the only ones
read, so that it can leave the prompts and the padding out of its lm_head (as
:meth:`tgr.TGRLlamaModel.target_log_probs` does). :func:`evaluate_heads` scores the TGR head and the
base model's own head with the same protocol, in one pass, through
:meth:`tgr.TGRLlamaModel.heads_target_log_probs` (the fused ``tgr_kernels.linear_log_probs``: the
``[B, S, V]`` logits never exist whole).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import DataError, RankingGroup, answer_text, check_int, fit_pair, prompt_ids, ranking_groups

logger = logging.getLogger("tgr")

#: The most tokens of a (prompt, answer) pair that are scored (see :func:`encode_pair`).
MAX_LENGTH = 256

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(input_ids [B, S], attention_mask [B, S]) -> log p(input_ids[:, s + 1] | prefix) [B, S − 1]``;
#: optionally a keyword ``scored`` (bool ``[B, S − 1]``): only those positions are read.
LogProbsFn = Callable[..., torch.Tensor]


def average_precision(ranked_labels: Sequence[int]) -> float:
    """Mean of precision@k over the ranks k of the correct items (0 when there is none)."""
    hits, total = 0, 0.0
    for k, label in enumerate(ranked_labels, start=1):
        if label:
            hits += 1
            total += hits / k
    return total / hits if hits else 0.0


def reciprocal_rank(ranked_labels: Sequence[int]) -> float:
    for k, label in enumerate(ranked_labels, start=1):
        if label:
            return 1.0 / k
    return 0.0


@dataclass
class RankingResult:
    map: float
    mrr: float
    questions: int
    candidates: int

    def as_dict(self) -> dict[str, float]:
        return {"map": self.map, "mrr": self.mrr, "questions": self.questions, "candidates": self.candidates}


def encode_pair(tokenizer, question: str, answer: str, max_length: int):
    """(ids, number of prompt tokens): BOS + prompt + answer in at most ``max_length`` tokens.

    A pair that does not fit loses the start of its question first (the BOS stays, and the end of
    the question next to the answer): the whole answer is scored as long as it fits beside the BOS
    or one prompt token. Only an answer longer than that loses its end."""
    ids, n_prompt, _, _ = _encode_pair(tokenizer, question, answer, max_length)
    return ids, n_prompt


def _encode_pair(tokenizer, question: str, answer: str, max_length: int):
    """:func:`encode_pair`, and whether it cut the question and the answer."""
    bos, question_ids = prompt_ids(tokenizer, question)
    answer_ids = tokenizer(answer_text(answer), add_special_tokens=False)["input_ids"]
    prompt, kept_answer = fit_pair(bos, question_ids, answer_ids, max_length)
    return (prompt + kept_answer, len(prompt), len(prompt) < len(bos) + len(question_ids),
            len(kept_answer) < len(answer_ids))


def _target_log_probs_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log p(ids[:, s + 1])`` from logits ``[B, S, V]``: ``[B, S − 1]`` fp32."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logprobs.gather(-1, ids[:, 1:].to(logprobs.device).unsqueeze(-1)).squeeze(-1)


def _takes_scored(log_probs_fn: LogProbsFn) -> bool:
    """Whether ``log_probs_fn`` names a ``scored`` parameter that can be passed by keyword."""
    try:
        parameters = inspect.signature(log_probs_fn).parameters
    except (TypeError, ValueError):  # a builtin or an object without a signature
        return False
    scored = parameters.get("scored")
    return scored is not None and scored.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY)


#: ``(input_ids, attention_mask, scored) -> {name: log p(input_ids[:, 1:]) [B, S − 1]}``: one or more
#: models' next-token log-probabilities for a batch (``scored``: the positions read).
_BatchLogProbs = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict]


@torch.no_grad()
def answer_log_likelihoods(logits_fn: LogitsFn | None, tokenizer, pairs: Sequence[tuple], *,
                           log_probs_fn: LogProbsFn | None = None, batch_size: int = 8, max_length: int = MAX_LENGTH,
                           device="cpu", per_token: bool = False, progress: bool = False) -> list[float]:
    """``log p(answer | prompt)`` for each (question, answer) pair (or its per-token mean);
    ``progress`` shows a progress bar (WikiQA's test split has thousands of candidates).

    The model is ``logits_fn`` (its ``[B, S, V]`` logits) or ``log_probs_fn`` (the log-probabilities
    of the next tokens, e.g. :meth:`tgr.TGRLlamaModel.target_log_probs`: no logits); give one.
    A ``log_probs_fn`` with a ``scored`` parameter gets ``scored=`` the bool ``[B, S − 1]`` of the
    answer tokens' positions, the only ones read."""
    if (logits_fn is None) == (log_probs_fn is None):
        raise ValueError("give exactly one of logits_fn and log_probs_fn")
    pass_scored = log_probs_fn is not None and _takes_scored(log_probs_fn)

    def batch_log_probs(ids, mask, scored):
        if logits_fn is not None:
            return {"": _target_log_probs_from_logits(logits_fn(ids, mask), ids)}
        return {"": log_probs_fn(ids, mask, scored=scored) if pass_scored else log_probs_fn(ids, mask)}

    return _answer_scores(batch_log_probs, tokenizer, pairs, batch_size=batch_size, max_length=max_length,
                          device=device, per_token=per_token, progress=progress).get("", [])


def _answer_scores(batch_log_probs: _BatchLogProbs, tokenizer, pairs: Sequence[tuple], *, batch_size: int,
                   max_length: int, device, per_token: bool, progress: bool) -> dict[str, list[float]]:
    """:func:`answer_log_likelihoods` of each model that ``batch_log_probs`` scores: ``{name: scores}``."""
    check_int("batch_size", batch_size, 1, "a positive integer")
    check_int("max_length", max_length, 2, "an integer >= 2 (a prompt token and an answer token)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [_encode_pair(tokenizer, q, a, max_length) for q, a in pairs]
    _warn_truncated(encoded, max_length)
    scores: dict[str, list[float]] = {}
    # Longest first: batches of similar lengths waste little padding.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    for start in tqdm(range(0, len(order), batch_size), desc="scoring candidates", unit="batch",
                      disable=not progress):
        idx = order[start:start + batch_size]
        longest = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        scored = torch.zeros((len(idx), longest - 1), dtype=torch.bool)
        for row, i in enumerate(idx):
            seq, n_prompt = encoded[i][:2]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            scored[row, n_prompt - 1:len(seq) - 1] = True
        per_model = batch_log_probs(ids.to(device), mask.to(device), scored.to(device))
        for name, token_lp in per_model.items():
            token_lp = token_lp.float().cpu()
            model_scores = scores.setdefault(name, [0.0] * len(encoded))
            for row, i in enumerate(idx):
                seq, n_prompt = encoded[i][:2]
                answer_lp = token_lp[row, n_prompt - 1:len(seq) - 1]
                total = answer_lp.sum().item()
                model_scores[i] = total / max(1, answer_lp.numel()) if per_token else total
    return scores


def _warn_truncated(encoded: Sequence[tuple], max_length: int) -> None:
    """Log how many pairs did not fit ``max_length`` (see :func:`encode_pair`)."""
    cut = sum(1 for _, _, cut_question, cut_answer in encoded if cut_question or cut_answer)
    cut_answers = sum(1 for _, _, _, cut_answer in encoded if cut_answer)
    if cut:
        logger.warning("%d of %d question-answer pairs are longer than %d tokens: the start of their question is "
                       "left out; %d of them are answers longer than that, of which the first %d tokens are scored",
                       cut, len(encoded), max_length, cut_answers, max_length - 1)


def evaluate_ranking(logits_fn: LogitsFn | None, tokenizer, groups: Sequence[RankingGroup],
                     **kwargs) -> RankingResult:
    """MAP and MRR over the groups that have a correct candidate (the others are left out, neither
    scored nor counted, as :func:`tgr.data.ranking_groups` leaves them out); the model is
    ``logits_fn`` or ``log_probs_fn=`` (see :func:`answer_log_likelihoods`)."""
    groups = [g for g in groups if any(g.labels)]
    pairs = [(g.question, a) for g in groups for a in g.answers]
    return _ranking(groups, answer_log_likelihoods(logits_fn, tokenizer, pairs, **kwargs))


def _ranking(groups: Sequence[RankingGroup], scores: Sequence[float]) -> RankingResult:
    """MAP and MRR of the groups from their candidates' scores (in the groups' order)."""
    not_a_number = sum(1 for x in scores if math.isnan(x))
    if not_a_number:
        logger.warning("%d of %d candidates scored NaN (the model's log-probabilities are not finite): they are "
                       "ranked last, below every other candidate of their question", not_a_number, len(scores))
    aps, rrs, offset = [], [], 0
    for g in groups:
        s = [-math.inf if math.isnan(x) else x for x in scores[offset:offset + len(g.answers)]]
        offset += len(g.answers)
        # Ties are broken against the correct answer, so a constant model scores as badly as possible.
        # (A NaN would compare neither above nor below anything: its place would be its row's.)
        ranked = [label for _, label in sorted(zip(s, g.labels, strict=True), key=lambda x: (-x[0], x[1]))]
        aps.append(average_precision(ranked))
        rrs.append(reciprocal_rank(ranked))
    n = max(1, len(groups))
    return RankingResult(sum(aps) / n, sum(rrs) / n, len(groups), len(scores))


def _base_logits(model, ids, mask):
    """The base's own logits: with every-layer TGR applied to the base, run as unpatched, and with
    LoRA, without its adapters (what ``model.target_log_probs(ids, mask, head="base")`` scores)."""
    from .layers import base_only

    block = model._base_only() if callable(getattr(model, "_base_only", None)) else base_only(
        getattr(model, "hf_base_model", model.base_model))
    with block:
        return model.base_model(input_ids=ids, attention_mask=mask).logits


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` inside the block; after it, every submodule in the mode it was in before (a
    model in training stays so, and so does a part of it that was kept in eval mode, such as a frozen
    base). An object that is no ``nn.Module`` goes back to train mode if it was training."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    modes = [m.training for m in modules]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        yield model
    finally:
        if modules:
            for module, training in zip(modules, modes, strict=True):
                module.training = training
        elif was_training:
            model.train()


def evaluate_heads(model, tokenizer, rows: Sequence[dict], *, batch_size: int = 8,
                   progress: bool = False) -> dict[str, dict[str, float]]:
    """MAP and MRR of a TGR model's head and of its base's own head, with the same protocol, over
    the questions of ``rows`` (WikiQA rows) that have a correct candidate. Both are scored in one
    pass over the candidates by :meth:`tgr.TGRLlamaModel.heads_target_log_probs` (the base runs
    once for both heads when it has no TGR layers or LoRA) from the final hidden states and the lm_head's
    weight, the answers' tokens only: the ``[B, S, V]`` logits are never built.

    Returns ``{"tgr_head": {...}, "base_head": {...}}`` (see :meth:`RankingResult.as_dict`). The
    model is scored in eval mode (the GSoT gate hard, no dropout) and left in the mode it was in.
    """
    groups = ranking_groups(rows)
    if not groups:
        raise DataError("no question in the data has a correct (label 1) candidate: nothing to rank")
    pairs = [(g.question, a) for g in groups for a in g.answers]
    # A model in training stays so (its GSoT gate and dropout as they were), module by module.
    with eval_mode(model), torch.no_grad():
        scores = _answer_scores(lambda ids, mask, scored: model.heads_target_log_probs(ids, mask, scored=scored),
                                tokenizer, pairs, batch_size=batch_size, max_length=MAX_LENGTH,
                                device=model.device, per_token=False, progress=progress)
    return {"tgr_head": _ranking(groups, scores["tgr"]).as_dict(),
            "base_head": _ranking(groups, scores["base"]).as_dict()}
