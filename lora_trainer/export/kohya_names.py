"""Kohya LoRA key names, exactly as sd-scripts writes them.

SD1/SD2 UNet: diffusers module paths (``lora_unet_down_blocks_0_attentions_0_...``). SDXL UNet: sgm block
paths (``lora_unet_input_blocks_4_1_...``). Text encoders: transformers' CLIP paths with the ``text_model``
level, under ``lora_te_`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL).
"""

from __future__ import annotations

from lora_trainer.models.architecture import SDXL
from lora_trainer.models.ldm_names import UNetNameMap


def _flat(path: str) -> str:
    return path.replace(".", "_")


def unet_lora_name(diffusers_path: str, arch: str, names: UNetNameMap) -> str:
    """The kohya name of a UNet module given its diffusers path."""
    if arch == SDXL:
        ldm = names.to_ldm(diffusers_path)
        if ldm is None:
            raise ValueError(f"no sgm name for UNet module {diffusers_path}")
        return "lora_unet_" + _flat(ldm)
    return "lora_unet_" + _flat(diffusers_path)


def unet_lora_name_from_ldm(ldm_path: str, arch: str, names: UNetNameMap) -> str:
    """The kohya name of a UNet module given its ldm/sgm path (the WebUI's live model)."""
    if arch == SDXL:
        return "lora_unet_" + _flat(ldm_path)
    diffusers = names.to_diffusers(ldm_path)
    if diffusers is None:
        raise ValueError(f"no diffusers name for UNet module {ldm_path}")
    return "lora_unet_" + _flat(diffusers)


def text_encoder_prefix(arch: str, index: int) -> str:
    return f"lora_te{index + 1}_" if arch == SDXL else "lora_te_"


def text_lora_name(hf_path: str, arch: str, index: int) -> str:
    """The kohya name of a CLIP text-encoder module given its transformers path (4.x or 5.x layout)."""
    if not hf_path.startswith(("text_model.", "text_projection")):
        hf_path = "text_model." + hf_path
    return text_encoder_prefix(arch, index) + _flat(hf_path)
