"""The model interface the trainer drives, whatever holds the model (diffusers from disk, or the WebUI's own).

An adapter knows its family (``arch``), noise schedule and prediction type, how to turn pixels into latents
and captions into conditioning, how to run the UNet, and which modules get LoRA under which kohya names.
Loading is staged: the trainer asks for the encoders first (to fill its caches), frees them, then the UNet.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import nn

from lora_trainer.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lora_trainer.models.families.base import ModelFamily

# "crossattn" (B, T, C) and, for SDXL, "pooled" (B, P); T is 77 for captions of one CLIP window, more with
# max_token_length 150/225 (the backend's chunked layout, fixed for a given max_token_length). Flux: "t5"
# (B, L, 4096) and "pooled" (B, 768).
Conditioning = Dict[str, torch.Tensor]


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


_Part = TypeVar("_Part")


def loaded(part: Optional[_Part], what: str) -> _Part:
    """``part`` (a model component or a located file), or an error naming ``what`` when it is absent: a
    component is used before ``load`` brought it in, or a file the layout needs was not found."""
    if part is None:
        raise RuntimeError(f"{what} is not loaded (load() it before use)")
    return part


def free_parts(adapter: Any, *, vae: bool, text_encoders: bool) -> None:
    """``release`` for an adapter that loads its own parts (``vae``, ``text_encoders`` attributes, None when not
    loaded): drops the named ones and returns their memory (a
    garbage collection, and the CUDA cache). Nothing loaded to free: nothing is done, sparing the collection
    (a tenth of a second beside a UNet)."""
    if not ((vae and adapter.vae is not None) or (text_encoders and adapter.text_encoders is not None)):
        return
    if vae:
        adapter.vae = None
    if text_encoders:
        adapter.text_encoders = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class DiffusionAdapter:
    """Base class and documentation of the interface; see ``DiffusersAdapter`` and the WebUI host adapter."""

    family: "ModelFamily"  # what the model is; see models/families
    arch: str  # the family's name, for logs
    prediction_type: str
    alphas_cumprod: torch.Tensor
    model_name: str
    identity: str  # changes when the weights on disk change; keys the disk caches
    device: torch.device
    model_file: Optional[str] = None  # the single-file checkpoint the weights came from (hashed into metadata)
    zero_terminal_snr: bool = False  # the noise schedule was rescaled to end at zero SNR
    latent_channels: int = 4
    renders_samples: bool = False  # decode_latents works: the trainer can render sample images
    # The autocast dtype of the no-grad encoding pass that fills the caches (None: run the encoders as they
    # are). Cached outputs are never trained through, so bf16/fp16 is close enough where it is faster.
    encoding_autocast: Optional[torch.dtype] = None
    # The trainer may encode latents while training runs (cache_latents_during_training): the VAE is ours to
    # load and free, and encoding touches nothing the UNet's training uses. Hosts, whose model management may
    # move models around to encode, fill the caches before training.
    encodes_during_training: bool = False

    def text_encoder_bytes(self) -> Optional[int]:
        """Bytes the text encoders add while loaded beside the denoiser, known before they load: 0 where the
        host holds them anyway, None where unknown (the trainer then encodes every caption first)."""
        return None

    def load(self, *, unet: bool, vae: bool, text_encoders: bool) -> None:
        """Make the named parts available (no-op where the host already holds them)."""

    def release(self, *, vae: bool = False, text_encoders: bool = False) -> None:
        """Free parts no longer needed (no-op where the host owns them)."""

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, captions: Sequence[str], clip_skip: int) -> Conditioning:
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents (scaled as ``encode_pixels`` returns them) -> (B, 3, 8h, 8w) pixels in about
        [-1, 1]; loads the VAE when it is not loaded. Backends with ``renders_samples`` implement it."""
        raise NotImplementedError

    def set_max_token_length(self, max_token_length: int) -> None:
        """Encode captions up to ``max_token_length`` tokens (75, 150 or 225) from now on. This default knows
        one CLIP window only and refuses longer settings; backends that chunk captions override it."""
        if max_token_length != 75:
            raise ConfigError(
                f"max_token_length: {max_token_length} is not supported by this backend "
                f"({type(self).__name__}), which encodes one 75-token window; use max_token_length: 75."
            )

    def caption_token_counts(self, captions: Sequence[str]) -> Optional[List[int]]:
        """Tokens of each caption without start and end tokens (for the summary of cut captions); None when
        this backend cannot count them."""
        return None

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
