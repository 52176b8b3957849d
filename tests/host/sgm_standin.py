"""A tiny stand-in for SDXL as the WebUI holds it: sgm's ``DiffusionEngine`` patched to look like SD1.

No installable wheel ships the ``sgm`` package, so this rebuilds the parts of its interface the adapter uses,
from ldm classes with the same module names (sgm's UNet is ldm's with ``label_emb``) and open_clip:
``conditioner.embedders`` = [CLIP-L, OpenCLIP-G (pooled), three size embedders], a conditioner that runs
non-trainable embedders under ``no_grad`` (as sgm's does), ``get_learned_conditioning`` returning
``{"crossattn", "vector"}``, ``apply_model(x, t, cond)`` and an already-scaled ``encode_first_stage``.
"""

from __future__ import annotations

import contextlib
import os

import torch
from ldm_tiny import OPEN_CLIP_ARCH, VAE, _clip_folder, _register_open_clip_arch, load_single_file
from torch import nn

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
SIZE_DIM = 8
UNET = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [2, 4],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 2],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 128,
    "use_checkpoint": True,
    "legacy": False,
}
ADM_IN = 32 + 6 * SIZE_DIM  # pooled OpenCLIP-G + three embedded size pairs


class SizeEmbedder(nn.Module):
    """Like sgm's ``ConcatTimestepEmbedderND``: each number gets a sinusoidal embedding of ``outdim``."""

    def __init__(self, input_key: str, outdim: int = SIZE_DIM):
        super().__init__()
        self.input_key = input_key
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        b, dims = x.shape
        return timestep_embedding(x.flatten(), self.outdim).reshape(b, dims * self.outdim)


class OpenClipG(nn.Module):
    """Like sgm's ``FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True)``."""

    input_key = "txt"
    return_pooled = True
    layer_idx = 1

    def __init__(self):
        super().__init__()
        import open_clip

        model, _, _ = open_clip.create_model_and_transforms(OPEN_CLIP_ARCH + "-g", device=torch.device("cpu"))
        del model.visual
        self.model = model.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, texts):
        import open_clip

        return self.encode_with_transformer(open_clip.tokenize(texts))

    def encode_with_transformer(self, tokens: torch.Tensor):
        """(B, 77) token ids -> (penultimate hidden states, pooled projection)."""
        x = (self.model.token_embedding(tokens) + self.model.positional_embedding).permute(1, 0, 2)
        blocks = self.model.transformer.resblocks
        for i, block in enumerate(blocks):
            if i == len(blocks) - 1:
                penultimate = x.permute(1, 0, 2)
            x = block(x, attn_mask=self.model.attn_mask)
        last = self.model.ln_final(x.permute(1, 0, 2))
        pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)] @ self.model.text_projection
        return penultimate, pooled


class Conditioner(nn.Module):
    """Like sgm's ``GeneralConditioner``: concatenates 3-d outputs as crossattn, 2-d ones as vector."""

    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch):
        out = {}
        for embedder in self.embedders:
            trainable = getattr(embedder, "is_trainable", False)
            with contextlib.nullcontext() if trainable else torch.no_grad():
                result = embedder(batch[embedder.input_key])
            for tensor in result if isinstance(result, tuple) else (result,):
                key, dim = ("crossattn", 2) if tensor.dim() == 3 else ("vector", 1)
                out[key] = torch.cat((out[key], tensor), dim) if key in out else tensor
        return out


class SdxlEngine(nn.Module):
    """The patched ``DiffusionEngine`` surface the WebUI (and so the adapter) uses."""

    parameterization = "eps"
    scale_factor = 0.13025

    def __init__(self, unet: nn.Module, vae: nn.Module, conditioner: Conditioner):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.first_stage_model = vae
        self.conditioner = conditioner
        from lora_trainer.models.loading import scaled_linear_alphas_cumprod

        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod(), persistent=False)

    @property
    def cond_stage_model(self):
        return self.conditioner

    def get_learned_conditioning(self, batch):
        n = len(batch)
        size = torch.tensor([[1024.0, 1024.0]]).repeat(n, 1)
        return self.conditioner(
            {
                "txt": batch,
                "original_size_as_tuple": size,
                "crop_coords_top_left": torch.zeros(n, 2),
                "target_size_as_tuple": size,
            }
        )

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, timesteps=t, context=cond["crossattn"], y=cond["vector"])

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).mode()

    def get_first_stage_encoding(self, x):
        return x


def build_sdxl(work_dir: str, checkpoint: str) -> SdxlEngine:
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from ldm.util import instantiate_from_config

    _register_open_clip_arch(os.path.join(work_dir, "open_clip"))
    torch.manual_seed(0)
    clip_l = FrozenCLIPEmbedder(
        version=_clip_folder(os.path.join(work_dir, "clip")), device="cpu", layer="hidden", layer_idx=-2
    )
    clip_l.input_key = "txt"
    conditioner = Conditioner([clip_l, OpenClipG(), *(SizeEmbedder(k) for k in SIZE_KEYS)])
    unet = instantiate_from_config({"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET})
    # sgm's num_classes="sequential" (this ldm lacks it): label_emb.0.0 / label_emb.0.2 take the vector y.
    width = UNET["model_channels"] * 4
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(ADM_IN, width), nn.SiLU(), nn.Linear(width, width)))
    unet.num_classes = "sequential"
    engine = SdxlEngine(unet, instantiate_from_config(VAE), conditioner)
    load_single_file(engine, checkpoint)
    return engine.eval()
