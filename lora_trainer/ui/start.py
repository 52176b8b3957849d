"""Starting a training run from a front end (the tab's Train and Quick check buttons, the REST API's train
route): the one place that refuses to overwrite a finished LoRA, refuses while another job runs, drops the
resumable states of a LoRA it overwrites, asks the host for what the trainer needs, estimates the memory, and
starts the job. Nothing here imports gradio or torch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Mapping, Optional

from lora_trainer.config import CommonConfig
from lora_trainer.errors import ConfigError
from lora_trainer.jobs import TRAINING, JobRunner, TrainingJob
from lora_trainer.ui.backend import UiBackend
from lora_trainer.ui.status_view import STATE_PREFIX


class LoraFileExists(ConfigError):
    """The run would overwrite a LoRA file that exists; ``path`` names it."""

    def __init__(self, path: str, how_to_overwrite: str) -> None:
        super().__init__(f"{path} already exists: choose another output name, or {how_to_overwrite}.")
        self.path = path


@dataclass(frozen=True)
class StartedRun:
    """A run that started: its job, the LoRA file it will write, and the memory estimate shown to the user."""

    job: TrainingJob
    lora_file: str
    memory_estimate: str


def start_training_run(
    runner: JobRunner,
    backend: UiBackend,
    cfg: CommonConfig,
    *,
    label: str = "Train",
    overwrite: bool = False,
    how_to_overwrite: str = "allow overwriting",
    preview: Optional[Mapping[str, object]] = None,
    drop_old_states: bool = True,
) -> StartedRun:
    """Start training ``cfg`` on ``runner`` with what ``backend`` provides; returns the started run.

    Raises ``LoraFileExists`` when the run's final file exists and ``overwrite`` is False (its message ends
    with ``how_to_overwrite``, the front end's own words); ``JobBusyError`` while any job runs (checked before
    the host does any work, and again, atomically, by the runner); ConfigError when the host cannot train
    ``cfg``. ``preview``: preview settings as the front end received them, for hosts that render previews.
    ``drop_old_states``: when the run overwrites an existing LoRA, remove the earlier run's resumable states
    in ``cfg.output_dir`` first (False: keep them, as a quick check replacing its own earlier one does).
    """
    lora_file = backend.final_lora_path(cfg)
    replacing = os.path.exists(lora_file)
    if replacing and not overwrite:
        raise LoraFileExists(lora_file, how_to_overwrite)
    running = runner.running_job()
    if running is not None:
        raise running.refusal(TRAINING)
    training = backend.training_backend(cfg, preview)
    if replacing and drop_old_states:
        clear_old_states(cfg)
    estimate = backend.estimate_memory(cfg)
    job = runner.start(cfg, label=label, backend=training)
    return StartedRun(job=job, lora_file=lora_file, memory_estimate=estimate)


def clear_old_states(cfg: CommonConfig) -> None:
    """Overwriting a LoRA: the earlier run's resumable states (``state-<step>`` folders) in the same output
    folder go with it, so a later resume cannot pick up a run that is gone; a state this run resumes from
    stays. Folders that cannot be read or removed are left alone."""
    folder = cfg.output_dir
    resume = getattr(cfg, "resume", None)
    keep = os.path.abspath(resume) if resume else None
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir() and entry.name.startswith(STATE_PREFIX) and os.path.abspath(entry.path) != keep:
            shutil.rmtree(entry.path, ignore_errors=True)


__all__ = ["LoraFileExists", "StartedRun", "clear_old_states", "start_training_run"]
