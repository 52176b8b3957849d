"""The memory a run will need, estimated before its first step, and which options lower it.

Counted exactly: the frozen denoiser's weights in their storage dtype (fp8 where ``fp8_base`` stored them),
the LoRA's weights, gradients and AdamW moments (16 bytes a parameter in fp32), and the text encoders when
their outputs are not cached. Estimated: activations, from the family's measured order of magnitude per
native-resolution sample (``ModelFamily.activation_factor``), scaled by pixels and batch size, and divided
when gradient checkpointing recomputes them. Orders of magnitude, not promises; the log says which option
would save how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch
from torch import nn

GIB = 2**30
BYTES_PER_TRAINED_PARAM = 16  # fp32 weight + gradient + two AdamW moments
ACTIVATION_GIB_PER_SD1_512_SAMPLE = 2.5
CHECKPOINTING_DIVISOR = 4.0


def module_bytes(modules: Iterable[Optional[nn.Module]]) -> int:
    """Bytes of the parameters and buffers of ``modules`` (None entries are skipped), shared tensors once."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class MemoryEstimate:
    base_gib: float  # the frozen denoiser as stored
    encoders_gib: float  # text encoders / VAE kept during the steps (not cached)
    lora_gib: float
    activations_gib: float
    advice: List[str]

    @property
    def total_gib(self) -> float:
        return self.base_gib + self.encoders_gib + self.lora_gib + self.activations_gib

    def describe(self) -> str:
        text = (
            f"memory estimate: about {self.total_gib:.1f} GiB (base model {self.base_gib:.1f}, kept encoders "
            f"{self.encoders_gib:.1f}, LoRA with optimizer state {self.lora_gib:.2f}, activations "
            f"{self.activations_gib:.1f})"
        )
        return text + (f"; to lower it: {'; '.join(self.advice)}" if self.advice else "")


def estimate_activations_gib(cfg, family) -> float:
    """The activations one step keeps for its backward pass, in GiB (see the module docstring)."""
    per_sample = ACTIVATION_GIB_PER_SD1_512_SAMPLE * family.activation_factor
    pixels = (cfg.resolution / family.native_resolution) ** 2
    activations = per_sample * pixels * cfg.batch_size
    if cfg.gradient_checkpointing:
        activations /= CHECKPOINTING_DIVISOR
    return activations


def estimate_memory(
    cfg,
    family,
    denoiser: nn.Module,
    kept_encoders: Iterable[Optional[nn.Module]],
    lora_parameters: int,
    kept_vae: Optional[nn.Module] = None,
) -> MemoryEstimate:
    """See the module docstring; ``cfg`` is the run's ImageConfig, ``kept_encoders`` the text encoders kept
    through the steps (their outputs not cached), ``kept_vae`` the VAE kept to encode every step (latents not
    cached)."""
    base = module_bytes([denoiser]) / GIB
    text_encoders = module_bytes(kept_encoders) / GIB
    vae = module_bytes([kept_vae]) / GIB
    encoders = text_encoders + vae
    lora = lora_parameters * BYTES_PER_TRAINED_PARAM / GIB
    activations = estimate_activations_gib(cfg, family)
    advice = []
    if not cfg.gradient_checkpointing:
        saved = activations * (1 - 1 / CHECKPOINTING_DIVISOR)
        advice.append(f"gradient_checkpointing: true (about -{saved:.1f} GiB)")
    stored = {p.dtype for p in denoiser.parameters()}
    if not getattr(cfg, "fp8_base", False) and torch.float32 in stored:
        advice.append(f"mixed_precision: bf16, which loads the base in bf16 (about -{base / 2:.1f} GiB)")
    elif not getattr(cfg, "fp8_base", False) and family.supports_fp8_base:
        advice.append(f"fp8_base: true (about -{base / 2:.1f} GiB)")
    if text_encoders > 0:
        advice.append(
            f"train_text_encoder: false, so text-encoder outputs are cached and the encoders freed "
            f"(about -{text_encoders:.1f} GiB)"
        )
    if vae > 0:
        # Latents go uncached when caching is off or random flips make them vary per step.
        option = "random_flip: false" if getattr(cfg, "cache_latents", True) else "cache_latents: true"
        advice.append(f"{option}, so latents are cached and the VAE freed (about -{vae:.1f} GiB)")
    if cfg.batch_size > 1:
        advice.append(f"batch_size: 1 with gradient_accumulation_steps: {cfg.batch_size}")
    return MemoryEstimate(base, encoders, lora, activations, advice)
