"""WikiQA loading, validation, training examples, collation and ranking groups (the word-level
``tokenizer`` fixture comes from conftest.py)."""
import csv
import json

import pytest
import torch

from tgr.data import (
    COLUMNS,
    IGNORE_INDEX,
    SAMPLE_PATH,
    DataError,
    PaddingCollator,
    build_training_examples,
    load_wikiqa,
    ranking_groups,
    split_by_question,
)

ROWS = [
    {"question_id": "Q1", "question": "Who?", "document_title": "T", "answer": "Someone.", "label": 1},
    {"question_id": "Q1", "question": "Who?", "document_title": "T", "answer": "Other.", "label": 0},
    {"question_id": "Q2", "question": "What?", "document_title": "U", "answer": "Nothing.", "label": 0},
]


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        pytest.importorskip("pyarrow", reason="parquet needs pyarrow (installed with datasets)")
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet"])
def test_local_files_of_every_format_load_the_same_rows(tmp_path, fmt):
    path = tmp_path / f"wiki.{fmt}"
    _write(path, ROWS, fmt)
    assert load_wikiqa(str(path)) == ROWS


def test_folder_picks_the_split_files(tmp_path):
    _write(tmp_path / "train.jsonl", ROWS[:2], "jsonl")
    _write(tmp_path / "test.jsonl", ROWS[2:], "jsonl")
    assert load_wikiqa(str(tmp_path), split="train") == ROWS[:2]
    assert load_wikiqa(str(tmp_path), split="test") == ROWS[2:]


def test_a_folder_never_mixes_other_splits_into_the_one_asked_for(tmp_path):
    """Files that name their split after a prefix (wiki_qa-test.jsonl) are that split's; a folder whose
    files name other splits only is an error, not all of them read together (training data in a test)."""
    _write(tmp_path / "wiki_qa-train.jsonl", ROWS[:2], "jsonl")
    _write(tmp_path / "wiki_qa-test.jsonl", ROWS[2:], "jsonl")
    assert load_wikiqa(str(tmp_path), split="test") == ROWS[2:]
    assert load_wikiqa(str(tmp_path), split="train") == ROWS[:2]
    with pytest.raises(DataError, match="no file for split 'validation'"):
        load_wikiqa(str(tmp_path), split="validation")
    other = tmp_path / "unnamed"
    other.mkdir()
    _write(other / "wikiqa.jsonl", ROWS, "jsonl")  # no file names a split: all of them, as before
    assert load_wikiqa(str(other), split="test") == ROWS


def test_the_shipped_sample_is_a_meaningful_ranking_set():
    rows = load_wikiqa(None)
    assert SAMPLE_PATH.stat().st_size < 100_000
    groups = ranking_groups(rows)
    assert len(groups) >= 40
    for g in groups:  # one correct and several wrong candidates per question
        assert sum(g.labels) == 1 and len(g.labels) >= 3
    # The correct answer's position varies, so candidate order carries no signal.
    assert len({g.labels.index(1) for g in groups}) > 1


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_integral_float_labels_are_labels(tmp_path, fmt):
    """A float label column (1.0 / 0.0, as pandas writes an int column that had a gap) is 0/1 labels."""
    path = tmp_path / f"wiki.{fmt}"
    _write(path, [{**r, "label": float(r["label"])} for r in ROWS], fmt)
    assert load_wikiqa(str(path)) == ROWS
    _write(path, [{**ROWS[0], "label": 0.5}], fmt)
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        load_wikiqa(str(path))


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{k: v for k, v in ROWS[0].items() if k != "label"}], "lacks the column"),
        ([{**ROWS[0], "label": 2}], "labels must be 0 or 1"),
        ([{**ROWS[0], "label": "yes"}], "labels must be 0 or 1"),
        ([], "holds no rows"),
    ],
)
def test_bad_rows_are_named(tmp_path, rows, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=match):
        load_wikiqa(str(path))


def test_empty_missing_and_unsupported_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_wikiqa(str(empty))
    with pytest.raises(DataError, match="does not exist"):
        load_wikiqa(str(tmp_path / "nope.jsonl"))
    other = tmp_path / "data.xml"
    other.write_text("<x/>")
    with pytest.raises(DataError, match="unsupported file type"):
        load_wikiqa(str(other))


def test_unreachable_hub_fails_fast_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load 'microsoft/wiki_qa'.*local files"):
        load_wikiqa("microsoft/wiki_qa")


def test_training_examples_end_with_eos_and_can_mask_the_prompt(tokenizer):
    (full,) = build_training_examples(ROWS, tokenizer)
    assert full["input_ids"][0] == tokenizer.bos_token_id
    assert full["input_ids"][-1] == tokenizer.eos_token_id
    assert full["labels"] == full["input_ids"]
    (masked,) = build_training_examples(ROWS, tokenizer, mask_prompt=True)
    prompt_len = 1 + len(tokenizer("Q: Who?\nA:", add_special_tokens=False)["input_ids"])
    assert masked["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert masked["labels"][prompt_len:] == masked["input_ids"][prompt_len:]
    (short,) = build_training_examples(ROWS, tokenizer, max_length=4)
    assert len(short["input_ids"]) == 4 and short["input_ids"][-1] == tokenizer.eos_token_id
    assert short["input_ids"][0] == tokenizer.bos_token_id  # the question's start went, not the answer
    for bad in (1, 0, -5):  # a slice by max_length - 1 would keep the wrong tokens
        with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
            build_training_examples(ROWS, tokenizer, max_length=bad)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_never_trains_on_padding(side):
    batch = PaddingCollator(pad_token_id=0, pad_to_multiple_of=4, padding_side=side)(
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].shape == (2, 4)
    pad = batch["attention_mask"] == 0
    assert torch.all(batch["labels"][pad] == IGNORE_INDEX) and torch.all(batch["input_ids"][pad] == 0)
    assert batch["attention_mask"].sum().item() == 4
    first_real = 0 if side == "right" else 1
    assert batch["input_ids"][1, 3 * first_real] == 8


def test_ranking_groups_and_question_split():
    groups = ranking_groups(ROWS)
    assert [g.question_id for g in groups] == ["Q1"]  # Q2 has no correct answer
    assert groups[0].labels == [1, 0]
    rows = load_wikiqa(None)
    train, held_out = split_by_question(rows)
    assert {r["question_id"] for r in train}.isdisjoint({r["question_id"] for r in held_out})
    assert len(train) + len(held_out) == len(rows) and held_out
    assert all(c in rows[0] for c in COLUMNS)


@pytest.mark.parametrize("name,text", [
    ("cut.jsonl", json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1])[:25]),
    ("cut.json", json.dumps(ROWS)[:60]),
])
def test_truncated_json_is_named(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=r"cut\.jsonl?: not valid JSON \(") as e:
        load_wikiqa(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["blob.jsonl", "blob.csv", "blob.tsv"])
def test_a_file_that_is_not_utf8_text_is_named(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"question_id,question\n" + bytes(range(128, 256)) * 8)
    with pytest.raises(DataError, match=rf"{name} is not UTF-8 text \(bad byte at offset 21\)") as e:
        load_wikiqa(str(path))
    assert "\n" not in str(e.value)


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    path = tmp_path / "blob.parquet"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match=r"blob\.parquet: not a readable Parquet file \("):
        load_wikiqa(str(path))


def test_csv_cells_stay_text_as_written(tmp_path):
    rows = [{**ROWS[0], "question_id": "007", "answer": "1.50"}, {**ROWS[1], "question_id": "007", "answer": ""}]
    path = tmp_path / "wiki.csv"
    _write(path, rows, "csv")
    assert load_wikiqa(str(path)) == rows


def test_header_only_csv_and_rows_missing_a_key(tmp_path):
    header = tmp_path / "header.csv"
    header.write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(DataError, match="holds no rows"):
        load_wikiqa(str(header))
    gap = tmp_path / "gap.jsonl"
    gap.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({k: v for k, v in ROWS[1].items() if k != "answer"}) + "\n")
    with pytest.raises(DataError, match="row 1 has no answer"):
        load_wikiqa(str(gap))


def test_loading_writes_nothing_beside_the_data(tmp_path):
    path = tmp_path / "wiki.jsonl"
    _write(path, ROWS, "jsonl")
    assert load_wikiqa(str(path)) == ROWS
    assert [p.name for p in tmp_path.iterdir()] == ["wiki.jsonl"]


def test_a_long_question_loses_its_start_and_the_answer_is_trained_whole(tokenizer, caplog):
    """As evaluation cuts a pair: the start of the question goes first (the BOS stays), so with
    ``mask_prompt`` a long question still leaves the whole answer and its EOS to train on (it left
    the EOS alone); an answer that alone does not fit loses its end and the EOS."""
    long_question = " ".join(["Who"] * 40) + "?"
    rows = [dict(ROWS[0], question=long_question)]
    answer = tokenizer(" Someone.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with caplog.at_level("WARNING", logger="tgr"):
        (ex,) = build_training_examples(rows, tokenizer, max_length=12, mask_prompt=True)
    assert len(ex["input_ids"]) == 12 and ex["input_ids"][0] == tokenizer.bos_token_id
    assert ex["input_ids"][-len(answer):] == answer
    assert ex["labels"] == [IGNORE_INDEX] * (12 - len(answer)) + answer
    assert "1 of 1 training pairs are longer than 12 tokens: 1 lost the start of their question" in caplog.text

    long_answer = dict(ROWS[0], answer=" ".join(["someone"] * 30))
    (cut,) = build_training_examples([long_answer], tokenizer, max_length=12)
    assert len(cut["input_ids"]) == 12 and tokenizer.eos_token_id not in cut["input_ids"]
    assert cut["input_ids"][0] == tokenizer.bos_token_id and cut["labels"] == cut["input_ids"]


ONE_ROW = {"question_id": "Q1", "question": "Who?", "document_title": "T", "answer": "Someone.", "label": 1}


def test_a_folder_whose_files_differ_in_columns_is_one_data_error_naming_the_file(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ONE_ROW) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({k: v for k, v in ONE_ROW.items() if k != "document_title"}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl.*document_title"):  # a bare KeyError before
        load_wikiqa(str(tmp_path))


def test_excel_utf8_csv_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "wiki.csv"
    path.write_text("\ufeff" + ",".join(COLUMNS) + "\nQ1,Who?,T,Someone.,1\n", encoding="utf-8")
    assert load_wikiqa(str(path)) == [ONE_ROW]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_a_csv_written_by_pandas_with_its_index_column_loads(tmp_path, suffix, sep):
    path = tmp_path / f"wiki{suffix}"
    path.write_text(sep + sep.join(COLUMNS) + "\n" + sep.join(["0", "Q1", "Who?", "T", "Someone.", "1"]) + "\n")
    assert load_wikiqa(str(path)) == [ONE_ROW]


def test_tsv_cells_are_kept_as_written_and_a_stray_quote_never_merges_rows(tmp_path):
    path = tmp_path / "wiki.tsv"
    lines = ["\t".join(COLUMNS),
             'Q1\tWhich film?\tT\t"Heat" is a 1995 film.\t1',
             'Q2\tWhat did he say?\tT\t"Hello\t1',
             'Q3\tWho?\tT\tBob" said it.\t0']
    path.write_text("\n".join(lines) + "\n")
    rows = load_wikiqa(str(path))
    assert [r["question_id"] for r in rows] == ["Q1", "Q2", "Q3"]  # Q2 and Q3 were one row
    assert [r["answer"] for r in rows] == ['"Heat" is a 1995 film.', '"Hello', 'Bob" said it.']


def test_a_json_file_whose_first_value_is_null_is_a_data_error(tmp_path):
    """pyarrow's JSON reader crashed the process (SIGSEGV) on it; the check runs before it."""
    for text in ("null", "\nnull\n" + json.dumps(ONE_ROW) + "\n"):
        path = tmp_path / "wiki.json"
        path.write_text(text)
        with pytest.raises(DataError, match="is null, not a row"):
            load_wikiqa(str(path))


def test_upper_case_suffixes_are_data_files_in_a_folder_too(tmp_path):
    (tmp_path / "train.JSONL").write_text(json.dumps(ONE_ROW) + "\n")
    assert load_wikiqa(str(tmp_path / "train.JSONL")) == [ONE_ROW]
    assert load_wikiqa(str(tmp_path)) == [ONE_ROW]
