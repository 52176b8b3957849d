"""The path for what cannot be trained in place: free the host's model through the host's own API, train with
the engine's own loader from the checkpoint file the host has loaded, and load the host's model again.

The host's model must not stay referenced while the file trains (two copies would be the very thing this path
avoids): callers pass no model, only the host file, and the run holds the GPU queue lock throughout, so no
generation finds the host without its model.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import TYPE_CHECKING, Callable, List

from lora_trainer.config import CommonConfig
from lora_trainer.errors import ConfigError
from lora_trainer.hosts.webui.host import TrainingPlan
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.result import TrainingResult

if TYPE_CHECKING:  # torch: the glue is imported when the WebUI builds its tab
    from lora_trainer.train.runtime import Runtime

log = logging.getLogger(__name__)

Trainer = Callable[..., TrainingResult]  # trainer(cfg, callbacks=[...], backend=TrainingBackend(...))


def train_from_file(
    plan: TrainingPlan,
    cfg: CommonConfig,
    callbacks: List[TrainingCallback],
    trainer: Trainer,
    runtime: Runtime,
    say: Callable[[str], None] = log.info,
) -> TrainingResult:
    """Run ``trainer`` on ``plan.checkpoint`` with the host's model unloaded; the host's model is loaded again
    whatever happens (success, cancel, error). The trainer gets ``runtime`` and no adapter: the engine's own
    loader reads the file. Raises ConfigError for a plan without a file, else what the trainer raises."""
    if not plan.checkpoint:  # a from-file plan names its file; refuse before the host's model is unloaded
        raise ConfigError(f"Cannot train from the checkpoint file: {plan.host.name} names none ({plan.reason}).")
    say(f"Training from {plan.checkpoint}: {plan.reason}. Unloading {plan.host.name}'s model…")
    plan.host.free_model()
    gc.collect()
    try:
        file_cfg = dataclasses.replace(cfg, base_model=plan.checkpoint)
        return trainer(file_cfg, callbacks=callbacks, backend=TrainingBackend(runtime=runtime))
    finally:
        gc.collect()
        say(f"Loading {plan.host.name}'s model again…")
        try:
            plan.host.reload_model()
        except Exception:  # the run's own outcome stays what the user sees; the host reloads on next use
            log.exception("Reloading the WebUI's model after training failed; it loads at the next generation")
