"""What the tab needs to know about where it runs: the standalone app or a WebUI host.

The tab is the same everywhere; a ``UiBackend`` answers the host-specific questions (which model, where
files go, what to pass to the trainer, how much memory a run needs). ``StandaloneBackend`` trains a model
from disk with the standard engine path; the WebUI glue subclasses ``UiBackend`` for the loaded checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, ContextManager, List, Mapping, Optional, Sequence

from lora_trainer.config import CommonConfig, lora_rank_of, resolved_output_name
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.ui.captioning import CaptionProgress, no_host_session
from lora_trainer.ui.options import final_lora_path

MODEL_WEIGHT_EXTENSIONS = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
# For a WebUI backend's send_prompt_js: javascript/lora_trainer.js, which the host injects into its page.
# Both return [] (no outputs): a value returned by an output-less event's JS is an error in gradio 3.41's page.
WEBUI_SEND_PROMPT_JS = "(prompt) => loraTrainerSendToTxt2img(prompt)"
WEBUI_REFRESH_LORAS_JS = "(published) => loraTrainerRefreshLoras(published)"
# The caption panel's choice that captions with the model at the "Model path" box, its kind told by its files.
LOCAL_CAPTIONER = "local model path"


class UiBackend:
    """Host-specific answers for the tab. Override what differs; the defaults suit a plain folder layout."""

    title = "LoRA Trainer"

    def describe_model(self) -> Optional[str]:
        """A line naming the base model the host has loaded (e.g. "the loaded checkpoint `x` (SDXL)").

        None means the user chooses the base model: the tab shows a path box instead. The tab asks again on
        every poll (about once a second) so a checkpoint switch shows up: keep it cheap.
        """
        return None

    def resolve_base_model(self, typed: str) -> str:
        """The config's ``base_model`` for what the user typed (a host with a loaded model ignores ``typed``)."""
        return typed

    def default_base_model(self) -> Optional[str]:
        """The image base model when the box is left empty (a Hub id), or None: one must be given."""
        return None

    def lora_dir(self) -> str:
        """The folder whose LoRA files the tab lists (the host's Lora folder)."""
        raise NotImplementedError

    def default_output_dir(self, output_name: str) -> str:
        """Where a run's LoRA, states and logs go when the user leaves the output folder blank."""
        return os.path.join(self.lora_dir(), output_name)

    def final_lora_path(self, cfg: CommonConfig) -> str:
        """The file a finished run writes; the tab refuses to overwrite it unless asked."""
        return final_lora_path(cfg)

    def training_backend(self, cfg: CommonConfig, preview: Optional[Mapping[str, object]] = None) -> TrainingBackend:
        """What ``run_training`` gets besides ``cfg`` (the host's runtime and model adapter); refuses with
        ConfigError what this host cannot train. ``preview``: preview-image settings as a front end sent them
        (the REST API's ``preview`` field), for hosts that render previews; the default ignores them."""
        return TrainingBackend()

    def estimate_memory(self, cfg: CommonConfig) -> str:
        """A sentence about the memory the run will need, shown before it starts."""
        return ""

    def send_prompt_js(self) -> Optional[str]:
        """JavaScript ``(prompt) => ...`` that sends the "Try it" prompt to the host's txt2img, or None."""
        return None

    def refresh_loras_js(self) -> Optional[str]:
        """JavaScript ``(published) => ...`` run in the page when a run's LoRA was published, so the host's
        own Lora list shows it (None: nothing to refresh)."""
        return None

    def hidden_options(self) -> Sequence[str]:
        """Config keys whose widgets the tab hides because the host decides them (its precision, say)."""
        return ()

    # --- captioning (the caption panel) --------------------------------------------------------------------
    def captioner_choices(self) -> List[str]:
        """The captioners the panel offers: ours by name, then a local model path; hosts add their own."""
        from lora_trainer.caption.registry import captioner_loaders

        return [*captioner_loaders(), LOCAL_CAPTIONER]

    def load_captioner(self, choice: str, options: Any) -> Any:
        """The ``Captioner`` for a panel choice (``options``: a ``CaptionerOptions``). Runs in the caption
        thread, inside ``caption_session``; raises ``CaptionerUnavailable`` saying what is missing."""
        from lora_trainer.caption.base import CaptionerUnavailable
        from lora_trainer.caption.registry import load_captioner

        if choice == LOCAL_CAPTIONER:
            if not options.model_path:
                raise CaptionerUnavailable(
                    'Enter the captioner\'s folder or file in "Model path" (a BLIP folder, '
                    "an open_clip folder or checkpoint, or a WD14 .onnx with its tags)."
                )
            return load_captioner(options.model_path, options)
        return load_captioner(choice, options)

    def caption_session(self, label: str) -> ContextManager[CaptionProgress]:
        """Held for a whole caption run: the host's GPU lock and progress bar. The default holds nothing."""
        return no_host_session(label)


def _weights_size(path: str) -> int:
    """Bytes of model weights in a single file or a diffusers/transformers folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(
            os.path.getsize(os.path.join(root, f)) for f in files if f.lower().endswith(MODEL_WEIGHT_EXTENSIONS)
        )
    return total


class StandaloneBackend(UiBackend):
    """The plain gradio app: the base model is a path, files go under one output root."""

    title = "LoRA Trainer (standalone)"

    def __init__(self, output_root: str, backend: Optional[TrainingBackend] = None) -> None:
        self.output_root = os.path.abspath(output_root)
        self.backend = backend or TrainingBackend()  # runtime None: run_training picks accelerate's runtime

    def lora_dir(self) -> str:
        return self.output_root

    def default_base_model(self) -> Optional[str]:
        from lora_trainer.models.hub_models import DEFAULT_BASE_MODEL

        return DEFAULT_BASE_MODEL

    def training_backend(self, cfg: CommonConfig, preview: Optional[Mapping[str, object]] = None) -> TrainingBackend:
        return self.backend

    def estimate_memory(self, cfg: CommonConfig) -> str:
        if not cfg.base_model or not os.path.exists(cfg.base_model):
            return ""
        size = _weights_size(cfg.base_model)
        if not size:
            return ""
        precision = "its stored precision" if cfg.mixed_precision == "no" else cfg.mixed_precision
        return (
            f"The base model's weights take about {size / 2**30:.1f} GiB on disk; training holds them in "
            f"{precision} plus the LoRA weights ({resolved_output_name(cfg)}, rank {lora_rank_of(cfg)}), "
            "their optimizer state and the activations of one batch."
        )
