"""A diffusers pipeline folder read the way diffusers' own loaders read it, or refused naming what is missing.

What ``DiffusionPipeline.from_pretrained`` accepts, this accepts: weights as ``.safetensors`` or ``.bin``,
sharded or not, or only as a variant (``diffusion_pytorch_model.fp16.safetensors``, which diffusers loads with
``variant="fp16"``); configs that omit optional keys take the defaults the diffusers or transformers class
declares; the noise schedule is built by the scheduler class the folder names, from its config, so every beta
schedule, ``trained_betas`` and zero-terminal-SNR rescaling come out as diffusers computes them.
Folders that are not SD1/SD2/SDXL text-to-image pipelines (an SDXL refiner, an inpainting UNet, SD3/Flux) are
refused with the reason.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.io.text_files import read_text
from lora_trainer.models.families import SD1, SD2, SDXL
from lora_trainer.models.families.unet_family import UNetFamily

WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
# <stem>.<variant>.safetensors, <stem>.<variant>-00001-of-00002.safetensors, <stem>.safetensors.index.<variant>.json
_VARIANT_FILE = re.compile(
    r"^(?:%s)(?:\.(?P<a>\w+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)|\.(?:safetensors|bin)\.index\.(?P<b>\w+)\.json)$"
    % "|".join(WEIGHT_STEMS)
)
LATENT_CHANNELS = 4


@dataclass
class PipelineFolder:
    path: str
    family: UNetFamily
    text_encoders: List[str]  # component names, in the order the conditioning concatenates them
    unet_config: dict  # with diffusers' defaults for the keys the file omits
    alphas_cumprod: torch.Tensor
    prediction_type: str
    vae_scaling_factor: float

    @property
    def zero_terminal_snr(self) -> bool:
        """The schedule ends at zero SNR (a ``rescale_betas_zero_snr`` scheduler)."""
        return float(self.alphas_cumprod[-1]) == 0.0

    @property
    def arch(self) -> str:
        return self.family.name

    def component(self, name: str) -> str:
        return os.path.join(self.path, name)

    def variant(self, name: str) -> Optional[str]:
        return weights_variant(self.component(name))


def read_json(path: str) -> dict:
    """A JSON object from a UTF-8 file; ``ModelLoadError`` naming the file otherwise."""
    try:
        value = json.loads(read_text(path, ModelLoadError))
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); the model folder is damaged.") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} must hold a JSON object; the model folder is damaged.")
    return value


def with_class_defaults(cls: type, config: dict) -> dict:
    """``config`` completed with the defaults ``cls.__init__`` declares, as instantiating ``cls`` applies them."""
    parameters = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **config}


def weights_variant(folder: str) -> Optional[str]:
    """The variant (``fp16``...) a component's weights exist only as, None when plain weights exist."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    plain = {f"{stem}.{ext}" for stem in WEIGHT_STEMS for ext in ("safetensors", "bin")}
    plain |= {f"{name}.index.json" for name in plain}
    if plain & set(names):
        return None
    for name in names:
        variant = weight_file_variant(name)
        if variant:
            return variant
    return None


def weight_file_variant(name: str) -> Optional[str]:
    """The variant in a weight file's name (``model.fp16.safetensors`` -> "fp16"), None for plain weights."""
    match = _VARIANT_FILE.match(name)
    return (match.group("a") or match.group("b")) if match else None


def _component_entry(index: dict, name: str) -> Optional[list]:
    entry = index.get(name)
    return entry if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None else None


def _require_component(path: str, index: dict, name: str, what: str) -> None:
    if _component_entry(index, name) is None:
        pipeline = index.get("_class_name", "this pipeline")
        raise ModelLoadError(
            f"base_model {path}: model_index.json lists no {name} ({what}), so {pipeline} is not an "
            "SD1/SD2/SDXL text-to-image pipeline this trainer can train (an SDXL refiner has no text_encoder; "
            "SD3 and Flux have a transformer instead of a unet)."
        )
    if not os.path.isdir(os.path.join(path, name)):
        raise ModelLoadError(f"base_model {path}: the {name}/ folder ({what}) is missing; the download is incomplete.")


def check_text_to_image_unet(in_channels: int, source: str) -> None:
    """Refuse UNets that take more than the noisy latents (inpainting 9, instruct-pix2pix 8, depth 5)."""
    if in_channels != LATENT_CHANNELS:
        raise ModelLoadError(
            f"{source}: the UNet takes {in_channels} input channels, not {LATENT_CHANNELS}: an inpainting, "
            "depth or instruct-pix2pix model. Only text-to-image models train here; use the base model they "
            "were made from."
        )


def _noise_schedule(path: str, index: dict):
    """(alphas_cumprod, prediction_type) from the scheduler the folder names, built by diffusers."""
    import diffusers

    config = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    entry = _component_entry(index, "scheduler")
    name = (entry[1] if entry else None) or config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ModelLoadError(f"base_model {path}: unknown scheduler class {name!r} in model_index.json.")
    try:
        scheduler = cls.from_config(config)
    except Exception as exc:  # a config its own class rejects (an unsupported beta_schedule...)
        raise ModelLoadError(f"base_model {path}: diffusers cannot build its {name} from the config: {exc}") from None
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ModelLoadError(
            f"base_model {path}: its {name} has no DDPM noise schedule (a flow-matching model); only SD1/SD2/SDXL "
            "train here."
        )
    return torch.as_tensor(alphas).float(), str(getattr(scheduler.config, "prediction_type", "epsilon"))


def read_pipeline_folder(path: str) -> PipelineFolder:
    """Check a diffusers SD1/SD2/SDXL folder and read its configs (no weights); see the module docstring."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    index = read_json(os.path.join(path, "model_index.json"))
    sdxl = _component_entry(index, "text_encoder_2") is not None
    for name, what in (
        ("unet", "the denoiser"),
        ("vae", "the image autoencoder"),
        ("text_encoder", "the CLIP text encoder"),
        ("scheduler", "the noise schedule"),
    ):
        _require_component(path, index, name, what)
    if sdxl:
        _require_component(path, index, "text_encoder_2", "SDXL's second text encoder")
    for name in ("unet", "vae", "scheduler"):
        config_name = "scheduler_config.json" if name == "scheduler" else "config.json"
        if not os.path.isfile(os.path.join(path, name, config_name)):
            raise ModelLoadError(f"base_model {path}: {name}/{config_name} is missing; the download is incomplete.")
    unet_config = with_class_defaults(UNet2DConditionModel, read_json(os.path.join(path, "unet", "config.json")))
    check_text_to_image_unet(int(unet_config["in_channels"]), f"base_model {path}")
    family = SDXL if sdxl else SD2 if unet_config["cross_attention_dim"] == 1024 else SD1
    vae_config = with_class_defaults(AutoencoderKL, read_json(os.path.join(path, "vae", "config.json")))
    alphas, prediction_type = _noise_schedule(path, index)
    return PipelineFolder(
        path=path,
        family=family,
        text_encoders=["text_encoder", "text_encoder_2"] if sdxl else ["text_encoder"],
        unet_config=unet_config,
        alphas_cumprod=alphas,
        prediction_type=prediction_type,
        vae_scaling_factor=float(vae_config["scaling_factor"]),
    )


def load_component(folder: PipelineFolder, name: str, cls: type, **kwargs) -> torch.nn.Module:
    """``cls.from_pretrained`` of one component (in the variant it exists as), errors naming the component."""
    try:
        return cls.from_pretrained(folder.path, subfolder=name, variant=folder.variant(name), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"base_model {folder.path}: cannot load {name}/ ({type(exc).__name__}: {exc})") from None
