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
            if command == ["generate"] and flag == "--data":
                assert flag not in text  # it reads no dataset, and refuses the flag
            else:
                assert flag in text


def test_demo_trains_evaluates_and_generates(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "1"] + FAST) == 0
    results = json.loads((out / "demo_results.json").read_text())
    for split in ("training questions", "held-out questions"):
        # the base, the TGR head and every-layer TGR, on the same questions
        assert set(results[split]) == {"base_head", "tgr_head", "tgr_layers"}
        for head in ("base_head", "tgr_head", "tgr_layers"):
            assert 0.0 <= results[split][head]["map"] <= 1.0 and results[split][head]["questions"] > 0
        assert len({results[split][head]["candidates"] for head in results[split]}) == 1
    assert len(results["generations"]) == 4 and all(r["answer"] is not None for r in results["generations"])
    assert (out / "final" / "config.json").exists()
    layers_config = json.loads((out / "every-layer" / "final" / "config.json").read_text())
    assert layers_config["tgr_mode"] == "layers" and layers_config["tgr_layers"] == "all"
    text = capsys.readouterr().out
    assert "MAP" in text
    for split in ("training questions", "held-out questions"):
        table = text.split(f"WikiQA answer selection, {split}", 1)[1].split("\n\n", 1)[0]
        rows = [line.split()[0] for line in table.splitlines()[2:]]
        assert rows == ["base", "tgr-head", "tgr-layers"], table


def test_demo_in_head_mode_skips_the_every_layer_run(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--max-steps", "1", "--tgr-mode", "head"] + FAST) == 0
    results = json.loads((out / "demo_results.json").read_text())
    assert set(results["held-out questions"]) == {"base_head", "tgr_head"}
    assert not (out / "every-layer").exists()


@pytest.mark.parametrize("held_out_labels", [[0], []])
def test_demo_data_without_a_rankable_held_out_question_is_refused_before_training(tmp_path, capsys,
                                                                                  held_out_labels):
    """The demo ranks held-out questions after training: with no correct candidate among them (or
    no held-out question at all) it failed only after both training runs."""
    rows = tmp_path / "rows.jsonl"
    labelled = [("q1", 1), ("q1", 0)] + [("q2", label) for label in held_out_labels]
    rows.write_text("".join(json.dumps({"question_id": q, "question": "Who?", "document_title": "t",
                                        "answer": "Someone.", "label": label}) + "\n" for q, label in labelled))
    out = tmp_path / "o"
    assert main(["demo", "--data", str(rows), "--output", str(out), "--max-steps", "1"] + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("tgr demo: error: the demo holds out") and err.count("\n") == 1
    assert not out.exists()


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


def test_resuming_with_other_settings_says_which(tmp_path, capsys, caplog):
    """Same tensors, another GSoT threshold: the run resumes (a schedule may mean it) and says what
    changed, rather than going on silently with the checkpoint's weights under new settings."""
    out = tmp_path / "run"
    base = ["train", "--output", str(out), "--save-steps", "1", "--batch-size", "2"] + FAST
    assert main(base + ["--max-steps", "1"]) == 0
    with caplog.at_level("WARNING", logger="tgr"):
        assert main(base + ["--max-steps", "2", "--gsot-threshold", "0.3"]) == 0
    assert "whose TGR settings differ from this run's: temperature_conf_threshold 0.4 -> 0.3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tgr"):
        assert main(base + ["--max-steps", "3", "--gsot-threshold", "0.3"]) == 0
    assert "settings differ" not in caplog.text


@pytest.mark.parametrize("flags", [["--temperature-heads", "8"], ["--tgr-layers", "all", "--tgr-mode", "both"],
                                   ["--lora-r", "2"]])
def test_resuming_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys, flags):
    """A rerun into the same folder resumes; with another model the Trainer failed on a size or an
    optimizer mismatch, with a traceback, after the model had loaded."""
    out = tmp_path / "run"
    base = ["train", "--output", str(out), "--save-steps", "1", "--batch-size", "2"] + FAST
    assert main(base + ["--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(base + ["--max-steps", "2"] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tgr train: error: cannot resume from {str(out / 'checkpoint-1')!r}: it holds another")
    assert err.count("\n") == 1


def test_resuming_from_a_folder_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    nowhere = str(tmp_path / "nowhere")
    argv = ["train", "--output", str(tmp_path / "o"), "--max-steps", "1", "--resume_from_checkpoint", nowhere]
    assert main(argv + FAST) == 2
    err = capsys.readouterr().err
    assert err == f"tgr train: error: cannot resume from {nowhere!r}: no model.safetensors there, not a checkpoint " \
                  f"of a TGR run\n"


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run with TrainingArguments flags tgr never mapped by hand, LoRA adapters on."""
    out = tmp_path_factory.mktemp("flags") / "run"
    argv = ["train", "--output", str(out), "--optim", "adafactor", "--lr_scheduler_type", "constant",
            "--max-steps", "2", "--save-steps", "2", "--lr", "0.002", "--report_to", "none",
            "--gradient-accumulation-steps", "2", "--batch-size", "2", "--logging_steps", "1",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj", "k_proj"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert main(argv + FAST) == 0
    return out


def test_train_takes_every_training_arguments_flag(trained):
    import torch

    args = torch.load(trained / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert str(getattr(args.optim, "value", args.optim)) == "adafactor"
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "constant"
    assert (args.learning_rate, args.gradient_accumulation_steps, args.per_device_train_batch_size) == (0.002, 2, 2)
    assert (args.save_total_limit, args.seed, args.remove_unused_columns) == (2, 0, False)  # tgr's defaults
    state = json.loads((trained / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    lrs = [log["learning_rate"] for log in state["log_history"] if "learning_rate" in log]
    assert lrs and all(lr == pytest.approx(0.002) for lr in lrs)  # constant schedule


def test_lora_flags_train_adapters(trained):
    from safetensors import safe_open

    config = json.loads((trained / "final" / "config.json").read_text())
    assert (config["lora_r"], config["lora_alpha"], config["lora_target_modules"]) == (4, 8.0, ["q_proj", "k_proj"])
    keys = []
    for file in (trained / "final").glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys += list(f.keys())
    assert any("lora_" in k and "k_proj" in k for k in keys)


def test_train_help_lists_training_arguments_with_tgr_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--optim", "--lr_scheduler_type", "--report_to", "--gradient_accumulation_steps", "--lora-r",
                 "--lora-alpha", "--lora-dropout", "--lora-target-modules", "--output", "--lr", "--epochs"):
        assert f"{flag} " in text
    assert "--learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE" in text
    assert "(default: 0.001)" in text and "(default: 200)" in text  # tgr's, not transformers' 5e-05 and 500


def test_train_help_states_each_default_once(capsys):
    """A tgr flag whose help says its default got a second, contradicting one from transformers'
    formatter: ``--model ... (default: the embedded demo Llama) (default: None)``."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the embedded demo Llama) (default: None)" not in text
    assert "(default: CUDA when present) (default: None)" not in text
    assert "(default: TGRConfig's, straight_through) (default: None)" not in text
    assert "(default: causal) (default: False)" not in text
    assert "(default: group_by_length)" in text  # tgr's own default of a TrainingArguments flag stays shown


def test_bad_training_flags_are_one_line_and_create_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--output", str(out), "--fp16", "--bf16", "--use_cpu"] + FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tgr train: error:") and not out.exists()


def test_label_smoothing_is_one_line_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--output", str(out), "--label_smoothing_factor", "0.1"] + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("tgr train: error: label_smoothing_factor=0.1 is not supported")
    assert err.count("\n") == 1 and not out.exists()


def test_data_without_a_correct_pair_is_refused_before_anything_is_created(tmp_path, capsys):
    rows = tmp_path / "wrong.jsonl"
    rows.write_text(json.dumps({"question_id": "1", "question": "q", "document_title": "t", "answer": "a",
                                "label": 0}) + "\n")
    assert main(["train", "--data", str(rows), "--output", str(tmp_path / "o")] + FAST) == 2
    assert "no correct (label 1) question-answer pairs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_binary_data_file_is_one_line_naming_it(tmp_path, capsys):
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(bytes(range(256)) * 16)
    assert main(["train", "--data", str(blob), "--output", str(tmp_path / "o")] + FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blob) in err and "not UTF-8 text" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command,name,damage", [
    ("eval", "model.safetensors", "truncate"),
    ("eval", "model.safetensors", "garbage"),
    ("generate", "config.json", "truncate"),
    ("generate", "config.json", "garbage"),
])
def test_a_damaged_saved_model_is_one_line_naming_the_file(trained, tmp_path, capsys, command, name, damage):
    import shutil

    ckpt = tmp_path / "final"
    shutil.copytree(trained / "final", ckpt)
    file = ckpt / name
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(range(256)) * 4)
    argv = [command, "--checkpoint", str(ckpt)] + (["--max-new-tokens", "2", "q"] if command == "generate" else [])
    assert main(argv + FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tgr {command}: error:") and name in err


def test_a_folder_saved_with_the_old_config_name_still_loads(trained, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "old"
    shutil.copytree(trained / "final", ckpt)
    (ckpt / "config.json").rename(ckpt / "tgr_config.json")
    assert main(["generate", "--checkpoint", str(ckpt), "--greedy", "--max-new-tokens", "2", "q"] + FAST) == 0
    assert "Q: q" in capsys.readouterr().out


def test_a_missing_model_extra_is_one_line(tmp_path):
    """Without transformers (blocked here), the commands that need it say which extra to install,
    and the command's help still works."""
    prelude = "import sys; sys.modules['transformers'] = None; from tgr.cli import main; "
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    helped = subprocess.run([sys.executable, "-c", prelude + "sys.exit(main(['--help']))"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert helped.returncode == 0 and "train" in helped.stdout and "generate" in helped.stdout
    for argv in (["train", "--help"], ["eval"], ["demo", "--max-steps", "1"]):
        proc = subprocess.run([sys.executable, "-c", prelude + f"sys.exit(main({argv!r}))"],
                              capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "pip install 'tgr[model]'" in proc.stderr


def test_bench_passes_its_flags_on(capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0 and "--suite" in capsys.readouterr().out


def test_parser_defaults_follow_the_seed():
    args = build_parser().parse_args(["generate", "q"])
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.7, 0.9, 50)


def _free_port() -> int:
    import socket

    with socket.socket() as s:  # a fixed port failed when another run on the machine held it
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script_args, timeout=300, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    return subprocess.run(cmd + script_args, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def test_two_process_training_with_torchrun_and_gloo(tmp_path):
    """Multi-GPU runs go through torchrun unchanged: two CPU processes, the gloo backend. Two
    processes of batch 1 accumulating 2 micro-batches train and log as one process of batch 4:
    the same loss, weights and logged statistics (those were the main process's micro-batches
    alone: lm_loss 0.855 against the step's 0.550), logged once."""
    from safetensors.torch import load_file
    from torch.testing import assert_close

    out, single = tmp_path / "ddp", tmp_path / "single"
    common = ["--max-steps", "3", "--logging_steps", "1", "--lr", "0.01"]
    proc = _torchrun(["-m", "tgr", "train", "--output", str(out), "--batch-size", "1", "--grad-accum", "2"]
                     + common + FAST[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("trained: ") == 1  # the other process logs warnings only
    assert main(["train", "--output", str(single), "--batch-size", "4"] + common + FAST) == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    logs = [log for log in state["log_history"] if "loss" in log]
    expected = [log for log in json.loads((single / "trainer_state.json").read_text())["log_history"] if "loss" in log]
    assert len(logs) == len(expected) == 3
    for got, want in zip(logs, expected, strict=True):
        for key in ("loss", "lm_loss", "temperature_mean", "temperature_std", "gsot_pruned"):
            assert abs(got[key] - want[key]) <= 2e-4, (key, got, want)
    weights, expected_weights = (load_file(folder / "final" / "model.safetensors") for folder in (out, single))
    assert weights.keys() == expected_weights.keys()
    for name, tensor in weights.items():
        assert_close(tensor, expected_weights[name], rtol=1e-4, atol=1e-6)


def test_two_process_demo_writes_one_folder_once(tmp_path):
    """tgr demo's default output folder is named by the second each process parsed its flags in:
    the processes of one torchrun that straddled a second wrote two folders (the second process's
    checkpoint state in its own). Here the second process starts 1.5 s late; the demo's results
    are written and printed by the main process alone."""
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "tgr",
                                                           "resources", "wikiqa_sample.jsonl"))]
    ids = sorted({r["question_id"] for r in rows})[:8]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["question_id"] in ids))
    script = tmp_path / "late_second_process.py"
    script.write_text("import os, sys, time\n"
                      "time.sleep(1.5 * int(os.environ['RANK']))\n"
                      "from tgr.cli import main\n"
                      "sys.exit(main(sys.argv[1:]))\n")
    proc = _torchrun([str(script), "demo", "--data", str(data), "--max-steps", "1", "--tgr-mode", "head",
                      "--batch-size", "2"] + FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = list((tmp_path / "outputs").iterdir())
    assert len(folders) == 1, folders
    assert (folders[0] / "checkpoint-1" / "rng_state_1.pth").exists()
    assert (folders[0] / "demo_results.json").exists()
    assert proc.stdout.count("demo done") == 1


def test_adapters_of_tgr_train_load_with_peft(trained):
    """The adapters `tgr train --lora-r ...` saved load with peft alone, onto a freshly loaded base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tgr.cli import DEMO_MODEL

    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(trained / "final"))
    trained_b = {name: p for name, p in peft_model.named_parameters() if "lora_B" in name}
    assert trained_b and any("k_proj" in name for name in trained_b)
    assert any(p.abs().max() > 0 for p in trained_b.values())  # B starts at zero: these were trained


@pytest.mark.parametrize("argv,message", [
    (["eval", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
    (["eval", "--num-tgr-heads", "-1"], "--num-tgr-heads: must be a positive integer, got -1"),
    (["generate", "q", "--temperature-heads", "0"], "--temperature-heads: must be a positive integer, got 0"),
])
def test_a_flag_out_of_range_is_an_argparse_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + FAST)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["generate", "q", "--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 0, got -1"),
    (["generate", "q", "--temperature", "0"], "--temperature must be a positive number, got 0.0"),
    (["generate", "q", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["generate", "q", "--top-k", "-3"], "--top-k must be None or an integer >= 0, got -3"),
])
def test_bad_generation_settings_are_one_line_before_the_model_loads(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("tgr.cli._load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(argv + FAST) == 2
    err = capsys.readouterr().err
    assert err == f"tgr generate: error: {message}\n"


class _Loading(Exception):
    """Raised in place of loading the model: the command got past its checks."""


def test_greedy_decoding_ignores_the_sampling_settings(monkeypatch):
    def load(*args, **kwargs):
        raise _Loading
    monkeypatch.setattr("tgr.cli._load", load)
    with pytest.raises(_Loading):
        main(["generate", "q", "--greedy", "--temperature", "0"] + FAST)


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_an_output_that_is_a_file_is_refused_before_the_model_loads(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tgr.cli._load", lambda *a, **k: pytest.fail("the model was loaded"))
    taken = tmp_path / "results"
    taken.write_text("mine")
    assert main([command, "--output", str(taken)] + (["q"] if command == "generate" else []) + FAST) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and taken.read_text() == "mine"


def test_a_config_that_does_not_fit_the_base_is_one_line(capsys):
    assert main(["eval", "--num-tgr-heads", "3"] + FAST) == 2  # the demo base's hidden size is 128
    err = capsys.readouterr().err
    assert err.startswith("tgr eval: error: TGRConfig.num_tgr_heads=3 must divide hidden_size=")
    assert err.count("\n") == 1


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--per_device_train_batch_size must be a positive integer, got 0"),
    (["--grad-accum", "0"], "--gradient_accumulation_steps must be a positive integer, got 0"),
    (["--max_length", "0"], "--max_length must be at least 2"),
    (["--max_length", "-5"], "--max_length must be at least 2"),
])
def test_bad_training_sizes_are_one_line_and_create_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--output", str(out)] + flags + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tgr train: error: {message}") and err.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("flags", [
    ["--eval_strategy", "steps"],
    ["--eval_strategy", "epoch", "--save_strategy", "epoch", "--load_best_model_at_end"],
])
def test_evaluation_during_training_is_one_line_and_creates_nothing(tmp_path, capsys, flags):
    out = tmp_path / "o"
    assert main(["train", "--output", str(out)] + flags + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tgr train: error: --eval_strategy {flags[1]} needs an evaluation set")
    assert err.count("\n") == 1 and not out.exists()
