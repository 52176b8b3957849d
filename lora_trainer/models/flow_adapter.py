"""What the flow-matching transformer adapters (Flux.1 ``models/flux/adapter.py``, Z-Image ``models/zimage.py``)
share: the standalone engine's common set-up, staged loading and freeing of their parts, and Flux's 16-channel
autoencoder (Z-Image uses it too). Each subclass supplies its files, text encoders, transformer and conditioning.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

import torch
from torch import nn

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.adapter import DiffusionAdapter, free_parts
from lora_trainer.models.families.base import ModelFamily
from lora_trainer.models.flux.autoencoder import encode_flux_latents, load_flux_autoencoder


class FlowTransformerAdapter(DiffusionAdapter):
    """A flow-matching transformer model opened by the standalone engine from its files (``self.files``: a
    located layout with ``folder`` (a diffusers folder or None), ``ae`` and ``transformer``).

    Subclasses call ``_set_up`` first in ``__init__`` and implement ``_load_text_encoders`` (which also prepares
    the tokenizers) and ``_load_transformer``."""

    files: Any  # FluxFiles / ZImageFiles: the located parts
    transformer: Optional[nn.Module]
    vae: Optional[nn.Module]
    text_encoders: Optional[List[nn.Module]]

    def _set_up(
        self,
        path: str,
        family: ModelFamily,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cfg: Any,
        model_name: Optional[str],
        on_download: Any,
        log: Optional[Callable[[str], None]],
        prediction_type: Optional[str],
    ) -> None:
        """The attributes every flow adapter sets; raises ModelLoadError for a prediction type other than flow."""
        if prediction_type not in (None, "flow"):
            raise ModelLoadError(
                f"prediction_type: {family.label} is a flow-matching model; {prediction_type!r} does not apply."
            )
        self.family = family
        self.arch = family.name
        self.prediction_type = "flow"
        self.alphas_cumprod = None
        self.device = device
        self.dtype = dtype
        self.cfg = cfg
        self.fp8_base = bool(getattr(cfg, "fp8_base", False))
        self._on_download, self._log = on_download, log
        self.model_name = model_name or os.path.basename(os.path.normpath(path))
        self.transformer = None
        self.unet: Optional[nn.Module] = None  # the SD adapters' name for the denoiser; the trainer reads neither
        self.vae = None
        self.text_encoders = None

    # ------------------------------------------------------------ staged loading

    def load(self, *, unet: bool, vae: bool, text_encoders: bool) -> None:
        if vae and self.vae is None:
            self.vae = self._load_vae().to(self.device)
        if text_encoders and self.text_encoders is None:
            self.text_encoders = [te.to(self.device) for te in self._load_text_encoders()]
        if unet and self.transformer is None:
            self.transformer = self._load_transformer().to(self.device)
            self.unet = self.transformer

    def release(self, *, vae: bool = False, text_encoders: bool = False) -> None:
        free_parts(self, vae=vae, text_encoders=text_encoders)

    def _load_vae(self) -> nn.Module:
        return load_flux_autoencoder(self.files.folder, self.files.ae)

    def _load_text_encoders(self) -> List[nn.Module]:
        raise NotImplementedError

    def _load_transformer(self) -> nn.Module:
        raise NotImplementedError

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_flux_latents(self.vae, pixels, self.device)
