"""Finding and checking training images.

kohya's folder convention is supported: a sub-folder named ``<N>_<name>`` repeats its images N times per
epoch. Images directly in the data folder repeat once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Tuple

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
SKIPPED_FOLDERS = {".lora_trainer_cache", "__pycache__"}


@dataclass(frozen=True)
class ImageFile:
    path: str  # absolute path
    name: str  # path relative to the data folder, with forward slashes: the key in metadata.csv
    repeats: int
    size: Tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class RejectedImage:
    path: str
    reason: str


def list_image_paths(folder: str) -> List[Tuple[str, int]]:
    """(path, repeats) for every file with an image extension, sorted, following kohya's ``N_name`` folders."""
    found: List[Tuple[str, int]] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith("."))
        relative = os.path.relpath(root, folder)
        top = relative.split(os.sep)[0]
        match = REPEAT_FOLDER.match(top) if relative != "." else None
        repeats = int(match.group(1)) if match else 1
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append((os.path.join(root, name), max(repeats, 1)))
    return found


def check_image(path: str) -> Tuple[int, int]:
    """Fully decode an image (catching truncation) and return its size; raises ValueError with the reason."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.size
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError) as exc:  # truncated files raise OSError from load()
        raise ValueError(f"corrupt or truncated image: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from None


def scan_images(folder: str) -> Tuple[List[ImageFile], List[RejectedImage]]:
    """All usable images under ``folder`` and the rejected ones with their reasons."""
    usable: List[ImageFile] = []
    rejected: List[RejectedImage] = []
    for path, repeats in list_image_paths(folder):
        try:
            size = check_image(path)
        except ValueError as exc:
            rejected.append(RejectedImage(path, str(exc)))
            continue
        name = os.path.relpath(path, folder).replace(os.sep, "/")
        usable.append(ImageFile(path=path, name=name, repeats=repeats, size=size))
    return usable, rejected


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, flattening transparency onto white (as most trainers do)."""
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
