"""A loaded model no host file recognises (a fork that changed the model object): trained from the checkpoint
file with the trainer's own loader, the host's model unloaded through whichever of AUTOMATIC1111's or Forge's
unload/reload functions the host has."""

from __future__ import annotations

from typing import Any, Optional

from lora_trainer.config import CommonConfig
from lora_trainer.hosts.webui.builtin_lora import builtin_networks
from lora_trainer.hosts.webui.facts import architecture, host_facts, prediction_label
from lora_trainer.hosts.webui.host import REFUSED, TrainingPlan, WebUIHost, from_file_or_refusal

TRAINED_FAMILIES = ("SD1", "SD2", "SDXL")


class UnrecognisedHost(WebUIHost):
    name = "the WebUI"

    def matches(self, model: Any) -> bool:
        return model is not None

    def architecture(self, model: Any) -> str:
        return architecture(model)

    def prediction_label(self, model: Any) -> str:
        return prediction_label(model)

    def plan(self, model: Any, cfg: Optional[CommonConfig] = None) -> TrainingPlan:
        family = architecture(model)
        if family not in TRAINED_FAMILIES:
            return TrainingPlan(REFUSED, f"{family} checkpoints are not supported by the trainer", self)
        return from_file_or_refusal(
            self,
            model,
            f"the loaded model ({type(model).__name__}) is not an ldm/sgm Stable Diffusion model the trainer knows "
            "how to train in place",
        )

    def facts(self, model: Any):
        return host_facts(model)

    def free_model(self) -> None:
        import gc

        from modules import sd_models

        sd_models.unload_model_weights()
        gc.collect()

    def reload_model(self) -> None:
        from modules import sd_models

        reload = getattr(sd_models, "forge_model_reload", None) or sd_models.reload_model_weights
        reload()

    def refresh_loras(self, name: str) -> None:
        networks = builtin_networks()
        if networks is not None:
            networks.list_available_networks()
