"""The host's interrogators as caption-panel captioners: BLIP, BLIP + CLIP (``shared.interrogator``) and
DeepBooru (``modules.deepbooru``), run on the host's progress bar inside its GPU queue lock.

The host's own ``interrogate()`` calls ``shared.state.begin/end`` itself and would end the caption run's progress
after the first image, so these call its load and caption pieces directly, inside ``host_caption_session``.
Their weights are downloaded on first use; offline and absent, the error says which file goes where.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from lora_trainer.caption.base import CallableCaptioner, Captioner, CaptionerUnavailable
from lora_trainer.hosts.webui.facts import scoped_host_options
from lora_trainer.hosts.webui.progress import host_asked_to_stop, host_job
from lora_trainer.ui.captioning import CaptionProgress

log = logging.getLogger(__name__)

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
        return host_asked_to_stop(self.state)


@contextlib.contextmanager
def host_caption_session(label: str) -> Iterator[CaptionProgress]:
    """The GPU queue lock and the host's progress bar for a whole caption run, as training holds them."""
    with host_job(CAPTION_STATE_JOB_NAME, f"Captioning with {label}…") as state:
        yield HostCaptionProgress(state)
