"""Aspect-ratio bucketing: every image goes to the bucket (w, h) of about resolution² pixels whose aspect ratio
is nearest its own, then is resized to cover that bucket and centre-cropped."""

from __future__ import annotations

from typing import List, Tuple

from PIL import Image

Bucket = Tuple[int, int]


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


def nearest_bucket(size: Tuple[int, int], buckets: List[Bucket]) -> Bucket:
    width, height = size
    ratio = width / height
    return min(buckets, key=lambda b: (abs(b[0] / b[1] - ratio), -b[0] * b[1]))


def resize_to_bucket(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale to cover the bucket, then centre-crop to exactly its size."""
    target_w, target_h = bucket
    scale = max(target_w / image.width, target_h / image.height)
    new_size = (max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    left = (image.width - target_w) // 2
    top = (image.height - target_h) // 2
    return image.crop((left, top, left + target_w, top + target_h))
