"""Training the TGR head on WikiQA with the HF Trainer (the seed's choice), current API.

What the seed did, fixed: bf16 autocast on GPU (the head's weights stay fp32), labels −100 on
padding with an EOS after each answer, batches padded to their own longest example and grouped
by length, gradient accumulation whose loss is the loss of one batch holding all the accumulated
micro-batches, checkpoints that a rerun resumes from, and logs of the loss, the temperatures'
mean and spread and the fraction of rows GSoT prunes.

Every :class:`transformers.TrainingArguments` field applies; :func:`training_arguments` gives
tgr's defaults for those it has an opinion on (``TRAINING_DEFAULTS`` and the device-dependent
``bf16``/``use_cpu``), and ``tgr train`` exposes all of them as flags.

Multi-GPU: launch the same command with ``torchrun --nproc_per_node N -m tgr train ...`` or
``accelerate launch -m tgr train ...``; the Trainer picks up the distributed environment.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data import IGNORE_INDEX, DataError, PaddingCollator, build_training_examples

logger = logging.getLogger("tgr")


def _group_by_length_kwargs() -> dict[str, object]:
    """Batches of similar lengths waste little padding; transformers renamed the switch in 5.2x."""
    fields = TrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True} if "group_by_length" in fields else {}


#: tgr's defaults for ``TrainingArguments`` fields (the rest keep transformers' defaults).
TRAINING_DEFAULTS: dict[str, object] = {
    "num_train_epochs": 1.0,
    "per_device_train_batch_size": 4,
    "learning_rate": 1e-3,  # a freshly initialised head, not a pretrained network
    "logging_steps": 10,
    "save_steps": 200,
    "save_total_limit": 2,
    "save_strategy": "steps",
    "eval_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "remove_unused_columns": False,  # the collator needs input_ids and labels as they are
    "dataloader_num_workers": 0,
    "ddp_find_unused_parameters": False,  # the frozen base has no gradients by design
    **_group_by_length_kwargs(),
}


def device_defaults(device: str | torch.device | None, fp16: bool = False) -> dict[str, bool]:
    """``bf16`` autocast where the GPU supports it (the head's weights stay fp32, unless ``fp16``
    was asked for), and ``use_cpu`` when training on the CPU (even on a machine with a GPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = torch.device(device).type == "cuda"
    return {"bf16": on_gpu and not fp16 and torch.cuda.is_bf16_supported(), "use_cpu": not on_gpu}


def training_arguments(output_dir: str | os.PathLike | None = None, *,
                       device: str | torch.device | None = None, **overrides) -> TrainingArguments:
    """``TrainingArguments`` with tgr's defaults, for training on ``device`` (default: CUDA when
    present); ``overrides`` are any ``TrainingArguments`` fields and win over the defaults."""
    if output_dir is not None:
        overrides["output_dir"] = str(output_dir)
    kwargs = {**TRAINING_DEFAULTS, **device_defaults(device, bool(overrides.get("fp16"))), **overrides}
    return TrainingArguments(**kwargs)


def check_training_arguments(args: TrainingArguments) -> None:
    """Refuse the ``TrainingArguments`` that :class:`TGRTrainer` cannot honour, rather than ignore them."""
    if args.label_smoothing_factor:
        # The Trainer smooths the logits' loss in its compute_loss, which TGRTrainer replaces: the
        # model's loss (fused cross-entropy + temperature regulariser) has no smoothing.
        raise ValueError(f"label_smoothing_factor={args.label_smoothing_factor:g} is not supported: the TGR model's "
                         f"loss has no label smoothing; leave it 0")


class TGRTrainer(Trainer):
    """Trainer whose loss under gradient accumulation is the loss of one big batch, and that also
    logs the temperature statistics and the GSoT pruning rate.

    The model's loss is a mean over its micro-batch (cross-entropy over the label tokens, the
    regulariser over the real tokens); averaging those means over the accumulated micro-batches
    would weight a token of a short micro-batch more than one of a long micro-batch. Instead
    :meth:`get_batch_samples` counts the label tokens and the real tokens of all the micro-batches
    of an optimizer step (``num_items_in_batch`` for the first), and :meth:`compute_loss` weights
    each micro-batch's parts by its share of them (:func:`accumulated_loss`).
    """

    # transformers 5.x: the loss of compute_loss is already normalised over the accumulated batch.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args)
        # Token weighting needs each replica's own counts, which DataParallel (several GPUs in one
        # process) does not give: there the Trainer's default, the mean of the micro-batch means.
        self._token_weighted = self.args.n_gpu <= 1
        if self._token_weighted:
            # The model's forward takes no loss kwargs; this tells the Trainer (4.56 included) that
            # compute_loss normalises over the accumulated batch, so it must not divide again.
            self.model_accepts_loss_kwargs = True
        else:
            self.loss_is_scaled_for_ga = False
        self._reset_tracking()

    def _reset_tracking(self) -> None:
        """The token counts and training statistics that compute_loss accumulates, emptied."""
        self._accumulated_tokens: torch.Tensor | None = None  # [label tokens, real tokens]
        # Running sums stay on the device as detached tensors: a step adds to them without a
        # host sync, and they are read (one transfer) only when the Trainer logs. The micro-batches
        # of one optimizer step are pooled first (_tgr_step), so that a step's statistics are those
        # of one batch holding them all, as its loss is; the log line averages the steps' statistics.
        self._tgr_step: dict[str, torch.Tensor] = {}
        self._tgr_sums: dict[str, torch.Tensor] = {}
        self._tgr_count = 0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their label-token count (no host sync)."""
        self._close_step()  # a new optimizer step begins
        if not self._token_weighted:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        self._accumulated_tokens = None
        if not batch_samples or "labels" not in batch_samples[0]:
            self.loss_is_scaled_for_ga = False  # plain means: the Trainer divides by the steps
            return batch_samples, None
        self.loss_is_scaled_for_ga = True
        counts = torch.stack([token_counts(b["labels"], b.get("attention_mask")) for b in batch_samples]).sum(0)
        counts = counts.to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # Every process normalises by the global counts; compute_loss then multiplies by the
            # number of processes because DDP averages the gradients.
            counts = self.accelerator.gather(counts[None]).sum(0)
        self._accumulated_tokens = counts
        return batch_samples, counts[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Training needs no logits: the loss comes from the fused linear cross-entropy, and the
        # [B, S, V] logits never exist whole. Evaluation (return_outputs) keeps them.
        outputs = model(**inputs, return_logits=return_outputs or "labels" not in inputs)
        if model.training:  # the logged statistics are the training steps' (not an eval_dataset's)
            self._track(outputs, inputs.get("labels"), inputs.get("attention_mask"))
        loss = outputs.loss
        totals = self._accumulated_tokens
        # Evaluation (model.eval()) and calls outside the training loop keep the plain mean.
        if loss is not None and num_items_in_batch is not None and totals is not None and model.training:
            loss = accumulated_loss(outputs, inputs["labels"], inputs.get("attention_mask"),
                                    label_tokens=num_items_in_batch, real_tokens=totals[1])
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _track(self, outputs, labels, attention_mask) -> None:
        """Pool one micro-batch's statistics into those of the current optimizer step."""
        parts = {}
        if outputs.temperatures is not None:  # the head's (modes "head" and "both")
            parts[""] = step_moments(outputs.temperatures, outputs.gsot_mask, attention_mask)
        layer_temperatures = getattr(outputs, "layer_temperatures", None)
        if layer_temperatures is not None:  # the TGR layers' (modes "layers" and "both"), over all layers
            parts["layer_"] = step_moments(layer_temperatures, outputs.layer_gsot_mask, attention_mask)
        if outputs.lm_loss is not None:
            lm_loss = outputs.lm_loss.detach().float()
            # The micro-batch's cross-entropy sum and its label tokens: the step's mean is their ratio.
            n = (labels[..., 1:] != IGNORE_INDEX).sum().to(lm_loss) if labels is not None else lm_loss.new_ones(())
            parts["lm_loss"] = torch.stack([lm_loss * n, n])
        step = self._tgr_step
        for key, value in parts.items():
            total = step.get(key)
            if total is None:
                step[key] = value
            else:
                step[key] = total + value if key == "lm_loss" else merge_moments(total, value.to(total.device))

    def _close_step(self) -> None:
        """Add the pooled statistics of the optimizer step just done to those of the log line."""
        step = self._tgr_step
        if not step:
            return
        if self.args.world_size > 1:  # the step's micro-batches on every process, as its loss
            step = self._pool_across_processes(step)
        stats = {}
        for key, value in step.items():
            if key == "lm_loss":
                stats["lm_loss"] = value[0] / value[1].clamp(min=1)
            else:
                stats.update({f"{key}{k}": v for k, v in moment_statistics(value).items()})
        for key, value in stats.items():
            total = self._tgr_sums.get(key)
            self._tgr_sums[key] = value if total is None else total + value.to(total.device)
        self._tgr_count += 1
        self._tgr_step = {}

    def _pool_across_processes(self, step: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimizer step's pooled statistics over all the processes of a distributed run
        (every process closes each step, so each joins this one gather; no host sync)."""
        keys = sorted(step)
        sizes = [step[k].numel() for k in keys]
        flat = torch.cat([step[k].float().reshape(-1) for k in keys])
        gathered = self.accelerator.gather(flat[None])  # [processes, sum(sizes)]
        pooled = {}
        for key, part in zip(keys, gathered.split(sizes, dim=1), strict=True):
            if key == "lm_loss":  # [cross-entropy sum, label tokens]: sums
                pooled[key] = part.sum(0)
            else:
                total = part[0]
                for other in part[1:]:
                    total = merge_moments(total, other)
                pooled[key] = total
        return pooled

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            self._close_step()
        if self._tgr_count and "loss" in logs:
            keys = list(self._tgr_sums)
            sums = torch.stack([self._tgr_sums[k].float() for k in keys]).tolist()  # the one sync
            logs.update({k: round(v / self._tgr_count, 4) for k, v in zip(keys, sums, strict=True)})
            self._tgr_sums, self._tgr_count = {}, 0
        super().log(logs, *args, **kwargs)


def token_counts(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[label tokens, real tokens]`` of a batch as a device tensor: the tokens the cross-entropy
    is taken over (labels shifted by one, not −100) and those the regulariser is taken over
    (attention mask 1; every token without a mask)."""
    n_labels = (labels[..., 1:] != IGNORE_INDEX).sum()
    n_real = attention_mask.sum() if attention_mask is not None else torch.tensor(labels.numel())
    return torch.stack([n_labels, n_real.to(n_labels.device)])


def accumulated_loss(outputs, labels: torch.Tensor, attention_mask: torch.Tensor | None, *,
                     label_tokens, real_tokens) -> torch.Tensor:
    """One micro-batch's share of the loss of the accumulated batch.

    With ``n`` label tokens and ``r`` real tokens in this micro-batch and ``N``, ``R`` in all the
    micro-batches of the optimizer step, the model's means ``lm_loss = Σ CE / n`` and
    ``temperature_loss = λ Σ (t − t₀)² / (T r)`` become

        lm_loss · n / N + temperature_loss · r / R,

    so that the sum over the micro-batches is ``Σ CE / N + λ Σ (t − t₀)² / (T R)``: the loss of
    one batch holding them all, and its gradient.
    """
    n_labels, n_real = token_counts(labels, attention_mask).to(outputs.lm_loss.device).unbind()
    label_tokens = torch.as_tensor(label_tokens, device=n_labels.device).clamp(min=1)
    real_tokens = torch.as_tensor(real_tokens, device=n_real.device).clamp(min=1)
    return outputs.lm_loss * (n_labels / label_tokens) + outputs.temperature_loss * (n_real / real_tokens)


def step_moments(temperatures: torch.Tensor, gsot_mask: torch.Tensor,
                 attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[count, mean, M2, kept]`` of a batch's rows as one fp32 device tensor: the real (unpadded)
    rows, the mean of their mean temperatures t̄, the sum of squared deviations from it, and the
    rows that GSoT keeps. Batches combine exactly with :func:`merge_moments`. Weighted sums rather
    than boolean indexing, which would sync to size its result.

    ``temperatures`` ``[B, S, T]`` with ``gsot_mask`` ``[B, S]``, or ``[L, B, S, T]`` with
    ``[L, B, S]`` for L TGR layers (every layer's rows)."""
    t_bar = temperatures.detach().float().mean(-1)
    real = torch.ones_like(t_bar) if attention_mask is None else attention_mask.to(t_bar).expand_as(t_bar)
    count = real.sum()
    mean = (t_bar * real).sum() / count.clamp(min=1)
    m2 = ((t_bar - mean).square() * real).sum()
    kept = (gsot_mask.to(t_bar.dtype) * real).sum()
    return torch.stack([count, mean, m2, kept])


def merge_moments(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The :func:`step_moments` of two batches together (Chan et al.'s pairwise update)."""
    n_a, mean_a, m2_a, kept_a = a.unbind()
    n_b, mean_b, m2_b, kept_b = b.unbind()
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n.clamp(min=1)
    m2 = m2_a + m2_b + delta.square() * n_a * n_b / n.clamp(min=1)
    return torch.stack([n, mean, m2, kept_a + kept_b])


def moment_statistics(moments: torch.Tensor) -> dict[str, torch.Tensor]:
    """The temperatures' mean and (unbiased) spread and the fraction of rows GSoT prunes, from
    :func:`step_moments`."""
    count, mean, m2, kept = moments.unbind()
    var = m2 / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.zeros_like(var))
    return {"temperature_mean": mean, "temperature_std": std, "gsot_pruned": 1.0 - kept / count.clamp(min=1)}


def step_statistics(temperatures: torch.Tensor, gsot_mask: torch.Tensor, lm_loss: torch.Tensor,
                    attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One step's logged statistics over the real (unpadded) tokens, as 0-d device tensors:
    the temperatures' mean and (unbiased) spread, the fraction of rows GSoT prunes (``gsot_mask``
    false: t̄ < τ, in every gate mode; the soft gate's partial rows count by the threshold), the LM loss.
    Weighted sums rather than boolean indexing, which would sync to size its result.

    ``temperatures`` ``[B, S, T]`` with ``gsot_mask`` ``[B, S]``, or ``[L, B, S, T]`` with
    ``[L, B, S]`` for L TGR layers (statistics over every layer's rows)."""
    stats = moment_statistics(step_moments(temperatures, gsot_mask, attention_mask))
    stats["lm_loss"] = lm_loss.detach().float()
    return stats


def check_resumable(model, checkpoint: str | os.PathLike, warn: bool = True) -> None:
    """A :class:`~tgr.config.CheckpointError` (one line) unless ``checkpoint`` holds a tensor of the
    same shape for every one of ``model``'s (and no other): the Trainer loads it non-strictly and then
    fails on a size or an optimizer mismatch, or a missing folder, with a traceback."""
    from .config import CheckpointError
    from .model import WEIGHTS_NAME, _read_weights

    file = os.path.join(os.fspath(checkpoint), WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise CheckpointError(f"cannot resume from {os.fspath(checkpoint)!r}: no {WEIGHTS_NAME} there, not a "
                              f"checkpoint of a TGR run")
    if not os.path.isfile(os.path.join(os.fspath(checkpoint), TRAINER_STATE_NAME)):
        # e.g. final/: the Trainer would fail on the missing file with a traceback
        raise CheckpointError(f"cannot resume from {os.fspath(checkpoint)!r}: no {TRAINER_STATE_NAME} there, a saved "
                              f"model rather than a Trainer checkpoint (checkpoint-N)")
    saved = {k: tuple(v.shape) for k, v in _read_weights(file).items()}
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if saved != own:
        differ = sorted(k for k in saved.keys() | own.keys() if saved.get(k) != own.get(k))
        raise CheckpointError(f"cannot resume from {os.fspath(checkpoint)!r}: it holds another TGR model (other "
                              f"temperature heads, TGR layers or LoRA: {len(differ)} tensor(s) differ, e.g. "
                              f"{differ[0]}); train into another output folder, or start over (tgr train --overwrite)")
    if warn:
        _warn_changed_settings(model, checkpoint)


# Fields whose change between a checkpoint and the resuming run does not change the model trained.
_RUN_ONLY_FIELDS = ("attention_backend", "device", "compute_dtype")


def _warn_changed_settings(model, checkpoint: str | os.PathLike) -> None:
    """Log the TGR settings that differ between ``checkpoint``'s config and ``model``'s: a rerun
    with, say, another GSoT threshold resumes with the checkpoint's weights under the new
    settings, which may be meant (a schedule) or not (the wrong output folder)."""
    from .config import TGRConfig

    try:
        saved = TGRConfig.from_pretrained(os.fspath(checkpoint))
    except (OSError, ValueError):  # no readable config: the tensors were checked, nothing to compare
        return
    changed = []
    for name in TGRConfig.tgr_field_names():
        before, now = getattr(saved, name), getattr(model.config, name)
        if name in _RUN_ONLY_FIELDS or before == now:
            continue
        if name == "base_model_name_or_path" and os.path.isdir(before) and os.path.isdir(now) \
                and os.path.samefile(before, now):
            continue
        changed.append(f"{name} {before!r} -> {now!r}")
    if changed:
        logger.warning("resuming from %s, whose TGR settings differ from this run's: %s; the run goes on with this "
                       "run's settings and the checkpoint's weights", os.fspath(checkpoint), "; ".join(changed))


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The last checkpoint in ``output_dir`` that the Trainer finished writing (it writes
    ``trainer_state.json`` last), or None. A later one that a run stopped while saving is left out,
    with a warning: the rerun resumes from the one before it rather than failing on it."""
    folder = os.fspath(output_dir)
    steps = {}
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps[os.path.join(folder, name)] = int(match.group(1))
    skipped = []
    for path in sorted(steps, key=steps.get, reverse=True):
        if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            break
        skipped.append(os.path.basename(path))
    else:
        path = None
    if skipped:
        logger.warning("%s: %s left out, no %s there (a run stopped while saving it); %s", folder, ", ".join(skipped),
                       TRAINER_STATE_NAME, f"resuming from {os.path.basename(path)}" if path else "starting over")
    return path


def check_batch_fill(n_examples: int, args: TrainingArguments) -> None:
    """A :class:`~tgr.data.DataError` when ``n_examples`` training examples cannot fill one batch with
    ``dataloader_drop_last``: the data loader would be empty (the Trainer fails on max_steps, or
    trains 0 steps with one)."""
    per_process = -(-n_examples // max(1, args.world_size))  # each process's share, rounded up
    if args.dataloader_drop_last and per_process < args.train_batch_size:
        raise DataError(f"{n_examples} training example(s) do not fill one batch of {args.train_batch_size} "
                        f"with dataloader_drop_last: nothing to train on; lower the batch size or leave out "
                        f"dataloader_drop_last")


def train(model, tokenizer, rows: list[dict], args: TrainingArguments, *, max_length: int = 192,
          mask_prompt: bool = False, resume: bool = True, final_dir: str | os.PathLike | None = None):
    """Train ``model``'s trainable parameters on the correct pairs of ``rows``; returns the
    Trainer's ``TrainOutput`` and the trainer.

    ``args``: e.g. :func:`training_arguments`. The run resumes from ``args.resume_from_checkpoint``
    when set, else (``resume``) from the last checkpoint in ``args.output_dir``. ``final_dir``:
    where the trained model and the tokenizer are saved at the end (by the main process).
    """
    examples = build_training_examples(rows, tokenizer, max_length, mask_prompt)
    check_batch_fill(len(examples), args)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameter (every one has requires_grad=False): "
                         f"nothing to train")
    device = trainable[0].device
    trainer = TGRTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=PaddingCollator(pad_id, pad_to_multiple_of=8 if device.type == "cuda" else None),
    )  # no processing_class: Trainer 5.2x would rewrite the model config's special tokens
    checkpoint = args.resume_from_checkpoint
    if checkpoint is None and resume and os.path.isdir(args.output_dir):
        checkpoint = last_complete_checkpoint(args.output_dir)
    if checkpoint:
        check_resumable(model, checkpoint)
        logger.info("resuming from %s", checkpoint)
    logger.info("training on %d examples (batch %d x %d accumulated, lr %g, optimizer %s, schedule %s)",
                len(examples), args.per_device_train_batch_size, args.gradient_accumulation_steps,
                args.learning_rate, getattr(args.optim, "value", args.optim),
                getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_state()
    if final_dir is not None and trainer.is_world_process_zero():
        model.save_pretrained(Path(final_dir))
        tokenizer.save_pretrained(Path(final_dir))
    return result, trainer
