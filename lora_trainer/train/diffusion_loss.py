"""The denoising loss shared by every backend: noise the latents, predict, compare (eps or v targets)."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from lora_trainer.train.loss_weights import LossWeights, weighted_sample_losses


def add_noise(
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    generator: torch.Generator,
    noise_offset: float = 0.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy latents, noise): ``sqrt(ac)·x0 + sqrt(1−ac)·n``."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset > 0:
        offset = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
        noise = noise + noise_offset * offset
    ac = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return ac.sqrt() * latents + (1 - ac).sqrt() * noise, noise


def diffusion_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    ac = alphas_cumprod[timesteps].to(latents.dtype).view(-1, 1, 1, 1)
    return ac.sqrt() * noise - (1 - ac).sqrt() * latents  # v-prediction


def min_snr_weights(
    timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023)."""
    ac = alphas_cumprod[timesteps].float()
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def denoising_loss(
    latents: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    min_snr_gamma: Optional[float] = None,
    weights: Optional[LossWeights] = None,
    timesteps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One training loss: sample timesteps and noise from ``generator``, call ``predict(noisy, t)``.

    ``weights``: regularisation weights and loss masks (``loss_weights``). ``timesteps``: (B,) given instead
    of drawn (the validation loss is measured at fixed ones)."""
    if timesteps is None:
        timesteps = torch.randint(
            0, alphas_cumprod.shape[0], (latents.shape[0],), generator=generator, device=latents.device
        )
    noisy, noise = add_noise(latents, timesteps, alphas_cumprod, generator, noise_offset)
    prediction = predict(noisy, timesteps).float()
    target = diffusion_target(latents, noise, timesteps, alphas_cumprod, prediction_type).float()
    per_sample = weighted_sample_losses(F.mse_loss(prediction, target, reduction="none"), weights)
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weights(timesteps, alphas_cumprod, min_snr_gamma, prediction_type)
    return per_sample.mean()
