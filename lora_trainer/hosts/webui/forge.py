"""Forge as a host (Forge Neo first, lllyasviel's Forge alike): its ``ForgeDiffusionEngine`` trained in place by
``ForgeHostAdapter``.

The host's own API does the host's part: the LoRAs Forge merged for earlier generations are undone by loading
``forge_objects_original``'s patchers through ``memory_management.load_models_gpu`` (Forge restores each merged
weight from its backup), and its LoRA state is reset so the next generation reads LoRA files afresh (a rewritten
file under the same name gives its new weights). SageAttention, which has no backward, is swapped for Forge's
PyTorch attention for the run. The run uses Forge's own "Clip skip" setting (Neo's default is 2) and records it.

Models this host file does not train in place (SD2, fp8/quantised storage, layers Forge streams in from the CPU,
the text encoder on another device than the UNet for text-encoder training) train from the checkpoint file.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
from typing import Any, List, Optional

from lora_trainer.config import CommonConfig, ImageConfig
from lora_trainer.hosts.webui.builtin_lora import builtin_networks
from lora_trainer.hosts.webui.facts import HostFacts, host_clip_skip_setting
from lora_trainer.hosts.webui.host import IN_PLACE, REFUSED, TrainingPlan, WebUIHost, from_file_or_refusal

SDXL_MINIMAL_CLIP_SKIP = 2  # Forge's SDXL engines never go above the penultimate layer
FLOAT8 = ("float8",)  # storage dtypes (by name) that cannot be trained through


def parts_of(model: Any) -> Any:
    return model.forge_objects_original


def family(model: Any) -> str:
    """SD1, SD2, SDXL or the engine's class name for anything else."""
    if getattr(model, "is_sdxl", False):
        return "SDXL" if hasattr(model, "text_processing_engine_l") else "SDXL refiner"
    if getattr(model, "is_sd2", False):
        return "SD2"
    if getattr(model, "is_sd1", False):
        return "SD1"
    return type(model).__name__


def reset_lora_state(model: Any) -> None:
    """Forge's "no LoRA applied" state: originals in use and no LoRA hash, so the next generation applies
    whatever its prompt asks for from the files on disk."""
    original = parts_of(model)
    for attribute in ("forge_objects", "forge_objects_after_applying_lora"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, original.shallow_copy())
    model.current_lora_hash = str([])


def sage_attention_overrides(model: Any) -> List[tuple]:
    """(module, "attention_function", PyTorch attention) when Forge's UNet attention has no backward."""
    unet_module = sys.modules.get(type(parts_of(model).unet.model.diffusion_model).__module__)
    current = getattr(unet_module, "attention_function", None)
    if current is None or "sage" not in getattr(current, "__name__", "").lower():
        return []
    attention = sys.modules.get("backend.attention")
    pytorch = getattr(attention, "attention_pytorch", None)
    return [(unet_module, "attention_function", pytorch)] if pytorch is not None else []


class ForgeHost(WebUIHost):
    """Forge Neo / lllyasviel's Forge: ``shared.sd_model`` is a ``ForgeDiffusionEngine``."""

    name = "Forge"

    def matches(self, model: Any) -> bool:
        original = getattr(model, "forge_objects_original", None)
        return original is not None and hasattr(getattr(original.unet, "model", None), "predictor")

    def architecture(self, model: Any) -> str:
        return family(model)

    def prediction_label(self, model: Any) -> str:
        kind = getattr(parts_of(model).unet.model.predictor, "prediction_type", "epsilon")
        return "v-prediction" if kind in ("v", "v_prediction") else str(kind)

    def plan(self, model: Any, cfg: Optional[CommonConfig] = None) -> TrainingPlan:
        from lora_trainer.hosts.forge_adapter import forge_architecture, host_prediction_type

        kind = family(model)
        if kind not in ("SD1", "SD2", "SDXL"):
            return TrainingPlan(
                REFUSED, f"{kind} models are not supported by the trainer (SD1.x, SD2.x and SDXL are)", self
            )
        try:
            host_prediction_type(parts_of(model).unet.model.predictor)
        except Exception as exc:
            return TrainingPlan(REFUSED, str(exc), self)
        if forge_architecture(model) is None:
            return from_file_or_refusal(self, model, f"this Forge host file trains SD1 and SDXL in place, not {kind}")
        storage = str(getattr(parts_of(model).unet.model, "storage_dtype", ""))
        if any(marker in storage for marker in FLOAT8) or "nf4" in storage or "gguf" in storage:
            return from_file_or_refusal(
                self, model, f"Forge stores the UNet as {storage}, which cannot be trained through in place"
            )
        unet_device = getattr(parts_of(model).unet, "load_device", None)
        text_device = getattr(parts_of(model).clip.patcher, "load_device", unet_device)
        if isinstance(cfg, ImageConfig) and cfg.train_text_encoder and str(text_device) != str(unet_device):
            return from_file_or_refusal(
                self,
                model,
                f"Forge runs the text encoder on {text_device} and the UNet on {unet_device}; text-encoder "
                "training in place needs both on one device",
            )
        if getattr(parts_of(model).unet.model, "model_lowvram", False):
            return from_file_or_refusal(
                self, model, "Forge keeps part of the UNet off the GPU (its low-VRAM memory state)"
            )
        return TrainingPlan(
            IN_PLACE, f"no second copy is loaded; clip skip {self.clip_skip(model)} from its settings", self
        )

    def facts(self, model: Any) -> HostFacts:
        kmodel = parts_of(model).unet.model
        import torch

        device = getattr(parts_of(model).unet, "load_device", None) or torch.device("cpu")
        dtype = getattr(kmodel, "computation_dtype", None) or torch.float32
        return HostFacts(device=device, dtype=dtype, lowvram=False, medvram=False, fp8=False)

    def clip_skip(self, model: Any) -> int:
        """The host's "Clip skip" setting as Forge applies it to this model."""
        value = host_clip_skip_setting(default=2)
        if getattr(model, "is_sdxl", False):
            value = max(value, SDXL_MINIMAL_CLIP_SKIP)
        return value

    def configure(self, cfg: CommonConfig, model: Any) -> CommonConfig:
        """Train with Forge's clip skip, counted as the engine counts it (its SDXL 2 is the engine's 1), so the
        file's ``ss_clip_skip`` and the standalone engine agree on what was trained."""
        if not isinstance(cfg, ImageConfig):
            return cfg
        clip_skip = self.clip_skip(model)
        if getattr(model, "is_sdxl", False):
            clip_skip -= 1
        return dataclasses.replace(cfg, clip_skip=clip_skip)

    def trainable_roots(self, model: Any) -> List[Any]:
        original = parts_of(model)
        roots = [original.unet.model.diffusion_model]
        cond = original.clip.cond_stage_model
        roots += [getattr(cond, name).transformer for name in ("clip_l", "clip_g") if hasattr(cond, name)]
        return roots

    def prepare(self, model: Any) -> None:
        """Undo the LoRAs Forge merged (its loader restores every merged weight from its backup when the
        originals' patchers load) and load the parts."""
        import torch
        from backend import memory_management

        from lora_trainer.hosts.live_weights import HostModelNotTrainable, weights_off_device

        reset_lora_state(model)
        original = parts_of(model)
        with torch.inference_mode():  # as Forge loads for a generation (see ForgeHostAdapter.load)
            memory_management.load_models_gpu([original.unet, original.clip.patcher, original.vae.patcher])
        unet = original.unet
        away = weights_off_device(unet.model.diffusion_model, unet.load_device)
        if away or getattr(unet.model, "model_lowvram", False):
            raise HostModelNotTrainable(
                f"Forge keeps {away or 'some'} of the UNet's weights off {unet.load_device} (its low-VRAM memory "
                "state streams them in during each step), which cannot be trained through in place"
            )

    def make_adapter(self, model: Any) -> Any:
        from backend import memory_management

        from lora_trainer.hosts.forge_adapter import ForgeHostAdapter

        return ForgeHostAdapter(
            model,
            load_models=memory_management.load_models_gpu,
            attention_overrides=sage_attention_overrides(model),
        )

    def free_model(self) -> None:
        """Forge's own unload; lllyasviel's Forge only moves models off the GPU there, so its loaded engine is
        also dropped as Forge drops it before loading another checkpoint."""
        from backend import memory_management
        from modules import sd_models, shared

        seed_clip_vocabulary(sd_models.model_data.sd_model)
        sd_models.unload_model_weights()
        data = sd_models.model_data
        if getattr(data, "sd_model", None) is not None and hasattr(data.sd_model, "forge_objects"):
            placeholder = getattr(sd_models, "FakeInitialModel", lambda: None)()
            data.sd_model = placeholder
            shared.sd_model = placeholder
            data.forge_hash = ""
            memory_management.unload_all_models()
        gc.collect()
        memory_management.soft_empty_cache()

    def reload_model(self) -> None:
        from modules import sd_models

        sd_models.forge_model_reload()

    def refresh_loras(self, name: str) -> None:
        """List the new file and make Forge read LoRA files afresh at the next generation."""
        from modules import sd_models

        networks = builtin_networks()
        if networks is not None:
            networks.list_available_networks()
        model = getattr(sd_models.model_data, "sd_model", None)
        if self.matches(model):
            reset_lora_state(model)


def seed_clip_vocabulary(model: Any) -> None:
    """Let the engine's own loader build its CLIP tokenizer where open_clip (which ships the vocabulary) is not
    installed, as in Forge Neo: from the merges of the CLIP tokenizer Forge has loaded."""
    import importlib.util

    if importlib.util.find_spec("open_clip") is not None or not hasattr(model, "forge_objects_original"):
        return
    from lora_trainer.models.tokenizer import default_tokenizer_dir, write_clip_tokenizer_files

    engines = [getattr(model, n, None) for n in ("text_processing_engine", "text_processing_engine_l")]
    tokenizer = next((e.tokenizer for e in engines if e is not None), None)
    merges = clip_merges(tokenizer)
    if merges:
        write_clip_tokenizer_files(default_tokenizer_dir(), merges=merges)


def clip_merges(tokenizer: Any) -> Optional[List[str]]:
    """A transformers CLIP tokenizer's BPE merges in rank order ("a b" lines), or None."""
    import os

    ranks = getattr(tokenizer, "bpe_ranks", None)
    if ranks:
        return [" ".join(pair) for pair, _rank in sorted(ranks.items(), key=lambda item: item[1])]
    path = os.path.join(str(getattr(tokenizer, "name_or_path", "")), "merges.txt")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return [line for line in fh.read().split("\n")[1:] if line]
