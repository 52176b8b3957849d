"""AUTOMATIC1111 as a host: its ldm/sgm model (``shared.sd_model``) trained in place by ``LdmHostAdapter``.

What the host's settings mean for training in place (``--lowvram`` moves blocks during every forward, fp8
weight storage cannot be trained through, ``--medvram`` moves the text encoder away between uses) is said here,
before any work; such runs train from the checkpoint file instead. The builtin Lora extension's merged deltas
are unloaded before training (``builtin_lora``).
"""

from __future__ import annotations

from typing import Any, Optional

from lora_trainer.config import CommonConfig, ImageConfig
from lora_trainer.hosts.webui.builtin_lora import refresh_host_networks, unload_host_networks
from lora_trainer.hosts.webui.facts import (
    HostFacts,
    architecture,
    host_clip_skip,
    host_facts,
    loaded_model,
    prediction_label,
)
from lora_trainer.hosts.webui.host import IN_PLACE, REFUSED, TrainingPlan, WebUIHost, from_file_or_refusal

TRAINED_FAMILIES = ("SD1", "SD2", "SDXL")


def model_refusal(model: Any) -> Optional[str]:
    """Why no path can train the loaded model (said in the tab as soon as it is loaded), or None."""
    family = architecture(model)
    if family not in TRAINED_FAMILIES:
        return f"{family} checkpoints are not supported by the trainer (SD1.x, SD2.x and SDXL are)."
    return None


def refusal(cfg: Optional[CommonConfig], facts: HostFacts) -> Optional[str]:
    """Why this run cannot train in place on this host, or None. Said before starting, never mid-run."""
    if facts.lowvram:
        return (
            "the WebUI runs with --lowvram, which moves model blocks between devices during every forward "
            "pass, and training in place cannot go through that (restart the WebUI without --lowvram to train "
            "in place; --medvram works for UNet-only training)"
        )
    if facts.fp8:
        return (
            "the WebUI stores the model's weights in fp8 (Settings > Optimizations > FP8 weight), which cannot "
            "be trained through (set FP8 weight to Disable and reload the checkpoint to train in place)"
        )
    if facts.medvram and isinstance(cfg, ImageConfig) and cfg.train_text_encoder:
        return (
            "text-encoder training does not work in place under --medvram (the WebUI moves the text encoder "
            'off the GPU between uses; untick "Train text encoder" or restart without --medvram to train in '
            "place)"
        )
    return None


def make_adapter(model: Any, facts: HostFacts) -> Any:
    """``LdmHostAdapter`` on the loaded model, with the host's compute context and its "Clip skip" setting."""
    from modules import devices, shared

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
        fast_attention=not getattr(shared, "loaded_hypernetworks", None),  # they hook the host's attention
    )


def unload_through_sd_models() -> None:
    """The host's own unload (AUTOMATIC1111's API, which reForge and Forge Classic keep)."""
    import gc

    from modules import sd_models

    sd_models.unload_model_weights()
    gc.collect()


def reload_through_sd_models() -> None:
    from modules import sd_models

    sd_models.reload_model_weights()


class A1111Host(WebUIHost):
    """AUTOMATIC1111 1.10: an ldm ``LatentDiffusion`` (SD1/SD2) or a patched sgm ``DiffusionEngine`` (SDXL)."""

    name = "the WebUI"
    adapter_before_lock = True

    def matches(self, model: Any) -> bool:
        return not hasattr(model, "forge_objects") and hasattr(getattr(model, "model", None), "diffusion_model")

    def architecture(self, model: Any) -> str:
        return architecture(model)

    def prediction_label(self, model: Any) -> str:
        return prediction_label(model)

    def plan(self, model: Any, cfg: Optional[CommonConfig] = None) -> TrainingPlan:
        problem = model_refusal(model)
        if problem:
            return TrainingPlan(REFUSED, problem, self)
        why_not = refusal(cfg, self.facts(model))
        if why_not:
            return from_file_or_refusal(self, model, why_not)
        return TrainingPlan(IN_PLACE, "no second copy is loaded", self)

    def facts(self, model: Any) -> HostFacts:
        return host_facts(model)

    def prepare(self, model: Any) -> None:
        import logging

        restored = unload_host_networks(model)
        if restored:
            logging.getLogger(__name__).info(
                "Unloaded LoRA deltas the WebUI had merged into %d modules before training", restored
            )

    def make_adapter(self, model: Any) -> Any:
        return make_adapter(model, self.facts(model))

    def free_model(self) -> None:
        unload_through_sd_models()

    def reload_model(self) -> None:
        reload_through_sd_models()

    def refresh_loras(self, name: str) -> None:
        refresh_host_networks(name, loaded_model())
