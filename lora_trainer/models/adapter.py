"""The model interface the trainer drives, whatever holds the model (diffusers from disk, or the WebUI's own).

An adapter knows its family (``arch``), noise schedule and prediction type, how to turn pixels into latents
and captions into conditioning, how to run the UNet, and which modules get LoRA under which kohya names.
Loading is staged: the trainer asks for the encoders first (to fill its caches), frees them, then the UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

Conditioning = Dict[str, torch.Tensor]  # "crossattn" (B, 77, C) and, for SDXL, "pooled" (B, P)


@dataclass(frozen=True)
class SizeCondition:
    """SDXL's micro-conditioning of one sample: original size, crop offset and target size, (w, h) order."""

    original: Tuple[int, int]
    crop_left_top: Tuple[int, int]
    target: Tuple[int, int]

    def time_ids(self) -> List[int]:
        # SDXL orders these as (h, w): original, crop top-left, target.
        return [
            self.original[1],
            self.original[0],
            self.crop_left_top[1],
            self.crop_left_top[0],
            self.target[1],
            self.target[0],
        ]


class DiffusionAdapter:
    """Base class and documentation of the interface; see ``DiffusersAdapter`` and the WebUI host adapter."""

    arch: str
    prediction_type: str
    alphas_cumprod: torch.Tensor
    model_name: str
    identity: str  # changes when the weights on disk change; keys the disk caches
    device: torch.device

    def load(self, *, unet: bool, vae: bool, text_encoders: bool) -> None:
        """Make the named parts available (no-op where the host already holds them)."""

    def release(self, *, vae: bool = False, text_encoders: bool = False) -> None:
        """Free parts no longer needed (no-op where the host owns them)."""

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, captions: Sequence[str], clip_skip: int) -> Conditioning:
        raise NotImplementedError

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: Optional[Sequence[SizeCondition]] = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def lora_targets(
        self, train_text_encoder: bool, extra: Sequence[str] = (), conv: bool = False
    ) -> List[Tuple[str, nn.Module]]:
        """(kohya name, module) of every module to adapt; ``conv`` adds the UNet's convolution blocks (LoCon)."""
        raise NotImplementedError

    def text_encoder_modules(self) -> List[nn.Module]:
        raise NotImplementedError

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        """Undo every change training made to the model (flags, modes, checkpointing)."""
