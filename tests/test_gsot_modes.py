"""GSoT gate modes in the model: a pruned token's temperature learns under the straight-through and
soft gates (in the TGR head and in every layer), every mode gates hard in eval mode, and the mode
travels through the config, its files and the command line."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tgr import build_tiny_llama  # noqa: E402

transformers = pytest.importorskip("transformers")

THRESHOLD = 0.4
# Under the threshold, and within a few gate widths (ε = 0.05) of it: the learning gates' slope
# there is far from zero.
COLD = 0.38
LEARNING_MODES = ("straight_through", "soft")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # Larger random weights than the default tiny model's, so that attention matters to the logits.
    return build_tiny_llama(tmp_path_factory.mktemp("gsot-llama"), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256, initializer_range=0.2)


def _tokens(seed=3):
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return ids, mask


def _head_model(path, mode, **fields):
    from tgr import TGRConfig, TGRLlamaModel

    config = TGRConfig(base_model_name_or_path=path, load_in_4bit=False, compute_dtype="float32", device="cpu",
                       attention_backend="torch", temperature_heads=4, temperature_conf_threshold=THRESHOLD,
                       gsot_mode=mode, **fields)
    return TGRLlamaModel(config)


def _layers_model(path, mode):
    from transformers import AutoModelForCausalLM

    from tgr.layers import apply_tgr

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return apply_tgr(model, gsot_threshold=THRESHOLD, gsot_mode=mode, temperature_heads=4, backend="torch")


def _set_projection(mechanisms, *, cold: bool, seed: int = 0):
    """``cold``: every temperature at COLD (every token under τ); else random weights that spread
    the temperatures around τ, some tokens on each side of it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mechanism in mechanisms:
            w, b = mechanism.proj.weight, mechanism.proj.bias
            if cold:
                w.zero_()
                b.fill_(math.log(COLD / (1 - COLD)))
            else:
                w.copy_(torch.randn(w.shape, generator=g) * 3.0 / w.shape[1] ** 0.5)
                b.fill_(math.log(THRESHOLD / (1 - THRESHOLD)))


def _layer_mechanisms(model):
    from tgr.layers import tgr_layer_modules

    return list(tgr_layer_modules(model).values())


# ---------------------------------------------------------------------------------------------
# A pruned token's temperature gets a gradient under the learning gates, none under the hard one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["hard", *LEARNING_MODES])
def test_a_pruned_token_gets_a_temperature_gradient_in_the_head_unless_the_gate_is_hard(mode, llama_dir):
    # No regularizer: its pull towards initial_temperature would give every mode a gradient.
    model = _head_model(llama_dir, mode, temperature_regularization_weight=0.0).train()
    mechanism = model.temperature_mechanisms[0]
    _set_projection([mechanism], cold=True)
    ids, mask = _tokens()
    out = model(ids, attention_mask=mask, labels=ids)
    assert (out.temperatures.mean(-1) < THRESHOLD).all() and not out.gsot_mask.any()  # every token pruned
    out.loss.backward()
    grads = [mechanism.proj.weight.grad, mechanism.proj.bias.grad]
    if mode == "hard":
        assert all(g is None or not g.any() for g in grads)
    else:
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["hard", *LEARNING_MODES])
def test_a_pruned_token_gets_a_temperature_gradient_in_every_layer_unless_the_gate_is_hard(mode, llama_dir):
    model = _layers_model(llama_dir, mode).train()
    mechanisms = _layer_mechanisms(model)
    _set_projection(mechanisms, cold=True)
    ids, mask = _tokens()
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    for index, mechanism in enumerate(mechanisms):
        grads = [mechanism.proj.weight.grad, mechanism.proj.bias.grad]
        if mode == "hard":
            assert all(g is None or not g.any() for g in grads), index
        else:
            assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), index


# ---------------------------------------------------------------------------------------------
# Eval mode gates hard, whatever the mode
# ---------------------------------------------------------------------------------------------


def _head_logits(path, mode, training):
    torch.manual_seed(0)
    model = _head_model(path, mode).train(training)
    _set_projection(model.temperature_mechanisms, cold=False, seed=5)
    ids, mask = _tokens()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert out.gsot_mask.any() and not out.gsot_mask.all()  # tokens on both sides of τ
    return out.logits


def _layers_logits(path, mode, training):
    model = _layers_model(path, mode).train(training)
    _set_projection(_layer_mechanisms(model), cold=False, seed=5)
    ids, mask = _tokens()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


@pytest.mark.parametrize("placement", ["head", "layers"])
def test_eval_mode_gates_hard_in_every_mode(placement, llama_dir):
    logits = _head_logits if placement == "head" else _layers_logits
    hard = logits(llama_dir, "hard", training=False)
    for mode in LEARNING_MODES:
        torch.testing.assert_close(logits(llama_dir, mode, training=False), hard, rtol=0, atol=0)
    # In training the soft gate's forward is not the hard one (so the comparison above can fail),
    # and the straight-through gate's is.
    assert not torch.allclose(logits(llama_dir, "soft", training=True), logits(llama_dir, "hard", training=True))
    torch.testing.assert_close(logits(llama_dir, "straight_through", training=True),
                               logits(llama_dir, "hard", training=True), rtol=0, atol=0)


def test_pruned_fraction_counts_rows_under_the_threshold_in_every_mode(llama_dir):
    from tgr.train import step_statistics

    masks = {}
    for mode in ("hard", *LEARNING_MODES):
        model = _head_model(llama_dir, mode).train()
        _set_projection(model.temperature_mechanisms, cold=False, seed=5)
        ids, mask = _tokens()
        out = model(ids, attention_mask=mask, labels=ids)
        assert torch.equal(out.gsot_mask, out.temperatures.detach().mean(-1) >= THRESHOLD)
        masks[mode] = step_statistics(out.temperatures, out.gsot_mask, out.lm_loss, mask)["gsot_pruned"]
    assert 0 < masks["hard"] < 1 and masks["hard"] == masks["soft"] == masks["straight_through"]


def test_the_layers_width_and_threshold_are_scaled_like_the_temperature(llama_dir, monkeypatch):
    # The kernel sees t̄ / t_init; the gate of t̄ against τ with width ε is the gate of t̄ / t_init
    # against τ / t_init with width ε / t_init.
    import tgr.layers

    seen = []
    real = tgr.layers.temperature_guided_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["gsot_threshold"], kwargs["gsot_mode"], kwargs["gsot_width"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tgr.layers, "temperature_guided_attention", spy)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    tgr.layers.apply_tgr(model, layers=[0], gsot_threshold=0.3, gsot_mode="soft", gsot_width=0.02,
                         initial_temperature=0.4, backend="torch")
    ids, mask = _tokens()
    model.train()(ids, attention_mask=mask)
    model.eval()(ids, attention_mask=mask)
    assert [mode for _, mode, _ in seen] == ["soft", "hard"]
    assert [(threshold, width) for threshold, _, width in seen] == [pytest.approx((0.75, 0.05))] * 2
    settings = tgr.layers.tgr_layer_settings(model)
    assert (settings.gsot_mode, settings.gsot_width) == ("soft", 0.02)


# ---------------------------------------------------------------------------------------------
# Config, files, command line, bad input
# ---------------------------------------------------------------------------------------------


def test_config_round_trip_and_old_configs(tmp_path):
    from tgr import TGRConfig
    from tgr.config import DEFAULT_GSOT_MODE, DEFAULT_GSOT_WIDTH, GSOT_MODES
    from tgr_kernels._gate import GSOT_MODES as KERNEL_GSOT_MODES

    assert GSOT_MODES == KERNEL_GSOT_MODES
    config = TGRConfig(gsot_mode="soft", gsot_width=0.125, tgr_mode="both")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["gsot_mode"] == "soft" and saved["gsot_width"] == 0.125
    loaded = TGRConfig.from_pretrained(tmp_path)
    assert loaded == config and (loaded.gsot_mode, loaded.gsot_width) == ("soft", 0.125)
    # A config saved before the fields existed loads with the defaults (inference gates hard
    # whatever the mode, so the saved model evaluates as it did).
    del saved["gsot_mode"], saved["gsot_width"]
    old = TGRConfig.from_dict(saved)
    assert (old.gsot_mode, old.gsot_width) == (DEFAULT_GSOT_MODE, DEFAULT_GSOT_WIDTH)
    assert TGRConfig().gsot_mode == DEFAULT_GSOT_MODE in GSOT_MODES


@pytest.mark.parametrize("fields,match", [
    ({"gsot_mode": "sharp"}, "TGRConfig.gsot_mode must be one of"),
    ({"gsot_mode": None}, "TGRConfig.gsot_mode must be one of"),
    ({"gsot_width": 0.0}, "TGRConfig.gsot_width must be a positive"),
    ({"gsot_width": float("nan")}, "TGRConfig.gsot_width must be a positive"),
    ({"gsot_width": "0.1"}, "TGRConfig.gsot_width must be a positive"),
])
def test_a_bad_gate_in_the_config_is_one_clear_error(fields, match):
    from tgr import TGRConfig

    with pytest.raises(ValueError, match=match):
        TGRConfig(**fields)


@pytest.mark.parametrize("kwargs,match", [
    ({"gsot_mode": "sharp"}, "apply_tgr: gsot_mode must be one of"),
    ({"gsot_width": -1.0}, "apply_tgr: gsot_width must be a positive"),
])
def test_a_bad_gate_in_apply_tgr_is_one_clear_error_and_changes_nothing(kwargs, match, llama_dir):
    from transformers import AutoModelForCausalLM

    from tgr.layers import apply_tgr, is_tgr_applied

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    keys = tuple(model.state_dict())
    with pytest.raises(ValueError, match=match):
        apply_tgr(model, **kwargs)
    assert not is_tgr_applied(model) and tuple(model.state_dict()) == keys


def _fast_flags():
    import importlib.util

    flags = ["--quiet", "--backend", "torch"]
    return flags + (["--no-4bit"] if importlib.util.find_spec("bitsandbytes") is None else [])


def test_cli_gsot_flags_reach_the_saved_config(tmp_path):
    from tgr.cli import main

    out = tmp_path / "run"
    argv = ["train", "--output", str(out), "--max-steps", "1", "--gsot-mode", "straight_through",
            "--gsot-width", "0.08"]
    assert main(argv + _fast_flags()) == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert (saved["gsot_mode"], saved["gsot_width"]) == ("straight_through", 0.08)


@pytest.mark.parametrize("command", ["train", "demo", "eval", "generate"])
def test_every_command_that_takes_a_threshold_takes_the_gate(command):
    from tgr.cli import _config, build_parser, parse_training_args

    flags = ["--gsot-mode", "soft", "--gsot-width", "0.2", "--gsot-threshold", "0.3"]
    if command in ("train", "demo"):
        args, _ = parse_training_args(command, flags)
    else:
        args = build_parser().parse_args([command, *flags])
    config = _config(args)
    assert (config.gsot_mode, config.gsot_width, config.temperature_conf_threshold) == ("soft", 0.2, 0.3)


def test_without_the_flags_the_config_default_applies():
    from tgr import TGRConfig
    from tgr.cli import _config, parse_training_args

    args, _ = parse_training_args("train", [])
    config = _config(args)
    assert (config.gsot_mode, config.gsot_width) == (TGRConfig().gsot_mode, TGRConfig().gsot_width)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_bad_gate_on_the_command_line_is_one_clear_line(command, tmp_path, capsys):
    from tgr.cli import main

    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main([command, "--output", str(out), "--gsot-mode", "sharp"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--gsot-mode" in err and "sharp" in err and "Traceback" not in err and not out.exists()
    assert main([command, "--output", str(out), "--gsot-width", "0"] + _fast_flags()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gsot_width must be a positive" in err and not out.exists()


def test_the_default_gate_is_the_same_everywhere():
    import inspect

    from tgr.config import DEFAULT_GSOT_MODE, DEFAULT_GSOT_WIDTH
    from tgr.layers import apply_tgr
    from tgr.pipeline import GSOT_MODE_HELP, GSOT_WIDTH_HELP

    params = inspect.signature(apply_tgr).parameters
    assert (params["gsot_mode"].default, params["gsot_width"].default) == (DEFAULT_GSOT_MODE, DEFAULT_GSOT_WIDTH)
    assert f"TGRConfig's, {DEFAULT_GSOT_MODE})" in GSOT_MODE_HELP
    assert f"TGRConfig's, {DEFAULT_GSOT_WIDTH:g})" in GSOT_WIDTH_HELP


def test_gsot_curves_record_names_the_device_the_runs_trained_on(tmp_path, monkeypatch):
    """benchmarks/gsot_curves.py: a run with --device cuda was recorded (and tabled) as "cpu (...)"."""
    import pathlib
    import types

    import tgr.cli

    curves = pytest.importorskip("benchmarks.gsot_curves")

    def fake_parse(command, flags):
        return pathlib.Path(flags[flags.index("--output") + 1]), {}

    def fake_train(output, training, split_rows=None):
        output.mkdir(parents=True)
        history = [{"step": 1, "epoch": 1.0, "loss": 2.0}]
        (output / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        model = types.SimpleNamespace(config=types.SimpleNamespace(gsot_width=0.05))
        return {"summary": {"steps": 1, "train_loss": 2.0}, "model": model, "tokenizer": None}

    scores = {"map": 0.5, "mrr": 0.5}
    monkeypatch.setattr(tgr.cli, "parse_training_args", fake_parse)
    monkeypatch.setattr(tgr.cli, "cmd_train", fake_train)
    monkeypatch.setattr(tgr.cli, "_evaluate", lambda *a, **k: {"tgr_head": scores, "base_head": scores})
    for device in ("cuda:0", "cpu"):
        record = curves.run_one("head", "hard", [], [], tmp_path / device, epochs=1, lr=1e-3, threshold=0.4,
                                logging_steps=1, device=device)
        assert record["device"].startswith(f"{device} ("), record["device"]
