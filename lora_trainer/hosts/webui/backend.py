"""``WebUIBackend``: the tab's and the REST API's answers inside a WebUI, written once for every host.

It asks ``facts`` about the loaded model, the host file (``a1111``) for refusals and the model adapter, and adds
the host's progress bar, Interrupt and previews (``progress``) to every run. Job hooks: the GPU queue lock for the
whole run, merged LoRA deltas unloaded before training, the final file published into the Lora folder and the
host's Lora list refreshed afterwards (``builtin_lora``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional

from lora_trainer.caption.base import Captioner
from lora_trainer.config import CommonConfig, ImageConfig, resolved_output_name
from lora_trainer.errors import ConfigError
from lora_trainer.hosts.webui import a1111
from lora_trainer.hosts.webui.builtin_lora import publish_lora, refresh_host_networks, unload_host_networks
from lora_trainer.hosts.webui.facts import (
    architecture,
    checkpoint_name,
    host_facts,
    host_model,
    jobs_dir,
    loaded_model,
    lora_dir,
    prediction_label,
)
from lora_trainer.hosts.webui.interrogators import host_caption_session, host_captioner_loaders
from lora_trainer.hosts.webui.progress import (
    STATE_JOB_NAME,
    HostPreviews,
    HostProgress,
    PreviewRenderer,
    PreviewSettings,
    host_job,
    render_host_preview,
)
from lora_trainer.jobs import JobHooks, default_trainer
from lora_trainer.train.callbacks import CallbackList, TrainingCallback
from lora_trainer.ui.backend import WEBUI_SEND_PROMPT_JS, UiBackend
from lora_trainer.ui.captioning import CaptionProgress

log = logging.getLogger(__name__)

# The extra memory of a run, roughly: fp32 LoRA weight + gradient + two AdamW moments = 16 bytes a parameter.
BYTES_PER_TRAINED_PARAM = 16
# Activations of one 512x512 SD1 sample in fp16 with the frozen base (measured orders of magnitude, not
# promises); scaled by pixel count, batch size and architecture, divided when checkpointing recomputes them.
ACTIVATION_GIB_PER_SD1_512_SAMPLE = 2.5
ARCH_ACTIVATION_FACTOR = {"SD1": 1.0, "SD2": 1.2, "SDXL": 1.6}
CHECKPOINTING_DIVISOR = 4.0


def estimate_extra_memory(model: Any, cfg: CommonConfig) -> str:
    """The memory a run adds to the loaded checkpoint: LoRA weights, optimizer state, activations."""
    import torch

    rank = cfg.lora_rank or 8
    te = isinstance(cfg, ImageConfig) and cfg.train_text_encoder
    params = 0
    for module in model.modules():
        name = type(module).__name__
        in_unet_block = name in ("SpatialTransformer", "SpatialTransformer3D")
        in_te_block = te and name in ("CLIPAttention", "CLIPMLP", "ResidualAttentionBlock")
        if not (in_unet_block or in_te_block):
            continue
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear):
                params += rank * (sub.in_features + sub.out_features)
            elif isinstance(sub, torch.nn.Conv2d) and sub.kernel_size == (1, 1):
                params += rank * (sub.in_channels + sub.out_channels)
    arch = architecture(model)
    resolution = getattr(cfg, "resolution", 512)
    activations = (
        ACTIVATION_GIB_PER_SD1_512_SAMPLE
        * ARCH_ACTIVATION_FACTOR.get(arch, 2.0)
        * cfg.batch_size
        * (resolution / 512) ** 2
    )
    if cfg.gradient_checkpointing:
        activations /= CHECKPOINTING_DIVISOR
    lora_gib = params * BYTES_PER_TRAINED_PARAM / 2**30
    return (
        f"Extra memory beyond the loaded checkpoint (no second copy of it is loaded): about "
        f"{lora_gib:.2f} GiB for {params / 1e6:.1f} M LoRA parameters with their gradients and optimizer "
        f"state, plus roughly {activations:.1f} GiB of activations for batch {cfg.batch_size} at "
        f"{resolution} px{' with gradient checkpointing' if cfg.gradient_checkpointing else ''}. "
        "If that is too much: lower batch size, resolution or rank, or turn on gradient checkpointing."
    )


class WebUIBackend(UiBackend):
    """The tab's and the REST API's answers inside AUTOMATIC1111: train the loaded checkpoint in place."""

    title = "LoRA Trainer"

    def __init__(
        self,
        default_preview: Optional[Callable[[], PreviewSettings]] = None,
        render_preview: PreviewRenderer = render_host_preview,
    ) -> None:
        # The preview defaults come from the host's settings page, read when each run starts.
        self.default_preview = default_preview or PreviewSettings
        self.render_preview = render_preview
        self._cfg: Optional[CommonConfig] = None  # the running job's config (one job at a time)

    # --- what the tab shows ------------------------------------------------------------------------------
    def describe_model(self) -> Optional[str]:
        model = loaded_model()
        if model is None:
            return "Base model: **the loaded checkpoint** (none is loaded yet: the WebUI loads it on first use)."
        problem = a1111.model_refusal(model)
        if problem:
            return f"Base model: the loaded checkpoint `{checkpoint_name(model)}`. **Cannot train here:** {problem}"
        return (
            f"Base model: **the loaded checkpoint** `{checkpoint_name(model)}` ({architecture(model)}, "
            f"{prediction_label(model)}). Training runs in place on the weights the WebUI holds."
        )

    def resolve_base_model(self, typed: str) -> str:
        # The config still needs a base_model; it names the checkpoint for the LoRA's metadata.
        model = loaded_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return getattr(info, "filename", None) or typed or "webui-loaded-checkpoint"

    def lora_dir(self) -> str:
        return lora_dir()

    def jobs_dir(self) -> str:
        return jobs_dir()

    def default_output_dir(self, output_name: str) -> str:
        return os.path.join(self.jobs_dir(), output_name)

    def final_lora_path(self, cfg: CommonConfig) -> str:
        return os.path.join(self.lora_dir(), resolved_output_name(cfg) + ".safetensors")

    def estimate_memory(self, cfg: CommonConfig) -> str:
        model = loaded_model()
        if model is None:
            return ""
        try:
            text = estimate_extra_memory(model, cfg)
            precision = host_facts(model).mixed_precision
            if precision != cfg.mixed_precision:
                # The weights are the host's: their precision decides, not the form's option.
                text += (
                    f" Computing in the WebUI's precision ({precision}); the Mixed precision option "
                    f"({cfg.mixed_precision}) does not apply to a loaded checkpoint."
                )
            return text
        except Exception:  # an estimate must never block a start
            log.exception("Memory estimate failed")
            return ""

    def send_prompt_js(self) -> Optional[str]:
        return WEBUI_SEND_PROMPT_JS

    # --- captioning: the host's interrogators first, then ours -------------------------------------------
    def captioner_choices(self) -> List[str]:
        return [*host_captioner_loaders(), *super().captioner_choices()]

    def load_captioner(self, choice: str, options: Any) -> Captioner:
        loaders = host_captioner_loaders()
        if choice in loaders:
            return loaders[choice](options)
        return super().load_captioner(choice, options)

    def caption_session(self, label: str) -> ContextManager[CaptionProgress]:
        return host_caption_session(label)

    # --- what the trainer gets ---------------------------------------------------------------------------
    def make_backend_kwargs(self, cfg: CommonConfig, preview: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """The runtime and the host-model adapter; refuses here (before any work) what cannot train."""
        if cfg.task_type != "image-generation":
            raise ConfigError(
                "The WebUI tab trains image LoRAs on the loaded checkpoint; text-generation "
                "runs use the standalone command line."
            )
        from lora_trainer.train.runtime import LocalRuntime

        model = host_model()
        facts = host_facts(model)
        problem = a1111.model_refusal(model) or a1111.refusal(cfg, facts)
        if problem:
            raise ConfigError(problem)
        adapter = a1111.make_adapter(model, facts)
        settings = PreviewSettings.from_mapping(preview) if preview is not None else self.default_preview()
        return {
            "runtime": LocalRuntime(facts.device, facts.mixed_precision),
            "adapter": adapter,
            "preview": settings.for_run(cfg),
        }

    def train(self, cfg: CommonConfig, callbacks: List[TrainingCallback], **backend_kwargs: Any) -> Any:
        """The JobRunner's trainer: the engine plus the host progress and preview callbacks."""
        from modules import shared

        preview: Optional[PreviewSettings] = backend_kwargs.pop("preview", None)
        extra: List[TrainingCallback] = [HostProgress(shared.state, resolved_output_name(cfg))]
        if preview is not None and preview.every_n_steps > 0:
            extra.append(
                HostPreviews(
                    preview,
                    cfg.output_dir,
                    self.render_preview,
                    deliver=CallbackList(list(callbacks)),
                    state=shared.state,
                )
            )
        adapter = backend_kwargs.get("adapter")
        try:
            return default_trainer(cfg, callbacks=[*callbacks, *extra], **backend_kwargs)
        finally:
            # The host keeps generating with this model: put it back whatever the engine did or failed to do
            # (restore is idempotent; the engine calls it too on its normal paths).
            if adapter is not None and hasattr(adapter, "restore"):
                adapter.restore()

    # --- job hooks -----------------------------------------------------------------------------------------
    def job_hooks(self) -> JobHooks:
        return JobHooks(
            guard=self.hold_gpu, before_start=self.before_start, after_save=self.after_save, after_end=self.after_end
        )

    @contextlib.contextmanager
    def hold_gpu(self, cfg: CommonConfig) -> Iterator[None]:
        """The host's GPU queue lock for the whole run: no generation runs while we train, and vice versa."""
        with host_job(STATE_JOB_NAME, f"Training LoRA {resolved_output_name(cfg)}: loading…"):
            yield

    def before_start(self, cfg: CommonConfig) -> None:
        """Inside the lock: refuse what cannot train, then give the model back its own weights."""
        model = host_model()
        problem = a1111.model_refusal(model) or a1111.refusal(cfg, host_facts(model))
        if problem:
            raise ConfigError(problem)
        restored = unload_host_networks(model)
        if restored:
            log.info("Unloaded LoRA deltas the WebUI had merged into %d modules before training", restored)
        self._cfg = cfg

    def after_save(self, path: str) -> None:
        """Publish the final file into the Lora folder (atomically) and make the host load it afresh."""
        cfg = self._cfg
        if cfg is None:
            return
        name = resolved_output_name(cfg)
        produced = os.path.join(cfg.output_dir, name + ".safetensors")
        if os.path.abspath(path) != os.path.abspath(produced):
            return  # an intermediate save: it stays in the job folder
        publish_lora(path, self.final_lora_path(cfg))
        refresh_host_networks(name, loaded_model())

    def after_end(self, status: Any) -> None:
        self._cfg = None
