"""What a front end hands the trainer besides the config: where it runs and, for a host, its loaded model.

``TrainingBackend`` travels unchanged from the host (``UiBackend.training_backend``) through the job runner
and ``run_training`` to the trainer, so every layer sees the same named, typed fields. A host that needs more
for its own wrapper around the trainer subclasses it (the WebUI adds its preview settings).
Nothing here imports torch: the job runner imports this module when the WebUI builds its tab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from lora_trainer.models.adapter import DiffusionAdapter
    from lora_trainer.train.runtime import Runtime


@dataclass(frozen=True)
class TrainingBackend:
    """``runtime``: where the loop runs (None: the standalone default, accelerate's runtime from the config's
    ``mixed_precision``); ``adapter``: the model to train, already loaded (None: load ``cfg.base_model`` from
    disk or the Hub). Image training only takes an adapter; text-generation refuses one."""

    runtime: Optional[Runtime] = None
    adapter: Optional[DiffusionAdapter] = None


__all__ = ["TrainingBackend"]
