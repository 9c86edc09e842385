"""The `tgr` command on bad or stale input: one clear line (exit 2), nothing created, never a traceback."""
import json

import pytest
import torch

from tgr.cli import DEMO_MODEL, main

FAST = ["--quiet", "--backend", "torch"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _one_line(capsys, command, *needles):
    err = capsys.readouterr().err
    assert err.startswith(f"tgr {command}: error: ") and err.count("\n") == 1, err[-2000:]
    for needle in needles:
        assert needle in err, err


def _saved_head(tmp_path):
    """A saved TGR folder (config.json only; enough for the checks before the weights load)."""
    from tgr.config import TGRConfig

    folder = tmp_path / "ckpt"
    TGRConfig(base_model_name_or_path=DEMO_MODEL).save_pretrained(folder)
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_device_cuda_without_cuda_is_one_line(command, tmp_path, capsys):
    argv = {"train": ["train", "--output", str(tmp_path / "o"), "--max-steps", "1"],
            "eval": ["eval"], "generate": ["generate", "q"]}[command]
    assert main(argv + ["--device", "cuda"] + FAST) == 2
    _one_line(capsys, command, "--device", "CUDA is not available")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_device_that_is_no_device_is_one_line(command, tmp_path, capsys):
    argv = ["train", "--output", str(tmp_path / "o")] if command == "train" else ["eval"]
    assert main(argv + ["--device", "banana"] + FAST) == 2
    _one_line(capsys, command, "--device 'banana' is not a device")


def test_a_bad_device_is_not_blamed_on_the_checkpoint(tmp_path, capsys):
    folder = _saved_head(tmp_path)
    assert main(["generate", "q", "--checkpoint", str(folder), "--device", "banana"] + FAST) == 2
    err = capsys.readouterr().err
    assert "damaged" not in err and "--device 'banana' is not a device" in err


def test_a_base_model_given_as_checkpoint_says_so(capsys):
    assert main(["eval", "--checkpoint", DEMO_MODEL] + FAST) == 2
    _one_line(capsys, "eval", "'llama' model, not of a saved TGR model", "--model")


def test_a_checkpoint_whose_base_folder_is_gone_is_one_clear_line(tmp_path, capsys):
    folder = _saved_head(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["base_model_name_or_path"] = "/no/such/place/llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--checkpoint", str(folder)] + FAST) == 2
    _one_line(capsys, "eval", "/no/such/place/llama", "does not exist", "--model")


def test_a_demo_run_loads_after_tgr_is_installed_elsewhere(tmp_path, monkeypatch):
    """A demo run names the embedded base by its path in the install that trained it."""
    from tgr.cli import _config, build_parser

    folder = _saved_head(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["base_model_name_or_path"] = "/old/venv/lib/python3.11/site-packages/tgr/resources/demo-llama"
    (folder / "config.json").write_text(json.dumps(config))
    args = build_parser().parse_args(["eval", "--checkpoint", str(folder)] + FAST)
    assert _config(args, str(folder)).base_model_name_or_path == DEMO_MODEL


def test_a_model_path_that_is_a_file_is_not_called_missing(tmp_path, capsys):
    afile = tmp_path / "weights.bin"
    afile.write_text("x")
    assert main(["eval", "--model", str(afile)] + FAST) == 2
    _one_line(capsys, "eval", "is a file")


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--num_train_epochs must be positive"),
    (["--max-steps", "0"], "--max_steps must be a positive integer"),
])
def test_a_run_of_no_steps_is_refused_and_creates_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--output", str(out)] + flags + FAST) == 2
    _one_line(capsys, "train", message)
    assert not out.exists()


def test_resuming_from_a_saved_model_rather_than_a_checkpoint_is_one_line(tmp_path, capsys):
    """final/ holds model.safetensors but no trainer_state.json: the Trainer raised FileNotFoundError."""
    first = tmp_path / "first"
    assert main(["train", "--output", str(first), "--max-steps", "1"] + FAST) == 0
    capsys.readouterr()
    out = tmp_path / "second"
    assert main(["train", "--output", str(out), "--max-steps", "2",
                 "--resume_from_checkpoint", str(first / "final")] + FAST) == 2
    _one_line(capsys, "train", "trainer_state.json", "Trainer checkpoint")
    assert not out.exists()  # nothing created


def test_overwrite_never_deletes_the_checkpoint_it_is_asked_to_resume_from(tmp_path, capsys):
    """--overwrite emptied the output folder, the checkpoint inside it included, and the run then
    failed on the missing checkpoint: the run was lost."""
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), "--max-steps", "1"] + FAST) == 0
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["train", "--output", str(out), "--max-steps", "2", "--overwrite",
                 "--resume_from_checkpoint", str(checkpoint)] + FAST) == 2
    _one_line(capsys, "train", "lies inside --output_dir", "--overwrite")
    assert (checkpoint / "model.safetensors").is_file() and (out / "final").is_dir()


def test_a_batch_that_drop_last_leaves_empty_is_refused_before_anything_is_created(tmp_path, capsys, monkeypatch):
    """The check ran inside the training, once the model had loaded and the output folder had been
    made (an empty folder left behind) or, with --overwrite, emptied: the previous run was lost."""
    import tgr.cli

    monkeypatch.setattr(tgr.cli, "_load", lambda *a, **k: pytest.fail("the model loaded"))
    flags = ["--batch-size", "64", "--dataloader_drop_last"] + FAST
    out = tmp_path / "o"
    assert main(["train", "--output", str(out)] + flags) == 2
    _one_line(capsys, "train", "48 training example(s) do not fill one batch of 64")
    assert not out.exists()
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    assert main(["train", "--output", str(earlier), "--overwrite"] + flags) == 2
    _one_line(capsys, "train", "do not fill one batch")
    assert (earlier / "results.json").is_file()


def test_resuming_from_a_folder_that_is_no_checkpoint_creates_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["train", "--output", str(out), "--resume_from_checkpoint", str(tmp_path / "none")] + FAST) == 2
    _one_line(capsys, "train", "cannot resume from")
    assert not out.exists()


@pytest.mark.parametrize("checkpoint", ["./no/such/run/final", "someone/tgr-model"])
def test_a_checkpoint_that_is_not_a_folder_says_so(checkpoint, capsys):
    assert main(["eval", "--checkpoint", checkpoint] + FAST) == 2
    _one_line(capsys, "eval", f"--checkpoint {checkpoint!r} is not a folder")


def test_the_version_is_not_the_one_of_the_legacy_format(tmp_path):
    """tgr 0.1 saved tgr_config.json (tgr_version "0.1.0") and adapters in the bare base; folders of
    this format stamp tgr_version too, so it must not be the legacy one."""
    from packaging.version import Version

    from tgr.config import TGRConfig

    TGRConfig(base_model_name_or_path="some/base").save_pretrained(tmp_path)
    stamped = json.loads((tmp_path / "config.json").read_text())["tgr_version"]
    assert Version(stamped) >= Version("0.2")


def test_generate_refuses_data(capsys):
    # generate reads its questions from the arguments or --file; a --data was accepted and ignored.
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "q", "--data", "rows.jsonl"] + FAST)
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --data" in capsys.readouterr().err


@pytest.mark.parametrize("pair", [["--lr", "1e-3", "--learning_rate", "2e-3"],
                                  ["--output", "a", "--output-dir", "b"],
                                  ["--grad-accum=2", "--gradient_accumulation_steps", "4"]])
def test_a_short_flag_and_its_long_name_together_are_refused(pair, tmp_path, capsys, monkeypatch):
    # argparse kept the last of the two silently (--lr 1e-3 --learning_rate 2e-3 trained at 2e-3).
    monkeypatch.chdir(tmp_path)
    assert main(["train", *pair] + FAST) == 2
    _one_line(capsys, "train", "set the same thing", "give one")
    assert not any(tmp_path.iterdir())


def test_a_distributed_launch_prints_a_command_line_error_once(tmp_path, capsys, monkeypatch):
    """Under torchrun every process parses the same command line: the main process prints its
    error, the others exit 2 without repeating it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad = ["train", "--lr", "1e-3", "--learning_rate", "2e-3"] + FAST
    monkeypatch.setenv("RANK", "1")
    assert main(bad) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--no-such-flag"] + FAST)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert main(bad) == 2
    _one_line(capsys, "train", "set the same thing")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_error_met_by_another_process_names_its_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--output", str(tmp_path / "o"), "--max-steps", "1", "--device", "cuda"] + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("tgr train (rank 1): error: ") and "CUDA is not available" in err and err.count("\n") == 1


def test_eval_on_start_is_refused_in_one_line_before_anything_is_created(tmp_path, capsys):
    # The Trainer raised "evaluation requires an eval_dataset" once the model had loaded.
    out = tmp_path / "o"
    assert main(["train", "--output", str(out), "--max-steps", "1", "--eval_on_start"] + FAST) == 2
    _one_line(capsys, "train", "--eval_on_start")
    assert not out.exists()
