"""Training the TGR head on WikiQA with the HF Trainer (the seed's choice), current API.

What the seed did, fixed: bf16 autocast on GPU (the head's weights stay fp32), labels −100 on
padding with an EOS after each answer, batches padded to their own longest example and grouped
by length, gradient accumulation, checkpoints that a rerun resumes from, and logs of the loss,
the temperatures' mean and spread and the fraction of rows GSoT prunes.

Multi-GPU: launch the same command with ``torchrun --nproc_per_node N -m tgr train ...`` or
``accelerate launch -m tgr train ...``; the Trainer picks up the distributed environment.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .data import PaddingCollator, build_training_examples

logger = logging.getLogger("tgr")


@dataclass
class TrainSettings:
    """Knobs of a training run (the CLI's ``tgr train`` flags map onto these)."""

    output_dir: str
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_length: int = 192
    mask_prompt: bool = False
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    seed: int = 0
    resume: bool = True
    progress_bar: bool = True


class TGRTrainer(Trainer):
    """Trainer that also logs the temperature statistics and the GSoT pruning rate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Running sums stay on the device as detached tensors: a step adds to them without a
        # host sync, and they are read (one transfer) only when the Trainer logs.
        self._tgr_sums: Dict[str, torch.Tensor] = {}
        self._tgr_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        self._track(outputs, inputs.get("attention_mask"))
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    @torch.no_grad()
    def _track(self, outputs, attention_mask) -> None:
        stats = step_statistics(outputs.temperatures, outputs.gsot_mask, outputs.lm_loss, attention_mask)
        for key, value in stats.items():
            total = self._tgr_sums.get(key)
            self._tgr_sums[key] = value if total is None else total + value
        self._tgr_count += 1

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self._tgr_count and "loss" in logs:
            keys = list(self._tgr_sums)
            sums = torch.stack([self._tgr_sums[k].float() for k in keys]).tolist()  # the one sync
            logs.update({k: round(v / self._tgr_count, 4) for k, v in zip(keys, sums)})
            self._tgr_sums, self._tgr_count = {}, 0
        super().log(logs, *args, **kwargs)


def step_statistics(temperatures: torch.Tensor, gsot_mask: torch.Tensor, lm_loss: torch.Tensor,
                    attention_mask: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """One step's logged statistics over the real (unpadded) tokens, as 0-d device tensors:
    the temperatures' mean and (unbiased) spread, the fraction of rows GSoT prunes, the LM loss.
    Weighted sums rather than boolean indexing, which would sync to size its result."""
    t_bar = temperatures.detach().float().mean(-1)
    real = torch.ones_like(t_bar) if attention_mask is None else attention_mask.to(t_bar.dtype)
    count = real.sum()
    mean = (t_bar * real).sum() / count.clamp(min=1)
    var = ((t_bar - mean).square() * real).sum() / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.zeros_like(var))
    kept = (gsot_mask.to(t_bar.dtype) * real).sum() / count.clamp(min=1)
    return {
        "temperature_mean": mean,
        "temperature_std": std,
        "gsot_pruned": 1.0 - kept,
        "lm_loss": lm_loss.detach().float(),
    }


def _group_by_length_kwargs() -> Dict[str, object]:
    """Batches of similar lengths waste little padding; transformers renamed the switch in 5.2x."""
    fields = TrainingArguments.__dataclass_fields__
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True} if "group_by_length" in fields else {}


def training_arguments(settings: TrainSettings, device: torch.device) -> TrainingArguments:
    on_gpu = device.type == "cuda"
    return TrainingArguments(
        output_dir=settings.output_dir,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        logging_steps=settings.logging_steps,
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        save_strategy="steps",
        eval_strategy="no",
        bf16=on_gpu and torch.cuda.is_bf16_supported(),  # autocast; the head's weights stay fp32
        use_cpu=not on_gpu,
        **_group_by_length_kwargs(),
        remove_unused_columns=False,
        report_to=[],
        seed=settings.seed,
        disable_tqdm=not settings.progress_bar,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def train(model, tokenizer, rows: List[Dict], settings: TrainSettings):
    """Train ``model``'s trainable parameters on the correct pairs of ``rows``; returns the
    Trainer's ``TrainOutput``. A rerun with the same output folder resumes from its last
    checkpoint (``settings.resume``)."""
    examples = build_training_examples(rows, tokenizer, settings.max_length, settings.mask_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(p for p in model.parameters() if p.requires_grad).device
    trainer = TGRTrainer(
        model=model,
        args=training_arguments(settings, device),
        train_dataset=examples,
        data_collator=PaddingCollator(pad_id, pad_to_multiple_of=8 if device.type == "cuda" else None),
    )  # no processing_class: Trainer 5.2x would rewrite the model config's special tokens
    checkpoint = get_last_checkpoint(settings.output_dir) if settings.resume and os.path.isdir(
        settings.output_dir) else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    logger.info("training on %d examples: %s", len(examples), asdict(settings))
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_state()
    return result, trainer
