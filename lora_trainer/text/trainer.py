"""The text-generation route: a PEFT LoRA on a causal LM, run by the shared training loop (``train/loop.py``).

``TextTask`` is what is text-specific: tokenizing, the base model and adapter, each step's rows (from
``BatchSchedule``), the summed token loss, the adapter folders it saves. The config snapshot, callbacks and
TensorBoard, optimizer and schedule, step seeding, token-weighted accumulation, resume, save cadence and
NaN/OOM/cancel handling are the loop's, shared with the image route.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from lora_trainer.config import TextConfig, resolved_output_name
from lora_trainer.text.batches import BatchSchedule, collate
from lora_trainer.text.chat import require_chat_template
from lora_trainer.text.data import load_text_dataset
from lora_trainer.text.export import save_adapter, save_merged_model
from lora_trainer.text.model import (
    attach_adapter,
    declared_dtype,
    load_base_model,
    load_tokenizer,
    resolve_causal_lm,
    resolve_lora_settings,
)
from lora_trainer.text.tokenize import IGNORE_INDEX, tokenize_dataset
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.loop import LoopEnd, StepBatches, TrainingLoop, TrainingTask
from lora_trainer.train.result import TrainingResult
from lora_trainer.train.runtime import Runtime
from lora_trainer.train.state import resume_hint, state_folder


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the trained tokens (each position predicts the next token)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def adapter_folder(cfg: TextConfig, step: Optional[int] = None) -> str:
    """``output_dir/<name>`` for the final adapter, ``output_dir/<name>-step00000100`` for intermediate ones."""
    name = resolved_output_name(cfg)
    return os.path.join(cfg.output_dir, name if step is None else f"{name}-step{step:08d}")


def _pad_id(tokenizer) -> int:
    # Padding never reaches the loss (labels are IGNORE_INDEX) nor attention, so any valid id serves.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def train_text(
    cfg: TextConfig, callbacks: Optional[List[TrainingCallback]] = None, runtime: Optional[Runtime] = None
) -> TrainingResult:
    """Train a LoRA adapter for ``cfg.base_model`` on ``cfg.train_data_dir``; see the module docstring."""
    # Data first: a malformed or empty dataset is reported before anything heavy loads.
    dataset = load_text_dataset(cfg.train_data_dir, cfg.data_format, cfg.text_sample_unit)
    owns_runtime = runtime is None
    if runtime is None:
        from lora_trainer.train.accelerate_runtime import AccelerateRuntime

        runtime = AccelerateRuntime(cfg.mixed_precision, cfg.num_threads)
    try:
        return _train(cfg, dataset, list(callbacks or []), runtime)
    finally:
        if owns_runtime:
            runtime.end()


def _train(cfg: TextConfig, dataset, callbacks: List[TrainingCallback], runtime) -> TrainingResult:
    task = TextTask(cfg, dataset, runtime)
    loop = TrainingLoop(cfg, task, runtime, callbacks, lambda line: print(line, flush=True))
    task.prepare(loop.callbacks)
    loop.write_snapshot()
    task.model.train()
    return loop.run()


class TextTask(TrainingTask):
    """The text route's part of the shared loop (``train/loop.py``): a PEFT LoRA on a causal LM, each loss unit
    one trained token."""

    def __init__(self, cfg: TextConfig, dataset, runtime):
        self.cfg, self.dataset, self.runtime = cfg, dataset, runtime

    def prepare(self, listeners) -> None:
        """Tokenize, load the base model and attach the adapter (the base is downloaded on first use)."""
        cfg, runtime, dataset = self.cfg, self.runtime, self.dataset
        # A Hub id becomes its cached folder (downloaded on first use); the id stays the adapter's recorded base.
        self.base_path = resolve_causal_lm(cfg.base_model, on_download=listeners.on_download)
        self.hub_name = cfg.base_model if self.base_path != cfg.base_model else None
        self.tokenizer = load_tokenizer(self.base_path)
        if any(s.is_chat for s in dataset.samples):
            require_chat_template(self.tokenizer, cfg.base_model)
        self.tokens = tokenize_dataset(dataset, self.tokenizer, cfg.max_seq_length, cfg.packing)
        self.settings = resolve_lora_settings(cfg)
        base = load_base_model(self.base_path, runtime.dtype, cfg.gradient_checkpointing)
        torch.manual_seed(cfg.seed)  # the adapter's initial weights
        self.model = attach_adapter(base, cfg, self.settings).to(runtime.device)
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.schedule = BatchSchedule(
            len(self.tokens.sequences),
            cfg.batch_size,
            cfg.gradient_accumulation_steps,
            cfg.seed,
            runtime.num_processes,
            runtime.process_index,
        )
        self.total = cfg.max_train_steps or cfg.epochs * self.schedule.steps_per_epoch
        self.pad_id = _pad_id(self.tokenizer)
        self.step = 0

    def parameter_groups(self) -> List[dict]:
        return [{"params": [p for _, p in self.named]}]

    def total_steps(self) -> int:
        return self.total

    def start_at(self, state) -> int:
        self.start = 0 if state is None else state.step
        return self.start

    def next_step(self, step: int) -> StepBatches:
        self.step = step + 1
        batches = [
            collate([self.tokens.sequences[i] for i in rows], self.pad_id) for rows in self.schedule.micro_batches(step)
        ]
        per_epoch = self.schedule.steps_per_epoch
        return StepBatches(batches, self.schedule.epoch_of(step), epoch_finished=(step + 1) % per_epoch == 0)

    def units(self, micro_batch) -> float:
        return float(micro_batch.trained_tokens)

    def loss(self, micro_batch, epoch: int, generator: torch.Generator) -> torch.Tensor:
        batch = micro_batch.to(self.runtime.device)
        with self.runtime.autocast():
            # No cache: transformers keeps packed samples apart (by their position ids) only without one.
            logits = self.model(**batch.model_inputs(), use_cache=False).logits
        return summed_token_loss(logits, batch.labels)

    def summary(self) -> dict:
        cfg, settings = self.cfg, self.settings
        return {
            "task_type": cfg.task_type,
            "formats": self.dataset.formats,
            "files": len(self.dataset.files),
            **self.tokens.summary(),
            "lora_rank": settings.rank,
            "lora_alpha": settings.alpha,
            "lora_dropout": settings.dropout,
            "target_modules": settings.target_modules,
            "trainable_params": sum(p.numel() for _, p in self.named),
            "steps_per_epoch": self.schedule.steps_per_epoch,
            "total_steps": self.total,
            "resumed_from": self.start,
        }

    def save(self, step: int, final: bool) -> List[str]:
        cfg = self.cfg
        folder = adapter_folder(cfg, None if final else step)
        save_adapter(self.model, self.tokenizer, folder, cfg.save_precision, base_model_name=self.hub_name)
        outputs = [folder]
        if final and cfg.merge_adapter:
            merged = adapter_folder(cfg) + "-merged"
            save_merged_model(self.model, self.tokenizer, merged, declared_dtype(self.base_path))
            outputs.append(merged)
        return outputs

    def trainable_state(self):
        return {n: p for n, p in self.named}

    def resume_settings(self) -> dict:
        settings = self.settings
        return {
            "lora_rank": settings.rank,
            "lora_alpha": settings.alpha,
            "target_modules": list(settings.target_modules),
            "base_model": os.path.basename(os.path.normpath(self.cfg.base_model)),
        }

    def state_info(self) -> dict:
        return {
            "epoch": self.schedule.epoch_of(max(self.step - 1, 0)),
            "task_type": self.cfg.task_type,
            "total_steps": self.total,
        }

    def load_trainable_state(self, state, source: str) -> None:
        """Load a ``state-<step>`` folder's adapter weights (the loop has checked they fit)."""
        own = dict(self.named)
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(state.weights[name].to(param.dtype))

    def result(self, end: LoopEnd) -> TrainingResult:
        if end.status == "finished" and not end.outputs:  # a data-parallel process other than the writer
            return TrainingResult("finished", end.step, [], "Finished; the main process saved the adapter.", end.losses)
        if end.status == "finished":
            return TrainingResult(
                "finished", end.step, end.outputs, _finished_message(end.outputs[0], self.tokens), end.losses
            )
        if end.status == "cancelled":  # saved as the image route saves on Cancel, so that nothing is lost
            message = f"Cancelled after step {end.step}."
            if end.last_save and self.cfg.save_state:
                message += f" Saved {end.last_save}.\n" + resume_hint(state_folder(self.cfg.output_dir, end.step))
                return TrainingResult(end.status, end.step, [end.last_save], message, end.losses)
        elif end.reason.startswith("out of memory"):
            message = (
                f"Out of memory at step {end.step + 1}. Lower batch_size or max_seq_length, or turn on "
                "gradient_checkpointing."
            )
        else:
            message = (
                f"The {end.reason.replace('the ', '', 1)}, so training stopped; the adapter was not updated with it. "
                "Try a lower learning_rate or mixed_precision: no."
            )
        kept = f" The last good save is {end.last_save}." if end.last_save else " Nothing was saved in this run."
        return TrainingResult(end.status, end.step, [], message + kept, end.losses)


def _finished_message(adapter: str, tokens) -> str:
    message = f"Saved the adapter to {adapter}."
    if tokens.truncated:
        message += (
            f" {tokens.truncated} of {tokens.samples} samples were longer than max_seq_length "
            f"{tokens.max_seq_length} tokens and were truncated."
        )
    if tokens.skipped:
        message += f" {tokens.skipped} samples had no completion within max_seq_length and were skipped."
    return message
