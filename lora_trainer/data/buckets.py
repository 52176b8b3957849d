"""Aspect-ratio bucketing: every image goes to the bucket (w, h) of about resolution² pixels whose aspect ratio
is nearest its own, then is resized to cover that bucket and centre-cropped.

With ``bucket_no_upscale`` (sd-scripts' option of that name) an image gets a bucket of its own instead: within
the area it keeps its size and only the sides are cut down to multiples of the step; a larger image is first
scaled down to the area.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from PIL import Image

Bucket = Tuple[int, int]
Size = Tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> List[Bucket]:
    """All (w, h) with sides multiples of ``step`` in [min_side, max_side] and area at most resolution²."""
    min_side = min(min_side, resolution)
    max_side = max(max_side, resolution)
    area = resolution * resolution
    buckets = {(resolution // step * step,) * 2}
    for width in range(min_side // step * step or step, max_side + 1, step):
        height = min(max_side, (area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: List[Bucket]) -> Bucket:
    width, height = size
    ratio = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def no_upscale_bucket(size: Size, resolution: int, step: int) -> Tuple[Bucket, Size]:
    """sd-scripts' ``bucket_no_upscale`` choice: ``(bucket, resized size)``.

    Within resolution² pixels the image keeps its size and the bucket is each side cut down to a multiple of
    ``step`` (the excess is cropped). A larger image is scaled to the area keeping its aspect ratio, rounding
    whichever side gives the smaller aspect-ratio error to the step (``BucketManager.select_bucket``). A side
    can come out 0 for an image narrower than ``step``; the caller rejects those.
    """
    width, height = size
    max_area = resolution * resolution
    if width * height > max_area:
        ratio = width / height
        scaled_w = math.sqrt(max_area * ratio)
        scaled_h = max_area / scaled_w
        w_rounded = _round_to_step(scaled_w, step)
        h_for_w = _round_to_step(w_rounded / ratio, step)
        h_rounded = _round_to_step(scaled_h, step)
        w_for_h = _round_to_step(h_rounded * ratio, step)
        error_w = abs(w_rounded / h_for_w - ratio) if h_for_w else math.inf
        error_h = abs(w_for_h / h_rounded - ratio) if h_rounded else math.inf
        if error_w < error_h:
            resized = (w_rounded, int(w_rounded / ratio + 0.5))
        else:
            resized = (int(h_rounded * ratio + 0.5), h_rounded)
    else:
        resized = (width, height)
    return (resized[0] - resized[0] % step, resized[1] - resized[1] % step), resized


def cover_size(size: Size, bucket: Bucket) -> Size:
    """The size that covers ``bucket`` with ``size``'s aspect ratio (the resize before the centre crop)."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def crop_left_top(resized: Size, bucket: Bucket) -> Size:
    """Where the centre crop of a ``resized`` image to ``bucket`` starts (SDXL's crop conditioning)."""
    return max(0, (resized[0] - bucket[0]) // 2), max(0, (resized[1] - bucket[1]) // 2)


def resize_to_bucket(image: Image.Image, bucket: Bucket, resized: Optional[Size] = None) -> Image.Image:
    """Scale to ``resized`` (default: cover the bucket), then centre-crop to exactly the bucket's size."""
    new_size = resized or cover_size(image.size, bucket)
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    left, top = crop_left_top(image.size, bucket)
    return image.crop((left, top, left + bucket[0], top + bucket[1]))
