"""The one entry point every front end calls: route a validated config to its trainer."""

from __future__ import annotations

from typing import List, Optional

from lora_trainer.config import CommonConfig
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.result import TrainingResult

__all__ = ["TrainingResult", "run_training"]  # TrainingResult is defined in train.result, kept importable here


def run_training(
    cfg: CommonConfig, callbacks: Optional[List[TrainingCallback]] = None, runtime=None, **backend
) -> TrainingResult:
    """Train ``cfg`` to completion (or cancel/stop), calling ``callbacks`` along the way.

    ``runtime`` defaults to accelerate's (standalone); ``backend`` passes trainer-specific objects such as the
    WebUI host's model adapter.
    """
    if cfg.task_type == "text-generation":
        from lora_trainer.text.trainer import train_text

        return train_text(cfg, callbacks=callbacks, runtime=runtime, **backend)
    from lora_trainer.train.image_trainer import train_image

    return train_image(cfg, callbacks=callbacks, runtime=runtime, **backend)
