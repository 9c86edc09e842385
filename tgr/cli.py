"""The ``tgr`` command: train, eval, generate, demo and bench.

    tgr demo                                   # offline, embedded model and sample, a few minutes on a CPU
    tgr train --model meta-llama/Llama-2-7b-hf --data microsoft/wiki_qa --output runs/llama
    tgr eval  --checkpoint runs/llama/final --data microsoft/wiki_qa --split test
    tgr generate --checkpoint runs/llama/final "When was Abraham Lincoln born?"

Without ``--model`` the embedded demo base (a small Llama trained on the project's sample, see
``scripts/build_demo_model.py``) is used; without ``--data`` the project's WikiQA-schema sample.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

logger = logging.getLogger("tgr")

DEMO_MODEL = str(Path(__file__).parent / "resources" / "demo-llama")
SEED_SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=50)  # the seed's defaults


class CommandError(Exception):
    """A user error, reported in one line without a traceback."""


# ----------------------------------------------------------------------------- arguments
def _common(parser: argparse.ArgumentParser, output_help: str) -> None:
    g = parser.add_argument_group("shared")
    g.add_argument("--model", default=None,
                   help="base model: hub name (e.g. meta-llama/Llama-2-7b-hf) or local folder "
                        "(default: the embedded demo Llama)")
    g.add_argument("--data", default=None,
                   help="WikiQA: hub dataset (e.g. microsoft/wiki_qa) or a local .jsonl/.json/.csv/.tsv/.parquet "
                        "file or folder in its schema (default: the project's sample)")
    g.add_argument("--output", default=None, help=output_help)
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "torch", "reference"],
                   help="TGR attention implementation (default: auto = Triton on CUDA, PyTorch elsewhere)")
    g.add_argument("--no-4bit", action="store_true", help="load the base unquantized instead of 4-bit NF4")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TGR head (new models; a --checkpoint brings its own)")
    g.add_argument("--temperature-heads", type=int, default=4, help="temperatures per token (seed demo: 4)")
    g.add_argument("--gsot-threshold", type=float, default=0.4, help="GSoT threshold (default: 0.4)")
    g.add_argument("--no-gsot", action="store_true", help="disable GSoT pruning")
    g.add_argument("--seed-attention", action="store_true",
                   help="non-causal TGR attention, exactly the seed's (default: causal)")
    g.add_argument("--num-tgr-heads", type=int, default=1, help="TGR attention heads (1 = the seed's one wide head)")


def _train_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--split", default="train", help="dataset split to train on (default: train)")
    g.add_argument("--epochs", type=float, default=1.0, help="epochs over the correct pairs (default: 1)")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, default=4, help="examples per device and step (default: 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default: 1)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate of the head (default: 1e-3)")
    g.add_argument("--max-length", type=int, default=192, help="tokens per example (default: 192)")
    g.add_argument("--mask-prompt", action="store_true", help="train on the answer tokens only")
    g.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps (default: 200)")
    g.add_argument("--logging-steps", type=int, default=10, help="log every N steps (default: 10)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the TGR head on WikiQA's correct pairs")
    _common(p, "training folder: checkpoints, logs and final/ (a rerun resumes from its checkpoints)")
    _model_flags(p)
    _train_flags(p)

    p = sub.add_parser("eval", help="answer-sentence selection: MAP and MRR, TGR head beside the base's head")
    _common(p, "write results.json here")
    _model_flags(p)
    p.add_argument("--checkpoint", default=None, help="a trained TGR folder (tgr train's final/)")
    p.add_argument("--split", default="test", help="dataset split (default: test; the sample has one split)")
    p.add_argument("--batch-size", type=int, default=8, help="candidates scored per batch (default: 8)")

    p = sub.add_parser("generate", help="answer questions through the TGR head")
    _common(p, "write generations.jsonl here")
    _model_flags(p)
    p.add_argument("questions", nargs="*", help="questions (each becomes 'Q: <question>\\nA:')")
    p.add_argument("--file", default=None, help="a text file with one question per line")
    p.add_argument("--checkpoint", default=None, help="a trained TGR folder (tgr train's final/)")
    p.add_argument("--max-new-tokens", type=int, default=SEED_SAMPLING["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=SEED_SAMPLING["temperature"], help="sampling temperature")
    p.add_argument("--top-p", type=float, default=SEED_SAMPLING["top_p"])
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")

    p = sub.add_parser("demo", help="train, evaluate and generate end to end (offline by default)")
    _common(p, "demo folder (default: a new outputs/demo-<time>)")
    _model_flags(p)
    _train_flags(p)
    p.set_defaults(epochs=8.0, lr=5e-3, logging_steps=20, save_steps=10_000)

    p = sub.add_parser("bench", help="run the benchmarks (python -m benchmarks; needs the repository)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
    return parser


# ----------------------------------------------------------------------------- shared steps
def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("transformers", "accelerate", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the hub; it
    # falls back to its own, and the hub is not ours to reach.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _check_model_path(model: str) -> str:
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise CommandError(f"--model {model!r} is a folder without a config.json: not a model")
        return model
    if model.startswith((".", "/", "~")) or os.path.exists(model):
        raise CommandError(f"--model {model!r} does not exist")
    return model  # a hub name


def _config(args, checkpoint: Optional[str] = None):
    from .config import TGRConfig

    overrides = dict(attention_backend=args.backend, device=args.device)
    if args.model:
        overrides["base_model_name_or_path"] = _check_model_path(args.model)
    if args.no_4bit:
        overrides["load_in_4bit"] = False
    if checkpoint:
        if not os.path.isfile(os.path.join(checkpoint, "tgr_config.json")):
            raise CommandError(f"--checkpoint {checkpoint!r} holds no tgr_config.json: not a saved TGR model")
        return TGRConfig.from_pretrained(checkpoint, **overrides)
    overrides.setdefault("base_model_name_or_path", DEMO_MODEL)
    return TGRConfig(
        temperature_heads=args.temperature_heads, temperature_conf_threshold=args.gsot_threshold,
        gsoT_enabled=not args.no_gsot, causal=not args.seed_attention, num_tgr_heads=args.num_tgr_heads,
        **overrides,
    )


def _load(args, checkpoint: Optional[str] = None):
    """(model, tokenizer) for a new head or a saved one."""
    import torch
    from transformers import AutoTokenizer

    from .model import TGRLlamaModel

    torch.manual_seed(args.seed)
    config = _config(args, checkpoint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)
        model = (TGRLlamaModel.from_pretrained(checkpoint, config=config) if checkpoint
                 else TGRLlamaModel(config))
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CommandError(f"cannot load the base model {config.base_model_name_or_path!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _rows(args, split: str):
    from .data import DataError, load_wikiqa

    try:
        return load_wikiqa(args.data, split=split)
    except DataError as e:
        raise CommandError(str(e)) from None


def _fresh_output(path: Optional[str], overwrite: bool, default: str) -> Path:
    """An output folder that does not hold someone else's files (or that may be replaced)."""
    out = Path(path or default)
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not any(out.glob("checkpoint-*")):
            raise CommandError(f"--output {str(out)!r} exists and is not empty; choose another folder or "
                               f"pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written file


# ----------------------------------------------------------------------------- commands
def cmd_train(args, split_rows=None) -> dict:
    from .train import TrainSettings, train

    # Check the data and the model before creating anything, so a bad input leaves nothing behind.
    rows = split_rows if split_rows is not None else _rows(args, args.split)
    model, tokenizer = _load(args)
    out = _fresh_output(args.output, args.overwrite, "outputs/train")
    settings = TrainSettings(
        output_dir=str(out), epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, learning_rate=args.lr, max_length=args.max_length,
        mask_prompt=args.mask_prompt, logging_steps=args.logging_steps, save_steps=args.save_steps,
        seed=args.seed, progress_bar=not args.quiet,
    )
    start = time.time()
    result, trainer = train(model, tokenizer, rows, settings)
    final = out / "final"
    if trainer.is_world_process_zero():
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
    summary = {"train_loss": result.training_loss, "steps": result.global_step,
               "seconds": round(time.time() - start, 1), "final": str(final)}
    logger.info("trained: %s", summary)
    return {"summary": summary, "model": model, "tokenizer": tokenizer, "output": out}


def _evaluate(model, tokenizer, rows, batch_size: int, progress: bool = False) -> dict:
    from .data import ranking_groups
    from .evaluation import evaluate_ranking

    groups = ranking_groups(rows)
    if not groups:
        raise CommandError("no question in the data has a correct (label 1) candidate: nothing to rank")
    model.eval()
    kwargs = dict(batch_size=batch_size, device=model.device, progress=progress)
    tgr = evaluate_ranking(lambda ids, mask: model(ids, mask).logits, tokenizer, groups, **kwargs)
    base = evaluate_ranking(lambda ids, mask: model.base_model(input_ids=ids, attention_mask=mask).logits,
                            tokenizer, groups, **kwargs)
    return {"tgr_head": tgr.as_dict(), "base_head": base.as_dict()}


def _print_ranking(title: str, results: dict) -> None:
    print(f"\n{title}  ({results['tgr_head']['questions']} questions, {results['tgr_head']['candidates']} candidates)")
    print(f"  {'head':10s} {'MAP':>7s} {'MRR':>7s}")
    for name in ("tgr_head", "base_head"):
        r = results[name]
        print(f"  {name[:-5]:10s} {r['map']:7.4f} {r['mrr']:7.4f}")


def cmd_eval(args) -> dict:
    rows = _rows(args, args.split)
    model, tokenizer = _load(args, args.checkpoint)
    results = _evaluate(model, tokenizer, rows, args.batch_size, progress=not args.quiet)
    _print_ranking(f"WikiQA answer selection [{args.data or 'sample'}:{args.split}]", results)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "results.json", results)
    return results


def _questions(args) -> List[str]:
    questions = list(args.questions)
    if args.file:
        try:
            questions += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise CommandError(f"--file {args.file!r}: {e.strerror}") from None
    if not questions:
        raise CommandError("give at least one question (positional, or --file with one per line)")
    return questions


def generate_answers(model, tokenizer, questions: List[str], *, greedy=False, max_new_tokens=50, temperature=0.7,
                     top_p=0.9, top_k=None, seed=0) -> List[str]:
    """Batched (left-padded) generation through the TGR head, with the seed's ClampLogits."""
    import torch

    from .data import prompt_text
    from .processors import ClampLogits

    tokenizer.padding_side = "left"
    batch = tokenizer([prompt_text(q) for q in questions], return_tensors="pt", padding=True)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    model.eval()
    out = model.generate(
        batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device),
        max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=temperature, top_p=top_p, top_k=top_k,
        logits_processor=[ClampLogits(-50.0, 50.0)], eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, generator=generator,
    )
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in new]


def cmd_generate(args) -> List[dict]:
    questions = _questions(args)
    model, tokenizer = _load(args, args.checkpoint)
    answers = generate_answers(model, tokenizer, questions, greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    records = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    for r in records:
        print(f"Q: {r['question']}\nA: {r['answer']}\n")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "generations.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, out / "generations.jsonl")
    return records


def cmd_demo(args) -> dict:
    """Train the head on the sample's training questions, evaluate on both splits, generate."""
    from .data import split_by_question

    start = time.time()
    rows = _rows(args, args.split)
    args.output = str(_fresh_output(args.output, args.overwrite, time.strftime("outputs/demo-%Y%m%d-%H%M%S")))
    train_rows, held_out = split_by_question(rows)
    print(f"tgr demo: base {args.model or 'embedded demo Llama'}, data {args.data or 'project sample'}: "
          f"{len(train_rows)} training rows, {len(held_out)} held-out rows -> {args.output}")
    trained = cmd_train(args, split_rows=train_rows)
    model, tokenizer = trained["model"], trained["tokenizer"]
    results = {"train": trained["summary"]}
    for name, part in (("training questions", train_rows), ("held-out questions", held_out)):
        results[name] = _evaluate(model, tokenizer, part, batch_size=8)
        _print_ranking(f"WikiQA answer selection, {name}", results[name])
    questions = sorted({r["question"] for r in held_out})[:2] + sorted({r["question"] for r in train_rows})[:2]
    answers = generate_answers(model, tokenizer, questions, seed=args.seed, **{
        k: v for k, v in SEED_SAMPLING.items() if k not in ("do_sample",)})
    results["generations"] = [{"question": q, "answer": a} for q, a in zip(questions, answers)]
    print("\nGenerations through the TGR head (seed sampling: T=0.7, top-p 0.9, ClampLogits):")
    for r in results["generations"]:
        print(f"  Q: {r['question']}\n  A: {r['answer']}")
    results["seconds"] = round(time.time() - start, 1)
    _write_json(Path(args.output) / "demo_results.json", results)
    print(f"\ndemo done in {results['seconds']:.0f} s; results in {args.output}/demo_results.json")
    return results


def cmd_bench(args) -> int:
    # The benchmarks live in the repository, beside the packages: run from its root.
    if os.path.isdir("benchmarks") and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError:
        raise CommandError("tgr bench runs the repository's benchmarks/ package: run it from a checkout "
                           "of the repository (python -m benchmarks)") from None
    return bench_main(args.args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "demo": cmd_demo, "bench": cmd_bench}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        try:
            return int(cmd_bench(args) or 0)
        except CommandError as e:
            print(f"tgr bench: error: {e}", file=sys.stderr)
            return 2
    _setup_logging(args.quiet)
    try:
        COMMANDS[args.command](args)
    except CommandError as e:
        print(f"tgr {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
