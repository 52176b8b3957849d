"""Flux.1 [dev] and [schnell] (Krea and other fine-tunes keep [dev]'s layout): a flow-matching transformer in
Black Forest Labs' layout, CLIP-L (pooled) + T5-XXL (sequence) text encoders, a 16-channel autoencoder.

Two family objects share this class: [dev] is guidance-distilled (its file has ``guidance_in`` weights and
the model takes a guidance value), [schnell] is not. The LoRA file is sd-scripts' Flux format
(``lora_unet_double_blocks_*``, ``lora_unet_single_blocks_*``, ``lora_te1_*`` for CLIP-L) with its metadata
(``ss_base_model_version`` ``flux1``, ModelSpec ``flux-1-dev``/``flux-1-schnell`` with BFL's implementation
URL, which is how Forge classifies a Flux LoRA). The standalone engine's loading is ``models/flux``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection, Dict, Optional

from lora_trainer.models.families.base import IMPL_FLUX, FlowMatchingFamily

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.")  # a bare transformer file, or one inside a checkpoint
DOUBLE_BLOCK_KEY = "double_blocks.0.img_attn.qkv.weight"
GUIDANCE_KEY = "guidance_in.in_layer.weight"
LORA_CONTAINERS = ("DoubleStreamBlock", "SingleStreamBlock")  # sd-scripts' Flux targets: every Linear in them


def transformer_prefix(keys: Collection[str]) -> Optional[str]:
    """The prefix of the Flux transformer's weights in a file with these keys, or None if it has none."""
    return next((p for p in TRANSFORMER_PREFIXES if p + DOUBLE_BLOCK_KEY in keys), None)


class FluxFamily(FlowMatchingFamily):
    native_resolution = 1024
    activation_factor = 8.0
    text_lora_prefixes = ("lora_te1_",)  # CLIP-L; sd-scripts names T5-XXL's lora_te3_ (not trained here)
    prediction_types = ("flow",)
    supports_fp8_base = True
    lora_containers = LORA_CONTAINERS

    def __init__(self, variant: str):
        self.variant = variant  # "dev" or "schnell"
        self.guidance = variant == "dev"
        self.name = f"flux-{variant}"
        self.label = f"Flux.1 [{variant}]"

    # ------------------------------------------------------------ recognising the model

    def claims_checkpoint(self, keys: Collection[str]) -> bool:
        prefix = transformer_prefix(keys)
        return prefix is not None and ((prefix + GUIDANCE_KEY) in keys) == self.guidance

    def claims_diffusers_folder(self, index: Dict[str, Any], path: str) -> bool:
        if index.get("_class_name") != "FluxPipeline" or "transformer" not in index:
            return False
        with open(os.path.join(path, "transformer", "config.json"), encoding="utf-8") as fh:
            return bool(json.load(fh).get("guidance_embeds", False)) == self.guidance

    # ------------------------------------------------------------ standalone engine

    standalone_adapter = "lora_trainer.models.flux.adapter:FluxAdapter"  # imported on first use (``adapter_class``)

    def t5_max_length(self, cfg=None) -> int:
        """T5 tokens per caption: sd-scripts' default is 512 for [dev], 256 for [schnell]."""
        configured = getattr(cfg, "t5xxl_max_token_length", None)
        return int(configured) if configured else (512 if self.guidance else 256)

    # ------------------------------------------------------------ the LoRA file

    def base_model_version(self, prediction_type: str) -> str:
        return "flux1"  # sd-scripts' MODEL_VERSION_FLUX_V1, for [dev] and [schnell] alike

    def modelspec_architecture(self, prediction_type: str) -> str:
        return f"flux-1-{self.variant}"

    def modelspec_implementation(self) -> str:
        return IMPL_FLUX

    def modelspec_prediction_type(self, prediction_type: str) -> Optional[str]:
        return None  # sd-scripts writes none for Flux

    def extra_metadata(self, cfg, prediction_type: str) -> Dict[str, Any]:
        """The keys sd-scripts' flux_train_network adds (``update_metadata``) for the options we have."""
        return {
            "ss_model_type": "flux",
            "ss_guidance_scale": getattr(cfg, "guidance_scale", 1.0),
            "ss_timestep_sampling": getattr(cfg, "timestep_sampling", "sigmoid"),
            "ss_sigmoid_scale": getattr(cfg, "sigmoid_scale", 1.0),
            "ss_discrete_flow_shift": getattr(cfg, "discrete_flow_shift", 3.0),
            "ss_model_prediction_type": "raw",
            "ss_apply_t5_attn_mask": False,
            "ss_t5xxl_max_token_length": self.t5_max_length(cfg),
            "ss_fp8_base": bool(getattr(cfg, "fp8_base", False)),
        }


FLUX_DEV = FluxFamily("dev")
FLUX_SCHNELL = FluxFamily("schnell")
