"""The one entry point every front end calls: route a validated config to its trainer."""

from __future__ import annotations

from typing import List, Optional, cast

from lora_trainer.config import CommonConfig, ImageConfig, TextConfig
from lora_trainer.errors import ConfigError
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.train.callbacks import TrainingCallback
from lora_trainer.train.result import TrainingResult

__all__ = ["TrainingResult", "run_training"]  # TrainingResult is defined in train.result, kept importable here


def run_training(
    cfg: CommonConfig, callbacks: Optional[List[TrainingCallback]] = None, backend: Optional[TrainingBackend] = None
) -> TrainingResult:
    """Train ``cfg`` to completion (or cancel/stop), calling ``callbacks`` along the way.

    ``backend`` carries what a host provides (its runtime, its loaded model); the default is the standalone
    engine's (accelerate's runtime, the model loaded from ``cfg.base_model``). ConfigError when the task cannot
    use what ``backend`` holds.
    """
    backend = backend or TrainingBackend()
    if cfg.task_type == "text-generation":
        from lora_trainer.text.trainer import train_text

        if backend.adapter is not None:
            raise ConfigError("text-generation takes no model adapter: it loads cfg.base_model itself.")
        return train_text(cast(TextConfig, cfg), callbacks=callbacks, runtime=backend.runtime)
    from lora_trainer.train.image_trainer import train_image

    return train_image(cast(ImageConfig, cfg), callbacks=callbacks, runtime=backend.runtime, adapter=backend.adapter)
