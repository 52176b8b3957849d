"""Loss masks (``masked_loss``): how much each pixel of an image counts in the loss, from 0 to 1.

The mask of ``folder/cat.png`` is an image named ``cat`` (any image extension) in ``folder/masks/``, read as
grey levels (white counts fully, black not at all); without one, the image's own alpha channel; without
either, the image has no mask (everything counts). A mask goes through the image's own resize and crop to its
bucket, then is averaged over 8x8 pixel blocks: one value per latent pixel of the VAE (every supported family
encodes 8x8 pixels into one latent), as sd-scripts' ``apply_masked_loss`` resizes masks ("area") to the loss.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lora_trainer.data.buckets import Bucket, Size, resize_to_bucket
from lora_trainer.data.images import IMAGE_EXTENSIONS, load_alpha, open_image

MASK_FOLDER = "masks"
LATENT_FACTOR = 8  # pixels per latent pixel along each side


def find_mask_file(image_path: str) -> Optional[str]:
    """``masks/<stem>.<image extension>`` beside the image, or None."""
    folder = os.path.join(os.path.dirname(image_path), MASK_FOLDER)
    if not os.path.isdir(folder):
        return None
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for name in sorted(os.listdir(folder)):
        base, extension = os.path.splitext(name)
        if base == stem and extension.lower() in IMAGE_EXTENSIONS:
            return os.path.join(folder, name)
    return None


def mask_image(image_path: str, image_size: Size) -> Optional[Image.Image]:
    """The image's mask as an "L" image of ``image_size`` (its displayed size), or None when it has none.
    Raises ``ValueError`` naming the mask file when that cannot be read."""
    path = find_mask_file(image_path)
    if path is None:
        return load_alpha(image_path)
    try:
        mask = open_image(path).convert("L")
    except ValueError as exc:
        raise ValueError(f"mask {path}: {exc}") from None
    return mask if mask.size == image_size else mask.resize(image_size, Image.Resampling.BILINEAR)


def latent_mask(mask: Image.Image, bucket: Bucket, resized: Optional[Size] = None) -> torch.Tensor:
    """``mask`` cropped to ``bucket`` like its image, as a (1, h/8, w/8) float32 tensor in [0, 1]."""
    pixels = np.asarray(resize_to_bucket(mask, bucket, resized), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels)[None, None]
    size = (max(1, bucket[1] // LATENT_FACTOR), max(1, bucket[0] // LATENT_FACTOR))
    return F.interpolate(tensor, size=size, mode="area")[0]
