"""The pipeline's steps as library functions, and the arguments ``tgr train`` adds to
``TrainingArguments``.

- :class:`TGRArguments`: the base model, the data, the TGR head and its LoRA adapters, for a
  training run (``HfArgumentParser((TGRArguments, TrainingArguments))`` is ``tgr train``'s parser).
- :func:`generate_answers`: batched answers to questions through the TGR head.

Training is :func:`tgr.train.train`, evaluation :func:`tgr.evaluation.evaluate_heads`. This module
imports only the standard library at import time, so the ``tgr`` command's help does not need the
model extra.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["TGRArguments", "SEED_SAMPLING", "generate_answers", "tgr_mode_fields", "gsot_fields", "TGR_LAYERS_HELP",
           "TGR_MODE_HELP", "GSOT_MODE_HELP", "GSOT_WIDTH_HELP"]

#: The seed's sampling settings.
SEED_SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=50)


TGR_LAYERS_HELP = ("decoder layers of the base that get temperature-guided attention: none (the TGR head only), "
                   "all, or indices such as 0,2,5")
TGR_MODE_HELP = ("where TGR acts: head (the seed's head on the final hidden state), layers (the chosen decoder "
                 "layers; the logits are the base's own) or both (default: head with --tgr-layers none, else "
                 "layers)")

GSOT_MODE_HELP = ("how the GSoT gate trains: hard (the seed's: no gradient, a pruned token stays pruned), "
                  "straight_through (hard forward, sigmoid slope in the backward) or soft (sigmoid in both passes); "
                  "evaluation and generation always gate hard (default: TGRConfig's, straight_through)")
GSOT_WIDTH_HELP = ("width ε > 0 of the straight_through and soft gates, in temperature units "
                   "(default: TGRConfig's, 0.05)")


def gsot_fields(gsot_mode: str | None, gsot_width: float | None) -> dict[str, object]:
    """``TGRConfig``'s ``gsot_mode`` and ``gsot_width`` from ``--gsot-mode`` / ``--gsot-width``;
    a flag left out (None) keeps the config's default."""
    return {name: value for name, value in (("gsot_mode", gsot_mode), ("gsot_width", gsot_width))
            if value is not None}


def tgr_mode_fields(tgr_layers: str, tgr_mode: str | None) -> dict[str, object]:
    """``TGRConfig``'s ``tgr_mode`` and ``tgr_layers`` from the flags ``--tgr-layers`` (none, all or
    a comma-separated list of indices) and ``--tgr-mode``; a ``ValueError`` naming the flag when
    they do not fit together."""
    text = str(tgr_layers).strip().lower()
    if text == "none":
        layers = None
    elif text == "all":
        layers = "all"
    else:
        try:
            layers = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(f"--tgr-layers must be none, all or layer indices such as 0,2,5, "
                             f"got {tgr_layers!r}") from None
    if tgr_mode is None:
        tgr_mode = "head" if layers is None else "layers"
    if tgr_mode not in ("head", "layers", "both"):
        raise ValueError(f"--tgr-mode must be head, layers or both, got {tgr_mode!r}")
    if tgr_mode == "head":
        if layers is not None:
            raise ValueError(f"--tgr-layers {tgr_layers} needs --tgr-mode layers or both, not head")
        return {"tgr_mode": "head"}
    if layers is None:
        raise ValueError(f"--tgr-mode {tgr_mode} needs --tgr-layers (all, or indices such as 0,2,5)")
    return {"tgr_mode": tgr_mode, "tgr_layers": layers}


def _flag(help: str, **kwargs):
    return field(metadata={"help": help}, **kwargs)


@dataclass
class TGRArguments:
    """tgr's arguments of a training run, beside ``transformers.TrainingArguments``."""

    _argument_group_name = "tgr: base model, data, TGR head and LoRA"

    model: str | None = _flag("base model: hub name (e.g. meta-llama/Llama-2-7b-hf) or local folder "
                              "(default: the embedded demo Llama)", default=None)
    data: str | None = _flag("WikiQA: hub dataset (e.g. microsoft/wiki_qa) or a local .jsonl/.json/.csv/.tsv/"
                             ".parquet file or folder in its schema (default: the project's sample)", default=None)
    split: str = _flag("dataset split to train on", default="train")
    device: str | None = _flag("cpu, cuda or cuda:N (default: CUDA when present)", default=None)
    backend: Literal["auto", "triton", "torch", "reference"] = _flag(
        "TGR attention implementation (auto = Triton on CUDA, PyTorch elsewhere)", default="auto")
    no_4bit: bool = _flag("load the base unquantized instead of 4-bit NF4", default=False)
    max_length: int = _flag("tokens per example", default=192)
    mask_prompt: bool = _flag("train on the answer tokens only", default=False)
    overwrite: bool = _flag("replace an existing --output_dir instead of refusing it (a folder with "
                            "checkpoints is resumed without it)", default=False)
    quiet: bool = _flag("warnings only, no progress bars", default=False)
    # The TGR head of a new model.
    temperature_heads: int = _flag("temperatures per token (seed demo: 4)", default=4)
    gsot_threshold: float = _flag("GSoT threshold", default=0.4)
    no_gsot: bool = _flag("disable GSoT pruning", default=False)
    gsot_mode: Literal["hard", "straight_through", "soft"] | None = _flag(GSOT_MODE_HELP, default=None)
    gsot_width: float | None = _flag(GSOT_WIDTH_HELP, default=None)
    seed_attention: bool = _flag("non-causal TGR attention, exactly the seed's (default: causal)", default=False)
    num_tgr_heads: int = _flag("TGR attention heads (1 = the seed's one wide head)", default=1)
    # TGR inside the base's decoder layers.
    tgr_layers: str = _flag(TGR_LAYERS_HELP, default="none")
    tgr_mode: Literal["head", "layers", "both"] | None = _flag(TGR_MODE_HELP, default=None)
    # LoRA adapters on the base (TGRConfig's lora fields).
    lora_r: int = _flag("rank of LoRA adapters on the base; 0 trains the TGR head only", default=0)
    lora_alpha: float = _flag("LoRA alpha", default=16.0)
    lora_dropout: float = _flag("LoRA dropout", default=0.0)
    lora_target_modules: list[str] = _flag("base modules that get LoRA adapters",
                                           default_factory=lambda: ["q_proj", "v_proj"])


def generate_answers(model, tokenizer, questions: list[str], *, greedy: bool = False, max_new_tokens: int = 50,
                     temperature: float = 0.7, top_p: float = 0.9, top_k: int | None = None,
                     seed: int = 0, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Answers to ``questions`` (each prompted as ``"Q: <question>\\nA:"``), generated through the
    TGR head with the seed's ``ClampLogits`` in left-padded batches of ``batch_size`` questions
    (``progress``: a progress bar over them); sampling by default (the seed's temperature and
    top-p), ``greedy`` for greedy decoding. A prompt is encoded as training and evaluation encode
    it: the BOS, then the prompt's tokens (none of the other special tokens the tokenizer's own
    template may add, such as a trailing EOS). A tokenizer without a pad token pads with its EOS;
    the tokenizer is left as it was given."""
    import torch
    from tqdm.auto import tqdm

    from .data import check_int, prompt_ids
    from .evaluation import eval_mode
    from .processors import ClampLogits

    check_int("batch_size", batch_size, 1, "a positive integer")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad the batched questions with")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [sum(prompt_ids(tokenizer, q), []) for q in questions]
    generator = torch.Generator(device=model.device).manual_seed(seed)
    answers = []
    with eval_mode(model):  # generation gates hard; a model in training is given back in training
        for start in tqdm(range(0, len(encoded), batch_size), desc="generating", unit="batch", disable=not progress):
            batch = encoded[start:start + batch_size]
            longest = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, ids in enumerate(batch):  # left padding
                input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, longest - len(ids):] = 1
            out = model.generate(
                input_ids.to(model.device), attention_mask.to(model.device),
                max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature, top_p=top_p,
                top_k=top_k, logits_processor=[ClampLogits(-50.0, 50.0)], eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad, generator=generator,
            )
            answers += [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in out[:, longest:]]
    return answers
