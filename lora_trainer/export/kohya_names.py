"""Kohya LoRA key names, exactly as sd-scripts writes them.

SD1/SD2 UNet: diffusers module paths (``lora_unet_down_blocks_0_attentions_0_...``). SDXL UNet: sgm block
paths (``lora_unet_input_blocks_4_1_...``). Text encoders: transformers' CLIP paths with the ``text_model``
level, under the family's prefix (``lora_te_`` for SD1/SD2, ``lora_te1_``/``lora_te2_`` for SDXL). Which rule
applies is the model family's (``models/families``); these helpers keep the call sites short.
"""

from __future__ import annotations

from lora_trainer.models.families.base import ModelFamily
from lora_trainer.models.ldm_names import UNetNameMap


def unet_lora_name(diffusers_path: str, family, names: UNetNameMap) -> str:
    """The kohya name of a UNet module given its diffusers path."""
    return family.unet_lora_name(diffusers_path, names)


def unet_lora_name_from_ldm(ldm_path: str, family, names: UNetNameMap) -> str:
    """The kohya name of a UNet module given its ldm/sgm path (the WebUI's live model)."""
    return family.unet_lora_name_from_ldm(ldm_path, names)


def text_encoder_prefix(family: ModelFamily, index: int) -> str:
    return family.text_lora_prefix(index)


def text_lora_name(hf_path: str, family: ModelFamily, index: int) -> str:
    """The kohya name of a CLIP text-encoder module given its transformers path (4.x or 5.x layout)."""
    if not hf_path.startswith(("text_model.", "text_projection")):
        hf_path = "text_model." + hf_path
    return text_encoder_prefix(family, index) + hf_path.replace(".", "_")
