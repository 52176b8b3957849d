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
from typing import Any, Callable, List

from lora_trainer.config import CommonConfig
from lora_trainer.hosts.webui.host import TrainingPlan
from lora_trainer.train.callbacks import TrainingCallback

log = logging.getLogger(__name__)

Trainer = Callable[..., Any]  # trainer(cfg, callbacks=[...], **backend_kwargs) -> TrainingResult


def train_from_file(
    plan: TrainingPlan,
    cfg: CommonConfig,
    callbacks: List[TrainingCallback],
    trainer: Trainer,
    runtime: Any,
    say: Callable[[str], None] = log.info,
) -> Any:
    """Run ``trainer`` on ``plan.checkpoint`` with the host's model unloaded; the host's model is loaded again
    whatever happens (success, cancel, error). Raises what the trainer raises."""
    say(f"Training from {plan.checkpoint}: {plan.reason}. Unloading {plan.host.name}'s model…")
    plan.host.free_model()
    gc.collect()
    try:
        file_cfg = dataclasses.replace(cfg, base_model=plan.checkpoint)
        return trainer(file_cfg, callbacks=callbacks, runtime=runtime)
    finally:
        gc.collect()
        say(f"Loading {plan.host.name}'s model again…")
        try:
            plan.host.reload_model()
        except Exception:  # the run's own outcome stays what the user sees; the host reloads on next use
            log.exception("Reloading the WebUI's model after training failed; it loads at the next generation")
