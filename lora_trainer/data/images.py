"""Finding, checking and reading training images: the one place the project opens an image file.

kohya's folder convention is supported: a sub-folder named ``<N>_<name>`` repeats its images N times per
epoch. Images directly in the data folder repeat once.

Every image is read the way a viewer shows it: its EXIF orientation applied (all eight values), then
converted to 8-bit RGB. PIL's own ``convert("RGB")`` clips 16- and 32-bit integer pixels at 255 and
truncates 0..1 floats to 0 or 1, so those modes are scaled here; transparency is flattened onto white, as
most trainers do. A mode that cannot be converted faithfully is rejected with a reason naming it.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
# masks/ holds the loss masks of the images beside it (masked_loss), never training images.
SKIPPED_FOLDERS = {".lora_trainer_cache", "__pycache__", "masks"}
EXIF_ORIENTATION = 0x0112
# 8-bit modes PIL converts to RGB correctly by itself (CMYK, YCbCr, LAB and HSV through its colour maths).
PLAIN_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")  # flattened onto white
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
TIFF_BITS_PER_SAMPLE = 258


class UnsupportedImage(ValueError):
    """The file is an image, but not one that converts faithfully to 8-bit RGB; the message names the mode."""


@dataclass(frozen=True)
class ImageFile:
    path: str  # absolute path
    name: str  # path relative to the data folder, with forward slashes: the key in metadata.csv
    repeats: int
    size: Tuple[int, int]  # (width, height) as displayed, after the EXIF orientation
    orientation: int = 1  # the EXIF orientation tag (1 = as stored); part of the latent cache key


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


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8), 1 when absent or invalid."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block reads as "no orientation", as viewers treat it
        return 1
    return value if 1 <= value <= 8 else 1


def _nominal_bits(image: Image.Image, values: np.ndarray) -> int:
    """Bits per sample of a 32-bit-integer ("I") image: the TIFF tag when there is one; PNG stores 16-bit
    grey this way in older Pillow; otherwise the smallest of 8/16/32 bits that holds the values."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and TIFF_BITS_PER_SAMPLE in tags:
        bits = tags[TIFF_BITS_PER_SAMPLE]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    if image.format == "PNG":
        return 16
    peak = int(values.max()) if values.size else 0
    return 8 if peak <= 0xFF else 16 if peak <= 0xFFFF else 32


def _grey_from_array(values: np.ndarray, full_scale: float) -> Image.Image:
    scaled = np.clip(np.rint(values.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _flatten_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Through the embedded ICC profile when there is one (print CMYK is far from PIL's naive formula)."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # an unusable profile: fall back to PIL's conversion
            pass
    return image.convert("RGB")


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` (any PIL mode, loaded) as 8-bit RGB; raises ``UnsupportedImage`` naming the mode otherwise.

    16-bit modes scale by 255/65535 (a pixel of 30000 becomes 117); "I" by its nominal bit depth; "F" floats
    in 0..1 by 255 (other float ranges have no agreed meaning and are refused); alpha is flattened onto white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode in PLAIN_MODES:
        return image.convert("RGB")
    if mode in SIXTEEN_BIT_MODES:
        return _grey_from_array(np.asarray(image), 65535.0).convert("RGB")
    if mode == "I":
        values = np.asarray(image)
        if values.size and int(values.min()) < 0:
            raise UnsupportedImage(f"mode {mode} (signed 32-bit integers) has negative pixel values")
        return _grey_from_array(values, float(2 ** _nominal_bits(image, values) - 1)).convert("RGB")
    if mode == "F":
        values = np.asarray(image)
        low, high = (float(np.nanmin(values)), float(np.nanmax(values))) if values.size else (0.0, 0.0)
        if not np.isfinite(values).all() or low < 0.0 or high > 1.0:
            raise UnsupportedImage(
                f"mode {mode} (32-bit float) with values from {low:g} to {high:g}; only floats in 0..1 are "
                "converted. Save it as an 8- or 16-bit PNG"
            )
        return _grey_from_array(values, 1.0).convert("RGB")
    raise UnsupportedImage(f"mode {mode} cannot be converted to RGB faithfully; save it as an 8-bit RGB PNG or JPEG")


def _decode(path: str, max_side: Optional[int] = None) -> Tuple[Image.Image, int]:
    try:
        with Image.open(path) as image:
            orientation = exif_orientation(image)
            if max_side:
                image.draft("RGB", (max_side, max_side))
            image.load()
            oriented = ImageOps.exif_transpose(image) if orientation != 1 else image
            if max_side:
                oriented.thumbnail((max_side, max_side))
            return to_rgb8(oriented), orientation
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from None
    except (OSError, SyntaxError) as exc:  # truncated files raise OSError from load()
        raise ValueError(f"corrupt or truncated image: {exc}") from None


def open_image(path: str, max_side: Optional[int] = None) -> Image.Image:
    """The image at ``path`` as displayed: EXIF orientation applied, 8-bit RGB (see ``to_rgb8``).

    ``max_side`` makes a thumbnail no larger than that (JPEGs then decode at a fraction of full size).
    Raises ``ValueError`` with a reason (unreadable, corrupt, truncated, too large, unsupported mode).
    """
    return _decode(path, max_side)[0]


def check_image(path: str) -> Tuple[Tuple[int, int], int]:
    """Fully decode and convert an image (catching truncation and unsupported modes); returns its displayed
    (width, height) and its EXIF orientation. Raises ValueError with the reason."""
    image, orientation = _decode(path)
    return image.size, orientation


def scan_images(folder: str) -> Tuple[List[ImageFile], List[RejectedImage]]:
    """All usable images under ``folder`` and the rejected ones with their reasons."""
    usable: List[ImageFile] = []
    rejected: List[RejectedImage] = []
    for path, repeats in list_image_paths(folder):
        try:
            size, orientation = check_image(path)
        except ValueError as exc:
            rejected.append(RejectedImage(path, str(exc)))
            continue
        name = os.path.relpath(path, folder).replace(os.sep, "/")
        usable.append(ImageFile(path=path, name=name, repeats=repeats, size=size, orientation=orientation))
    return usable, rejected


def load_alpha(path: str) -> Optional[Image.Image]:
    """The alpha channel of ``path`` as displayed (EXIF orientation applied), an 8-bit "L" image; None when the
    image has no transparency. Raises ``ValueError`` like ``open_image``."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ALPHA_MODES and not (image.mode == "P" and "transparency" in image.info):
                return None
            oriented = ImageOps.exif_transpose(image) if exif_orientation(image) != 1 else image
            return oriented.convert("RGBA").getchannel("A")
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"corrupt or truncated image: {exc}") from None


def load_rgb(path: str) -> Image.Image:
    """The training pixels of ``path``: ``open_image`` at full size."""
    return open_image(path)
