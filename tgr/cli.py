"""The ``tgr`` command: train, eval, generate, demo and bench.

    tgr demo                                   # offline, embedded model and sample, seconds on a CPU
    tgr train --model meta-llama/Llama-2-7b-hf --data microsoft/wiki_qa --output runs/llama
    tgr eval  --checkpoint runs/llama/final --data microsoft/wiki_qa --split test
    tgr generate --checkpoint runs/llama/final "When was Abraham Lincoln born?"

Without ``--model`` the embedded demo base (a small Llama trained on the project's sample, see
``scripts/build_demo_model.py``) is used; without ``--data`` the project's WikiQA-schema sample.
``tgr train`` and ``tgr demo`` accept every ``transformers.TrainingArguments`` flag
(``tgr train --help`` lists them with tgr's defaults).

The command only parses, calls the library (``tgr.train``, ``tgr.evaluation``, ``tgr.pipeline``)
and prints; this module imports the standard library only, so ``tgr --help`` works without the
model extra.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from . import missing_model_extra
from .pipeline import (  # the standard library only, at import
    GSOT_MODE_HELP,
    GSOT_WIDTH_HELP,
    SEED_SAMPLING,
    TGR_LAYERS_HELP,
    TGR_MODE_HELP,
)

logger = logging.getLogger("tgr")

DEMO_MODEL = str(Path(__file__).parent / "resources" / "demo-llama")
INSTALL_MODEL_EXTRA = "pip install 'tgr[model]'"

#: Commands whose flags are tgr's plus every ``TrainingArguments`` field (parsed in a second stage).
TRAINING_COMMANDS = ("train", "demo")
#: tgr's defaults of the training flags that ``tgr demo`` changes (a short run on the small sample).
DEMO_TRAINING_DEFAULTS = dict(num_train_epochs=8.0, learning_rate=5e-3, logging_steps=20, save_steps=10_000)
#: Short flags kept from earlier versions: flag -> (TrainingArguments field, type).
SHORT_TRAINING_FLAGS = {
    "--output": ("output_dir", str),
    "--epochs": ("num_train_epochs", float),
    "--lr": ("learning_rate", float),
    "--batch-size": ("per_device_train_batch_size", int),
    "--grad-accum": ("gradient_accumulation_steps", int),
}


class CommandError(Exception):
    """A user error, reported in one line without a traceback."""


# ----------------------------------------------------------------------------- arguments
def _common(parser: argparse.ArgumentParser, output_help: str, *, data: bool = True) -> None:
    """The flags shared by the commands; ``data=False`` for one that reads no dataset (generate),
    so that a ``--data`` given to it is refused, not ignored."""
    g = parser.add_argument_group("shared")
    g.add_argument("--model", default=None,
                   help="base model: hub name (e.g. meta-llama/Llama-2-7b-hf) or local folder "
                        "(default: the embedded demo Llama)")
    if data:
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


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports a bad one in one line, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("TGR head (new models; a --checkpoint brings its own)")
    g.add_argument("--temperature-heads", type=_positive_int, default=4, help="temperatures per token (seed demo: 4)")
    g.add_argument("--gsot-threshold", type=float, default=0.4, help="GSoT threshold (default: 0.4)")
    g.add_argument("--no-gsot", action="store_true", help="disable GSoT pruning")
    g.add_argument("--gsot-mode", default=None, choices=["hard", "straight_through", "soft"], help=GSOT_MODE_HELP)
    g.add_argument("--gsot-width", type=float, default=None, help=GSOT_WIDTH_HELP)
    g.add_argument("--seed-attention", action="store_true",
                   help="non-causal TGR attention, exactly the seed's (default: causal)")
    g.add_argument("--num-tgr-heads", type=_positive_int, default=1,
                   help="TGR attention heads (1 = the seed's one wide head)")
    g.add_argument("--tgr-layers", default="none", help=TGR_LAYERS_HELP)
    g.add_argument("--tgr-mode", default=None, choices=["head", "layers", "both"], help=TGR_MODE_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The command's parser. ``train`` and ``demo`` are listed here; their flags (tgr's and every
    ``TrainingArguments`` field) are parsed by :func:`build_training_parser`, which needs
    transformers, in a second stage."""
    parser = argparse.ArgumentParser(prog="tgr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\nThe command only")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the TGR head on WikiQA's correct pairs (every TrainingArguments "
                                     "flag; tgr train --help)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="see tgr train --help")

    p = sub.add_parser("eval", help="answer-sentence selection: MAP and MRR, TGR head beside the base's head")
    _common(p, "write results.json here")
    _model_flags(p)
    p.add_argument("--checkpoint", default=None, help="a trained TGR folder (tgr train's final/)")
    p.add_argument("--split", default="test", help="dataset split (default: test; the sample has one split)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="candidates scored per batch (default: 8)")

    p = sub.add_parser("generate", help="answer questions through the TGR head")
    _common(p, "write generations.jsonl here", data=False)  # questions come as arguments or --file
    _model_flags(p)
    p.add_argument("questions", nargs="*", help="questions (each becomes 'Q: <question>\\nA:')")
    p.add_argument("--file", default=None, help="a text file with one question per line")
    p.add_argument("--checkpoint", default=None, help="a trained TGR folder (tgr train's final/)")
    p.add_argument("--max-new-tokens", type=int, default=SEED_SAMPLING["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=SEED_SAMPLING["temperature"], help="sampling temperature")
    p.add_argument("--top-p", type=float, default=SEED_SAMPLING["top_p"])
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="questions generated per batch (default: 16)")

    p = sub.add_parser("demo", help="train the TGR head and every-layer TGR, compare them with the base (MAP/MRR) "
                                    "and generate (offline by default; the flags of tgr train)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="see tgr demo --help")

    p = sub.add_parser("bench", help="run the benchmarks (python -m benchmarks; needs the repository)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for python -m benchmarks")
    return parser


class _DefaultsOnceHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """HfArgumentParser's formatter, except that a flag whose help already says its default (tgr's
    ``(default: the embedded demo Llama)``, ``(default: TGRConfig's, straight_through)``) does not
    get a second, contradicting ``(default: None)``."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_training_parser(command: str = "train"):
    """``HfArgumentParser`` over :class:`tgr.pipeline.TGRArguments` and ``TrainingArguments``, with
    tgr's defaults (``tgr.train.TRAINING_DEFAULTS``; ``tgr demo``'s own for a short run) and the
    short flags ``--output``, ``--epochs``, ``--lr``, ``--batch-size``, ``--grad-accum``."""
    from transformers import HfArgumentParser, TrainingArguments

    from .pipeline import TGRArguments
    from .train import TRAINING_DEFAULTS

    if command == "demo":
        description = ("Train the TGR head and every-layer TGR (--tgr-layers, default all; --tgr-mode head: the head "
                       "only) on the sample's training questions, rank the training and the held-out questions' "
                       "candidates with the base, the head and the layers (MAP, MRR), and generate through the head "
                       "(offline by default).")
    else:
        description = ("Train the TGR head on WikiQA's correct pairs with the HF Trainer. Every TrainingArguments "
                       "flag applies (dashes or underscores); the defaults shown are tgr's. A rerun with the same "
                       "--output_dir resumes from its last checkpoint.")
    parser = HfArgumentParser((TGRArguments, TrainingArguments), prog=f"tgr {command}", description=description,
                              usage="%(prog)s [--model MODEL] [--data DATA] [--output DIR] [tgr and TrainingArguments "
                                    "flags, below]", allow_abbrev=False)
    parser.formatter_class = _DefaultsOnceHelpFormatter
    defaults = dict(TRAINING_DEFAULTS, **(DEMO_TRAINING_DEFAULTS if command == "demo" else {}))
    defaults["output_dir"] = time.strftime("outputs/demo-%Y%m%d-%H%M%S") if command == "demo" else "outputs/train"
    # bf16 and use_cpu follow the device unless given (None: decided in cmd_train).
    parser.set_defaults(**defaults, bf16=None, use_cpu=None)
    for action in parser._actions:
        if action.dest == "bf16" and action.option_strings[0] == "--bf16":
            action.help = "bf16 autocast; tgr's default (None): on when training on a GPU that supports bf16"
        elif action.dest == "use_cpu" and action.option_strings[0] == "--use_cpu":
            action.help = "train on the CPU; tgr's default (None): on when --device is cpu or there is no GPU"
        elif action.dest == "output_dir" and action.option_strings[0] == "--output_dir":
            action.help = "training folder: checkpoints, logs and final/ (a rerun resumes from its checkpoints)"
        elif command == "demo" and action.dest == "tgr_layers":
            # The demo's every-layer run: none (the default) trains every layer there too.
            action.help = ("decoder layers of the demo's every-layer run: all (none, the default, means all too) or "
                           "indices such as 0,2,5; --tgr-mode head skips that run")
    short = parser.add_argument_group("short names")
    for flag, (dest, kind) in SHORT_TRAINING_FLAGS.items():
        short.add_argument(flag, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"same as --{dest}")
    return parser


def _check_no_alias_pair(argv: list[str]) -> None:
    """A short flag and the TrainingArguments flag it stands for, both given (``--lr 1e-3
    --learning_rate 2e-3``): argparse would keep the last one silently."""
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    for flag, (dest, _) in SHORT_TRAINING_FLAGS.items():
        longs = sorted({f"--{dest}", f"--{dest.replace('_', '-')}"} & given)
        if flag in given and longs:
            raise CommandError(f"{flag} and {longs[0]} set the same thing ({dest}): give one")


def parse_training_args(command: str, argv: list[str]) -> tuple[object, dict[str, object]]:
    """(``TGRArguments``, the ``TrainingArguments`` fields as given or defaulted) of ``tgr train``
    or ``tgr demo``; the TrainingArguments object is built later, once the device is known."""
    from .pipeline import TGRArguments

    _check_no_alias_pair(argv)
    namespace = build_training_parser(command).parse_args(argv)
    ours = {f.name for f in dataclasses.fields(TGRArguments)}
    values = vars(namespace)
    tgr_args = TGRArguments(**{k: v for k, v in values.items() if k in ours})
    if tgr_args.max_length < 2:
        raise CommandError(f"--max_length must be at least 2 (a prompt token and the EOS), got {tgr_args.max_length}")
    return tgr_args, {k: v for k, v in values.items() if k not in ours}


# ----------------------------------------------------------------------------- shared steps
def _silence_import_warnings() -> None:
    # bitsandbytes warns at import (transformers imports it) that it cannot fetch an optional CPU
    # kernel from the hub; it falls back to its own, and the hub is not ours to reach.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _is_main_process() -> bool:
    """False in the other processes of a distributed launch (torchrun and accelerate set RANK)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _setup_logging(quiet: bool) -> None:
    quiet = quiet or not _is_main_process()  # a distributed run's other processes: warnings only
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    for noisy in ("transformers", "accelerate", "bitsandbytes", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _silence_import_warnings()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_model_path(model: str) -> str:
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise CommandError(f"--model {model!r} is a folder without a config.json: not a model")
        return model
    if os.path.exists(model):
        raise CommandError(f"--model {model!r} is a file, not a model folder or hub name")
    if model.startswith((".", "/", "~")):
        raise CommandError(f"--model {model!r} does not exist")
    return model  # a hub name


def _check_device(device: str | None) -> None:
    """``--device``: a device string torch parses, and CUDA only where there is one (else the
    base's loader or TrainingArguments fails deep inside with a traceback)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise CommandError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _demo_base_moved(base: str) -> bool:
    """A saved demo run names the embedded base by its absolute path in the tgr install that trained
    it; that path is gone once tgr is reinstalled elsewhere or the clone moves."""
    return (os.path.isabs(base) and not os.path.isdir(base)
            and Path(base).parts[-3:] == ("tgr", "resources", "demo-llama"))


def _config(args, checkpoint: str | None = None):
    """The TGRConfig of a saved model (``checkpoint``) or of a new head from the flags."""
    from .config import CONFIG_NAME, LEGACY_CONFIG_NAME, CheckpointError, TGRConfig

    _check_device(args.device)
    overrides = dict(attention_backend=args.backend, device=args.device)
    if args.model:
        overrides["base_model_name_or_path"] = _check_model_path(args.model)
    if args.no_4bit:
        overrides["load_in_4bit"] = False
    if checkpoint:
        if not os.path.isdir(checkpoint):  # hub ids too: the command reads local folders only
            raise CommandError(f"--checkpoint {checkpoint!r} is not a folder here: give a folder that tgr train "
                               f"saved (its final/ or a checkpoint-N)")
        if not any(os.path.isfile(os.path.join(checkpoint, name)) for name in (CONFIG_NAME, LEGACY_CONFIG_NAME)):
            raise CommandError(f"--checkpoint {checkpoint!r} holds no {CONFIG_NAME}: not a saved TGR model")
        try:
            config = TGRConfig.from_pretrained(checkpoint, **overrides)
        except CheckpointError as e:
            raise CommandError(str(e)) from None
        base = config.base_model_name_or_path
        if not args.model and _demo_base_moved(base):
            return config.copy(base_model_name_or_path=DEMO_MODEL)  # the embedded base of this install
        if not args.model and os.path.isabs(base) and not os.path.isdir(base):
            raise CommandError(f"--checkpoint {checkpoint!r} names the base {base!r}, which does not exist: "
                               f"give its new location with --model")
        return config
    overrides.setdefault("base_model_name_or_path", DEMO_MODEL)
    lora = {name: getattr(args, name) for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
            if hasattr(args, name)}  # tgr train's flags; eval and generate load trained adapters
    from .pipeline import gsot_fields, tgr_mode_fields

    try:
        mode = tgr_mode_fields(getattr(args, "tgr_layers", "none"), getattr(args, "tgr_mode", None))
        gate = gsot_fields(getattr(args, "gsot_mode", None), getattr(args, "gsot_width", None))
        return TGRConfig(
            temperature_heads=args.temperature_heads, temperature_conf_threshold=args.gsot_threshold,
            gsoT_enabled=not args.no_gsot, causal=not args.seed_attention, num_tgr_heads=args.num_tgr_heads,
            **mode, **gate, **lora, **overrides,
        )
    except (TypeError, ValueError) as e:  # TGRConfig names the field that is wrong
        raise CommandError(_first_line(e)) from None


def _load(args, checkpoint: str | None = None, seed: int = 0):
    """(model, tokenizer) for a new head or a saved one."""
    import torch
    from transformers import AutoTokenizer

    from .config import ConfigError
    from .model import CheckpointError, TGRLlamaModel

    torch.manual_seed(seed)
    if args.quiet:  # no loading bars either
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    config = _config(args, checkpoint)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.base_model_name_or_path)
        model = (TGRLlamaModel.from_pretrained(checkpoint, config=config) if checkpoint
                 else TGRLlamaModel(config))
    except (CheckpointError, ConfigError) as e:  # a damaged saved model, or a config that does not fit
        raise CommandError(str(e)) from None  # the base (e.g. --num-tgr-heads): its one line names it
    except OSError as e:
        raise CommandError(f"cannot load the base model {config.base_model_name_or_path!r}: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _rows(args, split: str):
    from .data import DataError, load_wikiqa

    try:
        return load_wikiqa(args.data, split=split)
    except DataError as e:
        raise CommandError(str(e)) from None


def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse a folder that holds someone else's files, before anything is loaded or created."""
    _check_results_folder(str(path))
    if path.is_dir() and any(path.iterdir()) and not overwrite and not any(path.glob("checkpoint-*")):
        raise CommandError(f"--output {str(path)!r} exists and is not empty; choose another folder or "
                           f"pass --overwrite")


def _check_results_folder(output: str | None) -> Path | None:
    """``--output`` of eval and generate: a folder (made if missing) that their results file goes
    into; a path that is a file is refused before anything is loaded."""
    if output is None:
        return None
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise CommandError(f"--output {output!r} is a file, not a folder")
    return path


def _fresh_output(path: Path, overwrite: bool) -> Path:
    """The output folder, emptied with ``overwrite`` (else a folder with checkpoints is resumed)."""
    _check_output(path, overwrite)
    if overwrite and path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written file


def _training_arguments(args, training: dict[str, object], output: Path):
    """``TrainingArguments`` from the flags; bf16 and use_cpu follow the device unless given."""
    from .train import check_training_arguments, training_arguments

    _check_device(args.device)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = training.get(name)
        if value is not None and value < 1:  # TrainingArguments takes them; the data loader fails later
            raise CommandError(f"--{name} must be a positive integer, got {value}")
    max_steps, epochs = training.get("max_steps", -1), training.get("num_train_epochs", 1.0)
    if max_steps == 0:  # the Trainer would run one step
        raise CommandError("--max_steps must be a positive integer (or -1: train --num_train_epochs), got 0")
    if max_steps < 0 and epochs is not None and not epochs > 0:  # the Trainer would run no step, and save
        raise CommandError(f"--num_train_epochs must be positive (or give --max_steps), got {epochs:g}")
    fields = {k: v for k, v in training.items() if not (k in ("bf16", "use_cpu") and v is None)}
    fields["output_dir"] = str(output)
    if args.quiet and fields.get("disable_tqdm") is None:
        fields["disable_tqdm"] = True
    device = args.device or ("cpu" if fields.get("use_cpu") else None)
    try:
        training_args = training_arguments(device=device, **fields)
        check_training_arguments(training_args)  # e.g. label smoothing, which TGR's loss does not do
        return training_args
    except (TypeError, ValueError) as e:  # TrainingArguments' own checks of the flags
        raise CommandError(_first_line(e)) from None


# ----------------------------------------------------------------------------- commands
def cmd_train(args, training: dict[str, object], split_rows=None) -> dict:
    """``tgr train``: ``args`` are TGRArguments, ``training`` the TrainingArguments fields."""
    from .config import CheckpointError
    from .data import DataError
    from .train import check_batch_fill, check_resumable, train

    # Check the data, the flags and the model before creating anything, so a bad input leaves
    # nothing behind.
    rows = split_rows if split_rows is not None else _rows(args, args.split)
    if not any(row["label"] == 1 for row in rows):
        raise CommandError("no correct (label 1) question-answer pairs to train on")
    out = Path(training["output_dir"])
    _check_output(out, args.overwrite)
    training_args = _training_arguments(args, training, out)
    if training_args.eval_strategy != "no":  # the Trainer would refuse it once the model had loaded
        raise CommandError(f"--eval_strategy {getattr(training_args.eval_strategy, 'value', '')} needs an evaluation "
                           f"set, which tgr train does not make: leave it no and rank with tgr eval")
    if training_args.eval_on_start:  # the Trainer would fail on it with a traceback once the model had loaded
        raise CommandError("--eval_on_start needs an evaluation set, which tgr train does not make: leave it out "
                           "and rank with tgr eval")
    resume = training_args.resume_from_checkpoint
    if args.overwrite and resume and Path(resume).resolve().is_relative_to(out.resolve()):
        # --overwrite empties the output folder before training: the checkpoint would go with it
        raise CommandError(f"--resume_from_checkpoint {resume!r} lies inside --output_dir {str(out)!r}, which "
                           f"--overwrite empties first: leave out --overwrite (a rerun resumes), or train into "
                           f"another --output_dir")
    try:  # one training example per correct pair: checked before the model loads and the output is made
        check_batch_fill(sum(row["label"] == 1 for row in rows), training_args)
    except DataError as e:
        raise CommandError(str(e)) from None
    if training_args.use_cpu and not args.device:
        args.device = "cpu"  # --use_cpu: the model too
    model, tokenizer = _load(args, seed=training_args.seed)
    if training_args.resume_from_checkpoint:  # before the output folder is made
        try:
            check_resumable(model, training_args.resume_from_checkpoint, warn=False)
        except CheckpointError as e:
            raise CommandError(str(e)) from None
    _fresh_output(out, args.overwrite)
    start = time.time()
    final = out / "final"
    try:
        result, _ = train(model, tokenizer, rows, training_args, max_length=args.max_length,
                          mask_prompt=args.mask_prompt, final_dir=final)
    except (DataError, CheckpointError) as e:  # e.g. no correct pairs, a checkpoint of another model
        raise CommandError(str(e)) from None
    summary = {"train_loss": result.training_loss, "steps": result.global_step,
               "seconds": round(time.time() - start, 1), "final": str(final)}
    logger.info("trained: %s", summary)
    return {"summary": summary, "model": model, "tokenizer": tokenizer, "output": out}


def _evaluate(model, tokenizer, rows, batch_size: int, progress: bool = False) -> dict:
    from .data import DataError
    from .evaluation import evaluate_heads

    try:
        return evaluate_heads(model, tokenizer, rows, batch_size=batch_size, progress=progress)
    except DataError as e:
        raise CommandError(str(e)) from None


def _print_ranking(title: str, results: dict) -> None:
    print(f"\n{title}  ({results['tgr_head']['questions']} questions, {results['tgr_head']['candidates']} candidates)")
    print(f"  {'head':10s} {'MAP':>7s} {'MRR':>7s}")
    for name in ("tgr_head", "base_head"):
        r = results[name]
        print(f"  {name[:-5]:10s} {r['map']:7.4f} {r['mrr']:7.4f}")


def cmd_eval(args) -> dict:
    out = _check_results_folder(args.output)
    rows = _rows(args, args.split)
    model, tokenizer = _load(args, args.checkpoint, seed=args.seed)
    results = _evaluate(model, tokenizer, rows, args.batch_size, progress=not args.quiet)
    _print_ranking(f"WikiQA answer selection [{args.data or 'sample'}:{args.split}]", results)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "results.json", results)
    return results


def _questions(args) -> list[str]:
    questions = list(args.questions)
    if args.file:
        try:
            questions += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise CommandError(f"--file {args.file!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise CommandError(f"--file {args.file!r} is not UTF-8 text") from None
    if not questions:
        raise CommandError("give at least one question (positional, or --file with one per line)")
    return questions


def cmd_generate(args) -> list[dict]:
    from .generation import check_generation_settings
    from .pipeline import generate_answers

    out = _check_results_folder(args.output)
    questions = _questions(args)
    try:  # before the model loads
        check_generation_settings(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    except ValueError as e:  # "top_p must be ..." -> "--top-p must be ..."
        name, _, rest = _first_line(e).partition(" ")
        raise CommandError(f"--{name.replace('_', '-')} {rest}") from None
    model, tokenizer = _load(args, args.checkpoint, seed=args.seed)
    answers = generate_answers(model, tokenizer, questions, greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                               batch_size=args.batch_size, progress=not args.quiet)
    records = [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    for r in records:
        print(f"Q: {r['question']}\nA: {r['answer']}\n")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "generations.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, out / "generations.jsonl")
    return records


#: The demo's rows: results key -> printed name.
DEMO_ROWS = {"base_head": "base", "tgr_head": "tgr-head", "tgr_layers": "tgr-layers"}


def _print_demo_ranking(title: str, results: dict) -> None:
    first = results["base_head"]
    print(f"\n{title}  ({first['questions']} questions, {first['candidates']} candidates)")
    print(f"  {'model':12s} {'MAP':>7s} {'MRR':>7s}")
    for key, name in DEMO_ROWS.items():
        if key in results:
            print(f"  {name:12s} {results[key]['map']:7.4f} {results[key]['mrr']:7.4f}")


def _evaluate_tgr_model(model, tokenizer, rows, batch_size: int, progress: bool = False) -> dict:
    """MAP and MRR of a TGR model's own predictions (its base's are scored by :func:`_evaluate`),
    scored through ``target_log_probs``: the [B, S, V] logits are never built."""
    from .data import ranking_groups
    from .evaluation import evaluate_ranking

    model.eval()
    result = evaluate_ranking(None, tokenizer, ranking_groups(rows), log_probs_fn=model.target_log_probs,
                              batch_size=batch_size, device=model.device, progress=progress)
    return result.as_dict()


def _main_process_output(args, training: dict[str, object]) -> str:
    """The main process's output folder, in every process of a distributed launch: tgr demo's
    default folder is named by the second each process parsed its flags in, which the processes of
    one torchrun do not always share (a run then wrote into two folders). The TrainingArguments set
    up the process group, as the Trainer's would."""
    output = str(training["output_dir"])
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return output
    _training_arguments(args, training, Path(output))
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return output
    chosen = [output]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def cmd_demo(args, training: dict[str, object]) -> dict:
    """Train the TGR head, and every-layer TGR (unless ``--tgr-mode head``), on the sample's
    training questions with the same settings; evaluate the base, the head and the layers on the
    training and the held-out questions; generate through the head.

    The head run is the seed's (``--tgr-mode head``) and writes into the output folder; the
    every-layer run (``--tgr-layers``, default all; ``--tgr-mode both`` keeps a head there too)
    into its ``every-layer/`` subfolder."""
    from .data import ranking_groups, split_by_question
    from .pipeline import generate_answers, tgr_mode_fields

    start = time.time()
    rows = _rows(args, args.split)
    training = dict(training, output_dir=_main_process_output(args, training))
    out = Path(training["output_dir"])
    _check_output(out, args.overwrite)
    layer_mode = None if args.tgr_mode == "head" else (args.tgr_mode or "layers")
    layer_choice = "all" if str(args.tgr_layers).strip().lower() == "none" else args.tgr_layers
    if layer_mode is not None:
        try:  # a bad --tgr-layers is one line before anything is trained
            tgr_mode_fields(layer_choice, layer_mode)
        except ValueError as e:
            raise CommandError(str(e)) from None
    train_rows, held_out = split_by_question(rows)
    if not ranking_groups(held_out):  # else the ranking fails after the training
        raise CommandError(f"the demo holds out the last quarter of the questions for ranking, and none of them "
                           f"({len({r['question_id'] for r in held_out})} questions) has a correct (label 1) "
                           f"candidate: give data with more questions that have one")
    print(f"tgr demo: base {args.model or 'embedded demo Llama'}, data {args.data or 'project sample'}: "
          f"{len(train_rows)} training rows, {len(held_out)} held-out rows -> {out}")
    head_args = dataclasses.replace(args, tgr_mode="head", tgr_layers="none")
    trained = cmd_train(head_args, training, split_rows=train_rows)
    model, tokenizer = trained["model"], trained["tokenizer"]
    results = {"train": trained["summary"]}
    splits = {"training questions": train_rows, "held-out questions": held_out}
    for name, part in splits.items():
        results[name] = _evaluate(model, tokenizer, part, batch_size=8, progress=not args.quiet)
    if layer_mode is not None:
        layer_args = dataclasses.replace(args, tgr_mode=layer_mode, tgr_layers=layer_choice)
        layer_training = dict(training, output_dir=str(out / "every-layer"))
        layer_run = cmd_train(layer_args, layer_training, split_rows=train_rows)
        results["train_layers"] = dict(layer_run["summary"], tgr_mode=layer_mode, tgr_layers=layer_choice)
        for name, part in splits.items():
            results[name]["tgr_layers"] = _evaluate_tgr_model(layer_run["model"], layer_run["tokenizer"], part, 8,
                                                              progress=not args.quiet)
        del layer_run
    for name in splits:
        _print_demo_ranking(f"WikiQA answer selection, {name}", results[name])
    questions = sorted({r["question"] for r in held_out})[:2] + sorted({r["question"] for r in train_rows})[:2]
    seed = int(training.get("seed", 0))
    answers = generate_answers(model, tokenizer, questions, seed=seed, progress=not args.quiet, **{
        k: v for k, v in SEED_SAMPLING.items() if k not in ("do_sample",)})
    results["generations"] = [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]
    print("\nGenerations through the TGR head (seed sampling: T=0.7, top-p 0.9, ClampLogits):")
    for r in results["generations"]:
        print(f"  Q: {r['question']}\n  A: {r['answer']}")
    results["seconds"] = round(time.time() - start, 1)
    if _is_main_process():  # the other processes of a distributed run computed the same
        _write_json(out / "demo_results.json", results)
    print(f"\ndemo done in {results['seconds']:.0f} s; results in {out}/demo_results.json")
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


COMMANDS = {"eval": cmd_eval, "generate": cmd_generate, "bench": cmd_bench}
TRAINING_COMMAND_FUNCTIONS = {"train": cmd_train, "demo": cmd_demo}


def _run(command: str, call, *, same_in_every_process: bool = False) -> int:
    """Run one command: its exit status (0 unless it returns an int), or 2 with one line on stderr
    for a user error or a missing model extra.

    In a distributed launch the other processes name their rank in that line; an error that every
    process meets alike (``same_in_every_process``: the command line's) is printed by the main one
    alone, not once per process."""
    main_process = _is_main_process()
    where = "" if main_process else f" (rank {os.environ['RANK'].strip()})"
    try:
        status = call()
    except CommandError as e:
        if main_process or not same_in_every_process:
            print(f"tgr {command}{where}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if not missing_model_extra(e):
            raise
        if main_process or not same_in_every_process:
            print(f"tgr {command}{where}: error: this command needs the model extra ({e.name} is not installed): "
                  f"{INSTALL_MODEL_EXTRA}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def _end_distributed(succeeded: bool) -> None:
    """Destroy the process group that a distributed run (torchrun, accelerate) created, once every
    rank is done, before the interpreter exits: left to the exit, gloo's threads aborted a rank
    ("terminate called without an active exception", SIGABRT) after training had finished, in 1
    two-process CPU run of 8 to 15. No-op in a single process (torch is not imported for it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return
    if succeeded:
        dist.barrier()  # no rank leaves while another still needs it
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _silence_import_warnings()
    if argv and argv[0] in TRAINING_COMMANDS:
        # Second stage: tgr's flags and every TrainingArguments flag (needs transformers).
        command, parsed = argv[0], {}

        def parse():
            with contextlib.ExitStack() as quiet:
                if not _is_main_process():  # argparse's usage errors are the same in every process
                    quiet.enter_context(contextlib.redirect_stderr(quiet.enter_context(open(os.devnull, "w"))))
                parsed["args"], parsed["training"] = parse_training_args(command, argv[1:])

        status = _run(command, parse, same_in_every_process=True)
        if status:
            return status
        _setup_logging(parsed["args"].quiet)
        with contextlib.ExitStack() as stack:
            if not _is_main_process():  # the demo's tables and answers once, from the main process
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            status = _run(command, lambda: TRAINING_COMMAND_FUNCTIONS[command](parsed["args"], parsed["training"]))
        _end_distributed(status == 0)
        return status
    if argv and argv[0] == "bench":  # everything after it is the benchmarks' (argparse's REMAINDER
        # would not take a leading --flag); their own exit status
        return _run("bench", lambda: int(cmd_bench(argparse.Namespace(args=argv[1:])) or 0))
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)
    return _run(args.command, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
