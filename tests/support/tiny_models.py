"""Tiny randomly initialised SD1-, SD2-v- and SDXL-shaped models, built in code for the tests.

Each family keeps its real structure (block layout, text-encoder kind, conditioning) at toy width, and can be
saved as a diffusers folder or as a single-file ldm/sgm checkpoint like the ones users download.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_trainer.models.ldm_names import UNetLayout, UNetNameMap, VaeNameMap, hf_clip_to_open_clip

VOCAB = 49408  # the real CLIP vocabulary: our offline tokenizer produces ids up to 49407


@dataclass
class TinyPipelineParts:
    arch: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: List[torch.nn.Module]
    prediction_type: str


def _text_encoder(hidden: int, layers: int, act: str, projection: Optional[int], seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or hidden,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        scaling_factor=0.18215,
        sample_size=64,
    ).eval()


def _perturb_zero_outputs(module: torch.nn.Module, seed: int) -> None:
    """diffusers zero-initialises some output layers; give every weight small noise so gradients flow and
    a LoRA's effect on the output is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def build_tiny(arch: str, seed: int = 0) -> TinyPipelineParts:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if arch == "sd1":
        te = [_text_encoder(64, 2, "quick_gelu", None, seed + 1)]
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64),
            # Attention only at the lower resolution keeps 512 px runs (the seed config's default) quick.
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        prediction = "epsilon"
    elif arch == "sd2":
        te = [_text_encoder(64, 2, "gelu", None, seed + 1)]
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=[1, 2],
            use_linear_projection=True,
            norm_num_groups=32,
        )
        prediction = "v_prediction"
    elif arch == "sdxl":
        te = [_text_encoder(64, 2, "quick_gelu", None, seed + 1), _text_encoder(64, 2, "gelu", 32, seed + 2)]
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=[1, 1, 1],
            transformer_layers_per_block=[1, 1, 2],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
            norm_num_groups=32,
        )
        prediction = "epsilon"
    else:
        raise ValueError(arch)
    _perturb_zero_outputs(unet, seed + 3)
    return TinyPipelineParts(arch, unet.eval(), _vae(seed + 4), te, prediction)


def save_diffusers_folder(parts: TinyPipelineParts, folder: str) -> str:
    """A diffusers pipeline folder (model_index.json, each component, a scheduler config; no tokenizer:
    the trainer builds it offline)."""
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    os.makedirs(folder, exist_ok=True)
    parts.unet.save_pretrained(os.path.join(folder, "unet"))
    parts.vae.save_pretrained(os.path.join(folder, "vae"))
    index = {
        "_class_name": "StableDiffusionXLPipeline" if parts.arch == "sdxl" else "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    names = ["text_encoder", "text_encoder_2"][: len(parts.text_encoders)]
    for i, (name, te) in enumerate(zip(names, parts.text_encoders)):
        te.save_pretrained(os.path.join(folder, name))
        tok = load_clip_tokenizer(None, "!" if (parts.arch == "sd2" or i == 1) else None)
        tok.save_pretrained(os.path.join(folder, name.replace("text_encoder", "tokenizer")))
        index[name] = ["transformers", type(te).__name__]
        index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as fh:
        json.dump(
            {
                "_class_name": "DDPMScheduler",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "prediction_type": parts.prediction_type,
            },
            fh,
        )
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump(index, fh)
    return folder


def canonical_text_state(te: torch.nn.Module) -> dict:
    """A CLIP text encoder's weights with transformers-4 names (``text_model.`` level), as files store them."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
        for k, v in te.state_dict().items()
        if "position_ids" not in k
    }


def _open_clip_state(te: torch.nn.Module, extra_layer: bool) -> dict:
    sd = canonical_text_state(te)
    out = {}
    layers = te.config.num_hidden_layers
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(p + f"{n}.{kind}") for n in ("q_proj", "k_proj", "v_proj")]
            )
    for k, v in sd.items():
        name = hf_clip_to_open_clip(k)
        assert name is not None, k
        out[name] = v.t().contiguous() if name == "text_projection" else v
    if "text_projection" not in out:  # SD2's encoder has a projection in the file even though SD never uses it
        out["text_projection"] = torch.randn(te.config.hidden_size, te.config.hidden_size) * 0.02
    if extra_layer:  # SD2 files hold one more layer than the penultimate-layer encoder uses
        last = layers - 1
        for k in [k for k in out if k.startswith(f"transformer.resblocks.{last}.")]:
            out[k.replace(f"resblocks.{last}.", f"resblocks.{layers}.")] = out[k] + 0.5
    return out


def to_single_file_state(parts: TinyPipelineParts) -> dict:
    """The parts as one ldm/sgm-format state dict (what a downloaded .safetensors holds)."""
    state = {}
    names = UNetNameMap(UNetLayout.from_config(parts.unet.config))
    for k, v in parts.unet.state_dict().items():
        state["model.diffusion_model." + names.to_ldm(k)] = v
    vae_names = VaeNameMap(len(parts.vae.config.block_out_channels), parts.vae.config.layers_per_block)
    for k, v in parts.vae.state_dict().items():
        name = vae_names.to_ldm(k)
        if ".mid.attn_1." in name and v.ndim == 2:
            v = v[:, :, None, None]
        state["first_stage_model." + name] = v
    if parts.arch == "sd1":
        for k, v in canonical_text_state(parts.text_encoders[0]).items():
            state["cond_stage_model.transformer." + k] = v
    elif parts.arch == "sd2":
        for k, v in _open_clip_state(parts.text_encoders[0], extra_layer=True).items():
            state["cond_stage_model.model." + k] = v
    else:
        for k, v in canonical_text_state(parts.text_encoders[0]).items():
            state["conditioner.embedders.0.transformer." + k] = v
        for k, v in _open_clip_state(parts.text_encoders[1], extra_layer=False).items():
            state["conditioner.embedders.1.model." + k] = v
    return {k: v.contiguous() for k, v in state.items()}


def save_single_file(parts: TinyPipelineParts, path: str, with_yaml: bool = False) -> str:
    save_file(to_single_file_state(parts), path)
    if with_yaml:
        parameterization = "v" if parts.prediction_type == "v_prediction" else "eps"
        with open(os.path.splitext(path)[0] + ".yaml", "w") as fh:
            fh.write(f'model:\n  params:\n    parameterization: "{parameterization}"\n')
    return path


def make_image_folder(
    folder: str,
    count: int = 4,
    size=(64, 64),
    captions: Optional[List[str]] = None,
    seed: int = 0,
    metadata: bool = True,
) -> List[str]:
    """Generated images with distinct colour patterns, and a metadata.csv (or none)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        w, h = size if isinstance(size, tuple) else size[i]
        base = rng.integers(0, 255, size=3)
        pixels = (base[None, None, :] + rng.integers(0, 60, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
        name = f"{i:03d}.png"
        Image.fromarray(pixels).save(os.path.join(folder, name))
        names.append(name)
    if metadata:
        captions = captions or [f"a picture number {i}, style test" for i in range(count)]
        with open(os.path.join(folder, "metadata.csv"), "w", encoding="utf-8") as fh:
            fh.write("filename,prompt\n")
            for name, caption in zip(names, captions):
                fh.write(f"{name},{caption}\n")
    return names
