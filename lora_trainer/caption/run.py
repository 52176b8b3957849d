"""Caption a folder of images into ``metadata.csv`` (and optionally kohya ``.txt`` sidecars).

Images that already have a caption are kept unless ``overwrite`` is set, so re-running after adding images
captions only the new ones. Unreadable images are reported and skipped. The CSV is rewritten atomically, also
when the run stops early, so finished captions are never lost.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from lora_trainer.caption.base import Captioner
from lora_trainer.caption.tags import add_trigger, tag_frequencies
from lora_trainer.data.captions import (
    METADATA_FILENAME,
    read_metadata_csv,
    read_sidecar,
    write_metadata_csv,
    write_sidecar,
)
from lora_trainer.data.images import IMAGE_EXTENSIONS, list_image_paths, open_image
from lora_trainer.errors import DatasetError

ProgressCallback = Callable[[int, int], None]  # (images done, images to caption)


@dataclass(frozen=True)
class CaptionRunOptions:
    output: Optional[str] = None  # metadata.csv to write; default: <folder>/metadata.csv
    prefix: str = ""  # trigger word(s) put before each new caption
    suffix: str = ""  # ... and after
    sidecar: bool = False  # also write <image>.txt
    overwrite: bool = False  # re-caption images that already have a caption
    batch_size: int = 8
    show_progress: bool = False  # a tqdm bar on stderr
    save_every_s: float = 30.0  # rewrite the CSV at most this often during a long run


@dataclass
class CaptionReport:
    output: str
    captioned: Dict[str, str] = field(default_factory=dict)  # name -> caption written by this run
    skipped: List[str] = field(default_factory=list)  # names that already had a caption
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason) of unreadable images
    tag_counts: Counter = field(default_factory=Counter)  # tag -> images of the folder whose caption has it
    total_images: int = 0  # captioned images in the folder after the run
    stopped: bool = False  # should_stop() ended the run early


def image_name(folder: str, path: str) -> str:
    """The metadata.csv key of an image: its path relative to the data folder, with forward slashes."""
    return os.path.relpath(path, folder).replace(os.sep, "/")


def _load(path: str) -> Tuple[Optional[Image.Image], str]:
    """(image as displayed, "") or (None, reason); ``open_image`` gives the reason, as in training."""
    try:
        return open_image(path), ""
    except ValueError as reason:
        return None, str(reason)


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def caption_folder(
    folder: str,
    captioner: Captioner,
    options: CaptionRunOptions = CaptionRunOptions(),
    *,
    on_progress: Optional[ProgressCallback] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> CaptionReport:
    """Caption every image under ``folder`` that needs it and write ``metadata.csv``; see the module doc."""
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder not found: {folder}")
    output = options.output or os.path.join(folder, METADATA_FILENAME)
    rows: Dict[str, str] = read_metadata_csv(output) if os.path.isfile(output) else {}
    rows_on_disk = dict(rows)
    paths = [path for path, _ in list_image_paths(folder)]
    if not paths:
        raise DatasetError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    report = CaptionReport(output=output)

    todo: List[Tuple[str, str]] = []
    for path in paths:
        name = image_name(folder, path)
        existing = rows.get(name) or (read_sidecar(path) if options.sidecar else None)
        if existing and not options.overwrite:
            rows[name] = existing
            report.skipped.append(name)
            if options.sidecar and read_sidecar(path) is None:
                write_sidecar(path, existing)
        else:
            todo.append((name, path))

    progress = None
    if options.show_progress:
        from tqdm import tqdm

        progress = tqdm(total=len(todo), unit="img", desc=f"captioning ({captioner.name})")
    done = 0
    last_save = time.monotonic()
    try:
        for batch in _batches(todo, options.batch_size):
            if should_stop is not None and should_stop():
                report.stopped = True
                break
            loaded = []
            for name, path in batch:
                image, reason = _load(path)
                if image is None:
                    report.failed.append((name, reason))  # the caller reports these (the CLI, the tab)
                else:
                    loaded.append((name, path, image))
            captions = captioner.caption([image for _, _, image in loaded]) if loaded else []
            for (name, path, _), caption in zip(loaded, captions, strict=True):
                caption = add_trigger(caption, options.prefix, options.suffix)
                rows[name] = caption
                report.captioned[name] = caption
                if options.sidecar:
                    write_sidecar(path, caption)
            done += len(batch)
            if progress is not None:
                progress.update(len(batch))
            if on_progress is not None:
                on_progress(done, len(todo))
            if time.monotonic() - last_save >= options.save_every_s:
                write_metadata_csv(output, rows.items())
                last_save = time.monotonic()
    finally:
        if progress is not None:
            progress.close()
        if rows != rows_on_disk or not os.path.isfile(output):
            write_metadata_csv(output, rows.items())

    in_folder = [rows[image_name(folder, path)] for path in paths if rows.get(image_name(folder, path))]
    report.tag_counts = tag_frequencies(in_folder)
    report.total_images = len(in_folder)
    return report
