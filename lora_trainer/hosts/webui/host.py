"""What a WebUI host file answers, and the plan for a run: in place, from the checkpoint file, or refused.

Each host file (``a1111``, ``forge``, ``reforge``) subclasses ``WebUIHost`` for the kind of loaded model it
knows; ``detect.host_for`` picks one. The backend asks the host for a ``TrainingPlan`` before a run starts
(the tab and the API say it), and follows it:

- ``IN_PLACE``: train the loaded model's own weights through the host's model adapter (no second copy);
- ``FROM_FILE``: free the host's model through the host's own API, train with the engine's own loader from
  the checkpoint file the host has loaded, and load the host's model again afterwards;
- ``REFUSED``: neither can train this model or run (the reason says what to do). The last resort.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

from lora_trainer.config import CommonConfig
from lora_trainer.hosts.webui.facts import HostFacts

IN_PLACE = "in place"
FROM_FILE = "from the checkpoint file"
REFUSED = "refused"


@dataclass(frozen=True)
class TrainingPlan:
    """How a run trains and why; holds no reference to the host's model (it may be freed)."""

    path: str
    reason: str
    host: "WebUIHost"
    checkpoint: Optional[str] = None  # the file the FROM_FILE path loads

    @property
    def in_place(self) -> bool:
        return self.path == IN_PLACE

    def sentence(self) -> str:
        """What the tab and the API say before the run starts."""
        if self.path == IN_PLACE:
            return f"Training runs in place on the weights {self.host.name} holds ({self.reason})."
        if self.path == FROM_FILE:
            return (
                f"Training loads the checkpoint file `{self.checkpoint}` with the trainer's own loader: "
                f"{self.reason}. {self.host.name}'s model is unloaded for the run and loaded again afterwards; "
                "no previews during the run."
            )
        return f"**Cannot train here:** {self.reason}"


def from_file_or_refusal(host: "WebUIHost", model: Any, reason: str) -> TrainingPlan:
    """The from-file plan when the checkpoint file and the engine's loader are both there, else the refusal
    (naming both what blocks training in place and what blocks the file path)."""
    checkpoint = host.checkpoint_file(model)
    missing = from_file_blocker(checkpoint)
    if missing:
        return TrainingPlan(
            REFUSED, f"{reason}; and training from the checkpoint file is not possible: {missing}", host
        )
    return TrainingPlan(FROM_FILE, reason, host, checkpoint)


def from_file_blocker(checkpoint: Optional[str]) -> Optional[str]:
    """Why the engine's own loader cannot train from ``checkpoint`` here, or None."""
    if not checkpoint or not os.path.isfile(checkpoint):
        return f"the WebUI names no checkpoint file that exists ({checkpoint or 'none'})"
    import importlib.util

    absent = [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if absent:
        return (
            f"{' and '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed in this WebUI's Python "
            "environment (the trainer's own loader needs them)"
        )
    return None


class WebUIHost:
    """One kind of loaded WebUI model. Every method that touches the WebUI imports ``modules`` inside it."""

    name = "the WebUI"
    # True: the adapter is made when Train is pressed (cheap, holds the model); False: inside the GPU lock, so a
    # run that falls back to the file path holds no reference to the model it frees.
    adapter_before_lock = False

    def matches(self, model: Any) -> bool:
        """True when this host file knows ``model`` (cheap: the tab asks on every poll)."""
        raise NotImplementedError

    def architecture(self, model: Any) -> str:
        """ "SD1", "SD2", "SDXL" or another family name the trainer does not train."""
        raise NotImplementedError

    def prediction_label(self, model: Any) -> str:
        return "epsilon"

    def plan(self, model: Any, cfg: Optional[CommonConfig] = None) -> TrainingPlan:
        """How ``cfg`` (or, without it, a default run) trains on ``model``; cheap, changes nothing."""
        raise NotImplementedError

    def facts(self, model: Any) -> HostFacts:
        """Device and precision the host computes in (the runtime of a run on this model)."""
        raise NotImplementedError

    def prepare(self, model: Any) -> None:
        """Inside the GPU lock, before training in place: give the model back its own weights (undo merged
        LoRAs) and load its parts. Raises ``HostModelNotTrainable`` when it turns out it cannot be trained."""

    def make_adapter(self, model: Any) -> Any:
        """The engine's ``DiffusionAdapter`` over the loaded model."""
        raise NotImplementedError

    def configure(self, cfg: CommonConfig, model: Any) -> CommonConfig:
        """The run's config adjusted to the host (e.g. its clip-skip setting); default unchanged."""
        return cfg

    def trainable_roots(self, model: Any) -> List[Any]:
        """The modules whose layers get LoRA (for the memory estimate)."""
        return [model] if hasattr(model, "modules") else []

    def checkpoint_file(self, model: Any) -> Optional[str]:
        info = getattr(model, "sd_checkpoint_info", None)
        return getattr(info, "filename", None)

    def free_model(self) -> None:
        """Unload the host's model through its own API (before training from the file)."""
        raise NotImplementedError

    def reload_model(self) -> None:
        """Load the host's model again through its own API (after training from the file)."""
        raise NotImplementedError

    def refresh_loras(self, name: str) -> None:
        """After ``name``'s file was (re)written into the Lora folder: list it, forget its old weights."""
