"""The ``tgr`` command end to end on the embedded demo model and the project's sample."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tgr.cli import build_parser, main

FAST = ["--quiet", "--backend", "torch"]
if importlib.util.find_spec("bitsandbytes") is None:  # e.g. the GPU test machine: load unquantized
    FAST.append("--no-4bit")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_command_explains_its_flags(capsys):
    for command in ([], ["train"], ["eval"], ["generate"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main(command + ["--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        for flag in (["--model", "--data", "--output", "--device", "--backend"] if command else ["demo", "bench"]):
            assert flag in text


def test_demo_trains_evaluates_and_generates(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "1"] + FAST) == 0
    results = json.loads((out / "demo_results.json").read_text())
    for split in ("training questions", "held-out questions"):
        for head in ("tgr_head", "base_head"):
            assert 0.0 <= results[split][head]["map"] <= 1.0 and results[split][head]["questions"] > 0
    assert len(results["generations"]) == 4 and all(r["answer"] is not None for r in results["generations"])
    assert (out / "final" / "tgr_config.json").exists()
    assert "MAP" in capsys.readouterr().out


def test_train_resumes_then_eval_and_generate_use_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--output", str(out), "--save-steps", "2", "--batch-size", "2"] + FAST
    assert main(base + ["--max-steps", "2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    assert main(base + ["--max-steps", "4"]) == 0  # same folder: resumes from checkpoint-2
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    ckpt = str(out / "final")
    assert main(["eval", "--checkpoint", ckpt, "--output", str(tmp_path / "ev")] + FAST) == 0
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results) == {"tgr_head", "base_head"}
    assert main(["generate", "--checkpoint", ckpt, "--greedy", "--max-new-tokens", "5", "--output",
                 str(tmp_path / "gen"), "How many legs does a spider have?"] + FAST) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert record["question"] == "How many legs does a spider have?"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--model", "./no/such/model"], "does not exist"),
        (["eval", "--data", "./no/such/file.jsonl"], "does not exist"),
        (["generate"], "at least one question"),
        (["eval", "--checkpoint", "."], "not a saved TGR model"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    assert main(argv + FAST) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_existing_output_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["train", "--output", str(tmp_path), "--max-steps", "1"] + FAST) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_bad_labels_in_a_local_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": "1", "question": "q", "document_title": "t", "answer": "a",
                               "label": 5}) + "\n")
    assert main(["train", "--data", str(bad), "--output", str(tmp_path / "o")] + FAST) == 2
    assert "labels must be 0 or 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written left behind


def test_parser_defaults_follow_the_seed():
    args = build_parser().parse_args(["generate", "q"])
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.7, 0.9, 50)


def test_two_process_training_with_torchrun_and_gloo(tmp_path):
    """Multi-GPU runs go through torchrun unchanged: two CPU processes, the gloo backend."""
    out = tmp_path / "ddp"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "tgr", "train", "--output", str(out), "--max-steps", "3", "--batch-size", "2"] + FAST
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert (out / "final" / "model.safetensors").exists()
