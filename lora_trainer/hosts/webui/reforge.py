"""reForge and Forge Classic as hosts: an AUTOMATIC1111-style model object (``model.diffusion_model``,
``cond_stage_model``) whose parts are Forge's own (ldm_patched modules, ``forge_objects`` patchers).

Their loaded model is neither of the two the trainer drives in place: the ldm adapter's text-encoder and VAE
paths meet Forge's patched encoders (SDXL's second encoder is a transformers CLIP, not open_clip; the VAE
encoding samples), and the Forge adapter's text path needs Forge's text-processing engines, which they do not
have. So a run trains from the checkpoint file with the trainer's own loader: the host's model is unloaded
through AUTOMATIC1111's API (which both keep) and loaded again afterwards.
"""

from __future__ import annotations

from typing import Any, Optional

from lora_trainer.config import CommonConfig
from lora_trainer.hosts.webui.a1111 import model_refusal, reload_through_sd_models, unload_through_sd_models
from lora_trainer.hosts.webui.builtin_lora import builtin_networks
from lora_trainer.hosts.webui.facts import architecture, host_facts, loaded_model, prediction_label
from lora_trainer.hosts.webui.host import REFUSED, TrainingPlan, WebUIHost, from_file_or_refusal


class ReForgeHost(WebUIHost):
    """reForge / Forge Classic: ``forge_objects`` on an AUTOMATIC1111-style model."""

    name = "reForge / Forge Classic"

    def matches(self, model: Any) -> bool:
        return hasattr(model, "forge_objects")  # asked after ForgeHost, which takes Forge's own engine

    def architecture(self, model: Any) -> str:
        return architecture(model)

    def prediction_label(self, model: Any) -> str:
        return prediction_label(model)

    def plan(self, model: Any, cfg: Optional[CommonConfig] = None) -> TrainingPlan:
        problem = model_refusal(model)
        if problem:
            return TrainingPlan(REFUSED, problem, self)
        return from_file_or_refusal(
            self,
            model,
            "this looks like reForge or Forge Classic, whose loaded model mixes AUTOMATIC1111's objects with "
            "Forge's patched parts, which the trainer does not drive in place",
        )

    def facts(self, model: Any):
        return host_facts(model)

    def free_model(self) -> None:
        unload_through_sd_models()

    def reload_model(self) -> None:
        reload_through_sd_models()

    def refresh_loras(self, name: str) -> None:
        networks = builtin_networks()
        if networks is not None:
            networks.list_available_networks()
        model = loaded_model()
        if model is not None and hasattr(model, "current_lora_hash"):
            model.current_lora_hash = str([])  # read LoRA files afresh at the next generation
