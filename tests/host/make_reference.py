"""Writes what the host tests compare against, with the main environment (it has diffusers; the host one has
not): tiny SD1 and SD2-v single-file checkpoints, and the LoRA files the standalone engine trains on them
(UNet and text encoder; and LoCon, UNet only). Usage: ``.venv/bin/python tests/host/make_reference.py OUTPUT_DIR``."""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the support package

from support.image_fixtures import image_config, train  # noqa: E402
from support.tiny_models import VOCAB, build_tiny, save_single_file  # noqa: E402

ARCHS = ("sd1", "sd2", "sdxl")


def _open_clip_shaped_encoder(projection: int = 0):
    """A CLIP text encoder with open_clip 2.20's fixed 4x MLP width (the WebUI's open_clip cannot build the
    2x width ``build_tiny`` uses)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=projection or 64,
        bos_token_id=VOCAB - 2,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _sdxl_unet():
    """``build_tiny``'s SDXL UNet with one transformer block per level: the ldm UNet that stands in for sgm's
    in the host tests takes a single depth."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
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
        transformer_layers_per_block=1,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=32,
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return unet.eval()


def host_shaped_parts(arch: str):
    """``build_tiny``'s parts in shapes the host's classes can hold (see the two helpers above)."""
    parts = build_tiny(arch, seed=0)
    if arch == "sd2":
        parts.text_encoders = [_open_clip_shaped_encoder()]
    elif arch == "sdxl":
        parts.text_encoders[1] = _open_clip_shaped_encoder(projection=32)
        parts.unet = _sdxl_unet()
    return parts


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for arch in ARCHS:
        checkpoint = save_single_file(
            host_shaped_parts(arch), os.path.join(out, f"tiny_{arch}.safetensors"), with_yaml=True
        )
        cfg = image_config(
            os.path.join(out, f"work_{arch}"),
            checkpoint,
            train_text_encoder=True,
            max_train_steps=1,
            output_name=f"standalone_{arch}",
            output_dir=os.path.join(out, f"standalone_{arch}"),
        )
        result = train(cfg)
        assert result.status == "finished", result.message
        print(f"{arch}: {result.output_files[-1]}")
        # LoCon: the convolution blocks' names (ResBlock/Downsample/Upsample in the host's model).
        locon = image_config(
            os.path.join(out, f"work_{arch}_locon"),
            checkpoint,
            network_type="locon",
            max_train_steps=1,
            output_name=f"standalone_{arch}_locon",
            output_dir=os.path.join(out, f"standalone_{arch}_locon"),
        )
        result = train(locon)
        assert result.status == "finished", result.message
        print(f"{arch} locon: {result.output_files[-1]}")


if __name__ == "__main__":
    main(sys.argv[1])
