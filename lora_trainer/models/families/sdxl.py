"""SDXL: sgm UNet with size/crop conditioning, CLIP-L + OpenCLIP-G text encoders (``conditioner.embedders``).

Its descendants keep the layout and change the objective: v-prediction and zero-terminal-SNR checkpoints mark
themselves with empty ``v_pred`` / ``ztsnr`` tensors in the file, which is how Forge Neo (and ComfyUI) tell
them apart; we read the same keys and train with the matching target and noise schedule.
"""

from __future__ import annotations

from typing import Collection

from lora_trainer.models.families.base import IMPL_STABILITY_AI
from lora_trainer.models.families.unet_family import UNET_PREFIX, UNetFamily


class SDXLFamily(UNetFamily):
    name = "sdxl"
    label = "SDXL"
    native_resolution = 1024
    activation_factor = 1.6
    checkpoint_text_encoders = (
        ("conditioner.embedders.0.transformer.", False),
        ("conditioner.embedders.1.model.", True),
    )
    text_lora_prefixes = ("lora_te1_", "lora_te2_")
    vae_scaling_factor = 0.13025
    unet_sample_size = 128
    size_conditioning = True
    kohya_sgm_unet_names = True
    pipeline_class = "StableDiffusionXLPipeline"

    def _claims_unet_folder(self, index, unet_config) -> bool:
        return "text_encoder_2" in index

    def claims_checkpoint(self, keys: Collection[str]) -> bool:
        # The refiner has only the OpenCLIP-G embedder: claimed here and refused with a message when read.
        keys = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
        return UNET_PREFIX + "input_blocks.0.0.weight" in keys and any(
            k.startswith("conditioner.embedders.") for k in keys
        )

    def base_model_version(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"  # sd-scripts writes this for every SDXL model, v-prediction ones included

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base"

    def modelspec_implementation(self) -> str:
        return IMPL_STABILITY_AI


SDXL = SDXLFamily()
