"""Cached encoder outputs: VAE latents per image and text-encoder outputs per caption.

Kept in memory, and on disk (one small safetensors file per entry, written atomically) when enabled, so a
second run on the same data and model skips loading the VAE and text encoders at all. Keys cover everything
the output depends on: the model's fingerprint, the image file (path, size, mtime, EXIF orientation), its
bucket, the caption, clip_skip and the caption length limit (max_token_length).
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from lora_trainer.data.dataset import Sample
from lora_trainer.io.atomic import atomic_path

Entry = Dict[str, torch.Tensor]


class EncodingCache:
    def __init__(self, folder: Optional[str], model_identity: str, writer: bool = True, max_token_length: int = 75):
        self.folder = folder
        self.identity = model_identity
        self.writer = writer  # only the main process writes the disk cache
        self.max_token_length = max_token_length
        self.memory: Dict[str, Entry] = {}

    def latent_key(self, sample: Sample) -> str:
        stat = os.stat(sample.image.path)
        raw = (
            f"latent|{self.identity}|{sample.image.path}|{stat.st_size}|{stat.st_mtime_ns}|{sample.bucket}"
            f"|orientation{sample.image.orientation}"
        )
        return hashlib.sha1(raw.encode()).hexdigest()

    def text_key(self, caption: str, clip_skip: int) -> str:
        # One 75-token window keeps the keys of caches written before longer captions were possible.
        length = "" if self.max_token_length == 75 else f"|tokens{self.max_token_length}"
        return hashlib.sha1(f"text|{self.identity}|{clip_skip}{length}|{caption}".encode()).hexdigest()

    def _path(self, key: str) -> Optional[str]:
        return os.path.join(self.folder, key[:2], key + ".safetensors") if self.folder else None

    def has(self, key: str) -> bool:
        path = self._path(key)
        return key in self.memory or (path is not None and os.path.isfile(path))

    def get(self, key: str) -> Optional[Entry]:
        if key in self.memory:
            return self.memory[key]
        path = self._path(key)
        if path and os.path.isfile(path):
            try:
                entry = load_file(path)
            except Exception:  # a damaged cache file is recomputed, never trusted
                return None
            self.memory[key] = entry
            return entry
        return None

    def put(self, key: str, entry: Entry) -> None:
        entry = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        self.memory[key] = entry
        path = self._path(key)
        if path and self.writer:
            with atomic_path(path) as tmp:
                save_file(entry, tmp)
