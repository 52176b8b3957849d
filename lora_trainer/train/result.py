"""What a trainer returns: how the run ended, where it stopped, the files it wrote.

Its own module so that the trainers and ``train.run`` (which routes a config to them) need not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List


@dataclass
class TrainingResult:
    """The end of one training run.

    ``status``: "finished" (every step ran), "cancelled" (the user stopped it; the last save is kept) or
    "stopped" (the trainer stopped itself: NaN loss, out of memory; ``message`` says what to change).
    ``jobs.JobRunner`` shows these as its states finished / cancelled / failed.
    """

    status: str
    step: int
    output_files: List[str] = field(default_factory=list)  # the final LoRA / adapter paths written
    message: str = ""
    losses: List[float] = field(default_factory=list)
