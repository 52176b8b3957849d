"""The image-caption dataset: which images, which captions, which bucket, in which order each epoch.

Order and caption augmentation are pure functions of (seed, epoch, index), so a resumed run sees exactly the
batches an uninterrupted one would, and every process of a multi-process run agrees on them.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch

from lora_trainer.config import ImageConfig
from lora_trainer.data.buckets import Bucket, make_buckets, nearest_bucket, resize_to_bucket
from lora_trainer.data.captions import (
    METADATA_FILENAME,
    SIDECAR_EXTENSIONS,
    read_metadata_csv,
    read_sidecar,
    sidecar_path,
)
from lora_trainer.data.images import REPEAT_FOLDER, ImageFile, RejectedImage, load_rgb, scan_images
from lora_trainer.errors import DatasetError


@dataclass(frozen=True)
class Sample:
    index: int
    image: ImageFile
    caption: str
    bucket: Bucket


@dataclass
class DatasetReport:
    rejected: List[RejectedImage] = field(default_factory=list)
    missing_captions: List[str] = field(default_factory=list)
    unmatched_rows: List[str] = field(default_factory=list)  # metadata rows naming no image
    other_sidecars: Dict[str, int] = field(default_factory=dict)  # extension -> uncaptioned images that have one


def _folder_class_token(name: str) -> str:
    """kohya's fallback caption: the name part of an ``N_name`` folder."""
    top = name.split("/")[0] if "/" in name else ""
    match = REPEAT_FOLDER.match(top)
    return match.group(2).replace("_", " ") if match else ""


def _other_sidecars(images: List[ImageFile], missing: List[str], configured: str) -> Dict[str, int]:
    """How many of the uncaptioned images have a sidecar with another common extension (``.caption`` is
    sd-scripts' default, ``.tags`` some taggers'), by extension: a hint that caption_extension is wrong."""
    paths = {img.name: img.path for img in images}
    found: Dict[str, int] = {}
    for extension in SIDECAR_EXTENSIONS:
        if extension != configured.lower():
            count = sum(1 for name in missing if os.path.isfile(sidecar_path(paths[name], extension)))
            if count:
                found[extension] = count
    return found


def split_tags(caption: str) -> List[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


class ImageCaptionDataset:
    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        folder = cfg.train_data_dir
        if not os.path.isdir(folder):
            raise DatasetError(f"train_data_dir not found: {folder}")
        images, rejected = scan_images(folder)
        self.report = DatasetReport(rejected=rejected)
        if not images:
            detail = f" ({len(rejected)} files could not be read)" if rejected else ""
            raise DatasetError(
                f"no usable images in {folder}{detail}; add .png/.jpg/.webp images (kohya's "
                "N_name sub-folders are supported)."
            )
        captions = self._read_captions(images)
        self.buckets = (
            make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
            if cfg.enable_bucket
            else [(cfg.resolution, cfg.resolution)]
        )
        self.samples = [
            Sample(i, img, captions[img.name], nearest_bucket(img.size, self.buckets)) for i, img in enumerate(images)
        ]

    def _read_captions(self, images: List[ImageFile]) -> Dict[str, str]:
        cfg = self.cfg
        metadata_path = cfg.metadata_path
        default_csv = os.path.join(cfg.train_data_dir, METADATA_FILENAME)
        if metadata_path is None and os.path.isfile(default_csv):
            metadata_path = default_csv
        rows = read_metadata_csv(metadata_path) if metadata_path else {}
        by_basename = {os.path.basename(k): v for k, v in rows.items()}
        names = {img.name for img in images}
        self.report.unmatched_rows = [
            k for k in rows if k not in names and k not in {os.path.basename(n) for n in names}
        ]
        captions, unreadable = {}, []
        for img in images:
            caption = rows.get(img.name, by_basename.get(os.path.basename(img.name)))
            if caption is None:
                try:
                    caption = read_sidecar(img.path, cfg.caption_extension)
                except DatasetError as exc:  # gathered, so that one run lists every file to re-save
                    unreadable.append(str(exc))
                    continue
            if caption is None:
                self.report.missing_captions.append(img.name)
                caption = _folder_class_token(img.name)
            captions[img.name] = caption
        if unreadable:
            more = f" (and {len(unreadable) - 3} more caption files)" if len(unreadable) > 3 else ""
            raise DatasetError("; ".join(unreadable[:3]) + more)
        self.report.other_sidecars = _other_sidecars(images, self.report.missing_captions, cfg.caption_extension)
        return captions

    # ------------------------------------------------------------ summary and metadata

    @property
    def num_repeated_images(self) -> int:
        return sum(s.image.repeats for s in self.samples)

    def bucket_counts(self) -> Dict[Bucket, int]:
        return dict(sorted(Counter(s.bucket for s in self.samples for _ in range(s.image.repeats)).items()))

    def summary_lines(self) -> List[str]:
        report = self.report
        lines = [
            f"dataset: {len(self.samples)} images, {self.num_repeated_images} per epoch with repeats, "
            f"{len(self.bucket_counts())} buckets, captions missing: {len(report.missing_captions)}"
        ]
        for bucket, count in self.bucket_counts().items():
            lines.append(f"  bucket {bucket[0]}x{bucket[1]}: {count}")
        for item in report.rejected:
            lines.append(f"  skipped {item.path}: {item.reason}")
        if report.missing_captions:
            shown = ", ".join(report.missing_captions[:5]) + (" ..." if len(report.missing_captions) > 5 else "")
            lines.append(
                f"  no caption (metadata.csv row or {self.cfg.caption_extension} file) for: {shown}; "
                "those train with an empty caption (or their N_name folder's name)"
            )
        for extension, count in report.other_sidecars.items():
            lines.append(
                f"  {count} of the images without a caption have a {extension} file beside them; set "
                f"caption_extension: {extension} to train on those captions"
            )
        if report.unmatched_rows:
            lines.append(f"  metadata rows naming no image: {', '.join(report.unmatched_rows[:5])}")
        return lines

    def metadata(self) -> Dict[str, str]:
        """ss_tag_frequency, ss_bucket_info, ss_dataset_dirs and ss_num_train_images, as sd-scripts writes them."""
        dirs: Dict[str, Dict[str, int]] = {}
        tags: Dict[str, Counter] = {}
        for s in self.samples:
            top = s.image.name.split("/")[0] if "/" in s.image.name else os.path.basename(self.cfg.train_data_dir)
            entry = dirs.setdefault(top, {"n_repeats": s.image.repeats, "img_count": 0})
            entry["img_count"] += 1
            tags.setdefault(top, Counter()).update(split_tags(s.caption))
        buckets = {str(i): {"resolution": list(b), "count": c} for i, (b, c) in enumerate(self.bucket_counts().items())}
        errors = [abs(s.image.size[0] / s.image.size[1] - s.bucket[0] / s.bucket[1]) for s in self.samples]
        return {
            "ss_num_train_images": str(self.num_repeated_images),
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_tag_frequency": json.dumps({k: dict(v) for k, v in tags.items()}),
            "ss_bucket_info": json.dumps({"buckets": buckets, "mean_img_ar_error": float(np.mean(errors))}),
        }

    # ------------------------------------------------------------ per-epoch order and captions

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> List[List[int]]:
        """This process's batches of sample indices for ``epoch``; each batch shares one bucket."""
        rng = random.Random(seed * 7919 + epoch)
        by_bucket: Dict[Bucket, List[int]] = {}
        for s in self.samples:
            by_bucket.setdefault(s.bucket, []).extend([s.index] * s.image.repeats)
        batches: List[List[int]] = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
        rng.shuffle(batches)
        # Every process must run the same number of steps: trim to a multiple of the process count.
        usable = max(world, len(batches) // world * world)
        batches = (batches * world)[:usable] if len(batches) < world else batches[:usable]
        return batches[rank::world]

    def caption_for(self, index: int, epoch: int, seed: int) -> str:
        """The caption of sample ``index`` in ``epoch``, after tag shuffling and caption dropout."""
        cfg = self.cfg
        caption = self.samples[index].caption
        if not (cfg.shuffle_caption or cfg.caption_dropout_rate > 0):
            return caption
        rng = random.Random(f"{seed}:{epoch}:{index}")
        if cfg.caption_dropout_rate > 0 and rng.random() < cfg.caption_dropout_rate:
            return ""
        if cfg.shuffle_caption:
            tags = split_tags(caption)
            head, tail = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
            rng.shuffle(tail)
            caption = ", ".join(head + tail)
        return caption

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """The sample's image in its bucket, as a (3, h, w) float tensor in [-1, 1]."""
        sample = self.samples[index]
        image = resize_to_bucket(load_rgb(sample.image.path), sample.bucket)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return tensor.flip(-1) if flip else tensor

    def captions_are_fixed(self) -> bool:
        return not self.cfg.shuffle_caption

    def all_caption_variants(self) -> List[str]:
        """Every caption text a step can ask for (for text-embedding caching)."""
        variants = {s.caption for s in self.samples}
        if self.cfg.caption_dropout_rate > 0:
            variants.add("")
        return sorted(variants)
