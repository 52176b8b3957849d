"""The ``ss_*`` metadata sd-scripts writes and the WebUI shows (all values are strings)."""

from __future__ import annotations

import json
import time
from typing import Dict, Mapping, Optional

from lora_trainer.config import ImageConfig, resolved_output_name
from lora_trainer.models.architecture import BASE_MODEL_VERSION, SD2


def lora_metadata(
    cfg: ImageConfig,
    *,
    arch: str,
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
    network: Optional[Mapping[str, str]] = None,
) -> Dict[str, str]:
    """``dataset`` carries the JSON-encoded ss_tag_frequency, ss_bucket_info and ss_dataset_dirs and
    ss_num_train_images from the dataset summary; ``network`` the type's ``ss_network_module`` (and
    ``ss_network_args``) from ``NetworkSpec.metadata()``, sd-scripts' plain LoRA when None."""
    unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    meta = {
        "ss_output_name": resolved_output_name(cfg),
        "ss_network_module": "networks.lora",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_network_dropout": cfg.lora_dropout or 0.0,
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_v2": arch == SD2,
        "ss_v_parameterization": prediction_type == "v_prediction",
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
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_enable_bucket": cfg.enable_bucket,
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
    meta.update(network or {})
    meta.update(dataset)
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in meta.items()}
