"""Tiny random Llama checkpoints with an offline tokenizer, for tests, demos and benchmarks.

:func:`build_tiny_llama` writes a folder that ``AutoModelForCausalLM`` / ``AutoTokenizer`` (and so
``TGRConfig(base_model_name_or_path=folder)``) load with no network: a ``LlamaForCausalLM`` with
random weights and a small BPE tokenizer trained on an embedded corpus with ``tokenizers``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

import torch

__all__ = ["build_tiny_llama", "build_tokenizer", "TINY_CORPUS"]

logger = logging.getLogger("tgr")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3

#: A small English corpus (written for this project) that the tiny tokenizer learns merges from.
TINY_CORPUS = """\
Q: What is the capital of France?
A: Paris is the capital and the largest city of France.
Q: When was the telephone invented?
A: The telephone was patented in 1876.
Q: How many legs does a spider have?
A: A spider has eight legs.
Q: What is water made of?
A: Water is made of hydrogen and oxygen.
Q: Who wrote the first dictionary of the English language?
A: Many people worked on early dictionaries; one famous dictionary appeared in 1755.
Q: Why is the sky blue?
A: Air scatters blue light from the sun more than red light.
Q: What does a temperature mechanism do?
A: It gives every token a temperature between zero and one.
Q: How does guided reasoning work?
A: Hot tokens guide the attention, and cold tokens are pruned.
The quick brown fox jumps over the lazy dog.
A model reads the question, thinks step by step, and writes the answer.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Rivers flow into the sea; mountains rise above the clouds.
The train leaves the station at nine in the morning and arrives at noon.
"""


def build_tokenizer(vocab_size: int = 256, corpus: Iterable[str] | None = None):
    """A ``PreTrainedTokenizerFast``: BPE over Metaspace words, BOS prepended, trained offline.

    Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<unk>`` 3 (unknown
    characters). The vocabulary may come out smaller than ``vocab_size`` on a small corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = list(corpus) if corpus is not None else TINY_CORPUS.splitlines()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )


def build_tiny_llama(
    path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    with_tokenizer: bool = True,
) -> str:
    """Write a random ``LlamaForCausalLM`` (safetensors) and its tokenizer into ``path``.

    The model's vocabulary is the tokenizer's (at most ``vocab_size``); pad/BOS/EOS are 0/1/2.
    Weights are drawn from a private RNG seeded with ``seed`` (the global RNG is untouched), so
    the same arguments give the same checkpoint. Returns the folder's path.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, corpus)
    n_vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    if with_tokenizer:
        tokenizer.save_pretrained(path)
    logger.info("wrote a tiny Llama (hidden %d, %d layers, vocab %d) to %s", hidden_size, num_hidden_layers,
                n_vocab, path)
    return path
