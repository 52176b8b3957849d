"""The model families the engine knows, and how a model on disk or in a host is matched to one.

Registering a family is adding its object to ``FAMILIES``; the first that claims a checkpoint's keys or a
diffusers folder's ``model_index.json`` is its family (see ``base.ModelFamily``).
"""

from __future__ import annotations

import json
import os
from typing import Collection, List, Optional

from lora_trainer.models.families.base import ModelFamily
from lora_trainer.models.families.flux import FLUX_DEV, FLUX_SCHNELL
from lora_trainer.models.families.sd1 import SD1
from lora_trainer.models.families.sd2 import SD2
from lora_trainer.models.families.sdxl import SDXL
from lora_trainer.models.families.zimage import ZIMAGE

FAMILIES: List[ModelFamily] = [SD1, SD2, SDXL, FLUX_DEV, FLUX_SCHNELL, ZIMAGE]


def family_named(name: str) -> ModelFamily:
    """The family called ``name`` (``sd1``, ``sdxl``, ``flux``...); raises ValueError for an unknown one."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of_checkpoint(keys: Collection[str]) -> Optional[ModelFamily]:
    """The family whose single-file checkpoints have these tensor names, or None."""
    keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
    return next((f for f in FAMILIES if f.claims_checkpoint(keys)), None)


def family_of_folder(path: str) -> Optional[ModelFamily]:
    """The family of a diffusers folder (by its ``model_index.json``), or None if none claims it (the SD folder
    reader then says what the folder is and why it cannot be trained)."""
    try:
        with open(os.path.join(path, "model_index.json"), encoding="utf-8") as fh:
            index = json.load(fh)
    except (OSError, ValueError):
        return None
    return next((f for f in FAMILIES if f.claims_diffusers_folder(index, path)), None)


def family_at(path: str) -> Optional[ModelFamily]:
    """The family of the model at a local ``path``: a diffusers folder's, or a ``.safetensors`` file's by its
    tensor names (read from the header only). None when it cannot tell (other file types, unknown keys): the
    SD loader then reads the file and says what is wrong with it."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        return family_of_folder(path)
    if os.path.isfile(path) and path.lower().endswith(".safetensors"):
        from lora_trainer.io.safetensors_stream import SafetensorsStream

        try:
            keys = SafetensorsStream(path).keys()
        except (OSError, ValueError):
            return None
        return family_of_checkpoint(keys)
    return None


__all__ = [
    "FAMILIES",
    "ModelFamily",
    "family_at",
    "family_named",
    "family_of_checkpoint",
    "family_of_folder",
    "SD1",
    "SD2",
    "SDXL",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "ZIMAGE",
]
