"""The image-caption dataset: which images, which captions, which bucket, in which order each epoch.

A run reads one or more folders (``data/subsets.py``): training folders, regularisation folders (balanced
against the training images, ``data/roles.py``) and validation folders or a held-out fraction. Every image
is one ``Sample``; validation samples are never in an epoch's batches.

Order and caption augmentation are pure functions of (seed, epoch, index), so a resumed run sees exactly the
batches an uninterrupted one would, and every process of a multi-process run agrees on them.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lora_trainer.config import ImageConfig
from lora_trainer.data.buckets import (
    Bucket,
    Size,
    cover_size,
    crop_left_top,
    make_buckets,
    nearest_bucket,
    no_upscale_bucket,
    resize_to_bucket,
)
from lora_trainer.data.caption_processing import process_caption
from lora_trainer.data.captions import (
    METADATA_FILENAME,
    SIDECAR_EXTENSIONS,
    read_metadata_csv,
    read_sidecar,
    sidecar_path,
)
from lora_trainer.data.images import REPEAT_FOLDER, ImageFile, RejectedImage, load_rgb, scan_images
from lora_trainer.data.masks import MASK_FOLDER, latent_mask, mask_image
from lora_trainer.data.roles import balance_reg_repeats, split_validation
from lora_trainer.data.subsets import REG, TRAIN, VAL, Subset, resolve_subsets
from lora_trainer.errors import DatasetError

CACHE_FOLDER = ".lora_trainer_cache"


@dataclass(frozen=True)
class Sample:
    index: int
    image: ImageFile
    caption: str
    bucket: Bucket
    subset: int = 0  # index into ``ImageCaptionDataset.subsets``
    repeats: int = 1  # times per epoch (regularisation images: after balancing; validation images: 0)
    role: str = TRAIN  # TRAIN, REG or VAL
    resized: Optional[Size] = None  # the size before the centre crop when not the bucket-covering one

    @property
    def resized_size(self) -> Size:
        return self.resized or cover_size(self.image.size, self.bucket)

    @property
    def crop_left_top(self) -> Size:
        """Where the crop to the bucket starts, in resized pixels (SDXL's crop conditioning)."""
        return crop_left_top(self.resized_size, self.bucket)


@dataclass
class DatasetReport:
    rejected: List[RejectedImage] = field(default_factory=list)
    missing_captions: List[str] = field(default_factory=list)
    unmatched_rows: List[str] = field(default_factory=list)  # metadata rows naming no image
    other_sidecars: Dict[str, int] = field(default_factory=dict)  # extension -> uncaptioned images that have one
    reg_left_out: int = 0  # regularisation images beyond the training images' count
    unused_masks: List[str] = field(default_factory=list)  # folders with masks/ while masked_loss is off
    caption_extensions: List[str] = field(default_factory=list)


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


@dataclass
class _Found:
    """An image as read from its folder, before it gets its bucket and index."""

    subset: int
    image: ImageFile
    caption: str
    role: str
    repeats: int


class ImageCaptionDataset:
    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg
        self.subsets: List[Subset] = resolve_subsets(cfg)
        self.report = DatasetReport()
        self._bucket_sets: Dict[int, List[Bucket]] = {}
        self._masks: Dict[Tuple[int, bool], Optional[torch.Tensor]] = {}
        self._reg_folder_repeats: Dict[str, int] = {}  # image path -> its folder's repeats (before balancing)
        found: List[_Found] = []
        owner: Dict[str, str] = {}
        for position, subset in enumerate(self.subsets):
            images = self._scan(subset)
            for img in images:
                if img.path in owner:
                    raise DatasetError(
                        f"{img.path} is in {owner[img.path]} and in {subset.key} ({subset.image_dir}); a folder "
                        "inside another is read by both: list folders that do not contain each other."
                    )
                owner[img.path] = f"{subset.key} ({subset.image_dir})"
            captions = self._read_captions(subset, images, several=len(self.subsets) > 1)
            held_out = set()
            if subset.role == TRAIN:
                held_out = split_validation([img.name for img in images], cfg.validation_split, self.validation_seed)
            for img in images:
                role = VAL if img.name in held_out else subset.role
                repeats = 0 if role == VAL else subset.num_repeats or img.repeats
                found.append(_Found(position, img, captions[img.name], role, repeats))
        self._balance_reg(found)
        self.samples: List[Sample] = []
        for item in found:
            if item.role == REG and item.repeats == 0:
                continue  # left out by the balancing
            placed = self._bucket_for(item.image, self.subsets[item.subset])
            if placed is None:
                continue
            bucket, resized = placed
            self.samples.append(
                Sample(
                    len(self.samples),
                    item.image,
                    item.caption,
                    bucket,
                    subset=item.subset,
                    repeats=item.repeats,
                    role=item.role,
                    resized=resized,
                )
            )
        if not any(s.role == TRAIN for s in self.samples):
            raise DatasetError(
                "no training images left: every usable image is a regularisation or validation image (or too small "
                "for a bucket); lower validation_split or add training images."
            )

    # ------------------------------------------------------------ reading the folders

    @property
    def validation_seed(self) -> int:
        return self.cfg.seed if self.cfg.validation_seed is None else self.cfg.validation_seed

    @property
    def cache_root(self) -> str:
        """The default folder of the disk cache: in the first folder of the run."""
        return os.path.join(self.subsets[0].image_dir, CACHE_FOLDER)

    def _scan(self, subset: Subset) -> List[ImageFile]:
        folder = subset.image_dir
        if not os.path.isdir(folder):
            raise DatasetError(f"{subset.key} not found: {folder}")
        images, rejected = scan_images(folder)
        self.report.rejected += rejected
        if not images:
            detail = f" ({len(rejected)} files could not be read)" if rejected else ""
            raise DatasetError(
                f"no usable images in {folder}{detail}; add .png/.jpg/.webp images (kohya's "
                "N_name sub-folders are supported)."
            )
        if not subset.masked_loss and os.path.isdir(os.path.join(folder, MASK_FOLDER)):
            self.report.unused_masks.append(folder)
        return images

    def _read_captions(self, subset: Subset, images: List[ImageFile], several: bool) -> Dict[str, str]:
        metadata_path = subset.metadata_path
        default_csv = os.path.join(subset.image_dir, METADATA_FILENAME)
        if metadata_path is None and os.path.isfile(default_csv):
            metadata_path = default_csv
        rows = read_metadata_csv(metadata_path) if metadata_path else {}
        by_basename = {os.path.basename(k): v for k, v in rows.items()}
        names = {img.name for img in images}
        shown = (lambda name: f"{subset.name}/{name}") if several else (lambda name: name)
        self.report.unmatched_rows += [
            shown(k) for k in rows if k not in names and k not in {os.path.basename(n) for n in names}
        ]
        captions, unreadable, missing = {}, [], []
        for img in images:
            caption = rows.get(img.name, by_basename.get(os.path.basename(img.name)))
            if caption is None:
                try:
                    caption = read_sidecar(img.path, subset.caption_extension)
                except DatasetError as exc:  # gathered, so that one run lists every file to re-save
                    unreadable.append(str(exc))
                    continue
            if caption is None:
                missing.append(img.name)
                caption = subset.class_tokens if subset.class_tokens is not None else _folder_class_token(img.name)
            captions[img.name] = caption
        if unreadable:
            more = f" (and {len(unreadable) - 3} more caption files)" if len(unreadable) > 3 else ""
            raise DatasetError("; ".join(unreadable[:3]) + more)
        self.report.missing_captions += [shown(name) for name in missing]
        if missing and subset.caption_extension not in self.report.caption_extensions:
            self.report.caption_extensions.append(subset.caption_extension)
        for extension, count in _other_sidecars(images, missing, subset.caption_extension).items():
            self.report.other_sidecars[extension] = self.report.other_sidecars.get(extension, 0) + count
        return captions

    def _balance_reg(self, found: List[_Found]) -> None:
        """Balance the regularisation images' repeats against the training images (sd-scripts' rule)."""
        reg = [item for item in found if item.role == REG]
        if not reg:
            return
        self._reg_folder_repeats = {item.image.path: item.repeats for item in reg}
        num_train = sum(item.repeats for item in found if item.role == TRAIN)
        for item, repeats in zip(reg, balance_reg_repeats(num_train, [item.repeats for item in reg])):
            item.repeats = repeats
        self.report.reg_left_out = sum(1 for item in reg if item.repeats == 0)

    def _bucket_for(self, img: ImageFile, subset: Subset) -> Optional[Tuple[Bucket, Optional[Size]]]:
        """(bucket, resized size or None for the covering one); None (and the image reported) when the image is
        too small for any bucket."""
        cfg, resolution = self.cfg, subset.resolution
        if not cfg.enable_bucket:
            return (resolution, resolution), None
        if cfg.bucket_no_upscale:
            bucket, resized = no_upscale_bucket(img.size, resolution, cfg.bucket_reso_steps)
            if min(bucket) == 0:
                self.report.rejected.append(
                    RejectedImage(
                        img.path,
                        f"{img.size[0]}x{img.size[1]} is narrower than bucket_reso_steps ({cfg.bucket_reso_steps}) "
                        "and bucket_no_upscale never enlarges it",
                    )
                )
                return None
            return bucket, (None if resized == cover_size(img.size, bucket) else resized)
        if resolution not in self._bucket_sets:
            self._bucket_sets[resolution] = make_buckets(
                resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps
            )
        return nearest_bucket(img.size, self._bucket_sets[resolution]), None

    # ------------------------------------------------------------ counts, summary and metadata

    def _of(self, role: str) -> List[Sample]:
        return [s for s in self.samples if s.role == role]

    @property
    def num_repeated_images(self) -> int:
        """Images per epoch: training and (balanced) regularisation images with their repeats."""
        return sum(s.repeats for s in self.samples)

    @property
    def num_train_images(self) -> int:
        """Training images with repeats (sd-scripts' num_train_images)."""
        return sum(s.repeats for s in self._of(TRAIN))

    @property
    def num_reg_images(self) -> int:
        """Regularisation images with their folders' repeats, before balancing (sd-scripts' num_reg_images)."""
        return sum(self._reg_folder_repeats.values())

    @property
    def validation_samples(self) -> List[Sample]:
        return self._of(VAL)

    @property
    def has_reg(self) -> bool:
        return any(s.role == REG for s in self.samples)

    def bucket_counts(self, samples: Optional[Sequence[Sample]] = None) -> Dict[Bucket, int]:
        """Images per bucket and epoch (repeats included), by bucket."""
        samples = self.samples if samples is None else samples
        return dict(sorted(Counter(s.bucket for s in samples for _ in range(s.repeats)).items()))

    def bucket_numbers(self) -> Dict[Bucket, int]:
        """sd-scripts' bucket numbers (its table and ``ss_bucket_info``): positions in the sorted list of every
        bucket the resolutions define (``make_buckets``) and, with ``bucket_no_upscale``, of those in use."""
        known = set(self.bucket_counts()) | {b for buckets in self._bucket_sets.values() for b in buckets}
        return {bucket: i for i, bucket in enumerate(sorted(known))}

    def mean_aspect_error(self, samples: Optional[Sequence[Sample]] = None) -> float:
        """Mean |bucket aspect ratio - image aspect ratio| over the images without repeats (sd-scripts')."""
        samples = [s for s in (self.samples if samples is None else samples) if s.repeats]
        errors = [abs(s.bucket[0] / s.bucket[1] - s.image.size[0] / s.image.size[1]) for s in samples]
        return float(np.mean(errors)) if errors else 0.0

    def summary_lines(self) -> List[str]:
        report = self.report
        train = self._of(TRAIN)
        lines = [
            f"dataset: {len(train)} images, {self.num_repeated_images} per epoch with repeats, "
            f"{len(self.bucket_counts())} buckets, captions missing: {len(report.missing_captions)}"
        ]
        if len(self.subsets) > 1:
            for subset in self.subsets:
                own = [s for s in self.samples if self.subsets[s.subset] is subset]
                lines.append(
                    f"  {subset.key} {subset.image_dir} ({subset.role}): {len(own)} images, "
                    f"{sum(s.repeats for s in own)} per epoch"
                )
        reg = self._of(REG)
        if reg or report.reg_left_out:
            lines.append(
                f"  regularisation images: {self.num_reg_images} with repeats, balanced to "
                f"{sum(s.repeats for s in reg)} per epoch against {self.num_train_images} training images "
                f"(loss weight {self.cfg.prior_loss_weight:g})"
                + (f"; {report.reg_left_out} left out (more than the training images)" if report.reg_left_out else "")
            )
        validation = self._of(VAL)
        if validation:
            lines.append(f"  validation images: {len(validation)} (not trained on)")
        # sd-scripts' bucket table: each bucket's resolution and images per epoch, then the mean aspect error.
        numbers = self.bucket_numbers()
        for bucket, count in self.bucket_counts().items():
            lines.append(f"  bucket {numbers[bucket]}: resolution ({bucket[0]}, {bucket[1]}), count: {count}")
        lines.append(f"  mean ar error (without repeats): {self.mean_aspect_error():.6g}")
        for item in report.rejected:
            lines.append(f"  skipped {item.path}: {item.reason}")
        if report.missing_captions:
            shown = ", ".join(report.missing_captions[:5]) + (" ..." if len(report.missing_captions) > 5 else "")
            lines.append(
                f"  no caption (metadata.csv row or {'/'.join(report.caption_extensions)} file) for: {shown}; "
                "those train with an empty caption (or class_tokens, or their N_name folder's name)"
            )
        for extension, count in report.other_sidecars.items():
            lines.append(
                f"  {count} of the images without a caption have a {extension} file beside them; set "
                f"caption_extension: {extension} to train on those captions"
            )
        if report.unmatched_rows:
            lines.append(f"  metadata rows naming no image: {', '.join(report.unmatched_rows[:5])}")
        for folder in report.unused_masks:
            lines.append(f"  {os.path.join(folder, MASK_FOLDER)} is not used: set masked_loss: true to weight the loss")
        return lines

    def _dirs(self, samples: Sequence[Sample]) -> Dict[str, Dict[str, int]]:
        """{folder name: {n_repeats, img_count}} as sd-scripts' ss_dataset_dirs: kohya N_name sub-folders each."""
        dirs: Dict[str, Dict[str, int]] = {}
        for s in samples:
            subset = self.subsets[s.subset]
            top = s.image.name.split("/")[0] if "/" in s.image.name else subset.name
            entry = dirs.setdefault(top, {"n_repeats": subset.num_repeats or s.image.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs

    def _tag_frequency(self, samples: Sequence[Sample]) -> Dict[str, Dict[str, int]]:
        tags: Dict[str, Counter] = {}
        for s in samples:
            subset = self.subsets[s.subset]
            top = s.image.name.split("/")[0] if "/" in s.image.name else subset.name
            tags.setdefault(top, Counter()).update(split_tags(s.caption))
        return {k: dict(v) for k, v in tags.items()}

    def _bucket_info(self, samples: Sequence[Sample]) -> Dict[str, object]:
        counts = self.bucket_counts(samples)
        numbers = self.bucket_numbers()
        buckets = {str(numbers[b]): {"resolution": list(b), "count": c} for b, c in counts.items()}
        return {"buckets": buckets, "mean_img_ar_error": self.mean_aspect_error(samples)}

    def metadata(self) -> Dict[str, str]:
        """The dataset's ``ss_*`` keys as sd-scripts writes them (JSON-encoded where it encodes them)."""
        cfg = self.cfg
        trained = self._of(TRAIN) + self._of(REG)
        meta = {
            "ss_num_train_images": str(self.num_train_images),
            "ss_num_reg_images": str(self.num_reg_images),
            "ss_num_validation_images": str(len(self._of(VAL))),
            "ss_dataset_dirs": json.dumps(self._dirs(self._of(TRAIN))),
            "ss_reg_dataset_dirs": json.dumps(self._dirs(self._of(REG))),
            "ss_tag_frequency": json.dumps(self._tag_frequency(trained)),
            "ss_bucket_info": json.dumps(self._bucket_info(trained)),
            "ss_bucket_no_upscale": str(cfg.bucket_no_upscale),
            "ss_min_bucket_reso": str(cfg.min_bucket_reso),
            "ss_max_bucket_reso": str(cfg.max_bucket_reso),
            "ss_prior_loss_weight": str(cfg.prior_loss_weight),
            "ss_caption_tag_dropout_rate": str(cfg.caption_tag_dropout_rate),
            "ss_flip_aug": str(cfg.random_flip),
            "ss_validation_split": str(cfg.validation_split),
            "ss_validation_seed": str(cfg.validation_seed),
            "ss_validate_every_n_steps": str(cfg.validate_every_n_steps),
            "ss_validate_every_n_epochs": str(cfg.validate_every_n_epochs),
            "ss_max_validation_steps": str(cfg.max_validation_steps),
        }
        if cfg.datasets:
            meta["ss_datasets"] = json.dumps(self._datasets_metadata())
        return meta

    def _datasets_metadata(self) -> List[Dict[str, object]]:
        """sd-scripts' ss_datasets: one dataset per resolution (sd-scripts' datasets each have one), its subsets."""
        cfg = self.cfg
        result = []
        for resolution in sorted({s.resolution for s in self.subsets}):
            members = [i for i, s in enumerate(self.subsets) if s.resolution == resolution]
            samples = [s for s in self.samples if s.subset in members and s.role != VAL]
            subsets = []
            for i in members:
                subset = self.subsets[i]
                own = [s for s in self.samples if s.subset == i]
                subsets.append(
                    {
                        "img_count": len(own),
                        "num_repeats": subset.num_repeats or 1,
                        "color_aug": False,
                        "flip_aug": subset.random_flip,
                        "random_crop": False,
                        "shuffle_caption": subset.captions.shuffle,
                        "keep_tokens": subset.captions.keep_tokens,
                        "keep_tokens_separator": subset.captions.keep_tokens_separator,
                        "secondary_separator": subset.captions.secondary_separator or None,
                        "enable_wildcard": False,
                        "caption_prefix": subset.captions.prefix or None,
                        "caption_suffix": subset.captions.suffix or None,
                        "image_dir": subset.name,
                        "class_tokens": subset.class_tokens,
                        "is_reg": subset.role == REG,
                        "is_val": subset.role == VAL,
                        "alpha_mask": subset.masked_loss,
                    }
                )
            result.append(
                {
                    "is_dreambooth": True,
                    "batch_size_per_device": cfg.batch_size,
                    "num_train_images": sum(s.repeats for s in samples if s.role == TRAIN),
                    "num_reg_images": sum(self._reg_folder_repeats.get(s.image.path, 0) for s in samples),
                    "resolution": [resolution, resolution],
                    "enable_bucket": cfg.enable_bucket,
                    "min_bucket_reso": cfg.min_bucket_reso,
                    "max_bucket_reso": cfg.max_bucket_reso,
                    "tag_frequency": self._tag_frequency(samples),
                    "bucket_info": self._bucket_info(samples),
                    "subsets": subsets,
                }
            )
        return result

    # ------------------------------------------------------------ per-epoch order and captions

    def epoch_batches(self, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> List[List[int]]:
        """This process's batches of sample indices for ``epoch``; each batch shares one bucket. Training and
        regularisation images mix in batches, as in sd-scripts; validation images are never in them."""
        rng = random.Random(seed * 7919 + epoch)
        by_bucket: Dict[Bucket, List[int]] = {}
        for s in self.samples:
            if s.repeats:
                by_bucket.setdefault(s.bucket, []).extend([s.index] * s.repeats)
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

    def validation_batches(self, batch_size: int, limit: Optional[int] = None) -> List[List[int]]:
        """The validation images in fixed batches (one bucket each, in index order); the first ``limit``."""
        by_bucket: Dict[Bucket, List[int]] = {}
        for s in self._of(VAL):
            by_bucket.setdefault(s.bucket, []).append(s.index)
        batches = [
            indices[i : i + batch_size]
            for _, indices in sorted(by_bucket.items())
            for i in range(0, len(indices), batch_size)
        ]
        return batches[:limit] if limit else batches

    def caption_for(self, index: int, epoch: int, seed: int) -> str:
        """The caption of sample ``index`` in ``epoch``, after its folder's caption options
        (``data/caption_processing.py``); validation captions never change."""
        sample = self.samples[index]
        options = self.subsets[sample.subset].captions
        random_ops = options.varies or options.dropout_rate > 0
        rng = random.Random(f"{seed}:{epoch}:{index}") if random_ops and sample.role != VAL else None
        return process_caption(sample.caption, options, rng)

    def pixels(self, index: int, flip: bool = False) -> torch.Tensor:
        """The sample's image in its bucket, as a (3, h, w) float tensor in [-1, 1]."""
        sample = self.samples[index]
        image = resize_to_bucket(load_rgb(sample.image.path), sample.bucket, sample.resized)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return tensor.flip(-1) if flip else tensor

    def flips(self, index: int) -> bool:
        """Whether the sample's folder flips its images at random (random_flip)."""
        return self.subsets[self.samples[index].subset].random_flip

    @property
    def any_flip(self) -> bool:
        return any(self.flips(s.index) for s in self.samples if s.repeats)

    @property
    def any_mask(self) -> bool:
        return any(subset.masked_loss for subset in self.subsets)

    def loss_mask(self, index: int, flip: bool = False) -> Optional[torch.Tensor]:
        """The sample's loss mask at latent resolution, (1, h/8, w/8) in [0, 1] (``data/masks.py``); None when
        its folder has masked_loss off or the image has no mask. Read once, then kept."""
        key = (index, flip)
        if key not in self._masks:
            sample = self.samples[index]
            mask = None
            if self.subsets[sample.subset].masked_loss:
                try:
                    image = mask_image(sample.image.path, sample.image.size)
                except ValueError as exc:
                    raise DatasetError(f"masked_loss: {exc}") from None
                if image is not None:
                    mask = latent_mask(image, sample.bucket, sample.resized)
                    mask = mask.flip(-1) if flip else mask
            self._masks[key] = mask
        return self._masks[key]

    def loss_weight(self, index: int) -> float:
        """The sample's loss weight: prior_loss_weight for regularisation images, else 1."""
        return self.cfg.prior_loss_weight if self.samples[index].role == REG else 1.0

    def captions_are_fixed(self) -> bool:
        """Whether every trained caption is one of ``all_caption_variants`` (no shuffling, no tag dropout)."""
        return not any(self.subsets[s.subset].captions.varies for s in self.samples if s.repeats)

    def all_caption_variants(self) -> List[str]:
        """Every caption text a step or a validation can ask for while captions are fixed (text caching)."""
        variants = set()
        for s in self.samples:
            options = self.subsets[s.subset].captions
            variants.add(process_caption(s.caption, options))
            if options.dropout_rate > 0 and s.role != VAL:
                variants.add("")
        return sorted(variants)
