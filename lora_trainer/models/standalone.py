"""The standalone engine's model: ``base_model`` resolved (Hub references fetched on first use), its family
recognised, and the family's adapter opened over it."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from lora_trainer.hub.progress import DownloadCallback
from lora_trainer.models.adapter import DiffusionAdapter


def open_base_model(
    cfg,
    *,
    device: torch.device,
    dtype: torch.dtype,
    on_download: Optional[DownloadCallback] = None,
    log: Optional[Callable[[str], None]] = None,
) -> DiffusionAdapter:
    """The adapter over ``cfg.base_model``: its family's (``models/families``), SD1/SD2/SDXL when the path
    tells nothing (the SD loader then explains what is wrong with it)."""
    from lora_trainer.models.families import SD1, family_at
    from lora_trainer.models.hub_models import resolve_base_model

    path, hub_name = resolve_base_model(cfg.base_model, on_download=on_download, log=log)
    family = family_at(path) or SD1
    if not getattr(cfg, "network_weights", None):  # refused before gigabytes load, not after
        family.check_network_type(getattr(cfg, "network_type", "lora"), getattr(cfg, "conv_rank", None))
    return family.open_standalone(
        path,
        reference=cfg.base_model,
        cfg=cfg,
        device=device,
        dtype=dtype,
        prediction_type=cfg.prediction_type,
        model_name=hub_name,
        on_download=on_download,
        log=log,
    )
