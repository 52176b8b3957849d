"""The ``ss_*`` and ``modelspec.*`` metadata sd-scripts writes and the hosts read (all values are strings).

Hosts classify a LoRA by it: AUTOMATIC1111 by ``ss_base_model_version`` (``sdxl_*``) and ``ss_v2``, Forge by
``modelspec.architecture``/``modelspec.implementation`` first, SD.Next by ``ss_base_model_version`` then
``modelspec.architecture``. Every family-specific value comes from the model family (``models/families``).
ModelSpec keys follow sd-scripts' ``library/sai_model_spec.py`` (ModelSpec 1.0.1).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from typing import Any, Dict, Mapping, Optional

from lora_trainer.config import ImageConfig, resolved_output_name

MODELSPEC_VERSION = "1.0.1"
_HASH_BLOCK = 1024 * 1024


def legacy_model_hash(path: str) -> str:
    """The WebUI's old 8-hex model hash (sd-scripts' ``model_hash``): SHA-256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        return hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]


def file_sha256(path: str) -> str:
    """SHA-256 of the whole file (the WebUI's "new" model hash, sd-scripts' ``calculate_sha256``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_hashes(path: Optional[str]) -> Dict[str, str]:
    """``ss_sd_model_hash`` and ``ss_new_sd_model_hash`` of a single-file base model; none for a folder or Hub
    id (sd-scripts would write a placeholder there, which no host can use)."""
    if not path or not os.path.isfile(path):
        return {}
    return {"ss_sd_model_hash": legacy_model_hash(path), "ss_new_sd_model_hash": file_sha256(path)}


def modelspec_metadata(
    family, prediction_type: str, *, title: str, resolution: int, clip_skip: Optional[int], timestamp: float
) -> Dict[str, str]:
    """The ``modelspec.*`` keys of a LoRA as sd-scripts' ``build_metadata`` writes them."""
    meta = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{family.modelspec_architecture(prediction_type)}/lora",
        "modelspec.implementation": family.modelspec_implementation(),
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
    }
    predicts = family.modelspec_prediction_type(prediction_type)
    if predicts is not None:
        meta["modelspec.prediction_type"] = predicts
    if clip_skip is not None:
        meta["modelspec.encoder_layer"] = str(clip_skip)
    return meta


def lora_metadata(
    cfg: ImageConfig,
    *,
    family,
    model_name: str,
    prediction_type: str,
    rank: int,
    alpha: float,
    dataset: Dict[str, str],
    started_at: float,
    step: int,
    epoch: int,
    num_epochs: int,
    max_steps: int,
    zero_terminal_snr: bool = False,
    batches_per_epoch: Optional[int] = None,
    num_processes: int = 1,
    session_id: Optional[int] = None,
    model_hashes: Optional[Dict[str, str]] = None,
    network: Optional[Mapping[str, str]] = None,
) -> Dict[str, str]:
    """``dataset`` carries the JSON-encoded ss_tag_frequency, ss_bucket_info and ss_dataset_dirs and
    ss_num_train_images from the dataset summary; ``model_hashes`` the base model's (``base_model_hashes``);
    ``network`` the type's ``ss_network_module`` (and ``ss_network_args``) from ``NetworkSpec.metadata()``,
    sd-scripts' plain LoRA when None."""
    unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    meta: Dict[str, Any] = {
        "ss_output_name": resolved_output_name(cfg),
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_network_dropout": cfg.lora_dropout or 0.0,
        "ss_base_model_version": family.base_model_version(prediction_type),
        "ss_v2": family.is_v2(),
        "ss_v_parameterization": prediction_type == "v_prediction",
        "ss_zero_terminal_snr": zero_terminal_snr,
        "ss_sd_model_name": model_name,
        "ss_clip_skip": cfg.clip_skip,
        # sd-scripts writes None for its default of one 75-token window, and 150 or 225 when set.
        "ss_max_token_length": None if cfg.max_token_length == 75 else cfg.max_token_length,
        "ss_learning_rate": cfg.learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": te_lr if cfg.train_text_encoder else 0.0,
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "ss_training_started_at": int(started_at),
        "ss_training_finished_at": int(time.time()),
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_num_epochs": num_epochs,
        "ss_max_train_steps": max_steps,
        "ss_batch_size_per_device": cfg.batch_size,
        "ss_total_batch_size": cfg.batch_size * num_processes * cfg.gradient_accumulation_steps,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": cfg.enable_bucket,
        "ss_min_bucket_reso": cfg.min_bucket_reso,
        "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_flip_aug": cfg.random_flip,
        "ss_cache_latents": cfg.cache_latents and not cfg.random_flip,
        "ss_optimizer": cfg.optimizer,
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": cfg.seed,
        "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_keep_tokens": cfg.keep_tokens,
        "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_max_grad_norm": cfg.max_grad_norm,
    }
    if batches_per_epoch is not None:
        meta["ss_num_batches_per_epoch"] = batches_per_epoch
    if session_id is not None:
        meta["ss_session_id"] = session_id
    meta.update(family.extra_metadata(cfg, prediction_type))
    meta.update(model_hashes or {})
    meta.update(network or {})
    meta.update(dataset)
    meta = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in meta.items()}
    meta.update(
        modelspec_metadata(
            family,
            prediction_type,
            title=resolved_output_name(cfg),
            resolution=cfg.resolution,
            clip_skip=cfg.clip_skip if cfg.clip_skip > 1 else None,
            timestamp=time.time(),
        )
    )
    return meta
