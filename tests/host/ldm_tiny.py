"""Tiny SD1 and SD2-v models built from the real ldm classes (the ones the WebUI loads), in the same shapes as
``tests/support/tiny_models.py`` builds with diffusers, so a single-file checkpoint of one loads into the other."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from lora_trainer.models.tokenizer import write_clip_tokenizer_files

VOCAB = 49408
TEXT_WIDTH = 64
OPEN_CLIP_ARCH = "lora-trainer-tiny-sd2"

VAE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "monitor": "val/rec_loss",
        "lossconfig": {"target": "torch.nn.Identity"},
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 64,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 32,
            "ch_mult": [1, 1, 1, 1],
            "num_res_blocks": 1,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
}
# use_checkpoint as in the real configs: the adapter must switch ldm's own checkpointing off to train.
UNETS = {
    "sd1": {
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2],
        "num_heads": 8,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": TEXT_WIDTH,
        "use_checkpoint": True,
        "legacy": False,
    },
    "sd2": {
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 64,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_head_channels": 64,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": TEXT_WIDTH,
        "use_checkpoint": True,
        "legacy": False,
    },
}


def _clip_folder(folder: str) -> str:
    """A transformers CLIPTextModel + tokenizer folder for ldm's FrozenCLIPEmbedder(version=folder)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if not os.path.isfile(os.path.join(folder, "config.json")):
        write_clip_tokenizer_files(folder)
        config = CLIPTextConfig(
            vocab_size=VOCAB,
            hidden_size=TEXT_WIDTH,
            intermediate_size=TEXT_WIDTH * 2,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=VOCAB - 2,
            eos_token_id=VOCAB - 1,
            pad_token_id=VOCAB - 1,
        )
        CLIPTextModel(config).save_pretrained(folder)
    return folder


def _register_open_clip_arch(folder: str) -> None:
    """Tiny open_clip model configs: SD2's (3 text layers, as SD2 files hold one more than the encoder uses)
    and SDXL's OpenCLIP-G (2 layers, 32-wide projection). The MLP is 4x wide, fixed in open_clip 2.20."""
    import open_clip

    os.makedirs(folder, exist_ok=True)
    for name, layers, embed in ((OPEN_CLIP_ARCH, 3, TEXT_WIDTH), (OPEN_CLIP_ARCH + "-g", 2, 32)):
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w") as fh:
            json.dump(
                {
                    "embed_dim": embed,
                    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                    "text_cfg": {
                        "context_length": 77,
                        "vocab_size": VOCAB,
                        "width": TEXT_WIDTH,
                        "heads": 1,
                        "layers": layers,
                    },
                },
                fh,
            )
        open_clip.add_model_config(path)


def build_ldm(arch: str, work_dir: str, checkpoint: Optional[str] = None) -> nn.Module:
    """A tiny ldm ``LatentDiffusion`` (eval mode, as the WebUI holds it), with the weights of ``checkpoint``
    (a single-file state dict) when given, else random weights with no all-zero tensors."""
    from ldm.util import instantiate_from_config

    if arch == "sd1":
        cond = {
            "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": _clip_folder(os.path.join(work_dir, "clip")), "device": "cpu"},
        }
    else:
        _register_open_clip_arch(os.path.join(work_dir, "open_clip"))
        cond = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"arch": OPEN_CLIP_ARCH, "version": None, "device": "cpu", "layer": "penultimate"},
        }
    config = {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "num_timesteps_cond": 1,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 8,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "scale_factor": 0.18215,
            "use_ema": False,
            "parameterization": "eps" if arch == "sd1" else "v",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNETS[arch]},
            "first_stage_config": VAE,
            "cond_stage_config": cond,
        },
    }
    torch.manual_seed(0)
    model = instantiate_from_config(config)
    if checkpoint:
        load_single_file(model, checkpoint)
    else:
        perturb_zero_parameters(model)
    return model.eval()


def load_single_file(model: nn.Module, path: str) -> None:
    """Load a single-file checkpoint as the WebUI does (its keys are the ldm state dict's)."""
    state = load_file(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    parts = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")
    weights = [k for k in missing if k.startswith(parts) and not k.endswith(("position_ids", "logit_scale"))]
    assert not weights and not unexpected, (weights[:5], unexpected[:5])


def perturb_zero_parameters(model: nn.Module, seed: int = 3) -> None:
    """ldm zero-initialises output layers; small noise lets gradients reach every LoRA."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


CHUNK_TOKENS = 75


class PromptWrapper(nn.Module):
    """Shaped like the WebUI's prompt wrapper around an ldm/sgm embedder (AUTOMATIC1111's
    ``modules/sd_hijack_clip.py``): the original under ``.wrapped``, its ``is_trainable``/``input_key`` copied,
    ``tokenize(texts)`` giving ids without start/end tokens, and ``forward(texts)`` encoding each prompt in
    chunks of 77: start, 75 tokens, end, a short chunk filled with the end token, and for open_clip (whose
    padding differs) every position after the first end token set to its pad id 0. A batch is padded to its
    longest prompt with empty chunks (start, then end tokens); the chunks' hidden states are concatenated and
    a pooled output, where the encoder has one, comes from the first chunk. Left out: emphasis, textual
    inversion and moving a comma-separated phrase to the next chunk (no test caption needs them)."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.is_trainable = getattr(wrapped, "is_trainable", False)
        self.input_key = getattr(wrapped, "input_key", "txt")
        if hasattr(wrapped, "tokenizer"):  # transformers CLIP
            self.id_start, self.id_end = wrapped.tokenizer.bos_token_id, wrapped.tokenizer.eos_token_id
            self.id_pad = self.id_end
        else:  # open_clip
            from open_clip.tokenizer import _tokenizer

            self.id_start, self.id_end = _tokenizer.encoder["<start_of_text>"], _tokenizer.encoder["<end_of_text>"]
            self.id_pad = 0

    def tokenize(self, texts):
        if hasattr(self.wrapped, "tokenizer"):
            return self.wrapped.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]
        from open_clip.tokenizer import _tokenizer

        return [_tokenizer.encode(text) for text in texts]

    def _chunks(self, ids):
        chunks = []
        for start in range(0, max(len(ids), 1), CHUNK_TOKENS):
            body = ids[start : start + CHUNK_TOKENS]
            chunks.append([self.id_start, *body] + [self.id_end] * (CHUNK_TOKENS + 1 - len(body)))
        return chunks

    def _encode(self, tokens: torch.Tensor):
        """(B, 77) ids -> hidden states (and pooled output), as the wrapped embedder computes them."""
        if self.id_pad != self.id_end:
            for row in tokens:
                first_end = int((row == self.id_end).nonzero()[0])
                row[first_end + 1 :] = self.id_pad
        wrapped = self.wrapped
        if hasattr(wrapped, "tokenizer"):
            out = wrapped.transformer(input_ids=tokens, output_hidden_states=wrapped.layer == "hidden")
            return (out.hidden_states[wrapped.layer_idx] if wrapped.layer == "hidden" else out.last_hidden_state), None
        out = wrapped.encode_with_transformer(tokens)
        return out if isinstance(out, tuple) else (out, None)

    def forward(self, texts):
        per_text = [self._chunks(ids) for ids in self.tokenize(texts)]
        empty = [self.id_start] + [self.id_end] * (CHUNK_TOKENS + 1)
        states, pooled = [], None
        for index in range(max(len(chunks) for chunks in per_text)):
            tokens = torch.tensor([chunks[index] if index < len(chunks) else empty for chunks in per_text])
            z, chunk_pooled = self._encode(tokens)
            states.append(z)
            pooled = chunk_pooled if index == 0 else pooled
        return torch.hstack(states) if pooled is None else (torch.hstack(states), pooled)
