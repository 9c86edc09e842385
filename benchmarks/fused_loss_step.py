"""A training step of the TGR model (forward with labels + backward) with the loss through the
logits and through the fused linear cross-entropy: time and extra peak memory, on this device.

    python -m benchmarks.fused_loss_step [--vocab 32000] [--hidden 512] [--tokens 1024] [--reps 5]
                                         [--dtype float32] [--masked-prompt 0.0]

The base is a random Llama built in a temporary folder (2 layers, unquantized, in ``--dtype``), the TGR
head in mode "head" with the torch backend; only the head trains (the base frozen, as tgr train
does). ``--masked-prompt F`` sets the labels of the first F of each sequence to -100, as ``tgr
train`` masks the question of a question-answer pair (the fused loss leaves those rows out of its
GEMMs). Prints one markdown row per variant.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.measure import peak_memory_mib


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_loss_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024, help="batch of 2 sequences of tokens / 2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the base's compute dtype")
    p.add_argument("--masked-prompt", type=float, default=0.0,
                   help="fraction of each sequence whose labels are -100 (default %(default)s)")
    args = p.parse_args(argv)
    if not 0.0 <= args.masked_prompt < 1.0:
        p.error(f"--masked-prompt must be in [0, 1), got {args.masked_prompt}")

    from transformers import LlamaConfig, LlamaForCausalLM

    from tgr import TGRConfig, TGRLlamaModel

    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=2,
                                     intermediate_size=2 * args.hidden, num_attention_heads=8,
                                     max_position_embeddings=args.tokens)).save_pretrained(folder)
        model = TGRLlamaModel(TGRConfig(base_model_name_or_path=folder, load_in_4bit=False,
                                        compute_dtype=args.dtype, device="cpu", attention_backend="torch",
                                        temperature_heads=4))
    ids = torch.randint(3, args.vocab, (2, args.tokens // 2), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :int(args.masked_prompt * ids.shape[1])] = -100
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)

    def step(return_logits):
        model.zero_grad(set_to_none=True)
        out = model(**batch, return_logits=return_logits)
        out.loss.backward()
        return out.loss.detach()

    print(f"TGR training step, V = {args.vocab}, hidden {args.hidden}, {args.tokens} tokens, {args.dtype}, "
          f"{args.masked_prompt:.0%} of each sequence's labels masked, {torch.get_num_threads()} threads\n")
    print("| loss | median time | extra peak memory |\n| --- | ---: | ---: |")
    for name, flag in (("through the logits", True), ("fused linear cross-entropy", False)):
        step(flag)
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            step(flag)
            times.append((time.perf_counter() - start) * 1e3)
        memory = peak_memory_mib(lambda: None, lambda _, f=flag: step(f), "cpu")
        print(f"| {name} | {statistics.median(times):.0f} ms | {memory['peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
