"""``WebUIBackend``: the tab's and the REST API's answers inside a WebUI, written once for every host.

For the loaded model it asks ``detect`` which host file knows it and that host for a ``TrainingPlan`` (in
place, from the checkpoint file, or refused), says the plan before a run starts, and follows it: in place
through the host's model adapter, or through ``from_file``. Every run gets the host's progress bar, Interrupt
and previews (``progress``); the job hooks hold the GPU queue lock for the whole run, let the host give the
model its own weights back before training, and publish the final file into the Lora folder and refresh the
host's Lora list afterwards (``builtin_lora``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, List, Mapping, Optional, Sequence

from lora_trainer.caption.base import Captioner
from lora_trainer.config import CommonConfig, ImageConfig, lora_rank_of, resolved_output_name
from lora_trainer.errors import ConfigError
from lora_trainer.hosts.live_weights import HostModelNotTrainable
from lora_trainer.hosts.webui.builtin_lora import publish_lora, refresh_host_networks
from lora_trainer.hosts.webui.detect import host_for
from lora_trainer.hosts.webui.facts import checkpoint_name, host_model, jobs_dir, loaded_model, lora_dir
from lora_trainer.hosts.webui.from_file import train_from_file
from lora_trainer.hosts.webui.host import FROM_FILE, REFUSED, TrainingPlan, from_file_or_refusal
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
from lora_trainer.lora.layer import is_lora_target
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.train.callbacks import CallbackList, TrainingCallback
from lora_trainer.train.result import TrainingResult
from lora_trainer.ui.backend import WEBUI_REFRESH_LORAS_JS, WEBUI_SEND_PROMPT_JS, UiBackend
from lora_trainer.ui.captioning import CaptionProgress

if TYPE_CHECKING:  # torch: the glue is imported when the WebUI builds its tab
    from lora_trainer.train.runtime import Runtime

log = logging.getLogger(__name__)

# The extra memory of a run, roughly: fp32 LoRA weight + gradient + two AdamW moments = 16 bytes a parameter.
BYTES_PER_TRAINED_PARAM = 16
# Activations of one 512x512 SD1 sample in fp16 with the frozen base (measured orders of magnitude, not
# promises); scaled by pixel count, batch size and architecture, divided when checkpointing recomputes them.
ACTIVATION_GIB_PER_SD1_512_SAMPLE = 2.5
CHECKPOINTING_DIVISOR = 4.0
# The loaded weights' precision is the host's (its --precision / --no-half flags): the tab hides the option.
HOST_DECIDED_OPTIONS = ("mixed_precision",)


def activation_factor(arch: str) -> float:
    """A host's architecture label's activations relative to SD1 (the family's ``activation_factor``); 2.0 for a
    label no family has."""
    from lora_trainer.models.families import family_named

    try:
        return family_named(arch.lower()).activation_factor
    except ValueError:
        return 2.0


def estimate_extra_memory(roots: Sequence[Any], arch: str, cfg: CommonConfig) -> str:
    """The memory a run adds to the loaded checkpoint (LoRA weights, optimizer state, activations), counting the
    LoRA-able layers of the transformer blocks under ``roots`` (the UNet, and the text encoders' when trained)."""
    import torch

    rank = lora_rank_of(cfg)
    te = isinstance(cfg, ImageConfig) and cfg.train_text_encoder
    params = 0
    for root in roots:
        for module in root.modules():
            name = type(module).__name__
            in_unet_block = name in ("SpatialTransformer", "SpatialTransformer3D")
            in_te_block = te and name in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "ResidualAttentionBlock")
            if not (in_unet_block or in_te_block):
                continue
            for sub in module.modules():
                if isinstance(sub, torch.nn.Conv2d):
                    if sub.kernel_size == (1, 1):
                        params += rank * (sub.in_channels + sub.out_channels)
                elif is_lora_target(sub):
                    params += rank * (sub.in_features + sub.out_features)
    resolution = getattr(cfg, "resolution", 512)
    activations = ACTIVATION_GIB_PER_SD1_512_SAMPLE * activation_factor(arch) * cfg.batch_size * (resolution / 512) ** 2
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


@dataclass(frozen=True)
class WebUITraining(TrainingBackend):
    """What the WebUI hands a run: the engine's runtime and (an in-place AUTOMATIC1111 run) the host-model
    adapter, plus what only its own trainer wrapper (``WebUIBackend.train``) reads: the preview settings it
    turns into preview images and the plan it follows (in place or from the checkpoint file)."""

    preview: Optional[PreviewSettings] = None
    plan: Optional[TrainingPlan] = None


class WebUIBackend(UiBackend):
    """The tab's and the REST API's answers inside a WebUI: train the loaded checkpoint, in place when its host
    file can, else from its checkpoint file."""

    title = "LoRA Trainer"

    def __init__(
        self,
        default_preview: Optional[Callable[[], PreviewSettings]] = None,
        render_preview: PreviewRenderer = render_host_preview,
    ) -> None:
        # The preview defaults come from the host's settings page, read when each run starts.
        self.default_preview = default_preview or PreviewSettings
        self.render_preview = render_preview
        # The running job's config as given and as the host adjusted it, and its plan (one job at a time).
        self._cfg: Optional[CommonConfig] = None
        self._run_cfg: Optional[CommonConfig] = None
        self._plan: Optional[TrainingPlan] = None

    # --- what the tab shows ------------------------------------------------------------------------------
    def describe_model(self) -> Optional[str]:
        model = loaded_model()
        if model is None:
            return "Base model: **the loaded checkpoint** (none is loaded yet: the WebUI loads it on first use)."
        host = host_for(model)
        plan = host.plan(model)
        name = checkpoint_name(model)
        if plan.path == REFUSED:
            return f"Base model: the loaded checkpoint `{name}`. {plan.sentence()}"
        return (
            f"Base model: **the loaded checkpoint** `{name}` ({host.architecture(model)}, "
            f"{host.prediction_label(model)}). {plan.sentence()}"
        )

    def resolve_base_model(self, typed: str) -> str:
        # The config still needs a base_model; it names the checkpoint for the LoRA's metadata (and is the file
        # the from-file path trains).
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
        """Which path the run takes and why, then (in place) the memory it adds to the loaded checkpoint."""
        model = loaded_model()
        if model is None:
            return ""
        try:
            host = host_for(model)
            plan = host.plan(model, cfg)
            if not plan.in_place:
                return plan.sentence()
            text = f"{plan.sentence()} " + estimate_extra_memory(
                host.trainable_roots(model), host.architecture(model), cfg
            )
            precision = host.facts(model).mixed_precision
            if precision != cfg.mixed_precision:
                # The weights are the host's: their precision decides, not the form's option.
                text += f" Computing in the WebUI's precision ({precision})."
            return text
        except Exception:  # an estimate must never block a start
            log.exception("Memory estimate failed")
            return ""

    def send_prompt_js(self) -> Optional[str]:
        return WEBUI_SEND_PROMPT_JS

    def refresh_loras_js(self) -> Optional[str]:
        return WEBUI_REFRESH_LORAS_JS

    def hidden_options(self) -> Sequence[str]:
        return HOST_DECIDED_OPTIONS

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
    def training_backend(self, cfg: CommonConfig, preview: Optional[Mapping[str, object]] = None) -> WebUITraining:
        """The runtime, the plan, the preview settings and (for an in-place AUTOMATIC1111 run) the model adapter;
        refuses here, before any work, what neither path can train."""
        if cfg.task_type != "image-generation":
            raise ConfigError(
                "The WebUI tab trains image LoRAs on the loaded checkpoint; text-generation "
                "runs use the standalone command line."
            )
        from lora_trainer.train.runtime import LocalRuntime

        model = host_model()
        host = host_for(model)
        plan = host.plan(model, cfg)
        if plan.path == REFUSED:
            raise ConfigError(plan.reason[0].upper() + plan.reason[1:] + ".")
        facts = host.facts(model)
        settings = PreviewSettings.from_mapping(preview) if preview is not None else self.default_preview()
        return WebUITraining(
            runtime=LocalRuntime(facts.device, facts.mixed_precision),
            adapter=host.make_adapter(model) if plan.in_place and host.adapter_before_lock else None,
            preview=settings.for_run(cfg),
            plan=plan,
        )

    def train(self, cfg: CommonConfig, callbacks: List[TrainingCallback], backend: TrainingBackend) -> TrainingResult:
        """The JobRunner's trainer: the engine plus the host progress and preview callbacks, on the plan's path.

        In place, a host model that turns out untrainable before the first step (``HostModelNotTrainable``:
        Forge streaming layers in, say) is handed back untouched and the run trains from the file instead."""
        from modules import shared

        own = backend if isinstance(backend, WebUITraining) else WebUITraining(backend.runtime, backend.adapter)
        preview = own.preview
        plan = self._plan or own.plan
        cfg = self._run_cfg or cfg
        progress = HostProgress(shared.state, resolved_output_name(cfg))
        if plan is not None and plan.path == FROM_FILE:
            return self._train_from_file(plan, cfg, [*callbacks, progress], own.runtime)
        extra: List[TrainingCallback] = [progress]
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
        adapter = own.adapter
        if plan is not None and plan.in_place and not plan.host.adapter_before_lock and adapter is None:
            adapter = plan.host.make_adapter(host_model())
        try:
            # The engine gets the engine's part: the preview settings and the plan are this wrapper's.
            return default_trainer(
                cfg, callbacks=[*callbacks, *extra], backend=TrainingBackend(runtime=own.runtime, adapter=adapter)
            )
        except HostModelNotTrainable as exc:
            if plan is None:
                raise
            reason = str(exc)
        finally:
            # The host keeps generating with this model: put it back whatever the engine did or failed to do
            # (restore is idempotent; the engine calls it too on its normal paths).
            if adapter is not None and hasattr(adapter, "restore"):
                adapter.restore()
        # Outside the except block: the exception's frames (which hold the adapter) are gone by now.
        del adapter
        fallback = from_file_or_refusal(plan.host, host_model(), reason)
        if fallback.path == REFUSED:
            raise ConfigError(fallback.reason)
        return self._train_from_file(fallback, cfg, [*callbacks, progress], own.runtime)

    def _train_from_file(
        self, plan: TrainingPlan, cfg: CommonConfig, callbacks: List[TrainingCallback], runtime: Optional[Runtime]
    ) -> TrainingResult:
        from modules import shared

        from lora_trainer.train.runtime import LocalRuntime

        self._plan = plan

        def say(text: str) -> None:
            log.info(text)
            shared.state.textinfo = f"Training LoRA {resolved_output_name(cfg)}: {text}"

        return train_from_file(plan, cfg, callbacks, default_trainer, runtime or LocalRuntime(), say=say)

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
        """Inside the lock: plan again (the host may have changed since Train was pressed), refuse what neither
        path can train, and for an in-place run let the host give the model back its own weights."""
        model = host_model()
        host = host_for(model)
        plan = host.plan(model, cfg)
        if plan.path == REFUSED:
            raise ConfigError(plan.reason[0].upper() + plan.reason[1:] + ".")
        if plan.in_place:
            try:
                host.prepare(model)
            except HostModelNotTrainable as exc:
                plan = from_file_or_refusal(host, model, str(exc))
                if plan.path == REFUSED:
                    raise ConfigError(plan.reason) from None
        self._run_cfg = host.configure(cfg, model)
        self._plan = plan
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
        if self._plan is not None:
            self._plan.host.refresh_loras(name)
        else:
            refresh_host_networks(name, loaded_model())

    def after_end(self, status: Any) -> None:
        self._cfg = None
        self._run_cfg = None
        self._plan = None
