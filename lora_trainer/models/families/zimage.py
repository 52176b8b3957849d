"""Z-Image (base and Turbo): Tongyi-MAI's single-stream flow-matching transformer (6 B parameters), conditioned
on the second-to-last hidden states of a Qwen3-4B text encoder, with Flux.1's 16-channel autoencoder.

Recognised as Forge Neo's ``huggingface_guess`` recognises it: a ``cap_embedder`` and refiner blocks with
query/key norms, in the original (ComfyUI/Forge) layout of ``z_image_turbo_bf16.safetensors`` (fused
``attention.qkv``) or in diffusers' layout; and a diffusers folder whose pipeline is ``ZImagePipeline``. Base
and Turbo share one architecture, so they are one family.

The LoRA file: ``diffusion_model.<diffusers module path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(e.g. ``diffusion_model.layers.0.attention.to_q``). Why this format: ComfyUI's and Forge Neo's loaders
(``comfy/lora.py``, ``model_lora_keys_unet``) map exactly these ``diffusion_model.`` + diffusers names onto the
fused ``qkv`` rows and the renamed ``out`` (their ``z_image_to_diffusers`` table); their kohya-style
``lora_unet_*`` names exist only for the original fused layout, which diffusers' Z-Image LoRA loader cannot read.
diffusers' ``ZImageLoraLoaderMixin`` strips ``diffusion_model.`` and folds ``alpha``. The module names are those
ai-toolkit's Z-Image LoRAs use. The standalone engine's loading is ``models/zimage.py``.
"""

from __future__ import annotations

import re
from typing import Any, Collection, Dict, Optional

from lora_trainer.models.families.base import FlowMatchingFamily

IMPL_ZIMAGE = "https://github.com/Tongyi-MAI/Z-Image"
PREFIXES = ("", "model.diffusion_model.")  # a bare transformer file, or one inside a checkpoint
CAP_EMBEDDER_KEY = "cap_embedder.1.weight"
# The refiner's key norm: ``k_norm`` in the original layout, ``norm_k`` in diffusers'.
REFINER_NORM_KEYS = ("noise_refiner.0.attention.k_norm.weight", "noise_refiner.0.attention.norm_k.weight")
# Z-Image's own pad tokens (Lumina 2, whose detection keys are otherwise the same, has none).
PAD_TOKEN_KEY = "x_pad_token"
LORA_CONTAINERS = ("ZImageTransformerBlock",)  # every Linear of every block (main layers and both refiners)
FILE_PREFIX = "diffusion_model."
INTERNAL_PREFIX = "lora_unet_"
# Our modules' names as ComfyUI/Forge Neo/diffusers read them: the leaf path inside a block.
_LEAVES = {
    "attention_to_q": "attention.to_q",
    "attention_to_k": "attention.to_k",
    "attention_to_v": "attention.to_v",
    "attention_to_out_0": "attention.to_out.0",
    "feed_forward_w1": "feed_forward.w1",
    "feed_forward_w2": "feed_forward.w2",
    "feed_forward_w3": "feed_forward.w3",
    "adaLN_modulation_0": "adaLN_modulation.0",
}
_INTERNAL = re.compile(r"^lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_(\w+)$")


def transformer_prefix(keys: Collection[str]) -> Optional[str]:
    """The prefix of the Z-Image transformer's weights in a file with these keys, or None if it has none."""
    for prefix in PREFIXES:
        if (
            prefix + CAP_EMBEDDER_KEY in keys
            and prefix + PAD_TOKEN_KEY in keys
            and any(prefix + k in keys for k in REFINER_NORM_KEYS)
        ):
            return prefix
    return None


def file_module_name(internal: str) -> str:
    """``lora_unet_layers_0_attention_to_q`` -> ``diffusion_model.layers.0.attention.to_q``; raises ValueError
    for a module this family never trains."""
    match = _INTERNAL.match(internal)
    if not match or match.group(3) not in _LEAVES:
        raise ValueError(f"{internal!r} is not a Z-Image LoRA module")
    block, index, leaf = match.groups()
    return f"{FILE_PREFIX}{block}.{index}.{_LEAVES[leaf]}"


def internal_module_name(file_name: str) -> str:
    """The inverse of ``file_module_name`` (any dotted path: ``.`` -> ``_`` under ``lora_unet_``)."""
    return INTERNAL_PREFIX + file_name[len(FILE_PREFIX) :].replace(".", "_")


class ZImageFamily(FlowMatchingFamily):
    name = "zimage"
    label = "Z-Image"
    native_resolution = 1024
    activation_factor = 8.0
    text_lora_prefixes = ()  # Qwen3 is not trained: no Z-Image loader applies LoRA to it
    prediction_types = ("flow",)
    supports_fp8_base = True
    lora_file_prefixes = (FILE_PREFIX,)
    lora_containers = LORA_CONTAINERS

    # ------------------------------------------------------------ recognising the model

    def claims_checkpoint(self, keys: Collection[str]) -> bool:
        return transformer_prefix(keys) is not None

    def claims_diffusers_folder(self, index: Dict[str, Any], path: str) -> bool:
        return index.get("_class_name") == "ZImagePipeline" and "transformer" in index

    # ------------------------------------------------------------ standalone engine

    standalone_adapter = "lora_trainer.models.zimage:ZImageAdapter"  # imported on first use (``adapter_class``)

    # ------------------------------------------------------------ the LoRA file

    def to_lora_file(self, tensors: Dict[str, Any]) -> Dict[str, Any]:
        """Our kohya-named tensors under the names ComfyUI, Forge Neo and diffusers load (module docstring)."""
        out = {}
        for key, value in tensors.items():
            module, _, suffix = key.partition(".")
            out[f"{file_module_name(module)}.{suffix}"] = value
        return out

    def from_lora_file(self, tensors: Dict[str, Any]) -> Dict[str, Any]:
        out = {}
        for key, value in tensors.items():
            for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
                if key.startswith(FILE_PREFIX) and key.endswith(suffix):
                    out[internal_module_name(key[: -len(suffix)]) + suffix] = value
                    break
            else:
                out[key] = value
        return out

    def base_model_version(self, prediction_type: str) -> str:
        return "zimage"  # SD.Next's LoRA version rule reads this prefix

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "z-image"

    def modelspec_implementation(self) -> str:
        return IMPL_ZIMAGE

    def modelspec_prediction_type(self, prediction_type: str) -> Optional[str]:
        return None  # flow matching: no epsilon/v

    def extra_metadata(self, cfg, prediction_type: str) -> Dict[str, Any]:
        return {
            "ss_model_type": "zimage",
            "ss_timestep_sampling": getattr(cfg, "timestep_sampling", "sigmoid"),
            "ss_sigmoid_scale": getattr(cfg, "sigmoid_scale", 1.0),
            "ss_discrete_flow_shift": getattr(cfg, "discrete_flow_shift", 3.0),
            "ss_model_prediction_type": "raw",
            "ss_fp8_base": bool(getattr(cfg, "fp8_base", False)),
        }


ZIMAGE = ZImageFamily()
