"""Writes what the host tests compare against, with the main environment (it has diffusers; the host one has
not): tiny SD1 and SD2-v single-file checkpoints, and the LoRA files the standalone engine trains on them
(UNet and text encoder). Usage: ``.venv/bin/python tests/host/make_reference.py OUTPUT_DIR``."""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: tiny_models, image_fixtures

from image_fixtures import image_config, train  # noqa: E402
from tiny_models import VOCAB, build_tiny, save_single_file  # noqa: E402

ARCHS = ("sd1", "sd2")


def host_shaped_parts(arch: str):
    """``build_tiny``'s parts, but SD2's text encoder with open_clip 2.20's fixed 4x MLP width (the WebUI's
    open_clip cannot build the 2x width ``build_tiny`` uses)."""
    parts = build_tiny(arch, seed=0)
    if arch == "sd2":
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(1)
        config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu",
                                bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
        parts.text_encoders = [CLIPTextModel(config).eval()]
    return parts


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for arch in ARCHS:
        checkpoint = save_single_file(host_shaped_parts(arch), os.path.join(out, f"tiny_{arch}.safetensors"),
                                      with_yaml=True)
        cfg = image_config(os.path.join(out, f"work_{arch}"), checkpoint, train_text_encoder=True,
                           max_train_steps=1, output_name=f"standalone_{arch}",
                           output_dir=os.path.join(out, f"standalone_{arch}"))
        result = train(cfg)
        assert result.status == "finished", result.message
        print(f"{arch}: {result.output_files[-1]}")


if __name__ == "__main__":
    main(sys.argv[1])
