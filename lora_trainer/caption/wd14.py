"""A WD14-style booru tagger run with onnxruntime, from an ``.onnx`` and its ``selected_tags.csv`` (local, or
the default repository on the Hub, downloaded into the Hugging Face cache on first use).

The models expect square NHWC images, BGR, with values 0-255, padded with white; they output one probability
per row of ``selected_tags.csv``. Rating tags (category 9) are never written into captions.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from PIL import Image

from lora_trainer.caption.base import Captioner, CaptionerUnavailable, resolve_device
from lora_trainer.caption.locate import WeightsSpec, resolve_weights_folder
from lora_trainer.hub.progress import DownloadCallback
from lora_trainer.io.text_files import read_text

WD14_WEIGHTS = WeightsSpec(
    label="WD14 tagger",
    repo_id="SmilingWolf/wd-swinv2-tagger-v3",
    required=(("selected_tags.csv",), ("model.onnx",)),
    suggested_folder="models/caption/wd14",
    name="wd14",
)
TAGS_FILENAME = "selected_tags.csv"
RATING_CATEGORY = 9
CHARACTER_CATEGORY = 4
# Emoticon tags such as ^_^ or o_o lose their meaning with a space; they have no run of two letters.
_WORD = re.compile(r"[A-Za-z]{2}")


@dataclass(frozen=True)
class Tag:
    name: str
    category: int


def read_selected_tags(path: str) -> List[Tag]:
    """Tags in model output order from a ``selected_tags.csv`` (columns include ``name`` and ``category``)."""
    reader = csv.DictReader(io.StringIO(read_text(path, CaptionerUnavailable)))
    if not reader.fieldnames or "name" not in reader.fieldnames:
        raise CaptionerUnavailable(
            f"{path} has no 'name' column; expected the tagger's selected_tags.csv (tag_id,name,category,count)."
        )
    return [Tag(row["name"], int(row.get("category") or 0)) for row in reader]


def tag_to_text(tag: str) -> str:
    """Booru tag -> caption text: underscores become spaces, except in emoticons."""
    return tag if not _WORD.search(tag) else tag.replace("_", " ")


def select_tags(
    probabilities: Sequence[float], tags: Sequence[Tag], threshold: float, character_threshold: float
) -> List[Tuple[str, float]]:
    """(caption text, probability) of the tags over their threshold, characters first, then most likely first."""
    chosen = []
    for tag, probability in zip(tags, probabilities, strict=True):
        if tag.category == RATING_CATEGORY:
            continue
        limit = character_threshold if tag.category == CHARACTER_CATEGORY else threshold
        if probability >= limit:
            chosen.append((tag.category != CHARACTER_CATEGORY, -float(probability), tag_to_text(tag.name)))
    chosen.sort()
    return [(text, -negative) for _, negative, text in chosen]


def square_pad(image: Image.Image, size: int) -> Image.Image:
    """Pad to a square on white, then resize to ``size``: the taggers were trained on such inputs."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas if side == size else canvas.resize((size, size), Image.BICUBIC)


class Wd14Tagger(Captioner):
    """Comma-separated booru tags for each image."""

    name = "wd14"

    def __init__(
        self, session, tags: Sequence[Tag], *, threshold: float = 0.35, character_threshold: Optional[float] = None
    ) -> None:
        if len(session.get_outputs()[0].shape) >= 2 and isinstance(session.get_outputs()[0].shape[-1], int):
            outputs = session.get_outputs()[0].shape[-1]
            if outputs != len(tags):
                raise CaptionerUnavailable(
                    f"the tagger outputs {outputs} scores but its tags file lists "
                    f"{len(tags)} tags; use the selected_tags.csv that came with the model."
                )
        self._session = session
        self._tags = list(tags)
        self._threshold = threshold
        self._character_threshold = threshold if character_threshold is None else character_threshold
        shape = session.get_inputs()[0].shape
        self._channels_first = len(shape) == 4 and shape[1] == 3
        height = shape[2] if self._channels_first else shape[1]
        self._size = height if isinstance(height, int) else 448  # 448 is what the published taggers use
        # Some exports fix the batch size to 1; feed those one image at a time.
        self._max_batch = shape[0] if isinstance(shape[0], int) else None

    def _pixels(self, images: Sequence[Image.Image]):
        import numpy as np

        batch = np.stack([np.asarray(square_pad(image, self._size), dtype=np.float32)[:, :, ::-1] for image in images])
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2) if self._channels_first else batch)

    def scores(self, images: Sequence[Image.Image]):
        """Tag probabilities, shape (len(images), len(tags))."""
        import numpy as np

        step = self._max_batch or len(images)
        name = self._session.get_inputs()[0].name
        parts = [
            self._session.run(None, {name: self._pixels(images[i : i + step])})[0] for i in range(0, len(images), step)
        ]
        return np.concatenate(parts)

    def tag(self, images: Sequence[Image.Image]) -> List[List[Tuple[str, float]]]:
        """For each image, its selected (tag text, probability) pairs."""
        if not images:
            return []
        return [select_tags(row, self._tags, self._threshold, self._character_threshold) for row in self.scores(images)]

    def caption(self, images: Sequence[Image.Image]) -> List[str]:
        return [", ".join(text for text, _ in tags) for tags in self.tag(images)]

    def close(self) -> None:
        self._session = None


def _onnx_and_tags(model_path: Optional[str], tags_csv: Optional[str], **fetch) -> Tuple[str, str]:
    if model_path and os.path.isfile(model_path):
        onnx_path = os.path.abspath(model_path)
        tags_path = tags_csv or os.path.join(os.path.dirname(onnx_path), TAGS_FILENAME)
        if not os.path.isfile(tags_path):
            raise CaptionerUnavailable(
                f"WD14 tags file not found: {tags_path}. Put the model's {TAGS_FILENAME} beside {onnx_path} "
                f"(from https://huggingface.co/{WD14_WEIGHTS.repo_id}) or pass --tags-csv."
            )
        return onnx_path, tags_path
    if model_path and tags_csv and os.path.isdir(model_path):
        spec = WeightsSpec(WD14_WEIGHTS.label, WD14_WEIGHTS.repo_id, (("model.onnx",),), WD14_WEIGHTS.suggested_folder)
        folder = resolve_weights_folder(spec, model_path)
        if not os.path.isfile(tags_csv):
            raise CaptionerUnavailable(f"WD14 tags file not found: {tags_csv}.")
        return os.path.join(folder, "model.onnx"), tags_csv
    folder = resolve_weights_folder(WD14_WEIGHTS, model_path, **fetch)
    return os.path.join(folder, "model.onnx"), tags_csv or os.path.join(folder, TAGS_FILENAME)


def load_wd14(
    model_path: Optional[str] = None,
    device: str = "auto",
    *,
    tags_csv: Optional[str] = None,
    threshold: float = 0.35,
    character_threshold: Optional[float] = None,
    on_download: Optional[DownloadCallback] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Wd14Tagger:
    """Load the tagger from a folder (model.onnx + selected_tags.csv), an .onnx file, a Hub repository, or the
    default repository (downloaded on first use; ``on_download`` sees the progress)."""
    onnx_path, tags_path = _onnx_and_tags(model_path, tags_csv, on_download=on_download, log=log)
    try:
        import onnxruntime
    except ImportError as exc:
        raise CaptionerUnavailable(
            f"the WD14 tagger needs onnxruntime ({exc}); install it with `pip install lora-trainer[caption]`."
        ) from None
    providers = ["CPUExecutionProvider"]
    if resolve_device(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(onnx_path, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise CaptionerUnavailable(f"cannot load the WD14 tagger {onnx_path}: {exc}") from None
    return Wd14Tagger(
        session, read_selected_tags(tags_path), threshold=threshold, character_threshold=character_threshold
    )
