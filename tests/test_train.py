"""Training: gradient accumulation gives the loss and gradients of one big batch; tgr's defaults."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tgr import TGRConfig, TGRLlamaModel, build_tiny_llama  # noqa: E402
from tgr.data import IGNORE_INDEX, DataError, PaddingCollator  # noqa: E402
from tgr.train import TRAINING_DEFAULTS, TGRTrainer, token_counts, train, training_arguments  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = build_tiny_llama(tmp_path_factory.mktemp("tiny64"), hidden_size=64, num_hidden_layers=2, vocab_size=256)
    # A regulariser far from the initial temperatures (about 0.5) and weighted up, so that its
    # share of the loss is comparable to the cross-entropy's.
    config = TGRConfig(base_model_name_or_path=base, temperature_heads=4, compute_dtype="float32",
                       load_in_4bit=False, attention_backend="torch", device="cpu",
                       initial_temperature=0.95, temperature_regularization_weight=20.0)
    return TGRLlamaModel(config)


def _examples():
    """Three examples of different lengths; the last has its first 6 labels masked (a prompt), so
    the two micro-batches differ in label tokens (12, 11) and in real tokens (14, 17), in
    different ratios."""
    g = torch.Generator().manual_seed(3)
    examples = []
    for length, masked in ((5, 0), (9, 0), (17, 6)):
        ids = torch.randint(4, 200, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * masked + ids[masked:]})
    return examples


def _step(trainer, model, batches):
    """One optimizer step's loss and head gradients through the Trainer's own training_step."""
    model.zero_grad(set_to_none=True)
    samples, num_items = trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    trainer.current_gradient_accumulation_steps = len(samples)  # as Trainer's loop sets it
    loss = sum(trainer.training_step(model, b, num_items) for b in samples)
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    return loss, grads


def test_accumulated_micro_batches_give_the_loss_and_gradients_of_one_batch(model, tmp_path):
    collate = PaddingCollator(pad_token_id=0)
    examples = _examples()
    micro = [collate(examples[:2]), collate(examples[2:])]
    big = [collate(examples)]
    counts = [token_counts(b["labels"], b["attention_mask"]).tolist() for b in micro]
    assert counts == [[12, 14], [11, 17]]

    args = training_arguments(tmp_path, device="cpu", gradient_accumulation_steps=2, disable_tqdm=True)
    trainer = TGRTrainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    loss_accumulated, grads_accumulated = _step(trainer, model, micro)
    loss_big, grads_big = _step(trainer, model, big)

    torch.testing.assert_close(loss_accumulated, loss_big, rtol=1e-5, atol=1e-6)
    for g_acc, g_big in zip(grads_accumulated, grads_big, strict=True):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6)

    # The test can tell: the mean of the two micro-batch means is another number.
    model.eval()
    with torch.no_grad():
        means = [model(**b).loss for b in micro]
        full = model(**big[0])
    model.train()
    torch.testing.assert_close(full.loss, loss_big, rtol=1e-5, atol=1e-6)
    assert abs(float(sum(means) / 2 - loss_big)) > 1e-3
    assert float(full.temperature_loss) > 0.1 * float(full.lm_loss)  # both parts matter


def test_label_smoothing_is_refused_not_ignored(model, tmp_path):
    """TGRTrainer computes the model's own loss, so the Trainer's label smoother never ran: a
    label_smoothing_factor left the loss as it was, without a word."""
    args = training_arguments(tmp_path, device="cpu", label_smoothing_factor=0.1, disable_tqdm=True)
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 is not supported"):
        TGRTrainer(model=model, args=args, train_dataset=_examples(), data_collator=PaddingCollator(pad_token_id=0))


def test_training_arguments_carry_tgr_defaults_and_accept_any_field(tmp_path):
    args = training_arguments(tmp_path, device="cpu", optim="adafactor", lr_scheduler_type="constant")
    assert (args.learning_rate, args.per_device_train_batch_size, args.num_train_epochs) == (1e-3, 4, 1.0)
    assert (args.save_steps, args.logging_steps, args.save_total_limit, args.seed) == (200, 10, 2, 0)
    assert args.report_to == [] or args.report_to == "none" or args.report_to == ["none"]
    assert args.use_cpu and not args.bf16 and not args.remove_unused_columns
    assert str(getattr(args.optim, "value", args.optim)) == "adafactor"
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "constant"
    assert training_arguments(tmp_path, device="cpu", learning_rate=0.5).learning_rate == 0.5
    assert set(TRAINING_DEFAULTS) <= set(type(args).__dataclass_fields__)


@pytest.mark.parametrize("max_steps", [-1, 2])
def test_a_batch_larger_than_the_data_with_drop_last_is_refused(model, tmp_path, max_steps):
    """The data loader of 3 examples in batches of 8 with drop_last is empty: the Trainer failed on
    max_steps (without it) or trained 0 steps and saved the untrained head (with it)."""
    from tgr._tiny import build_tokenizer

    rows = [{"question_id": str(i), "question": "Why is the sky blue?", "document_title": "t",
             "answer": "Air scatters blue light.", "label": 1} for i in range(3)]
    args = training_arguments(tmp_path, device="cpu", per_device_train_batch_size=8, dataloader_drop_last=True,
                              max_steps=max_steps, disable_tqdm=True)
    with pytest.raises(DataError, match="3 training example.s. do not fill one batch of 8"):
        train(model, build_tokenizer(256), rows, args, final_dir=tmp_path / "final")
    assert not (tmp_path / "final").exists()


def test_a_model_with_nothing_to_train_is_a_clear_error(model, tmp_path):
    """Every parameter frozen: a ValueError that says so (it was a bare StopIteration)."""
    from tgr._tiny import build_tokenizer

    rows = [{"question_id": "1", "question": "Why?", "document_title": "t", "answer": "Because.", "label": 1}]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="has no trainable parameter"):
            train(model, build_tokenizer(256), rows, training_arguments(tmp_path, device="cpu", disable_tqdm=True))
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)


def test_evaluation_batches_stay_out_of_the_training_statistics(model, tmp_path):
    """With an eval_dataset, evaluate()'s batches went into the temperature statistics that the
    next training log line reports."""
    args = training_arguments(tmp_path, device="cpu", disable_tqdm=True, per_device_eval_batch_size=2)
    trainer = TGRTrainer(model=model, args=args, train_dataset=_examples(), eval_dataset=_examples(),
                         data_collator=PaddingCollator(pad_token_id=0))
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and trainer._tgr_count == 0 and not trainer._tgr_sums
    model.train()
    trainer.compute_loss(model, PaddingCollator(pad_token_id=0)(_examples()[:2]))
    assert trainer._tgr_step  # pooled into the current optimizer step
    trainer._close_step()
    assert trainer._tgr_count == 1


def _threshold_in_a_gap(t_bar: torch.Tensor) -> float:
    """A threshold midway across the widest gap between neighbouring temperatures of the middle half:
    one equal to a token's own temperature (the median) flips that token when a micro-batch computes
    it a rounding error apart, which made the pruned fraction depend on the batch split."""
    s = t_bar.sort().values
    lo, hi = len(s) // 4, max(len(s) * 3 // 4, len(s) // 4 + 1)
    i = lo + int((s[lo + 1:hi + 1] - s[lo:hi]).argmax())
    return float((s[i] + s[i + 1]) / 2)


def test_logged_statistics_of_accumulated_micro_batches_are_those_of_one_batch(model, tmp_path):
    """The temperature mean and spread, the GSoT pruned fraction and the LM loss that a log line
    reports for an optimizer step do not depend on how the step is split into micro-batches: they
    were the unweighted means of the micro-batches' own statistics (a token of the short
    micro-batch counted more, and the spread was a mean of spreads)."""
    collate = PaddingCollator(pad_token_id=0)
    examples = _examples()
    micro = [collate(examples[:1]), collate(examples[1:])]  # 1 and 2 examples: unequal token counts
    big = [collate(examples)]
    args = training_arguments(tmp_path, device="cpu", gradient_accumulation_steps=2, disable_tqdm=True)
    trainer = TGRTrainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    threshold = model.config.temperature_conf_threshold
    logged = []
    try:
        with torch.no_grad():  # a threshold inside the temperatures' range, so that some rows are pruned
            t_bar = model(**big[0]).temperatures.float().mean(-1)[big[0]["attention_mask"].bool()]
        model.config.temperature_conf_threshold = _threshold_in_a_gap(t_bar)
        for batches in (micro, big):
            _step(trainer, model, batches)
            logs = {"loss": 0.0}
            trainer.log(logs)
            logged.append(logs)
    finally:
        model.config.temperature_conf_threshold = threshold
    assert 0.2 < logged[1]["gsot_pruned"] < 0.8
    for key in ("temperature_mean", "temperature_std", "gsot_pruned", "lm_loss"):
        assert logged[0][key] == pytest.approx(logged[1][key], abs=2e-4), key


def test_a_rerun_resumes_from_the_last_complete_checkpoint(model, tmp_path, caplog):
    """A run stopped while the Trainer saved a checkpoint leaves it without trainer_state.json
    (written last): the rerun picked it as the last checkpoint and refused to resume from it."""
    from tgr._tiny import build_tokenizer

    rows = [{"question_id": str(i), "question": "Why is the sky blue?", "document_title": "t",
             "answer": "Air scatters blue light.", "label": 1} for i in range(4)]
    fresh = TGRLlamaModel(model.config)
    args = training_arguments(tmp_path, device="cpu", per_device_train_batch_size=2, max_steps=2, save_steps=1,
                              disable_tqdm=True)
    train(fresh, build_tokenizer(256), rows, args)
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()  # as if stopped while saving it
    args = training_arguments(tmp_path, device="cpu", per_device_train_batch_size=2, max_steps=3, save_steps=1,
                              disable_tqdm=True)
    with caplog.at_level("WARNING", logger="tgr"):
        result, _ = train(fresh, build_tokenizer(256), rows, args)
    assert result.global_step == 3
    assert "checkpoint-2 left out, no trainer_state.json there" in caplog.text
    assert "resuming from checkpoint-1" in caplog.text
