"""Build the embedded demo base model: a small Llama trained from scratch on the project's sample.

``tgr demo`` needs a real (if tiny) causal LM that runs offline. This script reproduces the one
committed under ``tgr/resources/demo-llama``: a BPE tokenizer and a 4-layer Llama (hidden 128)
trained as a plain language model on the sample's sentences and on the "Q: ...\\nA: ..." pairs of
its training questions (the held-out questions' pairs are never seen). Deterministic on a CPU.

    python scripts/build_demo_model.py [--out tgr/resources/demo-llama] [--steps 1500]
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tgr._tiny import build_tokenizer
from tgr.data import answer_text, load_wikiqa, prompt_text, split_by_question

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tgr", "resources", "demo-llama")


def corpus(rows, train_rows):
    sentences = sorted({r["answer"] for r in rows})
    pairs = [prompt_text(r["question"]) + answer_text(r["answer"]) for r in train_rows if r["label"] == 1]
    return sentences, pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    rows = load_wikiqa(None)
    train_rows, _ = split_by_question(rows)
    sentences, pairs = corpus(rows, train_rows)
    tokenizer = build_tokenizer(vocab_size=768, corpus=sentences + pairs + [r["question"] for r in rows])
    texts = sentences + pairs * 3  # the QA format matters most: see it more often
    encoded = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for t in texts]

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    start = time.time()
    model.train()
    for step in range(args.steps):
        batch = random.sample(encoded, min(args.batch_size, len(encoded)))
        longest = max(map(len, batch))
        ids = torch.full((len(batch), longest), tokenizer.pad_token_id)
        labels = torch.full((len(batch), longest), -100)
        for i, seq in enumerate(batch):
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, :len(seq)] = torch.tensor(seq)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"vocab {len(tokenizer)}")


if __name__ == "__main__":
    main()
