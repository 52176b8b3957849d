"""Stable Diffusion 1.x: ldm UNet, one HF CLIP-L text encoder (``cond_stage_model.transformer``), eps or v."""

from __future__ import annotations

from typing import Any, List

from lora_trainer.models.families.unet_family import UNetFamily


class SD1Family(UNetFamily):
    name = "sd1"
    label = "SD1.x"
    native_resolution = 512
    activation_factor = 1.0
    checkpoint_text_encoders = (("cond_stage_model.transformer.", False),)

    def _claims_unet_folder(self, index, unet_config) -> bool:
        return "text_encoder_2" not in index and unet_config.get("cross_attention_dim") != 1024

    def attention_heads(self, block_out_channels: List[int]) -> Any:
        return 8  # SD1 has 8 heads in every block, whatever the width

    def base_model_version(self, prediction_type: str) -> str:
        # sd-scripts' get_model_version_str_for_sd1_sd2: sd_v1, with _v for a v-prediction model.
        return "sd_v1_v" if prediction_type == "v_prediction" else "sd_v1"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v1"


SD1 = SD1Family()
