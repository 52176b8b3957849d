"""A run on the host's page: its GPU queue lock and progress bar, its Interrupt button, and preview images.

``host_job`` holds ``call_queue.queue_lock`` and ``shared.state`` for a whole job (training or captioning), so
no generation runs meanwhile and the page's progress bar shows ours. The two callbacks the backend adds to each
run: ``HostProgress`` mirrors steps into ``shared.state`` and turns Interrupt into ``should_stop()``;
``HostPreviews`` renders previews with the host's own txt2img every N steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from lora_trainer.config import CommonConfig, resolved_output_name
from lora_trainer.errors import ConfigError
from lora_trainer.train.callbacks import StepInfo, TrainingCallback
from lora_trainer.ui.status_view import format_duration

log = logging.getLogger(__name__)

PREVIEW_FOLDER = "samples"  # inside the job folder; jobs.py scans the same folder name
STATE_JOB_NAME = "lora_trainer"
CANCEL_HINT = "Cancel in the LoRA Trainer tab (or Interrupt) frees it."


def host_asked_to_stop(state: Any) -> bool:
    """Whether the host's Interrupt button asked the job on its progress bar to stop.

    AUTOMATIC1111 1.10 and the Forge line (modules/ui_toprow.py) answer the first Interrupt click of a job with
    ``job_count > 1`` by ``state.stop_generating()`` ("stop after the current image", the default setting
    "Don't Interrupt in the middle"), and only a second click by ``state.interrupt()``. For our jobs, whose
    ``job_count`` is the step or image total, both mean: stop after the current step or caption."""
    return bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))


@contextlib.contextmanager
def host_job(job: str, textinfo: str) -> Iterator[Any]:
    """Hold the host's GPU queue lock and its progress bar (``shared.state``) for a whole job; yields the state.

    Generation holds the same lock, so no txt2img runs while we train or caption, and vice versa."""
    from modules import call_queue, shared

    with call_queue.queue_lock:
        shared.state.begin(job=job)
        shared.state.job_count = 1
        shared.state.job_no = 0
        shared.state.textinfo = textinfo
        try:
            yield shared.state
        finally:
            shared.state.end()


class HostProgress(TrainingCallback):
    """Mirror progress into ``shared.state`` (the host's progress bar) and obey its Interrupt button."""

    def __init__(self, state: Any, output_name: str) -> None:
        self.state = state
        self.output_name = output_name

    def on_encode_progress(self, done: int, total: int, what: str) -> None:
        state = self.state
        state.job_count, state.job_no = max(int(total), 1), int(done)
        state.textinfo = f"Training LoRA {self.output_name}: encoding {what} {done}/{total}"

    def on_train_start(self, total_steps: int, start_step: int, summary: Dict[str, Any]) -> None:
        self._show(start_step, total_steps, "starting")

    def on_step_end(self, info: StepInfo) -> None:
        self._show(info.step, info.total_steps, f"loss {info.loss:.4f}, ETA {format_duration(info.eta_s)}")

    def _show(self, step: int, total: int, detail: str) -> None:
        state = self.state
        state.job_count = max(int(total), 1)
        state.job_no = int(step)
        state.sampling_step = 0
        state.sampling_steps = 0
        # What /sdapi/v1/progress and the host's progress bar show: generations wait for this run.
        state.textinfo = (
            f"Training LoRA {self.output_name} (holds the GPU): step {step}/{total}, {detail}. {CANCEL_HINT}"
        )

    def should_stop(self) -> bool:
        return host_asked_to_stop(self.state)


@dataclass(frozen=True)
class PreviewSettings:
    """Preview images every ``every_n_steps`` (0 = none), made with the host's txt2img."""

    every_n_steps: int = 0
    prompt: str = ""  # blank: the output name
    negative_prompt: str = ""
    steps: int = 20
    width: int = 0  # 0: the training resolution
    height: int = 0
    cfg_scale: float = 7.0
    seed: int = 42
    sampler_name: str = "Euler"

    @classmethod
    def from_mapping(cls, raw: Optional[Mapping[str, Any]]) -> "PreviewSettings":
        """Validate a request's ``preview`` object; unknown keys and bad values are ConfigErrors."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ConfigError('preview must be an object such as {"every_n_steps": 50, "prompt": "..."}.')
        known = cls.__dataclass_fields__
        values: Dict[str, Any] = {}
        for key, value in raw.items():
            if key not in known:
                raise ConfigError(f"preview: unknown key {key!r}; known keys: {', '.join(known)}.")
            kind = known[key].type
            try:
                values[key] = str(value) if kind == "str" else (float(value) if kind == "float" else int(value))
            except (TypeError, ValueError):
                raise ConfigError(f"preview.{key}: {value!r} is not a valid {kind}.") from None
        settings = cls(**values)
        if (
            settings.every_n_steps < 0
            or settings.steps < 1
            or not 0 <= settings.width <= 2048
            or not 0 <= settings.height <= 2048
        ):
            raise ConfigError("preview: every_n_steps >= 0, steps >= 1 and sizes from 0 to 2048 are allowed.")
        return settings

    def for_run(self, cfg: CommonConfig) -> "PreviewSettings":
        """Fill the blanks from the run: the prompt names the LoRA, the size is the training resolution."""
        side = int(getattr(cfg, "resolution", 512)) // 8 * 8
        return replace(
            self, prompt=self.prompt or resolved_output_name(cfg), width=self.width or side, height=self.height or side
        )


# (settings) -> PIL images: the host's txt2img with the LoRA live in the model.
PreviewRenderer = Callable[[PreviewSettings], Sequence[Any]]


class HostPreviews(TrainingCallback):
    """Every N steps, render previews and hand their paths to the other callbacks' ``on_preview``.

    The LoRA being trained is already live in the host's modules (the engine wraps their forward), so a
    plain txt2img shows it at strength 1 - the same as ``<lora:name:1>`` with the saved file. Naming the tag
    would apply it twice and make the builtin extension merge a delta into the frozen weights mid-run.
    """

    def __init__(
        self,
        settings: PreviewSettings,
        output_dir: str,
        render: PreviewRenderer,
        deliver: TrainingCallback,
        state: Any = None,
    ) -> None:
        self.settings = settings
        self.folder = os.path.join(output_dir, PREVIEW_FOLDER)
        self.render = render
        self.deliver = deliver
        self.state = state

    def on_step_end(self, info: StepInfo) -> None:
        every = self.settings.every_n_steps
        if every > 0 and info.step > 0 and info.step % every == 0:
            self.make(info.step)

    def make(self, step: int) -> List[str]:
        """Render and save this step's previews; a failure is logged and training goes on."""
        saved = self._snapshot_state()
        try:
            images = list(self.render(self.settings))
        except Exception:
            log.exception("Preview at step %s failed; training continues", step)
            return []
        finally:
            self._restore_state(saved)
        paths = [self._save(image, step, i) for i, image in enumerate(images)]
        if paths:
            self.deliver.on_preview(paths, step)
        return paths

    def _save(self, image: Any, step: int, index: int) -> str:
        from lora_trainer.io.atomic import atomic_write

        path = os.path.join(self.folder, f"preview-step{step:08d}-{index}.png")
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        return path

    def _snapshot_state(self) -> Dict[str, Any]:
        # txt2img moves the host's job counters (nextjob, sampling steps); put ours back afterwards.
        if self.state is None:
            return {}
        return {k: getattr(self.state, k, None) for k in ("job_count", "job_no", "textinfo")}

    def _restore_state(self, saved: Dict[str, Any]) -> None:
        for key, value in saved.items():
            setattr(self.state, key, value)
        if self.state is not None:
            self.state.sampling_step = 0
            self.state.sampling_steps = 0


def render_host_preview(settings: PreviewSettings) -> List[Any]:
    """One txt2img with the host's pipeline, nothing written to its outputs. Call inside the queue lock."""
    from modules import processing, shared

    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        prompt=settings.prompt,
        negative_prompt=settings.negative_prompt,
        steps=settings.steps,
        width=settings.width,
        height=settings.height,
        cfg_scale=settings.cfg_scale,
        seed=settings.seed,
        sampler_name=settings.sampler_name,
        batch_size=1,
        n_iter=1,
        do_not_save_samples=True,
        do_not_save_grid=True,
    )
    try:
        processed = processing.process_images(p)
    finally:
        close = getattr(p, "close", None)
        if close:
            close()
    return list(processed.images)
