"""The folders of a run: ``train_data_dir`` and each ``datasets:`` entry, every option resolved.

``train_data_dir`` (when set) is the first folder and takes the top-level options; a ``datasets`` entry takes
what it sets and the top-level value of everything else (``FOLDER_OPTION_KEYS``), as sd-scripts' subsets take
their dataset's and the general section's values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from lora_trainer.config import FOLDER_OPTION_KEYS, DatasetEntry, ImageConfig
from lora_trainer.data.caption_processing import CaptionOptions

TRAIN, REG, VAL = "train", "reg", "val"  # what a folder's images are for


@dataclass(frozen=True)
class Subset:
    """One folder with its effective options."""

    key: str  # where the config names it: "train_data_dir" or "datasets[i]"
    image_dir: str
    metadata_path: Optional[str]
    num_repeats: Optional[int]  # None: kohya N_name sub-folders decide (1 elsewhere)
    role: str  # TRAIN, REG or VAL
    class_tokens: Optional[str]
    caption_extension: str
    resolution: int
    random_flip: bool
    masked_loss: bool
    captions: CaptionOptions

    @property
    def name(self) -> str:
        """The folder's name, as sd-scripts' ss_dataset_dirs keys it."""
        return os.path.basename(os.path.normpath(self.image_dir))


def _subset(key: str, entry: DatasetEntry, cfg: ImageConfig) -> Subset:
    value = {k: getattr(cfg, k) if getattr(entry, k) is None else getattr(entry, k) for k in FOLDER_OPTION_KEYS}
    return Subset(
        key=key,
        image_dir=entry.image_dir,
        metadata_path=entry.metadata_path,
        num_repeats=entry.num_repeats,
        role=REG if entry.is_reg else VAL if entry.is_val else TRAIN,
        class_tokens=entry.class_tokens,
        caption_extension=value["caption_extension"],
        resolution=value["resolution"],
        random_flip=value["random_flip"],
        masked_loss=value["masked_loss"],
        captions=CaptionOptions(
            shuffle=value["shuffle_caption"],
            keep_tokens=value["keep_tokens"],
            keep_tokens_separator=value["keep_tokens_separator"],
            dropout_rate=value["caption_dropout_rate"],
            tag_dropout_rate=value["caption_tag_dropout_rate"],
            prefix=value["caption_prefix"],
            suffix=value["caption_suffix"],
            secondary_separator=value["secondary_separator"],
        ),
    )


def resolve_subsets(cfg: ImageConfig) -> List[Subset]:
    """The run's folders in order: train_data_dir (if set), then ``datasets``."""
    subsets = []
    if cfg.train_data_dir:
        top = DatasetEntry(image_dir=cfg.train_data_dir, metadata_path=cfg.metadata_path)
        subsets.append(_subset("train_data_dir", top, cfg))
    subsets += [_subset(f"datasets[{i}]", entry, cfg) for i, entry in enumerate(cfg.datasets)]
    return subsets
