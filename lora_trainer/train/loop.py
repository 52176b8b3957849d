"""The one training loop both routes run: image LoRAs (``train/image_trainer.py``) and text adapters
(``text/trainer.py``) are small ``TrainingTask`` objects; everything else is here.

What the loop owns: the config snapshot, TensorBoard and the callbacks, the optimizer and LR schedule,
resuming from a ``state-<step>`` folder, each micro-batch's seed (torch's global RNG for dropout and a
generator for the task's own draws, both from (seed, micro-step, process), so a resumed run equals an
uninterrupted one), gradient accumulation with every unit (image micro-batch, trained token) weighing the same
across micro-batches and processes, NaN/inf and out-of-memory stops that keep the last good save, cancel,
the save cadence (``save_steps``, ``save_every_n_epochs``) and the final save.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from lora_trainer.config import CommonConfig, save_config_snapshot
from lora_trainer.errors import LoraTrainerError
from lora_trainer.train.callbacks import CallbackList, StepInfo, TensorBoardLogger, TrainingCallback
from lora_trainer.train.optim import build_optimizer, build_scheduler, load_optimizer_state
from lora_trainer.train.result import TrainingResult
from lora_trainer.train.state import (
    TrainingState,
    apply_config_rates,
    check_resumable,
    describe_rate_changes,
    load_training_state,
    restore_rng_state,
    save_training_state,
    state_folder,
)


def step_seed(seed: int, micro_step: int, process: int) -> int:
    """The seed of one micro-batch: resuming at any step reproduces its randomness exactly."""
    return (seed * 1_000_003 + micro_step * 7_919 + process * 104_729) % (2**63)


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step on this process, and where the step falls in the data."""

    micro_batches: List[Any]
    epoch: int  # 0-based
    epoch_finished: bool = False  # this step finished an epoch (for save_every_n_epochs)


@dataclass
class LoopEnd:
    """How a run ended, for the task to turn into its ``TrainingResult``."""

    status: str  # finished, cancelled, stopped
    step: int
    losses: List[float]
    outputs: List[str] = field(default_factory=list)  # the final save's files (finished runs)
    last_save: Optional[str] = None  # the last intermediate or cancel save
    reason: str = ""  # why a stopped run stopped (NaN/inf, out of memory)


class TrainingTask:
    """One route's part of a run. Override everything that raises; see ``run_loop`` for when each is called."""

    saves_on_cancel = True  # write the LoRA and a state when the user cancels

    def parameter_groups(self) -> List[dict]:
        """Optimizer groups of the trainable parameters (``params``, optional ``lr`` and ``name``)."""
        raise NotImplementedError

    def total_steps(self) -> int:
        raise NotImplementedError

    def start_at(self, state: Optional[TrainingState]) -> int:
        """Set the data position to the run's start (a resumed state's, or the beginning); return the step."""
        raise NotImplementedError

    def next_step(self, step: int) -> StepBatches:
        """The micro-batches of optimizer step ``step`` (0-based), advancing the data position."""
        raise NotImplementedError

    def units(self, micro_batch) -> float:
        """How many loss units ``micro_batch`` holds (1 per image micro-batch, its trained tokens for text)."""
        return 1.0

    def loss(self, micro_batch, epoch: int, generator: torch.Generator) -> torch.Tensor:
        """The summed loss over the micro-batch's units (a scalar with a graph to the trainable parameters)."""
        raise NotImplementedError

    def summary(self) -> Dict[str, Any]:
        return {}

    def save(self, step: int, final: bool) -> List[str]:
        """Write the trained weights (intermediate or final); returns the written paths, the main one first."""
        raise NotImplementedError

    def trainable_state(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def resume_settings(self) -> Dict[str, Any]:
        """What a state records and a resumed run must match (rank, alpha, base model...; ``check_resumable``)."""
        return {}

    def load_trainable_state(self, state: TrainingState, source: str) -> None:
        raise NotImplementedError

    def state_info(self) -> Dict[str, Any]:
        """Extra facts a training state records (the data position, ...)."""
        return {}

    def result(self, end: LoopEnd) -> TrainingResult:
        raise NotImplementedError


class TrainingLoop:
    def __init__(
        self,
        cfg: CommonConfig,
        task: TrainingTask,
        runtime,
        callbacks: List[TrainingCallback],
        log: Callable[[str], None] = print,
    ):
        self.cfg, self.task, self.runtime, self.log = cfg, task, runtime, log
        main = runtime.is_main_process
        logger = TensorBoardLogger(cfg.logging_dir or os.path.join(cfg.output_dir, "logs")) if main else None
        self.callbacks = CallbackList([*callbacks, logger])
        self.started_at = time.time()

    def write_snapshot(self) -> None:
        """``output_dir/config.yaml``: the resolved config, written before anything heavy loads."""
        if self.runtime.is_main_process:
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            save_config_snapshot(self.cfg, os.path.join(self.cfg.output_dir, "config.yaml"))

    # ------------------------------------------------------------ set-up

    def _set_up(self) -> int:
        cfg, task = self.cfg, self.task
        groups = task.parameter_groups()
        self.params = [p for g in groups for p in g["params"] if p.requires_grad]
        self.total = task.total_steps()
        self.optimizer = build_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay)
        self.scheduler = build_scheduler(
            cfg.lr_scheduler, self.optimizer, cfg.lr_warmup_steps, self.total, cfg.lr_scheduler_num_cycles
        )
        if not cfg.resume:
            return task.start_at(None)
        state = load_training_state(cfg.resume)
        shapes = {k: tuple(v.shape) for k, v in task.trainable_state().items()}
        check_resumable(cfg.resume, state, task.resume_settings(), shapes)
        rates = list(self.scheduler.base_lrs)  # the config's, before the state's replace them
        task.load_trainable_state(state, cfg.resume)
        load_optimizer_state(self.optimizer, state.optimizer)  # keeps this run's fused/foreach flags
        self.scheduler.load_state_dict(state.scheduler)
        # The config's learning rates apply from the schedule's saved position on.
        for line in describe_rate_changes(apply_config_rates(self.optimizer, self.scheduler, rates), state.step):
            self.log(line)
        restore_rng_state(state.rng)
        self.started_at = float(state.info.get("started_at", self.started_at))
        return task.start_at(state)

    # ------------------------------------------------------------ one step

    def _step(self, step: int, batches: StepBatches) -> float:
        """Forward/backward over the step's micro-batches and, if the loss is finite, update; returns the loss
        (mean over every unit of every process), non-finite when the update was skipped."""
        cfg, runtime, task = self.cfg, self.runtime, self.task
        local_units = sum(task.units(b) for b in batches.micro_batches)
        # Units per process on average: each micro-batch's summed loss is divided by it, and the gradient
        # average over processes then weighs every unit of the step the same.
        per_process = runtime.mean_across_processes(float(local_units))
        if per_process == 0:
            return 0.0
        local_loss = 0.0
        for k, micro_batch in enumerate(batches.micro_batches):
            seed = step_seed(cfg.seed, step * cfg.gradient_accumulation_steps + k, runtime.process_index)
            torch.manual_seed(seed)  # dropout and anything else drawing on the global RNG
            generator = torch.Generator(device=runtime.device).manual_seed(seed)
            loss = task.loss(micro_batch, batches.epoch, generator)
            runtime.backward(loss / per_process)
            local_loss += float(loss.detach())
        value = runtime.mean_across_processes(local_loss / per_process)
        if runtime.broadcast_flag(not math.isfinite(value)):
            self.optimizer.zero_grad(set_to_none=True)
            return value if not math.isfinite(value) else math.nan  # nan: another process's loss blew up
        runtime.reduce_gradients(self.params)
        if cfg.max_grad_norm > 0:
            runtime.clip_grad_norm(self.params, cfg.max_grad_norm, self.optimizer)
        runtime.optimizer_step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    # ------------------------------------------------------------ the loop

    def run(self) -> TrainingResult:
        runtime, task = self.runtime, self.task
        step = start = self._set_up()
        self.callbacks.on_train_start(self.total, start, task.summary())
        info: Optional[StepInfo] = None
        end = LoopEnd("finished", step, [])
        t0 = time.time()
        try:
            while step < self.total:
                batches = task.next_step(step)
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self._step(step, batches)
                if not math.isfinite(loss):
                    end.status, end.reason = "stopped", f"the loss became {loss} at step {step + 1}"
                    break
                step += 1
                end.step = step
                end.losses.append(loss)
                info = StepInfo(
                    step,
                    self.total,
                    batches.epoch + 1,
                    loss,
                    lr,
                    time.time() - t0,
                    start_step=start,
                    epoch_finished=batches.epoch_finished,
                )
                self.callbacks.on_step_end(info)
                saved_now = step < self.total and self._save_due(step, batches)
                if saved_now:
                    end.last_save = self._save(step, final=False)
                if runtime.broadcast_flag(self.callbacks.should_stop()):
                    end.status = "cancelled"
                    if task.saves_on_cancel and not saved_now:  # nothing of the run is lost
                        end.last_save = self._save(step, final=False)
                    break
            if end.status == "finished":
                end.outputs = self._save(step, final=True, all_files=True)
        except torch.cuda.OutOfMemoryError:
            end.status, end.reason = "stopped", f"out of memory at step {step + 1}"
        except LoraTrainerError:
            end.status = "failed"
            raise
        except KeyboardInterrupt:
            end.status = "cancelled"
            raise
        except BaseException:
            end.status = "stopped"  # the listeners learn the run did not finish; the error itself propagates
            raise
        finally:
            self.callbacks.on_train_end(info, end.status)
        runtime.wait_for_everyone()
        return task.result(end)

    def _save_due(self, step: int, batches: StepBatches) -> bool:
        cfg = self.cfg
        by_steps = cfg.save_steps is not None and step % cfg.save_steps == 0
        epoch_done = batches.epoch + 1 if batches.epoch_finished else None
        by_epochs = bool(cfg.save_every_n_epochs and epoch_done and epoch_done % cfg.save_every_n_epochs == 0)
        return by_steps or by_epochs

    def _save(self, step: int, final: bool, all_files: bool = False):
        """The task's files (main process) and a training state; the main path (or every path with
        ``all_files``). Every process waits for the writer."""
        paths: List[str] = []
        if self.runtime.is_main_process:
            paths = self.task.save(step, final)
            if self.cfg.save_state:
                save_training_state(
                    state_folder(self.cfg.output_dir, step),
                    step=step,
                    epoch=self.task.state_info().get("epoch", 0),
                    weights=self.task.trainable_state(),
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    info={
                        **{k: v for k, v in self.task.state_info().items() if k != "epoch"},
                        "started_at": self.started_at,
                        "seed": self.cfg.seed,
                        **self.task.resume_settings(),
                    },
                )
            self.callbacks.on_save(paths[0], step)
        self.runtime.wait_for_everyone()
        if all_files:
            return paths
        return paths[0] if paths else None


def run_loop(cfg: CommonConfig, task: TrainingTask, runtime, callbacks: List[TrainingCallback]) -> TrainingResult:
    """Run ``task`` to its end with the shared loop (see the module docstring)."""
    return TrainingLoop(cfg, task, runtime, callbacks).run()
