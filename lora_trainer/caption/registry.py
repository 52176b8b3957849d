"""Captioners by name (``blip``, ``clip``, ``wd14``) or by local path, whose kind is detected from its files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional

from lora_trainer.caption.base import Captioner, CaptionerUnavailable
from lora_trainer.hub.progress import DownloadCallback


@dataclass(frozen=True)
class CaptionerOptions:
    """Everything a captioner may be configured with; each loader reads the fields it knows."""

    model_path: Optional[str] = None  # folder, file or Hub repo; None: the default repo (cached, or downloaded)
    device: str = "auto"
    tags_csv: Optional[str] = None  # wd14: selected_tags.csv when not beside the model
    threshold: float = 0.35  # wd14: general tags
    character_threshold: Optional[float] = None  # wd14: character tags (default: threshold)
    max_new_tokens: int = 40  # blip
    num_beams: int = 1  # blip
    clip_arch: Optional[str] = None  # clip: open_clip architecture when model_path is one checkpoint file
    clip_base: Optional[str] = None  # clip: a folder of BLIP weights captioning the base; None: phrases only
    clip_base_from_cache: bool = False  # clip: base caption from the default BLIP (cached, or downloaded)
    on_download: Optional[DownloadCallback] = None  # sees the progress of a first-use download
    log: Optional[Callable[[str], None]] = None  # gets a line before and after a download (default: stderr)


def _load_blip(options: CaptionerOptions) -> Captioner:
    from lora_trainer.caption.blip import load_blip

    return load_blip(
        options.model_path,
        options.device,
        max_new_tokens=options.max_new_tokens,
        num_beams=options.num_beams,
        on_download=options.on_download,
        log=options.log,
    )


def _load_clip(options: CaptionerOptions) -> Captioner:
    from lora_trainer.caption.blip import load_blip
    from lora_trainer.caption.clip_interrogator import load_clip_interrogator

    base = None
    if options.clip_base or options.clip_base_from_cache:
        base = load_blip(
            options.clip_base,
            options.device,
            max_new_tokens=options.max_new_tokens,
            num_beams=options.num_beams,
            on_download=options.on_download,
            log=options.log,
        )
    return load_clip_interrogator(
        options.model_path,
        options.device,
        arch=options.clip_arch,
        base_captioner=base,
        on_download=options.on_download,
        log=options.log,
    )


def _load_wd14(options: CaptionerOptions) -> Captioner:
    from lora_trainer.caption.wd14 import load_wd14

    return load_wd14(
        options.model_path,
        options.device,
        tags_csv=options.tags_csv,
        threshold=options.threshold,
        character_threshold=options.character_threshold,
        on_download=options.on_download,
        log=options.log,
    )


def captioner_loaders() -> Dict[str, Callable[[CaptionerOptions], Captioner]]:
    """Name -> loader. A fresh dict, so callers may add their own (e.g. the WebUI host's interrogators)."""
    return {"blip": _load_blip, "clip": _load_clip, "wd14": _load_wd14}


def detect_kind(path: str) -> str:
    """``blip``, ``clip`` or ``wd14`` for a local model file or folder, from the files it holds."""
    if os.path.isfile(path):
        if path.lower().endswith(".onnx"):
            return "wd14"
        if path.lower().endswith((".safetensors", ".bin", ".pt", ".pth")):
            return "clip"  # a lone checkpoint: open_clip weights, with --clip-arch naming the architecture
        raise CaptionerUnavailable(
            f"cannot tell what kind of captioner {path} is: expected an .onnx tagger "
            "or an open_clip checkpoint file, or a model folder."
        )
    if not os.path.isdir(path):
        raise CaptionerUnavailable(f"model path not found: {path}")
    names = set(os.listdir(path))
    if "open_clip_config.json" in names:
        return "clip"
    if any(name.lower().endswith(".onnx") for name in names):
        return "wd14"
    if "config.json" in names:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
                model_type = str(json.load(fh).get("model_type", ""))
        except (OSError, ValueError):
            model_type = ""
        if model_type.startswith("blip"):
            return "blip"
    raise CaptionerUnavailable(
        f"cannot tell what kind of captioner is in {path}: expected model.onnx + selected_tags.csv (wd14), "
        "open_clip_config.json + weights (clip), or a BLIP folder whose config.json has model_type 'blip'."
    )


def _with_model_path(options: CaptionerOptions, path: str) -> CaptionerOptions:
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model.onnx")):
        onnx_files = sorted(name for name in os.listdir(path) if name.lower().endswith(".onnx"))
        if len(onnx_files) == 1:  # a tagger folder whose model has another name
            path = os.path.join(path, onnx_files[0])
    return replace(options, model_path=path)


def load_captioner(
    model: str,
    options: CaptionerOptions = CaptionerOptions(),
    loaders: Optional[Dict[str, Callable[[CaptionerOptions], Captioner]]] = None,
) -> Captioner:
    """A captioner by name (``blip``/``clip``/``wd14``, or any name in ``loaders``) or from a local path whose
    kind is detected. ``loaders`` defaults to ``captioner_loaders()``."""
    loaders = captioner_loaders() if loaders is None else loaders
    if model in loaders:
        return loaders[model](options)
    if os.path.exists(model):
        kind = detect_kind(model)
        return captioner_loaders()[kind](_with_model_path(options, model))
    raise CaptionerUnavailable(f"unknown captioner {model!r}: use one of {', '.join(loaders)} or a local model path.")
