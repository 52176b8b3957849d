"""Forge's live model (Forge Neo, lllyasviel's Forge) as the engine's ``DiffusionAdapter``.

Forge holds a ``ForgeDiffusionEngine``: ``forge_objects_original`` has the UNet patcher (``.model`` is a
``KModel`` with ``apply_model``, ``predictor`` and ``diffusion_model``, an ldm-named UNet), the CLIP text
encoders (``clip.cond_stage_model.clip_l`` / ``clip_g``, each ``.transformer`` a transformers CLIP) and the VAE;
the engine's text-processing engines (``text_processing_engine``, SDXL ``_l``/``_g``) know its tokenizers and
clip-skip rules. Nothing from Forge is imported here: the WebUI glue hands over the engine, the host's loader
(``memory_management.load_models_gpu``) and the attention switch, so a stand-in written from Forge's code
tests this file.

What differs from the ldm/sgm model of AUTOMATIC1111, and how each is met:

- Weights are inference tensors (Forge loads and merges LoRAs under ``torch.inference_mode``): cloned once,
  one at a time, when training begins (``live_weights.replace_inference_tensors``). The LoRAs Forge merged for
  earlier generations are undone by the glue before that, through Forge's own loader.
- ``get_learned_conditioning`` and ``encode_first_stage`` run under inference mode (no graph to a text-encoder
  LoRA) and the VAE encoding samples: text is encoded through the engine's ``encode_with_transformers`` and
  pixels through the VAE's encoder, outside inference mode, taking the distribution's mean.
- ``KModel.apply_model(x, sigma)`` takes the noise level sigma (``x = x0 + sigma * eps``) and returns the
  denoised latent: ``predict`` converts the trainer's DDPM sample and timestep to that form with the
  predictor's own sigmas and turns the denoised latent back into the model's eps / v output.
- Its transformer blocks add residuals in place (``live_weights.guard_inplace_residuals``); its Linear may
  not be an ``nn.Linear`` (matched by behaviour, ``lora.layer.is_lora_target``); the text encoder's weights
  arrive with ``requires_grad=True`` (frozen for the run, flags restored exactly); SageAttention has no
  backward (the glue passes PyTorch attention to use for the run).

The LoRA names are the standalone engine's: UNet modules under the ldm->diffusers name map (SD1) or sgm names
(SDXL), text encoders under transformers' CLIP names.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lora_trainer.errors import ConfigError
from lora_trainer.export.kohya_names import text_lora_name, unet_lora_name_from_ldm
from lora_trainer.hosts.ldm_adapter import (
    HOST_CHECKPOINT_FLAGS,
    checkpoint_host_blocks,
    checkpoint_info_value,
    ldm_unet_layout,
    ldm_unet_targets,
    weights_fingerprint,
)
from lora_trainer.hosts.live_weights import (
    HostModelNotTrainable,
    guard_inplace_residuals,
    replace_inference_tensors,
    untrainable_dtypes,
    weights_off_device,
)
from lora_trainer.hosts.module_changes import ModuleChanges
from lora_trainer.lora.targets import TEXT_CONTAINERS, find_targets
from lora_trainer.models.adapter import Conditioning, DiffusionAdapter, SizeCondition
from lora_trainer.models.families import SD1, SDXL
from lora_trainer.models.families.unet_family import UNetFamily
from lora_trainer.models.ldm_names import UNetNameMap
from lora_trainer.models.long_captions import WINDOW_TOKENS, window_count

CONTEXT_TOKENS = 77  # one CLIP window: start, 75 caption tokens, end; Forge chains such chunks for longer prompts
COMMA_BACKTRACK = 20  # Forge moves a chunk's tail after a comma this close to its end into the next chunk
# Forge's SDXL engines stop at the penultimate layer at least (their minimal clip skip is 2, where the
# standalone engine counts the penultimate layer as clip skip 1).
SDXL_CLIP_SKIP_OFFSET = 1
PREDICTIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}

# (module or object, attribute, value) set for the run and put back by ``restore``.
AttributeOverride = Tuple[Any, str, Any]
LoadModels = Callable[[List[Any]], Any]


def forge_architecture(engine: Any) -> Optional[UNetFamily]:
    """The SD1 or SDXL family (an SDXL base model: both text encoders) when the engine is one this adapter
    drives, else None."""
    if getattr(engine, "forge_objects_original", None) is None:
        return None
    if getattr(engine, "is_sdxl", False):
        if hasattr(engine, "text_processing_engine_l") and hasattr(engine, "text_processing_engine_g"):
            return SDXL
        return None  # the SDXL refiner (one encoder, an aesthetic score) trains nothing the product writes
    if getattr(engine, "is_sd1", False) and hasattr(engine, "text_processing_engine"):
        return SD1
    return None


def host_prediction_type(predictor: Any) -> str:
    """The predictor's parameterisation in the engine's names; flow/EDM models cannot be trained."""
    kind = PREDICTIONS.get(str(getattr(predictor, "prediction_type", "")))
    if kind is None:
        raise ConfigError(
            f"The loaded model predicts {getattr(predictor, 'prediction_type', None)!r}; only epsilon and "
            "v-prediction models can be trained."
        )
    return kind


def forge_prompt_chunks(ids: Sequence[int], comma: Optional[int]) -> List[List[int]]:
    """A caption's token ids (no start/end tokens) cut into Forge's prompt chunks of at most 75, as its classic
    text engine's ``tokenize_line`` cuts a prompt without weights or embeddings: when a chunk fills up and a comma
    lies within its last 20 tokens, the tokens after that comma start the next chunk. At least one chunk."""
    chunks: List[List[int]] = []
    chunk: List[int] = []
    last_comma = -1
    for token in ids:
        if token == comma:
            last_comma = len(chunk)
        elif len(chunk) == WINDOW_TOKENS and last_comma != -1 and len(chunk) - last_comma <= COMMA_BACKTRACK:
            chunks.append(chunk[: last_comma + 1])
            chunk, last_comma = chunk[last_comma + 1 :], -1
        if len(chunk) == WINDOW_TOKENS:
            chunks.append(chunk)
            chunk, last_comma = [], -1
        chunk.append(token)
    if chunk or not chunks:
        chunks.append(chunk)
    return chunks


class ForgeHostAdapter(DiffusionAdapter):
    family: UNetFamily
    """Drives Forge's loaded SD1/SDXL engine for the trainer. Use as a context manager, or call ``restore()``,
    to undo every change training made (weights keep their values; they are clones of the host's)."""

    def __init__(
        self,
        engine: Any,
        *,
        load_models: Optional[LoadModels] = None,
        attention_overrides: Sequence[AttributeOverride] = (),
        model_name: Optional[str] = None,
        identity: Optional[str] = None,
    ):
        """``load_models(patchers)``: the host's loader (Forge's ``memory_management.load_models_gpu``), which
        puts the named parts on their device; None when they are already there (tests).
        ``attention_overrides``: attributes to set for the run (Forge's UNet attention function, when the host
        picked one without a backward)."""
        arch = forge_architecture(engine)
        if arch is None:
            raise ConfigError(
                f"The loaded Forge model ({type(engine).__name__}) is not an SD1.x or SDXL base model this "
                "adapter drives."
            )
        self.engine = engine
        self.family = arch
        self.arch = arch.name
        parts = engine.forge_objects_original
        self._unet_patcher = parts.unet
        self._clip = parts.clip
        self._vae = parts.vae
        kmodel = parts.unet.model
        self.unet: nn.Module = kmodel.diffusion_model
        self._predictor = kmodel.predictor
        self._host_prediction = host_prediction_type(self._predictor)
        self.prediction_type = self._host_prediction
        self.device = torch.device(getattr(parts.unet, "load_device", None) or next(self.unet.parameters()).device)
        self.dtype = getattr(kmodel, "computation_dtype", None) or next(self.unet.parameters()).dtype
        # The schedule Forge samples with: its sigmas (a zero-terminal-SNR model rescales them), as alphas.
        sigmas = self._predictor.sigmas.detach().to(torch.float64)
        self.alphas_cumprod = (1.0 / (1.0 + sigmas**2)).to(self.device, torch.float32)
        self.sigmas = sigmas.to(self.device, torch.float32)
        self.names = UNetNameMap(ldm_unet_layout(self.unet))
        self.model_name = (
            model_name or checkpoint_info_value(engine, "name_for_extra", "model_name", "name") or type(engine).__name__
        )
        self.identity = (
            identity
            or checkpoint_info_value(engine, "sha256", "shorthash", "filename")
            or weights_fingerprint(self.unet)
        )
        # The checkpoint's file and both its hashes as the host has them, for the file's metadata (as the
        # A1111 adapter records them: the same keys whichever host trained the LoRA).
        self.model_file = checkpoint_info_value(engine, "filename")
        legacy, sha256 = checkpoint_info_value(engine, "hash"), checkpoint_info_value(engine, "sha256")
        self.model_hashes = {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": sha256} if legacy and sha256 else None
        self._load_models = load_models
        self._attention_overrides = list(attention_overrides)
        self._changes = ModuleChanges()
        self._windows = 1  # prompt chunks of 77 per caption: max_token_length / 75

    # ------------------------------------------------------------ the host's parts

    def _text_engines(self) -> List[Any]:
        if self.family.size_conditioning:  # SDXL
            return [self.engine.text_processing_engine_l, self.engine.text_processing_engine_g]
        return [self.engine.text_processing_engine]

    def text_encoder_modules(self) -> List[nn.Module]:
        return [engine.text_encoder.transformer for engine in self._text_engines()]

    def _text_device(self) -> torch.device:
        return next(self.text_encoder_modules()[0].parameters()).device

    def load(self, *, unet: bool, vae: bool, text_encoders: bool) -> None:
        """Have Forge put the named parts on their devices, and check that they are all there: a memory state
        that streams layers in during each forward cannot be trained through."""
        patchers = []
        if unet:
            patchers.append(self._unet_patcher)
        if text_encoders:
            patchers.append(self._clip.patcher)
        if vae:
            patchers.append(self._vae.patcher)
        if patchers and self._load_models is not None:
            # As Forge always loads (its generations run in inference mode): a move to the GPU done outside it
            # would turn inference tensors into parameters Forge's later generations cannot use.
            with torch.inference_mode():
                self._load_models(patchers)
        if unet:
            self._check_resident("UNet", self._unet_patcher, self.unet)
        if text_encoders:
            for module in self.text_encoder_modules():
                self._check_resident("text encoder", self._clip.patcher, module)

    @staticmethod
    def _check_resident(what: str, patcher: Any, module: nn.Module) -> None:
        device = getattr(patcher, "load_device", None)
        if device is None:
            return
        away = weights_off_device(module, device)
        if away or getattr(getattr(patcher, "model", None), "model_lowvram", False):
            raise HostModelNotTrainable(
                f"Forge keeps {away or 'some'} of the {what}'s weights off {device} (its low-VRAM memory state "
                "streams them in during each step), which cannot be trained through in place."
            )
        if any(getattr(m, "weight_function", None) or getattr(m, "bias_function", None) for m in module.modules()):
            raise HostModelNotTrainable(
                f"Forge applies weight patches to the {what} on the fly (its online LoRA or low-VRAM mode), so "
                "its layers do not compute with their own weights; that cannot be trained through in place."
            )
        bad = untrainable_dtypes(module)
        if bad:
            raise HostModelNotTrainable(
                f"Forge stores the {what}'s weights as {', '.join(sorted(bad))}, which cannot be trained through "
                "in place."
            )

    def release(self, *, vae: bool = False, text_encoders: bool = False) -> None:
        """Nothing to free: the parts are Forge's, and it keeps using them."""

    def __enter__(self) -> "ForgeHostAdapter":
        return self

    def __exit__(self, *_exc) -> None:
        self.restore()

    # ------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mean, scaled as Forge scales latents (``process_in``); pixels in [-1, 1]."""
        vae = self._vae
        model = vae.first_stage_model
        device = getattr(vae, "device", None) or next(model.parameters()).device
        dtype = getattr(vae, "vae_dtype", None) or next(model.parameters()).dtype
        with torch.inference_mode(False):
            moments = model.encoder(pixels.to(device, dtype))
            if getattr(model, "quant_conv", None) is not None:
                moments = model.quant_conv(moments)
            mean = moments.chunk(2, dim=1)[0]  # Forge's encode() would sample from (mean, logvar)
            latents = model.process_in(mean.float()).to(self.device)
        if not torch.isfinite(latents).all():
            raise ConfigError(
                "Forge's VAE produced NaN/inf latents (an fp16 VAE overflows on some images); set the VAE to "
                "bf16 or fp32 in Forge (--vae-in-bf16 / --vae-in-fp32) and try again."
            )
        return latents

    def set_max_token_length(self, max_token_length: int) -> None:
        self._windows = window_count(max_token_length)

    def caption_token_counts(self, captions: Sequence[str]) -> Optional[List[int]]:
        """Tokens of each caption without start/end tokens, by the first text engine's tokenizer."""
        tokenizer = self._text_engines()[0].tokenizer
        return [len(ids) for ids in tokenizer(list(captions), add_special_tokens=False).input_ids]

    def _token_ids(self, engine: Any, captions: Sequence[str]) -> torch.Tensor:
        """(B * windows, 77) token ids: each caption in Forge's prompt chunks (``tokenize_line``: 75 tokens,
        a comma close to a chunk's end starts the next chunk), cut or filled with Forge's empty chunk to
        ``max_token_length / 75`` chunks, each with its start and end token and padded as Forge's engine pads
        after the end token. Captions are read literally (no prompt-attention syntax), as the standalone engine
        reads them."""
        comma = getattr(engine, "comma_token", None)
        if comma is None:
            comma = engine.tokenizer.get_vocab().get(",</w>")
        rows = []
        for ids in engine.tokenizer(list(captions), add_special_tokens=False).input_ids:
            chunks = forge_prompt_chunks(ids, comma)[: self._windows]
            chunks += [[]] * (self._windows - len(chunks))
            for body in chunks:
                rows.append([engine.id_start, *body] + [engine.id_end] * (WINDOW_TOKENS + 1 - len(body)))
        tokens = torch.tensor(rows, dtype=torch.long)
        if engine.id_end != engine.id_pad:
            for row in tokens:  # every row has an end token: a chunk holds 75 tokens at most
                row[int((row == engine.id_end).nonzero()[0]) + 1 :] = engine.id_pad
        return tokens

    @contextlib.contextmanager
    def _engine_clip_skip(self, engine: Any, clip_skip: int) -> Iterator[None]:
        before = engine.clip_skip
        engine.clip_skip = int(clip_skip) + (SDXL_CLIP_SKIP_OFFSET if self.family.size_conditioning else 0)
        try:
            yield
        finally:
            engine.clip_skip = before

    def _text_encoders_cloned(self) -> None:
        """Normal clones of the text encoders' inference tensors, before any of Forge's text code runs here:
        Forge converts its fp16 embeddings to fp32 at their first use (``Module.to``), and done outside inference
        mode on an inference tensor that conversion leaves a parameter Forge's later generations cannot use
        ("Inference tensors do not track version counter")."""
        replace_inference_tensors(self.text_encoder_modules())  # a no-op pass once cloned (Forge may reload)

    def _encode(
        self, engine: Any, captions: Sequence[str], clip_skip: int
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, 77 * windows, C) hidden states and, for an engine that pools, (B, P) pooled embeddings."""
        self._text_encoders_cloned()
        embeddings = getattr(engine, "embeddings", None)
        if embeddings is not None and hasattr(embeddings, "fixes"):
            embeddings.fixes = None  # no textual-inversion splices left over from a generation
        # Before training begins the weights are still Forge's inference tensors and nothing is trained: no graph.
        record = torch.is_grad_enabled() and not self._changes.empty
        with torch.inference_mode(False), torch.set_grad_enabled(record), self._engine_clip_skip(engine, clip_skip):
            states = engine.encode_with_transformers(self._token_ids(engine, captions))
        # (B * windows, 77, C) -> (B, 77 * windows, C): Forge joins a prompt's chunks one after another.
        joined = states.reshape(len(captions), self._windows * CONTEXT_TOKENS, states.shape[-1])
        pooled = getattr(states, "pooled", None)
        if pooled is not None:  # SDXL: the pooled embedding of each caption's first chunk, as Forge takes it
            pooled = pooled.reshape(len(captions), self._windows, -1)[:, 0]
        return joined, pooled

    def encode_text(self, captions: Sequence[str], clip_skip: int) -> Conditioning:
        """Through the engine's own ``encode_with_transformers`` (its layer choice and final norm), outside
        inference mode so a text-encoder LoRA gets gradients. ``clip_skip`` counts as in the standalone engine."""
        if self.family.size_conditioning:  # SDXL
            engine_l, engine_g = self._text_engines()
            cond_l, _ = self._encode(engine_l, captions, clip_skip)
            cond_g, pooled = self._encode(engine_g, captions, clip_skip)
            assert pooled is not None  # SDXL's second engine (OpenCLIP-G) always pools
            return {
                "crossattn": torch.cat([cond_l, cond_g], dim=2).float().to(self.device),
                "pooled": pooled.float().to(self.device),
            }
        return {"crossattn": self._encode(self._text_engines()[0], captions, clip_skip)[0].float().to(self.device)}

    # ------------------------------------------------------------ denoiser

    def predict(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        sizes: Optional[Sequence[SizeCondition]] = None,
    ) -> torch.Tensor:
        """The model's eps (or v) for the trainer's DDPM sample ``sqrt(a)*x0 + sqrt(1-a)*n`` at integer
        ``timesteps``, through Forge's ``apply_model(x0 + sigma*n, sigma)`` and its denoised output."""
        t = timesteps.to(self.device).long()
        shape = (-1,) + (1,) * (noisy.ndim - 1)
        sigma = self.sigmas[t]
        alpha = self.alphas_cumprod[t].view(shape)
        x = noisy.to(self.device, torch.float32) / alpha.sqrt()
        kwargs = {"c_crossattn": cond["crossattn"].to(self.device)}
        if self.family.size_conditioning:  # SDXL
            kwargs["y"] = self._sdxl_vector(cond["pooled"].to(self.device), sizes)
        denoised = self._unet_patcher.model.apply_model(x, sigma, **kwargs).float()
        s = sigma.view(shape)
        if self._host_prediction == "v_prediction":  # Forge: D = x / (s^2+1) - v * s / sqrt(s^2+1)
            return (x / (s**2 + 1) - denoised) * (s**2 + 1).sqrt() / s
        return (x - denoised) / s  # D = x - eps * s

    def _sdxl_vector(self, pooled: torch.Tensor, sizes: Optional[Sequence[SizeCondition]]) -> torch.Tensor:
        """Forge's SDXL ``y``: the pooled CLIP-G embedding, then each of the six size numbers (h, w, crop top,
        crop left, target h, target w) through the engine's own timestep embedder, per sample."""
        if not sizes:
            raise ConfigError("SDXL training needs each sample's size conditioning.")
        ids = torch.tensor([s.time_ids() for s in sizes], dtype=torch.float32)
        embedded = self.engine.embedder(ids.flatten()).reshape(len(sizes), -1)
        return torch.cat([pooled, embedded.to(pooled)], dim=1)

    # ------------------------------------------------------------ LoRA wiring

    def _begin_training(self) -> None:
        """Make the live weights trainable (clones of inference tensors), freeze them, switch Forge's
        checkpointing and attention for the run, guard its in-place residuals; recorded for ``restore``."""
        if not self._changes.empty:
            return
        roots = [self.unet, *self.text_encoder_modules()]
        replace_inference_tensors(roots)
        for root in roots:
            self._changes.remember_modes(root)
            self._changes.freeze(root)
        for module in self.unet.modules():
            for flag in HOST_CHECKPOINT_FLAGS:
                if module.__dict__.get(flag) is True:
                    self._changes.set_attribute(module, flag, False)
        guard_inplace_residuals(self.unet, self._changes)
        for owner, name, value in self._attention_overrides:
            self._changes.set_attribute(owner, name, value)

    def lora_targets(
        self, train_text_encoder: bool, extra: Sequence[str] = (), conv: bool = False
    ) -> List[Tuple[str, nn.Module]]:
        if train_text_encoder and self._text_device() != self.device:
            raise HostModelNotTrainable(
                f"Forge keeps the text encoder on {self._text_device()} and the UNet on {self.device}; "
                "text-encoder LoRA training needs both on one device."
            )
        self._begin_training()
        targets = [
            (unet_lora_name_from_ldm(path, self.family, self.names), module)
            for path, module in ldm_unet_targets(self.unet, self.names, extra, conv)
        ]
        if train_text_encoder:
            for index, module in enumerate(self.text_encoder_modules()):
                targets += [
                    (text_lora_name(path, self.family, index), layer)
                    for path, layer in find_targets(module, TEXT_CONTAINERS)
                ]
        return targets

    def enable_gradient_checkpointing(self, text_encoders: bool) -> None:
        self._begin_training()
        checkpoint_host_blocks(self._changes, self.unet, self.text_encoder_modules() if text_encoders else [])

    def restore(self) -> None:
        """Undo every change training made: flags, modes, wrapped forwards, attention and checkpoint switches."""
        self._changes.undo()


__all__ = ["ForgeHostAdapter", "forge_architecture", "forge_prompt_chunks", "host_prediction_type"]
