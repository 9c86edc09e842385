"""The model's training loss through the fused linear cross-entropy (no [B, S, V] logits) equals
the loss through the logits, value and gradients, in the head and every-layer modes; the Trainer
takes that path."""
import pytest
import torch

from tgr import TGRConfig, TGRLlamaModel, build_tiny_llama

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def _model(path, mode):
    config = TGRConfig(base_model_name_or_path=path, load_in_4bit=False, compute_dtype="float32", device="cpu",
                       attention_backend="torch", temperature_heads=4, tgr_mode=mode)
    return TGRLlamaModel(config)


def _loss_and_grads(model, batch, return_logits):
    model.zero_grad(set_to_none=True)
    out = model(**batch, return_logits=return_logits)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("mode", ["head", "layers", "both"])
def test_fused_loss_equals_the_loss_through_logits(base_dir, mode):
    torch.manual_seed(0)
    model = _model(base_dir, mode)
    with torch.no_grad():  # temperatures away from their start, so every part matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    ids = torch.randint(3, 256, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 4] = -100
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    eager, eager_grads = _loss_and_grads(model, batch, return_logits=True)
    fused, fused_grads = _loss_and_grads(model, batch, return_logits=False)
    assert fused.logits is None and eager.logits is not None
    torch.testing.assert_close(fused.lm_loss, eager.lm_loss, rtol=1e-5, atol=1e-6)
    assert eager_grads and fused_grads.keys() == eager_grads.keys()
    for name, g in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_int32_labels_on_both_paths_and_float_labels_refused(base_dir):
    """Labels of any integer dtype give the same loss through the logits as through the fused op;
    float labels are a ValueError naming them on both paths, not an error from inside the loss."""
    model = _model(base_dir, "head")
    ids = torch.randint(3, 256, (2, 9))
    expected = model(ids, labels=ids).loss
    for return_logits in (True, False):
        torch.testing.assert_close(model(ids, labels=ids.int(), return_logits=return_logits).loss, expected)
        with pytest.raises(ValueError, match="labels must be an integer tensor"):
            model(ids, labels=ids.float(), return_logits=return_logits)


def test_the_trainer_asks_for_no_logits(base_dir, monkeypatch):
    from tgr.train import TGRTrainer

    model = _model(base_dir, "head")
    seen = []
    original = TGRLlamaModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("return_logits", True))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TGRLlamaModel, "forward", spy)
    ids = torch.randint(3, 256, (2, 7))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    # A minimal trainer: compute_loss only reads the state _reset_tracking sets.
    trainer = object.__new__(TGRTrainer)
    trainer._reset_tracking()
    loss = trainer.compute_loss(model, inputs)
    assert seen == [False] and torch.isfinite(loss)
    _, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
    assert seen[-1] is True and outputs.logits is not None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_step_benchmark_runs(dtype, capsys):
    """benchmarks/fused_loss_step.py: a tiny model, one row per loss path, each with a time and
    a memory figure."""
    bench = pytest.importorskip("benchmarks.fused_loss_step")
    bench.main(["--vocab", "300", "--hidden", "64", "--tokens", "32", "--reps", "1", "--dtype", dtype])
    out = capsys.readouterr().out
    assert f"32 tokens, {dtype}" in out
    for name in ("through the logits", "fused linear cross-entropy"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        assert row.split("|")[2].strip().endswith(" ms") and row.split("|")[3].strip().endswith(" MiB"), row


@pytest.mark.parametrize("mode", ["head", "layers"])
def test_one_token_sequences_have_no_next_token_loss_on_either_path(base_dir, mode):
    """Sequences of one token have nothing to predict: lm_loss 0 through the logits and fused
    (the fused op got an empty hidden and refused it), and the loss still backpropagates."""
    model = _model(base_dir, mode)
    ids = torch.randint(3, 256, (2, 1))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    through_logits, _ = _loss_and_grads(model, batch, return_logits=True)
    fused, _ = _loss_and_grads(model, batch, return_logits=False)
    assert through_logits.lm_loss.item() == fused.lm_loss.item() == 0.0
    torch.testing.assert_close(fused.loss, through_logits.loss)
