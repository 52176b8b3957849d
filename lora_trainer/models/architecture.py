"""The diffusers configs of an ldm/sgm checkpoint's parts (SD1, SD2, SDXL), read from its keys and shapes.

Everything is inferred from tensor names and shapes, so full-size and tiny test checkpoints take the same path.
Which family a file is and what shapes cannot tell (attention heads, eps vs v prediction, the VAE's scale)
come from the family object (``models/families``): SD1 has 8 heads per block, SD2/SDXL 64-channel heads; SD2
checkpoints are assumed v-prediction (the 768-v models) unless a ``<checkpoint>.yaml`` beside the file or the
``prediction_type`` option says otherwise; SDXL descendants say v / zero-terminal SNR with marker tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.families.unet_family import UNET_PREFIX, VAE_PREFIX, UNetFamily

Shapes = Dict[str, Tuple[int, ...]]


@dataclass
class TextEncoderSpec:
    prefix: str  # key prefix in the single file
    open_clip: bool  # open_clip layout (fused qkv) rather than HF CLIP
    config: dict  # transformers CLIPTextConfig kwargs
    with_projection: bool


@dataclass
class CheckpointSpec:
    family: UNetFamily
    unet_config: dict
    vae_config: dict
    text_encoders: List[TextEncoderSpec] = field(default_factory=list)
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False

    @property
    def arch(self) -> str:
        return self.family.name


def detect_family(keys) -> UNetFamily:
    """The UNet family of a single-file checkpoint; raises ModelLoadError naming what the file lacks."""
    from lora_trainer.models.families import family_of_checkpoint

    keys = set(keys)
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        raise ModelLoadError(
            "not a Stable Diffusion checkpoint: it has no model.diffusion_model.input_blocks "
            "keys (LoRA files, VAEs and embeddings cannot be trained on)."
        )
    family = family_of_checkpoint(keys)
    if not isinstance(family, UNetFamily):
        raise ModelLoadError(
            "unrecognised checkpoint: no SD1 (cond_stage_model.transformer), SD2 "
            "(cond_stage_model.model) or SDXL (conditioner.embedders) text-encoder keys."
        )
    for prefix, _ in family.checkpoint_text_encoders:
        if not any(k.startswith(prefix) for k in keys):
            raise ModelLoadError(
                "this looks like the SDXL refiner, which has no CLIP-L text encoder; train on an "
                "SDXL base model instead."
            )
    return family


def detect_architecture(keys) -> str:
    """The family name (``sd1``, ``sd2``, ``sdxl``) of a single-file checkpoint; see ``detect_family``."""
    return detect_family(keys).name


def _count(shapes: Shapes, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in shapes for m in [regex.match(k)] if m})


def infer_unet_config(family: UNetFamily, shapes: Shapes) -> dict:
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
    config = {
        "sample_size": family.unet_sample_size,
        "in_channels": in_channels,
        "out_channels": u["out.2.weight"][0],
        "layers_per_block": per_level,
        "block_out_channels": block_out,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)],
        "cross_attention_dim": context_dim,
        "attention_head_dim": family.attention_heads(block_out),
        "use_linear_projection": len(u[proj_in]) == 2,
        "transformer_layers_per_block": depths if family.size_conditioning else 1,
        "norm_num_groups": 32,
    }
    if family.size_conditioning:
        adm_in = u["label_emb.0.0.weight"][1]
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=adm_in)
    return config


def infer_vae_config(shapes: Shapes, family: UNetFamily) -> dict:
    if not any(k.startswith(VAE_PREFIX) for k in shapes):
        raise ModelLoadError("the checkpoint has no VAE (first_stage_model.*) weights; use a full checkpoint.")
    return ldm_vae_config(
        shapes,
        VAE_PREFIX,
        scaling_factor=family.vae_scaling_factor,
        sample_size=family.native_resolution if family.size_conditioning else 512,
    )


def ldm_vae_config(
    shapes: Shapes, prefix: str, *, scaling_factor: float, shift_factor: Optional[float] = None, sample_size: int = 512
) -> dict:
    """diffusers ``AutoencoderKL`` kwargs of an ldm-layout VAE under ``prefix`` (SD's, or Flux's ``ae`` without
    quant convolutions)."""
    v = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    levels = _count(v, r"encoder\.down\.(\d+)\.")
    layers = _count(v, r"encoder\.down\.0\.block\.(\d+)\.")
    block_out = [v[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)]
    quant = "quant_conv.weight" in v
    config = {
        "in_channels": v["encoder.conv_in.weight"][1],
        "out_channels": v["decoder.conv_out.weight"][0],
        # The encoder outputs mean and log-variance: twice the latent channels.
        "latent_channels": v["encoder.conv_out.weight"][0] // 2,
        "block_out_channels": block_out,
        "layers_per_block": layers,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "scaling_factor": scaling_factor,
        "sample_size": sample_size,
    }
    if not quant:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    if shift_factor is not None:
        config["shift_factor"] = shift_factor
    return config


def text_encoder_config(shapes: Shapes, prefix: str, open_clip: bool, drop_last_layer: bool) -> Tuple[dict, bool]:
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
    family = detect_family(shapes)
    encoders = []
    last = len(family.checkpoint_text_encoders) - 1
    for index, (prefix, open_clip) in enumerate(family.checkpoint_text_encoders):
        config, has_projection = text_encoder_config(
            shapes, prefix, open_clip, drop_last_layer=family.text_uses_penultimate_layer
        )
        # The pooled, projected embedding SDXL conditions on comes from its last (OpenCLIP-G) encoder.
        pooled = family.size_conditioning and index == last and has_projection
        encoders.append(TextEncoderSpec(prefix, open_clip, config, with_projection=pooled))
    unet_config = infer_unet_config(family, shapes)
    if family.size_conditioning:
        # label_emb takes the pooled text vector plus six sinusoidal embeddings of the size/crop conditions.
        pooled = encoders[-1].config["projection_dim"]
        unet_config["addition_time_embed_dim"] = (unet_config["projection_class_embeddings_input_dim"] - pooled) // 6
    return CheckpointSpec(
        family=family,
        unet_config=unet_config,
        vae_config=infer_vae_config(shapes, family),
        text_encoders=encoders,
        prediction_type=prediction_type or family.default_prediction_type(shapes),
        zero_terminal_snr=family.zero_terminal_snr(shapes),
    )
