"""Which Stable Diffusion family a checkpoint is, and the diffusers configs of its parts, read from its keys.

Everything is inferred from tensor names and shapes, so full-size and tiny test checkpoints take the same path.
What shapes cannot tell (attention heads, eps vs v prediction) follows each family's convention: SD1 has
8 heads per block, SD2/SDXL 64-channel heads; SD2 checkpoints are assumed v-prediction (the 768-v models)
unless a ``<checkpoint>.yaml`` beside the file or the ``prediction_type`` option says otherwise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from lora_trainer.errors import ModelLoadError

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    SD1: ("cond_stage_model.transformer.",),
    SD2: ("cond_stage_model.model.",),
    SDXL: ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
}
# What the WebUI shows and filters on (ss_base_model_version).
BASE_MODEL_VERSION = {SD1: "sd_v1", SD2: "sd_v2", SDXL: "sdxl_base_v1-0"}
VAE_SCALING = {SD1: 0.18215, SD2: 0.18215, SDXL: 0.13025}

Shapes = Dict[str, Tuple[int, ...]]


@dataclass
class TextEncoderSpec:
    prefix: str  # key prefix in the single file
    open_clip: bool  # open_clip layout (fused qkv) rather than HF CLIP
    config: dict  # transformers CLIPTextConfig kwargs
    with_projection: bool


@dataclass
class CheckpointSpec:
    arch: str
    unet_config: dict
    vae_config: dict
    text_encoders: List[TextEncoderSpec] = field(default_factory=list)
    prediction_type: str = "epsilon"


def detect_architecture(keys) -> str:
    keys = set(keys)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        raise ModelLoadError(
            "not a Stable Diffusion checkpoint: it has no model.diffusion_model.input_blocks "
            "keys (LoRA files, VAEs and embeddings cannot be trained on)."
        )
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        if not any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
            raise ModelLoadError(
                "this looks like the SDXL refiner, which has no CLIP-L text encoder; train on an "
                "SDXL base model instead."
            )
        return SDXL
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return SD2
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return SD1
    raise ModelLoadError(
        "unrecognised checkpoint: no SD1 (cond_stage_model.transformer), SD2 "
        "(cond_stage_model.model) or SDXL (conditioner.embedders) text-encoder keys."
    )


def _count(shapes: Shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes for m in [regex.match(k)] if m})


def infer_unet_config(arch: str, shapes: Shapes) -> dict:
    u = {k[len(UNET_PREFIX) :]: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    model_channels, in_channels = u["input_blocks.0.0.weight"][:2]
    downsamplers = sorted(int(m.group(1)) for k in u for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k)] if m)
    levels = len(downsamplers) + 1
    per_level = downsamplers[0] - 1 if downsamplers else _count(u, r"input_blocks\.(\d+)\.") - 1
    block_out, has_attention, depths = [], [], []
    for i in range(levels):
        first = 1 + i * (per_level + 1)
        block_out.append(u[f"input_blocks.{first}.0.in_layers.2.weight"][0])
        depth = _count(u, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\.")
        has_attention.append(depth > 0)
        depths.append(max(depth, 1))
    attn_key = next((k for k in u if k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ModelLoadError("the UNet has no cross-attention layers; this is not a text-to-image UNet.")
    context_dim = u[attn_key][1]
    proj_in = next(k for k in u if k.endswith(".proj_in.weight"))
    if arch == SD1:
        heads: object = 8
    else:
        heads = [max(1, c // 64) for c in block_out]
    config = {
        "sample_size": 128 if arch == SDXL else 64,
        "in_channels": in_channels,
        "out_channels": u["out.2.weight"][0],
        "layers_per_block": per_level,
        "block_out_channels": block_out,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": len(u[proj_in]) == 2,
        "transformer_layers_per_block": depths if arch == SDXL else 1,
        "norm_num_groups": 32,
    }
    if arch == SDXL:
        adm_in = u["label_emb.0.0.weight"][1]
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm_in)
    return config


def infer_vae_config(shapes: Shapes, arch: str) -> dict:
    v = {k[len(VAE_PREFIX) :]: s for k, s in shapes.items() if k.startswith(VAE_PREFIX)}
    if not v:
        raise ModelLoadError("the checkpoint has no VAE (first_stage_model.*) weights; use a full checkpoint.")
    levels = _count(v, r"encoder\.down\.(\d+)\.")
    layers = _count(v, r"encoder\.down\.0\.block\.(\d+)\.")
    block_out = [v[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    return {
        "in_channels": v["encoder.conv_in.weight"][1],
        "out_channels": v["decoder.conv_out.weight"][0],
        "latent_channels": v["quant_conv.weight"][0] // 2,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "scaling_factor": VAE_SCALING[arch],
        "sample_size": 1024 if arch == SDXL else 512,
    }


def _text_config(shapes: Shapes, prefix: str, open_clip: bool, drop_last_layer: bool) -> Tuple[dict, bool]:
    t = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    if open_clip:
        vocab, hidden = t["token_embedding.weight"]
        positions = t["positional_embedding"][0]
        layers = _count(t, r"transformer\.resblocks\.(\d+)\.")
        intermediate = t["transformer.resblocks.0.mlp.c_fc.weight"][0]
        projection = t["text_projection"][1] if "text_projection" in t else hidden
        act = "gelu"
    else:
        t = {(k if k.startswith("text_model.") else "text_model." + k): s for k, s in t.items()}
        vocab, hidden = t["text_model.embeddings.token_embedding.weight"]
        positions = t["text_model.embeddings.position_embedding.weight"][0]
        layers = _count(t, r"text_model\.encoder\.layers\.(\d+)\.")
        intermediate = t["text_model.encoder.layers.0.mlp.fc1.weight"][0]
        projection = t["text_projection.weight"][0] if "text_projection.weight" in t else hidden
        act = "quick_gelu"
    if drop_last_layer:  # SD2 uses the penultimate layer: diffusers' SD2 text encoder stops there
        layers -= 1
    config = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }
    return config, "text_projection" in t or "text_projection.weight" in t


def infer_spec(shapes: Shapes, prediction_type: Optional[str] = None) -> CheckpointSpec:
    arch = detect_architecture(shapes)
    encoders = []
    for index, prefix in enumerate(TEXT_PREFIXES[arch]):
        open_clip = prefix.endswith(".model.")
        config, has_projection = _text_config(shapes, prefix, open_clip, drop_last_layer=arch == SD2)
        encoders.append(
            TextEncoderSpec(prefix, open_clip, config, with_projection=arch == SDXL and index == 1 and has_projection)
        )
    unet_config = infer_unet_config(arch, shapes)
    if arch == SDXL:
        # label_emb takes the pooled text vector plus six sinusoidal embeddings of the size/crop conditions.
        pooled = encoders[1].config["projection_dim"]
        unet_config["addition_time_embed_dim"] = (unet_config["projection_class_embeddings_input_dim"] - pooled) // 6
    default_prediction = "v_prediction" if arch == SD2 else "epsilon"
    return CheckpointSpec(
        arch=arch,
        unet_config=unet_config,
        vae_config=infer_vae_config(shapes, arch),
        text_encoders=encoders,
        prediction_type=prediction_type or default_prediction,
    )
