"""A tiny randomly initialised Flux.1, built with diffusers' and transformers' own classes and saved the way users
have Flux: the transformer in Black Forest Labs' layout in ``models/Stable-diffusion/flux1-dev.safetensors``,
``models/VAE/ae.safetensors``, ``models/text_encoder/clip_l.safetensors`` and ``t5xxl_fp16.safetensors``, as in
a WebUI's folders; the T5 tokenizer in the Hugging Face cache, where a first run would have downloaded it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from lora_trainer.models.flux.names import diffusers_to_bfl
from lora_trainer.models.ldm_names import VaeNameMap
from support.tiny_models import canonical_text_state

T5_VOCAB = 64
HIDDEN, HEAD_DIM, T5_DIM, CLIP_DIM = 64, 32, 32, 32
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class TinyFlux:
    transformer: torch.nn.Module  # diffusers FluxTransformer2DModel
    vae: torch.nn.Module
    clip: torch.nn.Module
    t5: torch.nn.Module
    guidance: bool


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Random weights everywhere (diffusers zero-initialises the output and modulation layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def tiny_flux_vae():
    """A tiny 16-channel autoencoder of Flux's layout and normalisation (Z-Image uses the same one); draws its
    initial weights from torch's global generator."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )


def build_tiny_flux(guidance: bool = True, seed: int = 0) -> TinyFlux:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HIDDEN // HEAD_DIM,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=CLIP_DIM,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 14, 14),
    )
    _perturb(transformer, seed + 1)
    vae = tiny_flux_vae()
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=CLIP_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=T5_VOCAB,
            d_model=T5_DIM,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    return TinyFlux(transformer.eval(), vae.eval(), clip.eval(), t5.eval(), guidance)


def _ae_state(vae) -> dict:
    names = VaeNameMap(len(vae.config.block_out_channels), vae.config.layers_per_block)
    state = {}
    for k, v in vae.state_dict().items():
        name = names.to_ldm(k)
        if ".mid.attn_1." in name and v.ndim == 2:
            v = v[:, :, None, None]  # BFL's autoencoder keeps ldm's 1x1 convolutions
        state[name] = v.contiguous()
    return state


def write_t5_tokenizer(folder: str) -> str:
    """A word-level tokenizer with T5's special tokens (pad 0, eos 1, unk 2) and ``</s>`` appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = "a picture number style test of 0 1 2 3 4 5 6 7 8 9 , cat dog red blue".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    return folder


def seed_t5_tokenizer_cache(hub_cache: str) -> str:
    """The T5 tokenizer where a first run would have downloaded it (FLUX.1-schnell's ``tokenizer_2``)."""
    repo = os.path.join(hub_cache, "models--black-forest-labs--FLUX.1-schnell")
    write_t5_tokenizer(os.path.join(repo, "snapshots", COMMIT, "tokenizer_2"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(COMMIT)
    return repo


def save_webui_layout(parts: TinyFlux, models_dir: str) -> str:
    """The four files in a WebUI's ``models`` folder; returns the transformer file's path."""
    name = "flux1-dev.safetensors" if parts.guidance else "flux1-schnell.safetensors"
    paths = {
        "transformer": os.path.join(models_dir, "Stable-diffusion", name),
        "ae": os.path.join(models_dir, "VAE", "ae.safetensors"),
        "clip_l": os.path.join(models_dir, "text_encoder", "clip_l.safetensors"),
        "t5xxl": os.path.join(models_dir, "text_encoder", "t5xxl_fp16.safetensors"),
    }
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    bfl = diffusers_to_bfl({k: v.clone() for k, v in parts.transformer.state_dict().items()})
    save_file({k: v.contiguous() for k, v in bfl.items()}, paths["transformer"])
    save_file(_ae_state(parts.vae), paths["ae"])
    save_file({k: v.contiguous() for k, v in canonical_text_state(parts.clip).items()}, paths["clip_l"])
    t5_state = {k: v.contiguous() for k, v in parts.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_state, paths["t5xxl"])
    return paths["transformer"]
