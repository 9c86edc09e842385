"""WikiQA data: loading (hub or local files), validation, training examples and ranking groups.

WikiQA rows have the columns ``question_id, question, document_title, answer, label`` (label 1:
the sentence answers the question). Training uses the correct pairs as ``"Q: <question>\\nA:
<answer>"`` (the seed's format), fixed: an EOS ends each answer, labels are −100 on padding, and
the prompt can be left out of the loss. Evaluation ranks each question's candidate sentences.

The project ships its own small sample in WikiQA's schema (``SAMPLE_PATH``), written for this
project: WikiQA's license does not allow its rows to be redistributed.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("tgr")

COLUMNS = ("question_id", "question", "document_title", "answer", "label")
HUB_DATASET = "microsoft/wiki_qa"
SAMPLE_PATH = Path(__file__).parent / "resources" / "wikiqa_sample.jsonl"
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data source that cannot be used as WikiQA, with a message that says why."""


def check_int(name: str, value, minimum: int, want: str) -> None:
    """Raise ``ValueError("{name} must be {want}, got ...")`` unless ``value`` is an int (not a
    bool) of at least ``minimum``: the size arguments of data, evaluation and generation."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be {want}, got {value!r}")


# ----------------------------------------------------------------------------- loading
def load_wikiqa(source: str | None = None, split: str = "train") -> list[dict]:
    """WikiQA rows as a list of dicts with the five columns, validated.

    ``source``: None (the project's sample), a local file (.json, .jsonl, .csv, .tsv, .parquet),
    a local folder (its files whose name starts with ``split`` or holds it as a word, as
    ``wiki_qa-test.jsonl``; all its data files when none names any split; an error when files
    name other splits only), or a hub dataset name such as ``microsoft/wiki_qa``.
    """
    if source is None or source == "sample":
        return validate_rows(_read_file(SAMPLE_PATH), str(SAMPLE_PATH))
    if os.path.exists(source):
        return _read_local(Path(source), split, source)
    if _looks_like_path(source):
        raise DataError(f"data path {source!r} does not exist")
    return validate_rows(_read_hub(source, split), f"{source} [{split}]")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.lower().endswith(LOCAL_SUFFIXES) or os.sep + os.sep in source


def _read_local(path: Path, split: str, where: str) -> list[dict]:
    """The validated rows of a local file, or of a folder's files (``where``: the path as given)."""
    if path.is_file():
        return validate_rows(_read_file(path), where)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in LOCAL_SUFFIXES)  # as _read_file: train.JSONL too
    if not files:
        raise DataError(f"folder {path} holds no data file ({', '.join(LOCAL_SUFFIXES)})")
    chosen = [p for p in files if _names_split(p, split)]
    if not chosen:
        # All the files only when none of them names a split: a folder of train and test files
        # without one of the split asked for must not be read whole (training data in a test).
        named = [p.name for p in files if set(_split_words(p)) & set(SPLIT_NAMES)]
        if named:
            raise DataError(f"folder {path} has no file for split {split!r} (its files name other splits: "
                            f"{', '.join(named)}); give the split's name with --split, or the file itself")
        chosen = files
    rows: list[dict] = []
    for p in chosen:
        # Each file checked under its own name: files with other columns name the file, not a KeyError.
        file_rows = _read_file(p)
        if file_rows:
            rows.extend(validate_rows(file_rows, str(p)))
    if not rows:
        raise DataError(f"{where} holds no rows")
    return rows


#: Split names that a data file's name can carry (``train.jsonl``, ``wiki_qa-test.parquet``).
SPLIT_NAMES = ("train", "training", "validation", "valid", "dev", "test")


def _split_words(path: Path) -> list[str]:
    """The words of a data file's name without its suffix: ``wiki_qa-test.jsonl`` -> wiki, qa, test."""
    return re.split(r"[^0-9a-z]+", path.stem.lower())


def _names_split(path: Path, split: str) -> bool:
    """Whether a data file's name starts with ``split`` or holds it as a word (``wikiqa-test.tsv``)."""
    return path.name.lower().startswith(split.lower()) or split.lower() in _split_words(path)


def _read_file(path: Path) -> list[dict]:
    """One local file's rows through ``datasets.load_dataset`` (json, csv or parquet builder)."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if suffix == ".parquet":
        return _load_local("parquet", path, "not a readable Parquet file")
    _check_utf8(path)
    if suffix in (".csv", ".tsv"):
        delimiter = "\t" if suffix == ".tsv" else ","
        # TSV has no quoting (WikiQA's own TSV files hold sentences that start or end with a '"'):
        # a quote is text, never the start of a cell that runs on over tabs and lines.
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        # Every column as text, as written: pandas would otherwise turn "007" into 7 and "1.50" into
        # 1.5, and empty cells into None; validate_rows converts the labels.
        return _load_local("csv", path, f"not valid {suffix[1:].upper()}", delimiter=delimiter, na_filter=False,
                           quoting=quoting, features=_text_features(path, delimiter, quoting))
    _check_json_start(path)
    return _load_local("json", path, "not valid JSON")


def _check_json_start(path: Path) -> None:
    """A JSON (Lines) file whose first value is ``null`` crashes pyarrow's JSON reader (SIGSEGV,
    the whole process): say so in one line instead."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                if line.strip() == "null":
                    raise DataError(f"{path}: not valid WikiQA JSON (line {number} is null, not a row)")
                return


def _check_utf8(path: Path) -> None:
    """A text data file must be UTF-8: say so in one line rather than deep inside a reader."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character split across chunks
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise DataError(f"{path} is not UTF-8 text (bad byte at offset {bad}); give a UTF-8 JSON Lines, "
                                f"JSON, CSV or TSV file, or a Parquet file") from None
            if not chunk:
                return
            offset += len(chunk)


def _text_features(path: Path, delimiter: str, quoting: int):
    import datasets
    import pandas

    # The column names as pandas (the reader datasets uses) makes them: a UTF-8 BOM (Excel's
    # "CSV UTF-8") dropped, an unnamed column (DataFrame.to_csv's index) "Unnamed: 0", a repeated
    # name "answer.1"; names read with the csv module did not match them.
    try:
        header = pandas.read_csv(path, sep=delimiter, nrows=0, encoding="utf-8", quoting=quoting).columns
    except (ValueError, pandas.errors.ParserError):
        return None  # load_dataset reports it
    return datasets.Features({str(name): datasets.Value("string") for name in header})


def _load_local(builder: str, path: Path, what_is_wrong: str, **options) -> list[dict]:
    import datasets
    import pyarrow

    # A private cache that is removed afterwards: loading a local file neither writes beside it
    # nor fills the user's datasets cache with copies.
    with tempfile.TemporaryDirectory(prefix="tgr-data-") as cache, _quiet_datasets():
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache, **options)
        except (datasets.exceptions.DatasetsError, pyarrow.ArrowException, ValueError, OSError) as e:
            if _holds_no_records(path, builder):
                return []  # datasets refuses an empty split; validate_rows says "holds no rows"
            raise DataError(f"{path}: {what_is_wrong} ({_innermost_message(e)})") from None
        return ds.to_list()


def _holds_no_records(path: Path, builder: str) -> bool:
    """A JSON file that is blank or ``[]``, or a CSV/TSV file with a header line only."""
    if builder == "parquet" or path.stat().st_size > 1 << 16:
        return False
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if builder == "csv":
        return len(lines) <= 1
    return "".join(lines).replace(" ", "") in ("", "[]")


def _innermost_message(error: BaseException) -> str:
    """The first line of the root cause: datasets wraps the reader's error in a generic one."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars and no log lines from datasets while it reads a local file (its failures
    are reported as one DataError instead); the caller's settings are restored."""
    from datasets.utils import logging as datasets_logging

    verbosity, bars = datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()
    datasets_logging.set_verbosity(logging.CRITICAL + 1)
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets_logging.enable_progress_bar()


def _read_hub(name: str, split: str) -> list[dict]:
    hint = "pass local files in WikiQA's schema instead, e.g. --data path/to/wiki_qa.jsonl"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise DataError(f"cannot load {name!r} from the Hugging Face hub: HF_HUB_OFFLINE is set; {hint}")
    import datasets

    # Short timeouts: an unreachable hub should fail in seconds, not minutes.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub client raises many types for one cause
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load {name!r} [{split}] from the Hugging Face hub ({first_line}); {hint}") from None
    return [dict(r) for r in ds]


def validate_rows(rows: Sequence[dict], where: str) -> list[dict]:
    """Check columns and labels; return rows with ``label`` as int and text fields as str."""
    if not rows:
        raise DataError(f"{where} holds no rows")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(f"{where} lacks the column(s) {', '.join(missing)}; WikiQA needs {', '.join(COLUMNS)}")
    clean, bad = [], []
    for i, row in enumerate(rows):
        # A key that only some JSON rows have is read as None in the others.
        absent = [c for c in COLUMNS if row.get(c) is None and c != "label"]
        if absent:
            raise DataError(f"{where}: row {i} has no {', '.join(absent)}")
        label = row.get("label")
        try:  # 1, "1", " 1 ", 1.0 (a float column, e.g. written by pandas) and "1.0"; not True or 0.5
            number = None if isinstance(label, bool) else float(str(label).strip())
        except ValueError:
            number = None
        label_int = int(number) if number is not None and number.is_integer() else None
        if label_int not in (0, 1):
            bad.append((i, label))
            continue
        clean.append({c: (label_int if c == "label" else str(row[c])) for c in COLUMNS})
    if bad:
        shown = ", ".join(f"row {i}: {v!r}" for i, v in bad[:5])
        raise DataError(f"{where}: labels must be 0 or 1, found {len(bad)} other value(s) ({shown})")
    return clean


# ----------------------------------------------------------------------------- training examples
def prompt_text(question: str) -> str:
    return f"Q: {question.strip()}\nA:"


def prompt_ids(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """(the BOS, if the tokenizer has one; the prompt's tokens): how training, evaluation and
    generation encode a question, with no other special token the tokenizer's template may add."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos, tokenizer(prompt_text(question), add_special_tokens=False)["input_ids"]


def answer_text(answer: str) -> str:
    return f" {answer.strip()}"


def fit_pair(prefix: list[int], question_ids: list[int], answer_ids: list[int],
             budget: int) -> tuple[list[int], list[int]]:
    """``(prompt, answer)`` ids of at most ``budget`` tokens together, ``prompt = prefix + question``.

    A pair that does not fit loses the start of its question first (``prefix``, the BOS, stays, and
    so does the end of the question next to the answer): the whole answer is kept as long as it
    fits beside the prefix or one question token. Only an answer longer than that loses its end.
    Training and evaluation cut the same way."""
    if len(prefix) + len(question_ids) + len(answer_ids) <= budget:
        return prefix + question_ids, answer_ids
    kept_answer = answer_ids[:budget - 1]  # the first answer token needs one token before it
    room = budget - len(kept_answer) - len(prefix)  # for the end of the question
    prompt = prefix + question_ids[len(question_ids) - room:] if room > 0 else list(prefix)
    return prompt, kept_answer


def build_training_examples(rows: Iterable[dict], tokenizer, max_length: int = 192,
                            mask_prompt: bool = False) -> list[dict[str, list[int]]]:
    """Tokenized ``Q: ...\\nA: <answer><eos>`` examples from the correct (label 1) pairs.

    The prompt and the answer are tokenized separately (so the prompt can be masked with
    ``mask_prompt``). A pair longer than ``max_length`` is cut as :func:`fit_pair` cuts it, with
    the EOS as the answer's last token: the start of the question goes first, so the answer is
    trained on whole (with ``mask_prompt`` a long question once left only the EOS to train on);
    an answer that alone does not fit loses its end and the EOS (no stop taught mid-sentence).
    The number of cut pairs is logged. No padding here: the collator pads each batch to its own
    longest example.
    """
    check_int("max_length", max_length, 2, "an integer >= 2 (a prompt token and the EOS)")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; training examples need one to end each answer")
    examples, cut_questions, cut_answers = [], 0, 0
    for row in rows:
        if row["label"] != 1:
            continue
        bos, question = prompt_ids(tokenizer, row["question"])
        answer = tokenizer(answer_text(row["answer"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt, kept = fit_pair(bos, question, answer, max_length)
        cut_questions += len(prompt) < len(bos) + len(question)
        cut_answers += len(kept) < len(answer)
        ids = prompt + kept
        labels = [IGNORE_INDEX] * len(prompt) + kept if mask_prompt else list(ids)
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError("no correct (label 1) question-answer pairs to train on")
    if cut_questions or cut_answers:
        logger.warning("%d of %d training pairs are longer than %d tokens: %d lost the start of their question, "
                       "%d answers their end (and the EOS)", max(cut_questions, cut_answers), len(examples),
                       max_length, cut_questions, cut_answers)
    return examples


@dataclass
class PaddingCollator:
    """Pads a batch to its longest example: pad id in input_ids, 0 in attention_mask and −100 in
    labels, so padding is never trained on. ``pad_to_multiple_of`` helps tensor cores on GPU."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, examples: list[dict[str, list[int]]]):
        import torch

        longest = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in examples:
            n, pad = len(e["input_ids"]), longest - len(e["input_ids"])
            parts = {
                "input_ids": (e["input_ids"], [self.pad_token_id] * pad),
                "attention_mask": ([1] * n, [0] * pad),
                "labels": (e.get("labels", e["input_ids"]), [IGNORE_INDEX] * pad),
            }
            for key, (real, filler) in parts.items():
                batch[key].append(filler + list(real) if self.padding_side == "left" else list(real) + filler)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ----------------------------------------------------------------------------- ranking groups
@dataclass
class RankingGroup:
    """One question with its candidate answer sentences and their 0/1 labels."""

    question_id: str
    question: str
    answers: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def ranking_groups(rows: Iterable[dict]) -> list[RankingGroup]:
    """Questions with at least one correct candidate (the standard WikiQA evaluation set)."""
    groups: dict[str, RankingGroup] = {}
    for row in rows:
        g = groups.setdefault(row["question_id"], RankingGroup(row["question_id"], row["question"]))
        g.answers.append(row["answer"])
        g.labels.append(row["label"])
    return [g for g in groups.values() if any(g.labels)]


def split_by_question(rows: Sequence[dict], eval_fraction: float = 0.25) -> tuple:
    """Deterministic question-level split (no question on both sides): (train_rows, eval_rows)."""
    ids = sorted({r["question_id"] for r in rows})
    n_eval = max(1, round(len(ids) * eval_fraction)) if len(ids) > 1 else 0
    eval_ids = set(ids[len(ids) - n_eval:])
    return [r for r in rows if r["question_id"] not in eval_ids], [r for r in rows if r["question_id"] in eval_ids]
