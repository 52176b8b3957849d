"""Stable Diffusion 2.x: ldm UNet with linear projections, one open_clip ViT-H text encoder used up to its
penultimate layer (``cond_stage_model.model``). The 768-v models predict v, the 512 base model eps; a single
file does not say which, so v is assumed unless a ``.yaml`` beside it or ``prediction_type`` says otherwise."""

from __future__ import annotations

from typing import Collection

from lora_trainer.models.families.unet_family import UNetFamily


class SD2Family(UNetFamily):
    name = "sd2"
    label = "SD2.x"
    native_resolution = 768
    activation_factor = 1.2
    checkpoint_text_encoders = (("cond_stage_model.model.", True),)
    text_uses_penultimate_layer = True

    def _claims_unet_folder(self, index, unet_config) -> bool:
        return "text_encoder_2" not in index and unet_config.get("cross_attention_dim") == 1024

    def default_prediction_type(self, keys: Collection[str] = ()) -> str:
        return "v_prediction"

    def is_v2(self) -> bool:
        return True

    def base_model_version(self, prediction_type: str) -> str:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"

    def resolution_of(self, prediction_type: str) -> int:
        return 768 if prediction_type == "v_prediction" else 512


SD2 = SD2Family()
