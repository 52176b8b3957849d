"""Training objectives: how a family's model is noised, what it must predict, and the loss.

The trainer asks the model family for one (``family.objective``) and calls ``loss`` once per micro-batch with
the batch's clean latents, a ``predict(noisy, t)`` closure over the adapter and the step's generator (all of
the step's randomness comes from it, so a resumed run draws exactly the same noise).

- ``DdpmObjective``: SD1/SD2/SDXL. Integer timesteps on the model's ``alphas_cumprod``; eps or v target.
- ``FlowMatchingObjective``: Flux, Z-Image. ``x_t = (1 - t)·x0 + t·noise`` for t in [0, 1], target
  ``noise - x0`` (rectified flow, Esser et al. 2024), timesteps drawn as sd-scripts' ``timestep_sampling``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lora_trainer.train.diffusion_loss import denoising_loss
from lora_trainer.train.loss_weights import LossWeights, weighted_sample_losses
from lora_trainer.train.validation import validation_timesteps

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TIMESTEP_SAMPLINGS = ("sigmoid", "shift", "uniform", "flux_shift")


class TrainingObjective:
    """One training loss for a family; see the module docstring.

    ``loss`` takes the batch's ``weights`` (regularisation weights and loss masks, ``loss_weights.py``) and
    optionally fixed ``timesteps`` (B,) in the objective's own units instead of drawn ones: the validation loss
    measures at ``validation_timesteps()``.
    """

    def loss(
        self,
        latents: torch.Tensor,
        predict: Predict,
        generator: torch.Generator,
        *,
        weights: Optional[LossWeights] = None,
        timesteps: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def validation_timesteps(self) -> Sequence[float]:
        """The fixed timesteps of the validation loss (sd-scripts' four, evenly inside the schedule)."""
        raise NotImplementedError


class DdpmObjective(TrainingObjective):
    """DDPM noise on integer timesteps, eps or v target, optional noise offset and Min-SNR-gamma weights."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str,
        *,
        noise_offset: float = 0.0,
        min_snr_gamma: Optional[float] = None,
    ):
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.noise_offset = noise_offset
        self.min_snr_gamma = min_snr_gamma

    def loss(self, latents, predict, generator, *, weights=None, timesteps=None) -> torch.Tensor:
        return denoising_loss(
            latents,
            predict,
            self.alphas_cumprod,
            self.prediction_type,
            generator,
            self.noise_offset,
            self.min_snr_gamma,
            weights=weights,
            timesteps=timesteps,
        )

    def validation_timesteps(self) -> Sequence[float]:
        return validation_timesteps(len(self.alphas_cumprod))  # 200, 400, 600, 800 of 1000


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    device: torch.device,
    sampling: str = "sigmoid",
    *,
    sigmoid_scale: float = 1.0,
    shift: float = 3.0,
    image_tokens: int = 4096,
) -> torch.Tensor:
    """Noise levels t in (0, 1), one per sample, as sd-scripts' ``timestep_sampling`` draws them (fp32, (B,)).

    ``sigmoid``: sigmoid(scale·n), n ~ N(0, 1) (x-flux, sd-scripts, ai-toolkit). ``shift``: the same, then
    ``t·s / (1 + (s - 1)·t)`` (SD3's resolution shift, sd-scripts' ``discrete_flow_shift``). ``flux_shift``:
    Flux's own shift, mu linear in the packed token count from 0.5 (256 tokens) to 1.15 (4096),
    ``e^mu / (e^mu + 1/t - 1)``. ``uniform``: U(0, 1).
    """
    if sampling == "uniform":
        return torch.rand((batch,), generator=generator, device=device)
    t = torch.sigmoid(sigmoid_scale * torch.randn((batch,), generator=generator, device=device))
    if sampling == "shift":
        return t * shift / (1 + (shift - 1) * t)
    if sampling == "flux_shift":
        mu = 0.5 + (1.15 - 0.5) * (image_tokens - 256) / (4096 - 256)
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    if sampling != "sigmoid":
        raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")
    return t


def flow_matching_pair(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(noisy input, target) of rectified flow: ``x_t = (1 - t)·x0 + t·noise`` and ``noise - x0``."""
    t = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - t) * latents + t * noise, noise - latents


class FlowMatchingObjective(TrainingObjective):
    """Rectified-flow training (Flux, Z-Image): the model predicts the velocity ``noise - x0`` at ``x_t``.

    ``predict(noisy, t)`` receives t in [0, 1] (fp32, (B,)); each family's adapter turns it into what its
    transformer takes (Flux: t, multiplied by 1000 inside; Z-Image: 1 - t).
    """

    def __init__(
        self,
        sampling: str = "sigmoid",
        *,
        sigmoid_scale: float = 1.0,
        shift: float = 3.0,
        noise_offset: float = 0.0,
        tokens_per_latent_pixel: float = 0.25,
    ):
        if sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {sampling!r}")
        self.sampling = sampling
        self.sigmoid_scale = sigmoid_scale
        self.shift = shift
        self.noise_offset = noise_offset
        self.tokens_per_latent_pixel = tokens_per_latent_pixel

    def loss(self, latents, predict, generator, *, weights=None, timesteps=None) -> torch.Tensor:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        if self.noise_offset > 0:
            offset = torch.randn(
                (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device
            ).to(latents.dtype)
            noise = noise + self.noise_offset * offset
        if timesteps is None:
            tokens = int(latents.shape[-2] * latents.shape[-1] * self.tokens_per_latent_pixel)
            sigmas = sample_sigmas(
                latents.shape[0],
                generator,
                latents.device,
                self.sampling,
                sigmoid_scale=self.sigmoid_scale,
                shift=self.shift,
                image_tokens=tokens,
            )
        else:
            sigmas = timesteps.float()
        noisy, target = flow_matching_pair(latents, noise, sigmas)
        prediction = predict(noisy, sigmas).float()
        return weighted_sample_losses(F.mse_loss(prediction, target.float(), reduction="none"), weights).mean()

    def validation_timesteps(self) -> Sequence[float]:
        # sd-scripts measures Flux's validation loss at the same 200..800 of 1000, as noise levels t = T/1000.
        return [t / 1000 for t in validation_timesteps(1000)]
