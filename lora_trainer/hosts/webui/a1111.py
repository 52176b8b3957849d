"""AUTOMATIC1111 as a host: its ldm/sgm model (``shared.sd_model``) trained in place by ``LdmHostAdapter``.

What follows from the host's settings (``--lowvram``, ``--medvram``, fp8 weight storage) and which models this
host file cannot drive are said here, before any work; the builtin Lora extension's merged deltas are unloaded
before training (``builtin_lora``).
"""

from __future__ import annotations

from typing import Any, Optional

from lora_trainer.config import CommonConfig, ImageConfig
from lora_trainer.hosts.webui.facts import HostFacts, architecture, host_clip_skip


def model_refusal(model: Any) -> Optional[str]:
    """Why the loaded model cannot be trained here at all (said in the tab as soon as it is loaded), or None."""
    if hasattr(model, "forge_objects"):
        return (
            "This looks like Forge: its models are reached through Forge's own objects, which this version "
            "of the trainer does not drive yet, so training is refused here. Use the standalone app "
            "(python -m lora_trainer ui) with the same checkpoint file."
        )
    if architecture(model) == "SD3":
        return "SD3 checkpoints are not supported by the trainer (SD1.x, SD2.x and SDXL are)."
    if not hasattr(getattr(model, "model", None), "diffusion_model"):
        return (
            f"The loaded model ({type(model).__name__}) is not an ldm/sgm Stable Diffusion model the trainer "
            "knows; training is refused."
        )
    return None


def refusal(cfg: CommonConfig, facts: HostFacts) -> Optional[str]:
    """Why this run cannot train on this host, or None. Said before starting, never mid-run."""
    if facts.lowvram:
        return (
            "The WebUI runs with --lowvram, which moves model blocks between devices during every forward "
            "pass; training through that is not supported. Restart the WebUI without --lowvram "
            "(--medvram works for UNet-only training)."
        )
    if facts.fp8:
        return (
            "The WebUI stores the model's weights in fp8 (Settings > Optimizations > FP8 weight), which "
            "cannot be trained through. Set FP8 weight to Disable, reload the checkpoint, and try again."
        )
    if facts.medvram and isinstance(cfg, ImageConfig) and cfg.train_text_encoder:
        return (
            "Text-encoder training does not work under --medvram (the WebUI moves the text encoder off the "
            'GPU between uses). Untick "Train text encoder" or restart the WebUI without --medvram.'
        )
    return None


def make_adapter(model: Any, facts: HostFacts) -> Any:
    """``LdmHostAdapter`` on the loaded model, with the host's compute context and its "Clip skip" setting."""
    from modules import devices

    from lora_trainer.hosts.ldm_adapter import LdmHostAdapter

    return LdmHostAdapter(
        model,
        device=facts.device,
        dtype=facts.dtype,
        lowvram=facts.lowvram,
        medvram=facts.medvram,
        fp8=facts.fp8,
        autocast=devices.autocast,
        clip_skip_scope=host_clip_skip,
    )
