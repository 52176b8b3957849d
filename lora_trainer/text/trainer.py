"""The text-generation training loop: a PEFT LoRA on a causal LM, with the engine's conventions.

Shared with the image trainer: the config snapshot (``output_dir/config.yaml``), callbacks (progress,
TensorBoard, cancel), optimizers and schedules, resumable ``state-<step>`` folders and the runtime (device,
precision, gradient sync, which process writes). Each step's randomness (LoRA dropout) is seeded from
(seed, step) and its rows come from ``BatchSchedule``, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from typing import List, Optional

import torch

from lora_trainer.config import TextConfig, resolved_output_name, save_config_snapshot
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
from lora_trainer.train.callbacks import CallbackList, StepInfo, TensorBoardLogger, TrainingCallback
from lora_trainer.train.optim import build_optimizer, build_scheduler, load_optimizer_state
from lora_trainer.train.result import TrainingResult
from lora_trainer.train.runtime import Runtime
from lora_trainer.train.state import (
    apply_config_rates,
    check_resumable,
    describe_rate_changes,
    load_training_state,
    restore_rng_state,
    resume_hint,
    save_training_state,
    state_folder,
)


def step_seed(seed: int, step: int) -> int:
    """The torch seed of optimizer step ``step``: resuming at any step reproduces its dropout exactly."""
    return seed * 1_000_003 + step


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
    # A Hub id becomes its cached folder (downloaded on first use); the id stays the adapter's recorded base.
    base_path = resolve_causal_lm(cfg.base_model, on_download=CallbackList(callbacks).on_download)
    hub_name = cfg.base_model if base_path != cfg.base_model else None
    tokenizer = load_tokenizer(base_path)
    if any(s.is_chat for s in dataset.samples):
        require_chat_template(tokenizer, cfg.base_model)
    tokens = tokenize_dataset(dataset, tokenizer, cfg.max_seq_length, cfg.packing)

    settings = resolve_lora_settings(cfg)
    base = load_base_model(base_path, runtime.dtype, cfg.gradient_checkpointing)
    torch.manual_seed(cfg.seed)  # the adapter's initial weights
    model = attach_adapter(base, cfg, settings).to(runtime.device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    schedule = BatchSchedule(
        len(tokens.sequences),
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        cfg.seed,
        runtime.num_processes,
        runtime.process_index,
    )
    total = cfg.max_train_steps or cfg.epochs * schedule.steps_per_epoch
    optimizer = build_optimizer(cfg.optimizer, [{"params": params}], cfg.learning_rate, cfg.weight_decay)
    scheduler = build_scheduler(cfg.lr_scheduler, optimizer, cfg.lr_warmup_steps, total, cfg.lr_scheduler_num_cycles)
    fixed = {
        "lora_rank": settings.rank,
        "lora_alpha": settings.alpha,
        "target_modules": list(settings.target_modules),
        "base_model": os.path.basename(os.path.normpath(cfg.base_model)),
    }
    start = _resume(cfg, named, optimizer, scheduler, fixed) if cfg.resume else 0

    main = runtime.is_main_process
    listeners = CallbackList(
        callbacks + ([TensorBoardLogger(cfg.logging_dir or os.path.join(cfg.output_dir, "logs"))] if main else [])
    )
    if main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_config_snapshot(cfg, os.path.join(cfg.output_dir, "config.yaml"))
    summary = {
        "task_type": cfg.task_type,
        "formats": dataset.formats,
        "files": len(dataset.files),
        **tokens.summary(),
        "lora_rank": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": settings.target_modules,
        "trainable_params": sum(p.numel() for p in params),
        "steps_per_epoch": schedule.steps_per_epoch,
        "total_steps": total,
        "resumed_from": start,
    }
    listeners.on_train_start(total, start, summary)

    def save(step: int, final: bool) -> str:
        folder = adapter_folder(cfg, None if final else step)
        if main:
            save_adapter(model, tokenizer, folder, cfg.save_precision, base_model_name=hub_name)
            if cfg.save_state:
                save_training_state(
                    state_folder(cfg.output_dir, step),
                    step=step,
                    epoch=schedule.epoch_of(max(step - 1, 0)),
                    weights={n: p for n, p in named},
                    optimizer=optimizer,
                    scheduler=scheduler,
                    info={"task_type": cfg.task_type, "total_steps": total, **fixed},
                )
            listeners.on_save(folder, step)
        runtime.wait_for_everyone()
        return folder

    pad_id = _pad_id(tokenizer)
    losses: List[float] = []
    info: Optional[StepInfo] = None
    status, message, last_save = "finished", "", None
    started = time.time()
    model.train()
    try:
        for step in range(start, total):
            if runtime.broadcast_flag(listeners.should_stop()):
                status = "cancelled"
                break
            torch.manual_seed(step_seed(cfg.seed, step))
            lr = optimizer.param_groups[0]["lr"]
            try:
                loss = _optimizer_step(
                    model,
                    params,
                    optimizer,
                    runtime,
                    cfg,
                    [collate([tokens.sequences[i] for i in rows], pad_id) for rows in schedule.micro_batches(step)],
                )
            except torch.cuda.OutOfMemoryError:
                status = "stopped"
                message = (
                    f"Out of memory at step {step + 1}. Lower batch_size or max_seq_length, or turn on "
                    "gradient_checkpointing."
                )
                break
            if not math.isfinite(loss):
                status = "stopped"
                message = (
                    f"The loss became {loss} at step {step + 1}, so training stopped; the adapter was "
                    "not updated with it. Try a lower learning_rate or mixed_precision: no."
                )
                break
            scheduler.step()
            done = step + 1
            losses.append(loss)
            info = StepInfo(
                step=done,
                total_steps=total,
                epoch=schedule.epoch_of(step) + 1,
                loss=loss,
                lr=lr,
                elapsed_s=time.time() - started,
            )
            listeners.on_step_end(info)
            if done < total and _save_due(cfg, done, schedule.steps_per_epoch):
                last_save = save(done, final=False)
        if status == "finished":
            done = info.step if info else start
            outputs = [save(done, final=True)]
            if cfg.merge_adapter:
                merged = adapter_folder(cfg) + "-merged"
                if main:
                    save_merged_model(model, tokenizer, merged, declared_dtype(base_path))
                runtime.wait_for_everyone()
                outputs.append(merged)
            return TrainingResult("finished", done, outputs, _finished_message(outputs[0], tokens), losses)
        done = info.step if info else start
        if status == "cancelled":  # saved as the image route saves on Cancel, so that nothing is lost
            if done > start and last_save != adapter_folder(cfg, done):
                last_save = save(done, final=False)
            message = f"Cancelled after step {done}."
            if last_save and cfg.save_state:
                message += f" Saved {last_save}.\n" + resume_hint(state_folder(cfg.output_dir, done))
                return TrainingResult(status, done, [last_save], message, losses)
        kept = f" The last good save is {last_save}." if last_save else " Nothing was saved in this run."
        return TrainingResult(status, done, [], message + kept, losses)
    except KeyboardInterrupt:
        status = "cancelled"
        raise
    except BaseException:
        status = "stopped"  # the listeners learn that the run did not finish; the error itself propagates
        raise
    finally:
        listeners.on_train_end(info, status)


def _optimizer_step(model, params, optimizer, runtime, cfg: TextConfig, batches) -> float:
    """Forward and backward over the step's micro-batches and update the adapter; returns the mean token
    loss, or a non-finite value (without updating) when the loss blew up."""
    # Every trained token weighs the same, however the step's tokens fall into micro-batches and processes.
    local_tokens = sum(b.trained_tokens for b in batches)
    global_tokens = runtime.mean_across_processes(float(local_tokens)) * runtime.num_processes
    if global_tokens == 0:
        return 0.0  # pragma: no cover  (rows without trained tokens are dropped when tokenizing)
    optimizer.zero_grad(set_to_none=True)
    local_loss = 0.0
    for batch in batches:
        batch = batch.to(runtime.device)
        with runtime.autocast():
            # No cache: transformers keeps packed samples apart (by their position ids) only without one.
            logits = model(**batch.model_inputs(), use_cache=False).logits
        token_loss = summed_token_loss(logits, batch.labels)
        # Gradients are averaged over processes later, hence the factor num_processes here.
        runtime.backward(token_loss * (runtime.num_processes / global_tokens))
        local_loss += float(token_loss.detach())
    loss = runtime.mean_across_processes(local_loss / global_tokens) * runtime.num_processes
    if runtime.broadcast_flag(not math.isfinite(loss)):
        optimizer.zero_grad(set_to_none=True)
        return loss if not math.isfinite(loss) else math.nan  # nan: another process's loss blew up
    runtime.reduce_gradients(params)
    if cfg.max_grad_norm > 0:
        runtime.clip_grad_norm(params, cfg.max_grad_norm, optimizer)
    runtime.optimizer_step(optimizer)
    return loss


def _save_due(cfg: TextConfig, done: int, steps_per_epoch: int) -> bool:
    if cfg.save_steps and done % cfg.save_steps == 0:
        return True
    return bool(
        cfg.save_every_n_epochs
        and done % steps_per_epoch == 0
        and (done // steps_per_epoch) % cfg.save_every_n_epochs == 0
    )


def _resume(cfg: TextConfig, named, optimizer, scheduler, fixed: dict) -> int:
    """Load a ``state-<step>`` folder into the adapter, optimizer and schedule; returns its step. The state
    must hold this config's adapter (``fixed``); the config's learning rate applies from here on."""
    state = load_training_state(cfg.resume)
    own = dict(named)
    check_resumable(cfg.resume, state, fixed, {name: tuple(p.shape) for name, p in own.items()})
    rates = list(scheduler.base_lrs)  # the config's, before the state's replace them
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state.weights[name].to(param.dtype))
    load_optimizer_state(optimizer, state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    for line in describe_rate_changes(apply_config_rates(optimizer, scheduler, rates), state.step):
        print(line, flush=True)
    restore_rng_state(state.rng)
    return state.step


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
