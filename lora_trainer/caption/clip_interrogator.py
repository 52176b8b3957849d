"""CLIP interrogation with open_clip: rank phrase lists against each image and append the best phrases to a
base caption (from another captioner, or the best medium when there is none).

Phrase embeddings are computed once when the captioner is built; captioning a batch then costs one image
encoder pass and a matrix product.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from PIL import Image

from lora_trainer.caption.base import Captioner, CaptionerUnavailable, resolve_device
from lora_trainer.caption.locate import WeightsSpec, hf_cache_snapshot, resolve_weights_folder
from lora_trainer.caption.phrases import DEFAULT_PHRASE_LISTS
from lora_trainer.hub.progress import DownloadCallback

CLIP_WEIGHTS = WeightsSpec(
    label="CLIP (open_clip)",
    repo_id="laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    required=(
        ("open_clip_config.json",),
        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    ),
    suggested_folder="models/caption/clip",
    name="clip",
)
DEFAULT_CLIP_ARCH = "ViT-L-14"  # the architecture of CLIP_WEIGHTS.repo_id, and of SD 1.x's text encoder

# How many phrases each list contributes; the flavour list describes several aspects, the others one each.
DEFAULT_TOP_K: Dict[str, int] = {"medium": 1, "style": 1, "lighting": 1, "flavour": 3}


class ClipInterrogator(Captioner):
    """Appends the best-matching phrases of each list to a base caption."""

    name = "clip"

    def __init__(
        self,
        model,
        preprocess,
        tokenizer,
        device: str,
        *,
        phrase_lists: Mapping[str, Sequence[str]] = DEFAULT_PHRASE_LISTS,
        top_k: Mapping[str, int] = DEFAULT_TOP_K,
        base_captioner: Optional[Captioner] = None,
        text_batch_size: int = 256,
    ) -> None:
        import torch

        self._model = model
        self._preprocess = preprocess
        self._device = device
        self._base = base_captioner
        self._top_k = dict(top_k)
        self._lists: List[Tuple[str, Tuple[str, ...], "torch.Tensor"]] = []
        with torch.inference_mode():
            for list_name, phrases in phrase_lists.items():
                phrases = tuple(phrases)
                chunks = [
                    self._encode_text(tokenizer(list(phrases[i : i + text_batch_size])))
                    for i in range(0, len(phrases), text_batch_size)
                ]
                self._lists.append((list_name, phrases, torch.cat(chunks)))

    def _encode_text(self, tokens):
        features = self._model.encode_text(tokens.to(self._device)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def _encode_images(self, images: Sequence[Image.Image]):
        import torch

        dtype = next(self._model.parameters()).dtype
        pixels = torch.stack([self._preprocess(image) for image in images]).to(self._device, dtype=dtype)
        features = self._model.encode_image(pixels).float()
        return features / features.norm(dim=-1, keepdim=True)

    def rank(self, images: Sequence[Image.Image]) -> List[Dict[str, List[str]]]:
        """For each image, the best phrases of each list (best first)."""
        import torch

        with torch.inference_mode():
            image_features = self._encode_images(images)
            picks: List[Dict[str, List[str]]] = [{} for _ in images]
            for list_name, phrases, text_features in self._lists:
                k = min(self._top_k.get(list_name, 1), len(phrases))
                if k <= 0:
                    continue
                best = (image_features @ text_features.T).topk(k, dim=-1).indices.tolist()
                for image_picks, indices in zip(picks, best, strict=True):
                    image_picks[list_name] = [phrases[i] for i in indices]
        return picks

    def caption(self, images: Sequence[Image.Image]) -> List[str]:
        if not images:
            return []
        bases = self._base.caption(images) if self._base is not None else [""] * len(images)
        captions = []
        for base, picks in zip(bases, self.rank(images), strict=True):
            parts = [base.strip()] if base.strip() else []
            for phrases in picks.values():
                parts.extend(p for p in phrases if p not in parts)
            captions.append(", ".join(parts))
        return captions

    def close(self) -> None:
        self._model = None
        if self._base is not None:
            self._base.close()


def _checkpoint_in(folder: str) -> Optional[str]:
    for alternatives in CLIP_WEIGHTS.required[1:]:
        for name in alternatives:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return None


def _model_source(model_path: Optional[str], arch: Optional[str], **fetch) -> Tuple[str, Optional[str], str]:
    """(open_clip model name, checkpoint file or None, what to name in errors) for the weights.

    A folder with open_clip_config.json loads as ``local-dir:``; a lone checkpoint, or a folder (or cached
    snapshot, as open_clip's own downloads leave it) holding only the weights, needs the architecture name.
    With no such local weights, the Hub repository (``model_path`` or the default) is fetched (``fetch``:
    ``on_download``, ``log``), downloading it on first use.
    """
    if model_path and os.path.isfile(model_path):
        if not arch:
            raise CaptionerUnavailable(
                f"{model_path} is a single checkpoint file: also pass --clip-arch with its open_clip architecture "
                f"(e.g. {DEFAULT_CLIP_ARCH}), or give a folder holding open_clip_config.json and the weights."
            )
        return arch, model_path, model_path
    folder = model_path or hf_cache_snapshot(CLIP_WEIGHTS.repo_id)
    arch = arch or (None if model_path else DEFAULT_CLIP_ARCH)
    if folder and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        checkpoint = _checkpoint_in(folder)
        if arch and checkpoint:
            return arch, checkpoint, checkpoint
        if checkpoint:
            raise CaptionerUnavailable(
                f"{folder} holds CLIP weights but no open_clip_config.json: pass --clip-arch with their open_clip "
                f"architecture (e.g. {DEFAULT_CLIP_ARCH}), or add the open_clip_config.json from "
                f"https://huggingface.co/{CLIP_WEIGHTS.repo_id} (or the model's own repository)."
            )
    folder = resolve_weights_folder(CLIP_WEIGHTS, model_path, **fetch)
    return "local-dir:" + folder, None, folder


def _open_clip_model(model_path: Optional[str], arch: Optional[str], device: str, **fetch):
    """(model, preprocess, tokenizer) from the files ``_model_source`` finds (or fetches)."""
    name, checkpoint, source = _model_source(model_path, arch, **fetch)
    try:
        import open_clip
    except ImportError as exc:
        raise CaptionerUnavailable(
            f"CLIP interrogation needs open_clip_torch ({exc}); install it with `pip install lora-trainer[caption]`."
        ) from None
    if not name.startswith("local-dir:") and name not in open_clip.list_models():
        raise CaptionerUnavailable(
            f"unknown open_clip architecture {name!r} for {source}; "
            f"known ones include {', '.join(open_clip.list_models()[:8])}, ..."
        )
    precision = "fp16" if device.startswith("cuda") else "fp32"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=checkpoint, device=device, precision=precision
        )
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CaptionerUnavailable(f"cannot load CLIP from {source}: {exc}") from None
    return model, preprocess, tokenizer


def load_clip_interrogator(
    model_path: Optional[str] = None,
    device: str = "auto",
    *,
    arch: Optional[str] = None,
    base_captioner: Optional[Captioner] = None,
    phrase_lists: Mapping[str, Sequence[str]] = DEFAULT_PHRASE_LISTS,
    top_k: Mapping[str, int] = DEFAULT_TOP_K,
    on_download: Optional[DownloadCallback] = None,
    log: Optional[Callable[[str], None]] = None,
) -> ClipInterrogator:
    """Build a CLIP interrogator from local weights or the Hub (see ``_model_source``; the default repository
    is downloaded on first use, ``on_download`` sees the progress)."""
    device = resolve_device(device)
    model, preprocess, tokenizer = _open_clip_model(model_path, arch, device, on_download=on_download, log=log)
    model.eval()
    return ClipInterrogator(
        model, preprocess, tokenizer, device, phrase_lists=phrase_lists, top_k=top_k, base_captioner=base_captioner
    )
