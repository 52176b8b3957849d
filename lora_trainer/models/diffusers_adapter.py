"""The standalone backend: diffusers UNet and VAE, transformers CLIP text encoders, loaded from disk (a Hub
``base_model`` is fetched into the Hugging Face cache first)."""

from __future__ import annotations

import hashlib
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lora_trainer.export.kohya_names import text_lora_name
from lora_trainer.hub.progress import DownloadCallback
from lora_trainer.lora.targets import TEXT_CONTAINERS, find_targets
from lora_trainer.models.adapter import Conditioning, DiffusionAdapter, SizeCondition, free_parts, loaded
from lora_trainer.models.ldm_names import UNetNameMap
from lora_trainer.models.loading import load_stable_diffusion
from lora_trainer.models.long_captions import (
    WINDOW_TOKENS,
    first_window,
    merge_window_states,
    split_into_windows,
    window_count,
)
from lora_trainer.models.precision import encoding_autocast_dtype


def file_identity(path: str) -> str:
    """A cheap fingerprint of a model on disk (paths, sizes, modification times of its files)."""
    digest = hashlib.sha1()
    paths = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    )
    for p in paths:
        stat = os.stat(p)
        digest.update(f"{os.path.abspath(p)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class DiffusersAdapter(DiffusionAdapter):
    renders_samples = True
    encodes_during_training = True

    def __init__(
        self,
        path: str,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        prediction_type: Optional[str] = None,
        on_download: Optional[DownloadCallback] = None,
        log: Optional[Callable[[str], None]] = None,
    ):
        from lora_trainer.models.hub_models import resolve_base_model

        # A Hub reference becomes its cached files here, once; every later load reads them.
        path, hub_name = resolve_base_model(path, on_download=on_download, log=log)
        self.path = path
        self.device = device
        self.dtype = dtype  # the frozen base's storage dtype; LoRA weights stay fp32
        self.encoding_autocast = encoding_autocast_dtype(device, dtype)
        self._prediction_override = prediction_type
        probe = load_stable_diffusion(
            path, load_unet=False, load_vae=False, load_text_encoders=False, prediction_type=prediction_type
        )
        self.family = probe.family
        self.arch = probe.family.name
        self.prediction_type = probe.prediction_type
        self.zero_terminal_snr = probe.zero_terminal_snr
        self.alphas_cumprod = probe.alphas_cumprod.to(device)
        self.vae_scaling_factor = probe.vae_scaling_factor
        self.tokenizers = probe.tokenizers
        self.text_encoder_parameters = probe.text_encoder_parameters
        self.model_name = hub_name or probe.name  # a snapshot folder's own name is a commit id
        self.names = UNetNameMap(probe.unet_layout)
        self.identity = file_identity(path)
        self.model_file = path if os.path.isfile(path) else None
        self.windows = 1  # CLIP windows per caption: max_token_length / 75
        self.unet: Optional[nn.Module] = None
        self.vae: Optional[nn.Module] = None
        self.text_encoders: Optional[List[nn.Module]] = None

    # ------------------------------------------------------------ staged loading

    def text_encoder_bytes(self) -> Optional[int]:
        if self.text_encoder_parameters is None:
            return None
        return self.text_encoder_parameters * self.dtype.itemsize

    def load(self, *, unet: bool, vae: bool, text_encoders: bool) -> None:
        want_unet = unet and self.unet is None
        want_vae = vae and self.vae is None
        want_text = text_encoders and self.text_encoders is None
        if not (want_unet or want_vae or want_text):
            return
        if want_vae:
            # The encoder only: the trainer encodes; sample images bring in the whole VAE when they decode.
            self.vae = self._load_vae(encoder_only=True)
        if not (want_unet or want_text):
            return
        model = load_stable_diffusion(
            self.path,
            load_unet=want_unet,
            load_vae=False,
            load_text_encoders=want_text,
            dtype=self.dtype,
            prediction_type=self._prediction_override,
        )
        if want_unet:
            self.unet = model.unet.to(self.device)
            self.unet.set_attn_processor(_sdpa_processor())
        if want_text:
            self.text_encoders = [te.to(self.device) for te in model.text_encoders]

    def _load_vae(self, encoder_only: bool) -> nn.Module:
        # fp32 weights: fp16 SD VAEs overflow to NaN at training resolutions. The encoding pass autocasts
        # the compute to bf16/fp16 where faster and re-encodes in fp32 where that overflows.
        vae = load_stable_diffusion(
            self.path,
            load_unet=False,
            load_vae=True,
            load_text_encoders=False,
            dtype=torch.float32,
            vae_encoder_only=encoder_only,
        ).vae
        # channels_last: the VAE is all convolutions, which run about 10 % faster in it on CPUs (oneDNN) and
        # on GPUs (cuDNN); encode_pixels hands the latents back contiguous.
        return loaded(vae, "the VAE").to(self.device, memory_format=torch.channels_last)

    def release(self, *, vae: bool = False, text_encoders: bool = False) -> None:
        free_parts(self, vae=vae, text_encoders=text_encoders)

    # ------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        # The distribution's mean, not a sample: cached latents are then deterministic across runs/processes.
        pixels = pixels.to(self.device, torch.float32, memory_format=torch.channels_last)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents * self.vae_scaling_factor).contiguous()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None or self.vae.decoder is None:  # released, or loaded to encode only
            self.vae = self._load_vae(encoder_only=False)
        return self.vae.decode(latents.to(self.device, torch.float32) / self.vae_scaling_factor).sample

    def set_max_token_length(self, max_token_length: int) -> None:
        self.windows = window_count(max_token_length)

    def caption_token_counts(self, captions: Sequence[str]) -> List[int]:
        ids = self.tokenizers[0](list(captions), add_special_tokens=False, verbose=False).input_ids
        return [len(i) for i in ids]

    def _token_windows(self, tokenizer, captions: Sequence[str]) -> torch.Tensor:
        """(B * windows, 77) token ids: each caption's 75-token windows (see ``long_captions``). The length
        is the CLIP window's, not the tokenizer's ``model_max_length``, which a tokenizer folder without
        tokenizer_config.json leaves at transformers' "unlimited" default."""
        ids = tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.windows * WINDOW_TOKENS + 2,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        windows = split_into_windows(ids, tokenizer.bos_token_id, tokenizer.eos_token_id, pad)
        return windows.flatten(0, 1).to(self.device)

    def encode_text(self, captions: Sequence[str], clip_skip: int) -> Conditioning:
        n = self.windows
        if self.family.size_conditioning:
            te1, te2 = self.text_encoders
            out1 = te1(self._token_windows(self.tokenizers[0], captions), output_hidden_states=True)
            out2 = te2(self._token_windows(self.tokenizers[1], captions), output_hidden_states=True)
            # SDXL conditions on the penultimate layers of both encoders (clip_skip moves further back).
            hidden = torch.cat([out1.hidden_states[-(clip_skip + 1)], out2.hidden_states[-(clip_skip + 1)]], dim=-1)
            return {"crossattn": merge_window_states(hidden, n), "pooled": first_window(out2.text_embeds, n)}
        te = self.text_encoders[0]
        ids = self._token_windows(self.tokenizers[0], captions)
        if clip_skip <= 1:
            return {"crossattn": merge_window_states(te(ids).last_hidden_state, n)}
        out = te(ids, output_hidden_states=True)
        final_norm = te.text_model.final_layer_norm if hasattr(te, "text_model") else te.final_layer_norm
        return {"crossattn": merge_window_states(final_norm(out.hidden_states[-clip_skip]), n)}

    # ------------------------------------------------------------ denoiser

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: Optional[Sequence[SizeCondition]] = None,
    ) -> torch.Tensor:
        kwargs = {}
        if self.family.size_conditioning:
            time_ids = torch.tensor([s.time_ids() for s in sizes], device=noisy.device, dtype=noisy.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": time_ids}
        return self.unet(noisy, timesteps, encoder_hidden_states=cond["crossattn"], return_dict=False, **kwargs)[0]

    # ------------------------------------------------------------ LoRA wiring

    def lora_targets(
        self, train_text_encoder: bool, extra: Sequence[str] = (), conv: bool = False
    ) -> List[Tuple[str, nn.Module]]:
        conv_containers = self.family.conv_containers if conv else ()
        targets = [
            (self.family.unet_lora_name(path, self.names), module)
            for path, module in find_targets(self.unet, self.family.lora_containers, extra, conv_containers)
        ]
        if train_text_encoder:
            for index, te in enumerate(self.text_encoders):
                targets += [
                    (text_lora_name(path, self.family, index), module)
                    for path, module in find_targets(te, TEXT_CONTAINERS)
                ]
        return targets

    def text_encoder_modules(self) -> List[nn.Module]:
        return list(self.text_encoders or [])

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        self.unet.enable_gradient_checkpointing()
        self.unet.train()  # diffusers checkpoints only in training mode; dropout is 0 in SD UNets
        if text_encoders:
            for te in self.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                te.train()

    def restore(self) -> None:
        for module in [self.unet, *(self.text_encoders or [])]:
            if module is not None:
                module.eval()


def _sdpa_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()
