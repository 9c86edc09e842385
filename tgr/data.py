"""WikiQA data: loading (hub or local files), validation, training examples and ranking groups.

WikiQA rows have the columns ``question_id, question, document_title, answer, label`` (label 1:
the sentence answers the question). Training uses the correct pairs as ``"Q: <question>\\nA:
<answer>"`` (the seed's format), fixed: an EOS ends each answer, labels are −100 on padding, and
the prompt can be left out of the loss. Evaluation ranks each question's candidate sentences.

The project ships its own small sample in WikiQA's schema (``SAMPLE_PATH``), written for this
project: WikiQA's license does not allow its rows to be redistributed.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

logger = logging.getLogger("tgr")

COLUMNS = ("question_id", "question", "document_title", "answer", "label")
HUB_DATASET = "microsoft/wiki_qa"
SAMPLE_PATH = Path(__file__).parent / "resources" / "wikiqa_sample.jsonl"
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data source that cannot be used as WikiQA, with a message that says why."""


# ----------------------------------------------------------------------------- loading
def load_wikiqa(source: Optional[str] = None, split: str = "train") -> List[Dict]:
    """WikiQA rows as a list of dicts with the five columns, validated.

    ``source``: None (the project's sample), a local file (.json, .jsonl, .csv, .tsv, .parquet),
    a local folder (its files whose name starts with ``split``, or all data files when none
    does), or a hub dataset name such as ``microsoft/wiki_qa``.
    """
    if source is None or source == "sample":
        rows, where = _read_file(SAMPLE_PATH), str(SAMPLE_PATH)
    elif os.path.exists(source):
        rows, where = _read_local(Path(source), split), source
    elif _looks_like_path(source):
        raise DataError(f"data path {source!r} does not exist")
    else:
        rows, where = _read_hub(source, split), f"{source} [{split}]"
    return validate_rows(rows, where)


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(LOCAL_SUFFIXES) or os.sep + os.sep in source


def _read_local(path: Path, split: str) -> List[Dict]:
    if path.is_file():
        return _read_file(path)
    files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise DataError(f"folder {path} holds no data file ({', '.join(LOCAL_SUFFIXES)})")
    chosen = [p for p in files if p.name.startswith(split)] or files
    rows: List[Dict] = []
    for p in chosen:
        rows.extend(_read_file(p))
    return rows


def _read_file(path: Path) -> List[Dict]:
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of datasets

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix in (".csv", ".tsv"):
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        text = f.read()
    try:
        if suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _read_hub(name: str, split: str) -> List[Dict]:
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


def validate_rows(rows: Sequence[Dict], where: str) -> List[Dict]:
    """Check columns and labels; return rows with ``label`` as int and text fields as str."""
    if not rows:
        raise DataError(f"{where} holds no rows")
    missing = [c for c in COLUMNS if c not in rows[0]]
    if missing:
        raise DataError(f"{where} lacks the column(s) {', '.join(missing)}; WikiQA needs {', '.join(COLUMNS)}")
    clean, bad = [], []
    for i, row in enumerate(rows):
        label = row["label"]
        try:
            label_int = int(str(label).strip())
        except ValueError:
            label_int = None
        if label_int not in (0, 1) or (isinstance(label, float) and label != label_int):
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


def answer_text(answer: str) -> str:
    return f" {answer.strip()}"


def build_training_examples(rows: Iterable[Dict], tokenizer, max_length: int = 192,
                            mask_prompt: bool = False) -> List[Dict[str, List[int]]]:
    """Tokenized ``Q: ...\\nA: <answer><eos>`` examples from the correct (label 1) pairs.

    The prompt and the answer are tokenized separately (so the prompt can be masked with
    ``mask_prompt``), then truncated to ``max_length`` keeping the EOS. No padding here: the
    collator pads each batch to its own longest example.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; training examples need one to end each answer")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    examples = []
    for row in rows:
        if row["label"] != 1:
            continue
        prompt = bos + tokenizer(prompt_text(row["question"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(answer_text(row["answer"]), add_special_tokens=False)["input_ids"]
        ids = (prompt + answer)[: max_length - 1] + [tokenizer.eos_token_id]
        labels = list(ids)
        if mask_prompt:
            n = min(len(prompt), len(ids) - 1)
            labels[:n] = [IGNORE_INDEX] * n
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError("no correct (label 1) question-answer pairs to train on")
    return examples


@dataclass
class PaddingCollator:
    """Pads a batch to its longest example: pad id in input_ids, 0 in attention_mask and −100 in
    labels, so padding is never trained on. ``pad_to_multiple_of`` helps tensor cores on GPU."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    padding_side: str = "right"

    def __call__(self, examples: List[Dict[str, List[int]]]):
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
    answers: List[str] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)


def ranking_groups(rows: Iterable[Dict]) -> List[RankingGroup]:
    """Questions with at least one correct candidate (the standard WikiQA evaluation set)."""
    groups: Dict[str, RankingGroup] = {}
    for row in rows:
        g = groups.setdefault(row["question_id"], RankingGroup(row["question_id"], row["question"]))
        g.answers.append(row["answer"])
        g.labels.append(row["label"])
    return [g for g in groups.values() if any(g.labels)]


def split_by_question(rows: Sequence[Dict], eval_fraction: float = 0.25) -> tuple:
    """Deterministic question-level split (no question on both sides): (train_rows, eval_rows)."""
    ids = sorted({r["question_id"] for r in rows})
    n_eval = max(1, round(len(ids) * eval_fraction)) if len(ids) > 1 else 0
    eval_ids = set(ids[len(ids) - n_eval:])
    return [r for r in rows if r["question_id"] not in eval_ids], [r for r in rows if r["question_id"] in eval_ids]
