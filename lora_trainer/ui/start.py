"""Starting a training run from a front end (the tab's Train and Quick check buttons, the REST API's train
route): the one place that refuses to overwrite a finished LoRA, refuses while another job runs, asks the host
for what the trainer needs, estimates the memory, and starts the job. Nothing here imports gradio or torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from lora_trainer.config import CommonConfig
from lora_trainer.errors import ConfigError
from lora_trainer.jobs import TRAINING, JobRunner, TrainingJob
from lora_trainer.ui.backend import UiBackend


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
) -> StartedRun:
    """Start training ``cfg`` on ``runner`` with what ``backend`` provides; returns the started run.

    Raises ``LoraFileExists`` when the run's final file exists and ``overwrite`` is False (its message ends
    with ``how_to_overwrite``, the front end's own words); ``JobBusyError`` while any job runs (checked before
    the host does any work, and again, atomically, by the runner); ConfigError when the host cannot train
    ``cfg``. ``preview``: preview settings as the front end received them, for hosts that render previews.
    """
    lora_file = backend.final_lora_path(cfg)
    if os.path.exists(lora_file) and not overwrite:
        raise LoraFileExists(lora_file, how_to_overwrite)
    running = runner.running_job()
    if running is not None:
        raise running.refusal(TRAINING)
    training = backend.training_backend(cfg, preview)
    estimate = backend.estimate_memory(cfg)
    job = runner.start(cfg, label=label, backend=training)
    return StartedRun(job=job, lora_file=lora_file, memory_estimate=estimate)


__all__ = ["LoraFileExists", "StartedRun", "start_training_run"]
