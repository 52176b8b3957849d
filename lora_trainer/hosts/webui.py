"""The AUTOMATIC1111 WebUI as a host: the one module of the package that imports the WebUI's ``modules.*``.

Every ``modules`` import happens inside a function, so importing this file costs nothing and works outside
the WebUI (the tests inject stand-in ``modules`` packages). What lives here:

- facts about the host (device, precision, ``--lowvram``/``--medvram``/fp8, the Lora folder, API credentials)
  and the refusals that follow from them;
- the builtin Lora extension's state: unloading networks it merged into the live weights before training,
  and forgetting a name after its file was rewritten;
- two callbacks the backend adds to every run: one mirrors progress into ``shared.state`` and turns the
  WebUI's Interrupt into ``should_stop()``, one renders previews with the host's own txt2img pipeline;
- ``WebUIBackend``, the tab's and the REST API's answers for this host, with the job hooks (hold the GPU
  queue lock for the whole run) and the trainer wrapper that adds the callbacks above.

Files: the engine writes into a job folder outside the Lora folder (intermediate saves, states, logs,
previews, the diffusers-named copy); only the final ``<name>.safetensors`` is copied, atomically, into the
Lora folder, so the host's Lora list never shows intermediates or two files with one alias.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence

from lora_trainer.caption.base import CallableCaptioner, Captioner, CaptionerUnavailable
from lora_trainer.config import CommonConfig, ImageConfig, lora_rank_of, resolved_output_name
from lora_trainer.errors import ConfigError
from lora_trainer.jobs import JobHooks, default_trainer
from lora_trainer.train.backend import TrainingBackend
from lora_trainer.train.callbacks import CallbackList, StepInfo, TrainingCallback
from lora_trainer.train.result import TrainingResult
from lora_trainer.ui.backend import WEBUI_SEND_PROMPT_JS, UiBackend
from lora_trainer.ui.captioning import CaptionProgress

log = logging.getLogger(__name__)

JOBS_FOLDER = os.path.join("outputs", "lora_trainer")  # under the WebUI's data folder: one sub-folder per run
PREVIEW_FOLDER = "samples"  # inside the job folder; jobs.py scans the same folder name
BUILTIN_LORA_MODULE = "networks"  # the builtin Lora extension's module (we never name a module like it)
STATE_JOB_NAME = "lora_trainer"
PUBLISHED_FILE_MODE = 0o644

# The extra memory of a run, roughly: fp32 LoRA weight + gradient + two AdamW moments = 16 bytes a parameter.
BYTES_PER_TRAINED_PARAM = 16
# Activations of one 512x512 SD1 sample in fp16 with the frozen base (measured orders of magnitude, not
# promises); scaled by pixel count, batch size and architecture, divided when checkpointing recomputes them.
ACTIVATION_GIB_PER_SD1_512_SAMPLE = 2.5
ARCH_ACTIVATION_FACTOR = {"SD1": 1.0, "SD2": 1.2, "SDXL": 1.6}
CHECKPOINTING_DIVISOR = 4.0


# --- host facts ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostFacts:
    """What the host's settings mean for training."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype of the UNet weights
    lowvram: bool
    medvram: bool
    fp8: bool

    @property
    def mixed_precision(self) -> str:
        """The engine's precision name for the host's weights: autocast to what the host computes in."""
        import torch

        if getattr(self.device, "type", "cpu") == "cpu":
            return "bf16" if self.dtype == torch.bfloat16 else "no"
        if self.dtype == torch.float16:
            return "fp16"
        if self.dtype == torch.bfloat16:
            return "bf16"
        return "no"


def loaded_model() -> Any:
    """The checkpoint the WebUI holds right now, or None; never triggers a load (the tab polls this)."""
    from modules import sd_models

    return getattr(sd_models.model_data, "sd_model", None)


def host_model() -> Any:
    """The loaded checkpoint, loading it if the WebUI has not yet (as a generation would)."""
    from modules import shared

    model = shared.sd_model
    if model is None:
        raise ConfigError("No checkpoint is loaded in the WebUI: choose one in the checkpoint menu first.")
    return model


def architecture(model: Any) -> str:
    """ "SD1", "SD2", "SDXL" or "SD3", from the flags the WebUI sets on its models."""
    if getattr(model, "is_sd3", False):
        return "SD3"
    if getattr(model, "is_sdxl", False):
        return "SDXL"
    if getattr(model, "is_sd2", False):
        return "SD2"
    return "SD1"


def prediction_label(model: Any) -> str:
    return "v-prediction" if getattr(model, "parameterization", "eps") == "v" else "epsilon"


def checkpoint_name(model: Any) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    for attr in ("name_for_extra", "model_name", "name", "title"):
        value = getattr(info, attr, None)
        if value:
            return str(value)
    return "unknown checkpoint"


def host_facts(model: Any) -> HostFacts:
    from modules import devices, shared

    opts = shared.cmd_opts
    medvram = bool(
        getattr(opts, "medvram", False) or (getattr(opts, "medvram_sdxl", False) and architecture(model) == "SDXL")
    )
    dtype = getattr(devices, "dtype_unet", None) or devices.dtype
    return HostFacts(
        device=devices.device,
        dtype=dtype,
        lowvram=bool(getattr(opts, "lowvram", False)),
        medvram=medvram,
        fp8=bool(getattr(devices, "fp8", False)),
    )


def model_refusal(model: Any) -> Optional[str]:
    """Why the loaded model cannot be trained here at all (said in the tab as soon as it is loaded), or None."""
    if hasattr(model, "forge_objects"):
        return (
            "This looks like Forge: its models are reached through Forge's own objects, which this version "
            "of the trainer does not drive yet, so training is refused here. Use the standalone app "
            "(python -m lora_trainer ui) with the same checkpoint file."
        )
    if architecture(model) == "SD3":
        return "SD3 checkpoints are not supported by the trainer (SD1.x, SD2.x and SDXL are)."
    if not hasattr(getattr(model, "model", None), "diffusion_model"):
        return (
            f"The loaded model ({type(model).__name__}) is not an ldm/sgm Stable Diffusion model the trainer "
            "knows; training is refused."
        )
    return None


def refusal(cfg: CommonConfig, facts: HostFacts) -> Optional[str]:
    """Why this run cannot train on this host, or None. Said before starting, never mid-run."""
    if facts.lowvram:
        return (
            "The WebUI runs with --lowvram, which moves model blocks between devices during every forward "
            "pass; training through that is not supported. Restart the WebUI without --lowvram "
            "(--medvram works for UNet-only training)."
        )
    if facts.fp8:
        return (
            "The WebUI stores the model's weights in fp8 (Settings > Optimizations > FP8 weight), which "
            "cannot be trained through. Set FP8 weight to Disable, reload the checkpoint, and try again."
        )
    if facts.medvram and isinstance(cfg, ImageConfig) and cfg.train_text_encoder:
        return (
            "Text-encoder training does not work under --medvram (the WebUI moves the text encoder off the "
            'GPU between uses). Untick "Train text encoder" or restart the WebUI without --medvram.'
        )
    return None


@contextlib.contextmanager
def host_clip_skip(clip_skip: int) -> Iterator[None]:
    """Encode prompts with the run's clip skip: the host's prompt wrapper reads its "Clip skip" setting.

    Written into the settings' data directly (no on-change callbacks, no settings file write) and put back.
    """
    from modules import shared

    data = shared.opts.data
    key = "CLIP_stop_at_last_layers"
    missing = object()
    before = data.get(key, missing)
    data[key] = int(clip_skip)
    try:
        yield
    finally:
        if before is missing:
            data.pop(key, None)
        else:
            data[key] = before


def lora_dir() -> str:
    """The builtin Lora extension's folder, ``--lora-dir`` respected."""
    from modules import shared

    folder = getattr(shared.cmd_opts, "lora_dir", None)
    if not folder:
        from modules import paths

        folder = os.path.join(paths.models_path, "Lora")
    return os.path.abspath(folder)


def jobs_dir() -> str:
    """Where runs keep their intermediates: the WebUI's data folder, outside the Lora folder."""
    from modules import paths_internal

    return os.path.abspath(os.path.join(paths_internal.data_path, JOBS_FOLDER))


def api_credentials() -> Dict[str, str]:
    """``--api-auth "u1:p1,u2:p2"`` as {user: password}; empty when the host's API is open."""
    from modules import shared

    return parse_api_auth(getattr(shared.cmd_opts, "api_auth", None))


def parse_api_auth(spec: Optional[str]) -> Dict[str, str]:
    credentials: Dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if sep:  # the host itself ignores entries without a colon too
            credentials[user] = password
    return credentials


# --- the builtin Lora extension ------------------------------------------------------------------------------
def builtin_networks() -> Any:
    """The builtin Lora extension's ``networks`` module when the host loaded it, else None (disabled)."""
    return sys.modules.get(BUILTIN_LORA_MODULE)


def _restore_module(networks: Any, module: Any) -> bool:
    """Put one module's backed-up weights back and forget what was applied; True if it had a backup."""
    had_backup = (
        getattr(module, "network_weights_backup", None) is not None
        or getattr(module, "network_bias_backup", None) is not None
    )
    if had_backup:
        networks.network_restore_weights_from_backup(module)
    # Cleared even without a backup: an empty name tuple is what a never-touched module has.
    module.network_current_names = ()
    module.network_weights_backup = None
    module.network_bias_backup = None
    return had_backup


def unload_host_networks(model: Any, networks: Any = None) -> int:
    """Undo every LoRA the host merged into ``model``'s weights; returns how many modules were restored.

    The builtin extension keeps deltas merged between generations; training on them would train on a
    modified model. Its next generation re-applies whatever that prompt asks for, from restored weights.
    """
    import torch

    networks = networks if networks is not None else builtin_networks()
    if networks is None or model is None:
        return 0
    restored = 0
    # The host restores with an in-place copy_ into parameters that require grad (the WebUI loads the UNet
    # that way); it only ever does so inside a no-grad forward, and so must we.
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "network_current_names") or hasattr(module, "network_weights_backup"):
                restored += _restore_module(networks, module)
    networks.loaded_networks.clear()
    return restored


def refresh_host_networks(name: str, model: Any = None, networks: Any = None) -> None:
    """After ``name``'s file was (re)written: rescan the Lora folder and drop what the host remembers of it."""
    networks = networks if networks is not None else builtin_networks()
    if networks is None:
        return
    networks.networks_in_memory.pop(name, None)
    if any(getattr(net, "name", None) == name for net in networks.loaded_networks):
        unload_host_networks(model, networks)  # merged old weights must not survive under the same name
    networks.list_available_networks()


# --- callbacks the backend adds to each run ------------------------------------------------------------------
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
        self._show(info.step, info.total_steps, f"loss {info.loss:.4f}")

    def _show(self, step: int, total: int, detail: str) -> None:
        state = self.state
        state.job_count = max(int(total), 1)
        state.job_no = int(step)
        state.sampling_step = 0
        state.sampling_steps = 0
        state.textinfo = f"Training LoRA {self.output_name}: step {step}/{total}, {detail}"

    def should_stop(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))


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


@dataclass(frozen=True)
class WebUITraining(TrainingBackend):
    """What the WebUI hands a run: the engine's runtime and adapter, plus the preview settings its own trainer
    wrapper (``WebUIBackend.train``) turns into preview images."""

    preview: Optional[PreviewSettings] = None


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


# --- the host's interrogators as captioners (the caption panel) ----------------------------------------------
# The host's own interrogate() calls shared.state.begin/end itself and would end the caption run's progress
# after the first image, so these call its load and caption pieces directly, inside host_caption_session.
HOST_BLIP = "webui: BLIP"
HOST_BLIP_CLIP = "webui: BLIP + CLIP"
HOST_DEEPBOORU = "webui: DeepBooru"
CAPTION_STATE_JOB_NAME = "lora_trainer_caption"


@dataclass(frozen=True)
class HostWeights:
    """Where the host keeps (and on first use downloads) one interrogator's weights."""

    what: str
    folder: str
    filename: str
    any_name: bool = True  # the host loads any file with the filename's extension there (its model loader)

    def present(self) -> bool:
        """True when the host would find weights in the folder instead of downloading them."""
        if not self.any_name:
            return os.path.isfile(os.path.join(self.folder, self.filename))
        extension = os.path.splitext(self.filename)[1].lower()
        try:
            return any(name.lower().endswith(extension) for name in os.listdir(self.folder))
        except OSError:
            return False

    def unavailable(self, exc: BaseException) -> CaptionerUnavailable:
        """The error for a failed load: missing weights (offline) said as such, anything else as it is."""
        if self.present():
            return CaptionerUnavailable(
                f"The WebUI's {self.what} could not be loaded from {self.folder}: {type(exc).__name__}: {exc}"
            )
        return CaptionerUnavailable(
            f"The WebUI's {self.what} weights are not on disk and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Put {self.filename} into {self.folder} (the WebUI downloads it there "
            "on first use when it is online). The other captioners still work."
        )


def host_blip_weights() -> HostWeights:
    from modules import paths

    return HostWeights(
        "BLIP captioner", os.path.join(paths.models_path, "BLIP"), "model_base_caption_capfilt_large.pth"
    )


def host_clip_weights() -> HostWeights:
    from modules import shared

    folder = getattr(shared.cmd_opts, "clip_models_path", None) or os.path.expanduser(
        os.path.join("~", ".cache", "clip")
    )
    return HostWeights("CLIP ViT-L/14 interrogator", folder, "ViT-L-14.pt", any_name=False)  # clip.load's name


def host_deepbooru_weights() -> HostWeights:
    from modules import paths

    return HostWeights(
        "DeepBooru tagger", os.path.join(paths.models_path, "torch_deepdanbooru"), "model-resnet_custom_v3.pt"
    )


class HostCaptioner(CallableCaptioner):
    """A captioner that calls the host's interrogator per image; ``close`` gives its memory back once."""

    batch_size = 1  # the host captions one image per call: the caption run reports and checks stop per image

    def __init__(self, fn: Callable[[Any], str], release: Callable[[], None], name: str) -> None:
        super().__init__(fn, name=name)
        self._release: Optional[Callable[[], None]] = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


@contextlib.contextmanager
def scoped_host_options(**values: Any) -> Iterator[None]:
    """Set host settings for a moment (in ``opts.data``, no callbacks, no settings file write), then put them back."""
    from modules import shared

    data = shared.opts.data
    missing = object()
    before = {key: data.get(key, missing) for key in values}
    data.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is missing:
                data.pop(key, None)
            else:
                data[key] = value


def host_interrogator() -> Any:
    """``shared.interrogator``, or CaptionerUnavailable on a WebUI build without it."""
    from modules import shared

    interrogator = getattr(shared, "interrogator", None)
    if interrogator is None:
        raise CaptionerUnavailable(
            "This WebUI has no BLIP/CLIP interrogator (shared.interrogator); choose another captioner."
        )
    return interrogator


def _make_room_for_interrogation() -> None:
    """What the host does before interrogating: under --lowvram/--medvram the SD model leaves the GPU first."""
    from modules import devices, shared

    if getattr(shared.cmd_opts, "lowvram", False) or getattr(shared.cmd_opts, "medvram", False):
        from modules import lowvram

        lowvram.send_everything_to_cpu()
        devices.torch_gc()


def _load_host_blip(interrogator: Any) -> None:
    """The BLIP half of the interrogator's ``load()``, so BLIP captions do not need the CLIP weights too."""
    from modules import devices, shared

    if interrogator.blip_model is None:
        model = interrogator.load_blip_model()
        if not getattr(shared.cmd_opts, "no_half", False) and not interrogator.running_on_cpu:
            model = model.half()
        interrogator.blip_model = model
    interrogator.blip_model = interrogator.blip_model.to(devices.device_interrogate)
    # generate_caption casts its input to ``interrogator.dtype``, which load() takes from the CLIP model.
    interrogator.dtype = next(interrogator.blip_model.parameters()).dtype


def _release_blip(interrogator: Any) -> None:
    from modules import devices

    interrogator.send_blip_to_ram()  # the host keeps it on the GPU only with "keep models in memory"
    devices.torch_gc()


def load_host_blip(options: Any) -> Captioner:
    """BLIP captions from the host's interrogator (``shared.interrogator``), reusing a model it holds."""
    interrogator = host_interrogator()
    _make_room_for_interrogation()
    try:
        _load_host_blip(interrogator)
    except Exception as exc:
        raise host_blip_weights().unavailable(exc) from exc
    return HostCaptioner(interrogator.generate_caption, lambda: _release_blip(interrogator), HOST_BLIP)


def _clip_phrases(interrogator: Any, categories: Sequence[Any], image: Any) -> List[str]:
    """The best phrases of each of the host's CLIP categories for ``image`` (its rank(), without scores)."""
    import torch
    from modules import devices

    pixels = interrogator.clip_preprocess(image).unsqueeze(0).type(interrogator.dtype)
    with torch.no_grad(), devices.autocast():
        features = interrogator.clip_model.encode_image(pixels.to(devices.device_interrogate)).type(interrogator.dtype)
        features /= features.norm(dim=-1, keepdim=True)
        return [
            match
            for category in categories
            for match, _score in interrogator.rank(features, category.items, top_count=category.topn)
        ]


def load_host_blip_clip(options: Any) -> Captioner:
    """The host's "Interrogate CLIP": a BLIP caption followed by CLIP's best phrases of each category."""
    interrogator = host_interrogator()
    _make_room_for_interrogation()
    try:
        interrogator.load()
    except Exception as exc:
        weights = host_blip_weights() if interrogator.blip_model is None else host_clip_weights()
        interrogator.unload()
        raise weights.unavailable(exc) from exc
    try:
        categories = list(interrogator.categories())  # the phrase lists; offline and absent: BLIP alone
    except Exception:
        log.exception("The WebUI's CLIP categories could not be read; captions are BLIP's alone")
        categories = []

    def caption(image: Any) -> str:
        return ", ".join([interrogator.generate_caption(image), *_clip_phrases(interrogator, categories, image)])

    return HostCaptioner(caption, interrogator.unload, HOST_BLIP_CLIP)


def load_host_deepbooru(options: Any) -> Captioner:
    """DeepBooru tags from ``modules.deepbooru.model``, at the panel's threshold, without score weights."""
    try:
        from modules import deepbooru
    except ImportError as exc:
        raise CaptionerUnavailable(
            f"This WebUI has no DeepBooru tagger (modules.deepbooru: {exc}); choose another captioner."
        ) from None
    model = deepbooru.model
    try:
        model.start()
    except Exception as exc:
        raise host_deepbooru_weights().unavailable(exc) from exc
    threshold = float(getattr(options, "threshold", 0.5))

    def tag(image: Any) -> str:
        with scoped_host_options(interrogate_deepbooru_score_threshold=threshold):
            return model.tag_multi(image, force_disable_ranks=True)

    return HostCaptioner(tag, model.stop, HOST_DEEPBOORU)


def host_captioner_loaders() -> Dict[str, Callable[[Any], Captioner]]:
    """The host's interrogators by the names the caption panel shows."""
    return {HOST_BLIP: load_host_blip, HOST_BLIP_CLIP: load_host_blip_clip, HOST_DEEPBOORU: load_host_deepbooru}


class HostCaptionProgress(CaptionProgress):
    """A caption run on the host's progress bar; its Interrupt button stops the run."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def update(self, done: int, total: int, text: str) -> None:
        self.state.job_count = max(int(total), 1)
        self.state.job_no = int(done)
        self.state.textinfo = text

    def should_stop(self) -> bool:
        return bool(getattr(self.state, "interrupted", False))


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


@contextlib.contextmanager
def host_caption_session(label: str) -> Iterator[CaptionProgress]:
    """The GPU queue lock and the host's progress bar for a whole caption run, as training holds them."""
    with host_job(CAPTION_STATE_JOB_NAME, f"Captioning with {label}…") as state:
        yield HostCaptionProgress(state)


# --- the backend ---------------------------------------------------------------------------------------------
def estimate_extra_memory(model: Any, cfg: CommonConfig) -> str:
    """The memory a run adds to the loaded checkpoint: LoRA weights, optimizer state, activations."""
    import torch

    rank = lora_rank_of(cfg)
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
        problem = model_refusal(model)
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
    def training_backend(self, cfg: CommonConfig, preview: Optional[Mapping[str, object]] = None) -> WebUITraining:
        """The runtime, the host-model adapter and the preview settings; refuses here (before any work) what
        cannot train."""
        if cfg.task_type != "image-generation":
            raise ConfigError(
                "The WebUI tab trains image LoRAs on the loaded checkpoint; text-generation "
                "runs use the standalone command line."
            )
        from lora_trainer.train.runtime import LocalRuntime

        model = host_model()
        facts = host_facts(model)
        problem = model_refusal(model) or refusal(cfg, facts)
        if problem:
            raise ConfigError(problem)
        from modules import devices, shared

        from lora_trainer.hosts.ldm_adapter import LdmHostAdapter

        adapter = LdmHostAdapter(
            model,
            device=facts.device,
            dtype=facts.dtype,
            lowvram=facts.lowvram,
            medvram=facts.medvram,
            fp8=facts.fp8,
            autocast=devices.autocast,
            clip_skip_scope=host_clip_skip,
            fast_attention=not getattr(shared, "loaded_hypernetworks", None),  # they hook the host's attention
        )
        settings = PreviewSettings.from_mapping(preview) if preview is not None else self.default_preview()
        return WebUITraining(
            runtime=LocalRuntime(facts.device, facts.mixed_precision), adapter=adapter, preview=settings.for_run(cfg)
        )

    def train(self, cfg: CommonConfig, callbacks: List[TrainingCallback], backend: TrainingBackend) -> TrainingResult:
        """The JobRunner's trainer: the engine plus the host progress and preview callbacks."""
        from modules import shared

        preview = backend.preview if isinstance(backend, WebUITraining) else None
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
        adapter = backend.adapter
        try:
            # The engine gets the engine's part: the preview settings are this wrapper's.
            engine = TrainingBackend(runtime=backend.runtime, adapter=backend.adapter)
            return default_trainer(cfg, callbacks=[*callbacks, *extra], backend=engine)
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
        problem = model_refusal(model) or refusal(cfg, host_facts(model))
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
        target = self.final_lora_path(cfg)
        if os.path.abspath(target) != os.path.abspath(path):
            from lora_trainer.io.atomic import atomic_write

            def copy(tmp: str) -> None:
                shutil.copyfile(path, tmp)
                # The temporary file is created private (0600); the Lora folder's files are normally readable
                # by the other programs that share the folder (another WebUI, a file server, backups).
                os.chmod(tmp, PUBLISHED_FILE_MODE)

            atomic_write(target, copy)
        refresh_host_networks(name, loaded_model())

    def after_end(self, status: Any) -> None:
        self._cfg = None


__all__ = [
    "HOST_BLIP",
    "HOST_BLIP_CLIP",
    "HOST_DEEPBOORU",
    "HostCaptionProgress",
    "HostCaptioner",
    "HostWeights",
    "host_caption_session",
    "host_captioner_loaders",
    "HostFacts",
    "HostPreviews",
    "HostProgress",
    "PreviewSettings",
    "WebUIBackend",
    "api_credentials",
    "architecture",
    "estimate_extra_memory",
    "host_facts",
    "jobs_dir",
    "lora_dir",
    "model_refusal",
    "parse_api_auth",
    "refresh_host_networks",
    "refusal",
    "render_host_preview",
    "unload_host_networks",
]
