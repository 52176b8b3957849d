"""Flux.1's 16-channel autoencoder (``ae.safetensors``), which Z-Image uses too: loading it for the encoding
pass, and pixels -> the latents the transformers are trained on.

Latents are ``(mean - shift) * scale`` with Black Forest Labs' constants (their ``AutoEncoder.encode``;
diffusers' ``AutoencoderKL`` config for FLUX.1 has the same ``shift_factor``/``scaling_factor``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.adapter import loaded
from lora_trainer.models.loading import CheckpointReader

AE_SCALING, AE_SHIFT = 0.3611, 0.1159
# Where the autoencoder's weights may sit in a file: alone (BFL's ae.safetensors), under ``vae.`` or inside a
# full checkpoint's ``first_stage_model.``.
AE_PREFIXES = ("", "vae.", "first_stage_model.")


def load_flux_autoencoder(folder: Optional[str], ae_file: Optional[str]) -> nn.Module:
    """The autoencoder's encoder half (training only encodes), fp32, frozen, in eval mode: from a diffusers
    folder's ``vae/`` when ``folder`` is set, else from the single file ``ae_file``.

    Raises ModelLoadError when the file holds no autoencoder, RuntimeError when neither source is given."""
    from diffusers import AutoencoderKL

    from lora_trainer.models.architecture import ldm_vae_config
    from lora_trainer.models.loading import convert_ldm_vae, drop_vae_decoder

    # The autoencoder encodes in fp32, as the SD adapters' VAE does.
    if folder:
        vae = drop_vae_decoder(AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32))
    else:
        path = loaded(ae_file, "the autoencoder file (ae)")
        reader = CheckpointReader(path)
        prefix = next((p for p in AE_PREFIXES if p + "encoder.conv_in.weight" in reader.keys), None)
        if prefix is None:
            raise ModelLoadError(f"{path} is not an autoencoder (no encoder.conv_in weights).")
        config = ldm_vae_config(
            reader.shapes(), prefix, scaling_factor=AE_SCALING, shift_factor=AE_SHIFT, sample_size=1024
        )
        vae = convert_ldm_vae(reader, prefix, config, torch.float32, encoder_only=True)
    return vae.requires_grad_(False).eval()


@torch.no_grad()
def encode_flux_latents(vae: Optional[nn.Module], pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, 16, H/8, W/8) fp32 latents: the posterior's mean, shifted and
    scaled. Raises RuntimeError when ``vae`` is not loaded."""
    posterior = loaded(vae, "the autoencoder").encode(pixels.to(device, torch.float32)).latent_dist
    return (posterior.mode() - AE_SHIFT) * AE_SCALING
