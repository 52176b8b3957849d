"""Stable Diffusion base models from the Hugging Face Hub: which files of a diffusers repository training
reads, and ``base_model`` resolved to local files (a diffusers repo id, or ``owner/name/file.safetensors``).

Light on imports (no torch): the command line and the standalone app read ``DEFAULT_BASE_MODEL`` from here.
"""

from __future__ import annotations

import os
from typing import Callable, Collection, List, Optional, Tuple

from lora_trainer.hub.files import MissingRepoFiles, weight_files
from lora_trainer.hub.progress import DownloadCallback

# The base model of the command line and the standalone app when a config names none (the WebUI trains
# its loaded checkpoint instead): SD 1.5, the model most LoRAs are trained on, in diffusers layout.
DEFAULT_BASE_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

_DIFFUSERS_WEIGHTS = (("diffusion_pytorch_model", ".safetensors"), ("diffusion_pytorch_model", ".bin"))
_TRANSFORMERS_WEIGHTS = (("model", ".safetensors"), ("pytorch_model", ".bin"))
# (component folder, weight candidates), smallest first so the UNet, the bulk, comes last but one.
_COMPONENTS = (
    ("text_encoder", _TRANSFORMERS_WEIGHTS),
    ("text_encoder_2", _TRANSFORMERS_WEIGHTS),
    ("vae", _DIFFUSERS_WEIGHTS),
    ("unet", _DIFFUSERS_WEIGHTS),
)
_OPTIONAL_COMPONENTS = ("text_encoder_2",)  # SDXL only
_TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
MODEL_INDEX = "model_index.json"


class DiffusersSdFiles:
    """What ``models.loading`` reads from a diffusers SD1/SD2/SDXL repository: ``model_index.json``, the
    scheduler config, each component's config and weights (safetensors preferred, non-variant), the
    tokenizer folders. Never the safety checker, the variants or the single-file checkpoints beside them.
    ``model_index.json`` comes last: its presence in the cache means every other planned file is there."""

    label = "SD base model"

    def plan(self, names: Collection[str], cached: Collection[str] = ()) -> List[str]:
        names = set(names)
        missing: List[str] = []
        chosen = sorted(n for n in names if n.split("/", 1)[0] in _TOKENIZER_FOLDERS and "/" in n)
        if SCHEDULER_CONFIG in names:
            chosen.append(SCHEDULER_CONFIG)
        else:
            missing.append(SCHEDULER_CONFIG)
        for folder, candidates in _COMPONENTS:
            if folder in _OPTIONAL_COMPONENTS and not any(n.startswith(folder + "/") for n in names):
                continue
            config = f"{folder}/config.json"
            weights = weight_files(names, folder, candidates)
            if config not in names:
                missing.append(config)
            if weights is None:
                missing.append(f"{folder}/{candidates[0][0]}{candidates[0][1]}")
            if config in names and weights is not None:
                chosen += [config, *weights]
        if MODEL_INDEX not in names:
            missing.insert(0, MODEL_INDEX)
        if missing:
            raise MissingRepoFiles(missing)
        return [*chosen, MODEL_INDEX]

    def describe(self) -> str:
        return (
            "model_index.json, scheduler/scheduler_config.json, tokenizer/*, and config.json with "
            "model.safetensors (text_encoder) or diffusion_pytorch_model.safetensors (vae, unet) in each component "
            "folder"
        )

    def include_patterns(self) -> List[str]:
        return [
            MODEL_INDEX,
            SCHEDULER_CONFIG,
            "tokenizer*/*",
            "text_encoder*/config.json",
            "text_encoder*/model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
        ]


def resolve_base_model(
    reference: str,
    *,
    on_download: Optional[DownloadCallback] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Tuple[str, Optional[str]]:
    """(local path, Hub name or None) for ``base_model``: an existing path as it is; a Hub repository id
    (diffusers layout) or ``owner/name/file.safetensors`` fetched into the Hugging Face cache on first use.
    Anything else is returned as given, for the loader's own "not found" message.

    Raises the ``lora_trainer.hub.errors`` HubErrors (offline and not cached, gated, not found, cut).
    """
    from lora_trainer.hub.reference import as_hub_reference

    ref = None if os.path.exists(reference) else as_hub_reference(reference)
    if ref is None:
        return reference, None
    from lora_trainer.hub.fetch import fetch_file, fetch_repo_files

    common = dict(
        as_given=reference,
        place_hint="download a checkpoint yourself and set base_model to its path (a diffusers folder or a "
        ".safetensors file)",
        download_command=f"python -m lora_trainer download {reference}",
        on_progress=on_download,
        log=log,
    )
    if ref.filename:
        # A ``<name>.yaml`` beside a checkpoint tells its prediction type (loading reads it, as the WebUI does).
        beside = [os.path.splitext(ref.filename)[0] + ".yaml"]
        return fetch_file(ref, "SD base model", beside=beside, **common), os.path.basename(ref.filename)
    return fetch_repo_files(ref, DiffusersSdFiles(), **common), ref.repo_text()
