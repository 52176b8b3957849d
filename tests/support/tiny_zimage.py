"""A tiny randomly initialised Z-Image, built with diffusers' and transformers' own classes and saved the way a
Forge Neo user has it: ``models/Stable-diffusion/z_image_turbo_bf16.safetensors`` in the original layout (fused
``attention.qkv``, as ComfyUI's repackaged file), ``models/VAE/ae.safetensors`` and
``models/text_encoder/qwen_3_4b.safetensors`` (``model.*`` names); the Qwen tokenizer (a word-level stand-in
with Qwen's chat tokens and a chat template) in the Hugging Face cache, where a first run would have put it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from support.tiny_flux import COMMIT, _ae_state, _perturb, tiny_flux_vae

DIM, HEADS, CAP_DIM = 64, 2, 32
WORDS = "a picture number style test of 0 1 2 3 4 5 6 7 8 9 , cat dog red blue user assistant".split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


@dataclass
class TinyZImage:
    transformer: torch.nn.Module  # diffusers ZImageTransformer2DModel
    vae: torch.nn.Module
    text_encoder: torch.nn.Module  # transformers Qwen3Model


def build_tiny_zimage(seed: int = 0) -> TinyZImage:
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        in_channels=16,
        dim=DIM,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=HEADS,
        n_kv_heads=HEADS,
        cap_feat_dim=CAP_DIM,
        axes_dims=[8, 12, 12],
        axes_lens=[1536, 512, 512],
    )
    _perturb(transformer, seed + 1)
    vae = tiny_flux_vae()
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(SPECIAL) + len(dict.fromkeys(WORDS)) + 1,
            hidden_size=CAP_DIM,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
        )
    )
    return TinyZImage(transformer.eval(), vae.eval(), text_encoder.eval())


def to_original_layout(state: dict) -> dict:
    """diffusers' Z-Image names -> the original ones (what ComfyUI's and Forge Neo's files hold)."""
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            parts = [state[key.replace(".to_q.", f".to_{p}.")] for p in "qkv"]
            out[key.replace(".to_q.", ".qkv.")] = torch.cat(parts, 0)
            continue
        for old, new in (
            (".attention.to_out.0.", ".attention.out."),
            (".attention.norm_q.", ".attention.q_norm."),
            (".attention.norm_k.", ".attention.k_norm."),
            ("all_x_embedder.2-1.", "x_embedder."),
            ("all_final_layer.2-1.", "final_layer."),
        ):
            key = key.replace(old, new)
        out[key] = value
    return out


def write_qwen_tokenizer(folder: str) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(SPECIAL)
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<unk>",
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh)
    return folder


def seed_qwen_tokenizer_cache(hub_cache: str) -> str:
    """The tokenizer where a first run would have downloaded it (Tongyi-MAI/Z-Image-Turbo's ``tokenizer``)."""
    repo = os.path.join(hub_cache, "models--Tongyi-MAI--Z-Image-Turbo")
    write_qwen_tokenizer(os.path.join(repo, "snapshots", COMMIT, "tokenizer"))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(COMMIT)
    return repo


def save_forge_neo_layout(parts: TinyZImage, models_dir: str) -> str:
    """The three files in a Forge Neo ``models`` folder; returns the transformer file's path."""
    paths = {
        "transformer": os.path.join(models_dir, "Stable-diffusion", "z_image_turbo_bf16.safetensors"),
        "ae": os.path.join(models_dir, "VAE", "ae.safetensors"),
        "qwen3": os.path.join(models_dir, "text_encoder", "qwen_3_4b.safetensors"),
    }
    for path in paths.values():
        os.makedirs(os.path.dirname(path), exist_ok=True)
    original = to_original_layout({k: v.clone() for k, v in parts.transformer.state_dict().items()})
    save_file({k: v.contiguous() for k, v in original.items()}, paths["transformer"])
    save_file(_ae_state(parts.vae), paths["ae"])
    text = {f"model.{k}": v.contiguous() for k, v in parts.text_encoder.state_dict().items()}
    save_file(text, paths["qwen3"])
    return paths["transformer"]


def save_diffusers_folder(parts: TinyZImage, folder: str) -> str:
    """The same model as a diffusers ``ZImagePipeline`` folder (its own tokenizer/ included)."""
    parts.transformer.save_pretrained(os.path.join(folder, "transformer"))
    parts.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    parts.vae.save_pretrained(os.path.join(folder, "vae"))
    write_qwen_tokenizer(os.path.join(folder, "tokenizer"))
    index = {
        "_class_name": "ZImagePipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump(index, fh)
    return folder
