"""Facts about the WebUI the extension runs in: the loaded model, device and precision, folders, settings.

Every ``modules`` import happens inside a function, so importing this file costs nothing and works outside
the WebUI (the tests inject stand-in ``modules`` packages). The other modules of this package ask here rather
than reading the host's globals themselves.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, Iterator, Optional

from lora_trainer.errors import ConfigError

JOBS_FOLDER = os.path.join("outputs", "lora_trainer")  # under the WebUI's data folder: one sub-folder per run


@dataclass(frozen=True)
class HostFacts:
    """What the host's settings mean for training."""

    device: Any  # torch.device
    dtype: Any  # torch.dtype of the UNet weights
    lowvram: bool
    medvram: bool
    fp8: bool

    @property
    def mixed_precision(self) -> str:
        """The engine's precision name for the host's weights: autocast to what the host computes in."""
        import torch

        if getattr(self.device, "type", "cpu") == "cpu":
            return "bf16" if self.dtype == torch.bfloat16 else "no"
        if self.dtype == torch.float16:
            return "fp16"
        if self.dtype == torch.bfloat16:
            return "bf16"
        return "no"


PLACEHOLDER_MODELS = ("FakeInitialModel",)  # what Forge holds before its first load and after an unload


def is_placeholder(model: Any) -> bool:
    return model is None or type(model).__name__ in PLACEHOLDER_MODELS


def loaded_model() -> Any:
    """The checkpoint the WebUI holds right now, or None; never triggers a load (the tab polls this)."""
    from modules import sd_models

    model = getattr(sd_models.model_data, "sd_model", None)
    return None if is_placeholder(model) else model


def host_model() -> Any:
    """The loaded checkpoint, loading it if the WebUI has not yet (as a generation would: AUTOMATIC1111 on
    first access to ``shared.sd_model``, Forge through ``sd_models.forge_model_reload``)."""
    from modules import sd_models, shared

    model = shared.sd_model
    reload = getattr(sd_models, "forge_model_reload", None)
    if is_placeholder(model) and reload is not None:
        try:
            model = reload()[0]
        except Exception as exc:  # Forge says "Failed to find available model..." without a checkpoint chosen
            raise ConfigError(
                f"Forge could not load its checkpoint ({exc}): choose one in the checkpoint menu."
            ) from None
    if is_placeholder(model):
        raise ConfigError("No checkpoint is loaded in the WebUI: choose one in the checkpoint menu first.")
    return model


def model_family(model: Any):
    """The engine's model family of the loaded checkpoint, from the flags the WebUI sets; None for SD3."""
    from lora_trainer.models.families import SD1, SD2, SDXL

    if getattr(model, "is_sd3", False):
        return None
    if getattr(model, "is_sdxl", False):
        return SDXL
    if getattr(model, "is_sd2", False):
        return SD2
    return SD1


def architecture(model: Any) -> str:
    """ "SD1", "SD2", "SDXL" or "SD3", from the flags the WebUI sets on its models."""
    family = model_family(model)
    return family.name.upper() if family is not None else "SD3"


def prediction_label(model: Any) -> str:
    return "v-prediction" if getattr(model, "parameterization", "eps") == "v" else "epsilon"


def checkpoint_name(model: Any) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    for attr in ("name_for_extra", "model_name", "name", "title"):
        value = getattr(info, attr, None)
        if value:
            return str(value)
    return "unknown checkpoint"


def host_facts(model: Any) -> HostFacts:
    from modules import devices, shared

    opts = shared.cmd_opts
    medvram = bool(
        getattr(opts, "medvram", False) or (getattr(opts, "medvram_sdxl", False) and getattr(model, "is_sdxl", False))
    )
    dtype = getattr(devices, "dtype_unet", None) or devices.dtype
    return HostFacts(
        device=devices.device,
        dtype=dtype,
        lowvram=bool(getattr(opts, "lowvram", False)),
        medvram=medvram,
        fp8=bool(getattr(devices, "fp8", False)),
    )


@contextlib.contextmanager
def scoped_host_options(**values: Any) -> Iterator[None]:
    """Set host settings for a moment (in ``opts.data``, no callbacks, no settings file write), then put them back."""
    from modules import shared

    data = shared.opts.data
    missing = object()
    before = {key: data.get(key, missing) for key in values}
    data.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is missing:
                data.pop(key, None)
            else:
                data[key] = value


def host_clip_skip(clip_skip: int) -> ContextManager[None]:
    """Encode prompts with the run's clip skip: the host's prompt wrapper reads its "Clip skip" setting.

    Written into the settings' data directly (no on-change callbacks, no settings file write) and put back.
    """
    return scoped_host_options(CLIP_stop_at_last_layers=int(clip_skip))


def host_clip_skip_setting(default: int = 1) -> int:
    """The host's own "Clip skip" setting (AUTOMATIC1111's default is 1, Forge Neo's 2)."""
    from modules import shared

    value = shared.opts.data.get("CLIP_stop_at_last_layers")
    if value is None:
        value = getattr(shared.opts, "CLIP_stop_at_last_layers", default)
    return int(value or default)


def ensure_host_temp_dir() -> None:
    """Create the folder the host's gradio saves images into (Forge Neo's ``temp_dir`` setting) if missing.

    Neo writes every PIL image a component shows there but creates the folder only when the setting changes, so
    on a fresh install the tab's loss plot (an image from the start) would fail to build."""
    from modules import shared

    folder = getattr(getattr(shared, "opts", None), "temp_dir", "") or ""
    if folder:
        os.makedirs(folder, exist_ok=True)


def lora_dir() -> str:
    """The builtin Lora extension's folder, ``--lora-dir`` respected."""
    from modules import shared

    folder = getattr(shared.cmd_opts, "lora_dir", None)
    if not folder:
        from modules import paths

        folder = os.path.join(paths.models_path, "Lora")
    return os.path.abspath(folder)


def jobs_dir() -> str:
    """Where runs keep their intermediates: the WebUI's data folder, outside the Lora folder."""
    from modules import paths_internal

    return os.path.abspath(os.path.join(paths_internal.data_path, JOBS_FOLDER))


def api_credentials() -> Dict[str, str]:
    """``--api-auth "u1:p1,u2:p2"`` as {user: password}; empty when the host's API is open."""
    from modules import shared

    return parse_api_auth(getattr(shared.cmd_opts, "api_auth", None))


def parse_api_auth(spec: Optional[str]) -> Dict[str, str]:
    credentials: Dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if sep:  # the host itself ignores entries without a colon too
            credentials[user] = password
    return credentials
