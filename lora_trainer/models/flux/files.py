"""Where a Flux model's parts are, as users have them: the files of a WebUI's or ComfyUI's ``models`` folder,
or a diffusers folder.

A WebUI user (Forge, Forge Neo, reForge) has the transformer in ``models/Stable-diffusion/flux1-dev.safetensors``
(or ``models/diffusion_models``), the autoencoder in ``models/VAE/ae.safetensors`` and the text encoders in
``models/text_encoder/clip_l.safetensors`` and ``t5xxl_fp16.safetensors`` (or ``t5xxl_fp8_e4m3fn``); ComfyUI
spells the folders ``diffusion_models``/``unet``, ``vae``, ``text_encoders``/``clip``. The config's ``ae``,
``clip_l`` and ``t5xxl`` options name each file; left empty, each is looked for beside the base model and in
those sibling folders, and a missing one is an error that says where it looked.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from lora_trainer.errors import ModelLoadError

SIBLING_FOLDERS = ("VAE", "vae", "text_encoder", "text_encoders", "clip")
# File-name patterns per part, best first (fp16 T5 before fp8 ones, which lose precision).
PATTERNS = {
    "ae": ("ae.safetensors", "flux*ae*.safetensors", "flux*vae*.safetensors"),
    "clip_l": ("clip_l.safetensors", "clip_l*.safetensors"),
    "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl*.safetensors", "t5*xxl*.safetensors"),
}
DESCRIPTIONS = {
    "ae": "the Flux autoencoder (ae.safetensors)",
    "clip_l": "the CLIP-L text encoder (clip_l.safetensors)",
    "t5xxl": "the T5-XXL text encoder (t5xxl_fp16.safetensors)",
}


@dataclass(frozen=True)
class FluxFiles:
    """A Flux model's parts: single files, or a diffusers ``folder`` (then the other fields are None)."""

    transformer: Optional[str] = None
    ae: Optional[str] = None
    clip_l: Optional[str] = None
    t5xxl: Optional[str] = None
    folder: Optional[str] = None

    def all_paths(self) -> List[str]:
        return [p for p in (self.folder, self.transformer, self.ae, self.clip_l, self.t5xxl) if p]


def search_folders(base_file: str) -> List[str]:
    """The base model's own folder, then its siblings a WebUI or ComfyUI keeps VAEs and text encoders in."""
    here = os.path.dirname(os.path.abspath(base_file))
    models = os.path.dirname(here)
    return [here] + [os.path.join(models, name) for name in SIBLING_FOLDERS]


def find_part(part: str, folders: Sequence[str], patterns: Optional[dict] = None) -> Optional[str]:
    """The first file matching ``part``'s patterns (best pattern first; ``patterns`` defaults to Flux's) in
    ``folders`` (in order), or None."""
    listings = {f: sorted(os.listdir(f)) for f in folders if os.path.isdir(f)}
    for pattern in (patterns or PATTERNS)[part]:
        for folder in folders:
            for name in listings.get(folder, ()):
                if fnmatch.fnmatch(name.lower(), pattern) and os.path.isfile(os.path.join(folder, name)):
                    return os.path.join(folder, name)
    return None


def locate_parts(path: str, cfg, patterns: dict, descriptions: dict, model: str) -> Dict[str, str]:
    """{part: file} for each of ``patterns``' parts of the single-file ``model`` whose transformer is ``path``:
    the config's own ``<part>:`` path when set (it must exist), else the first file ``find_part`` meets in the
    transformer's folder and its siblings. Raises ModelLoadError naming a part that cannot be found."""
    folders = search_folders(path)
    found = {}
    for part in patterns:
        given = getattr(cfg, part, None) if cfg is not None else None
        if given:
            if not os.path.isfile(given):
                raise ModelLoadError(f"{part}: {given} does not exist; point it at {descriptions[part]}.")
            found[part] = given
            continue
        located = find_part(part, folders, patterns)
        if located is None:
            raise ModelLoadError(
                f"{model} needs {descriptions[part]} beside the transformer file {os.path.basename(path)}; none "
                f"was found in {', '.join(folders)}. Set `{part}:` in the config to the file's path."
            )
        found[part] = located
    return found


def locate_flux_files(path: str, cfg=None) -> FluxFiles:
    """The parts of the Flux model at ``path`` (a transformer file or a diffusers folder); ``cfg``'s ``ae``,
    ``clip_l`` and ``t5xxl`` win over the search. Raises ModelLoadError naming a part that cannot be found."""
    if os.path.isdir(path):
        return FluxFiles(folder=path)
    return FluxFiles(transformer=path, **locate_parts(path, cfg, PATTERNS, DESCRIPTIONS, "Flux"))
