"""Saving and loading kohya-format LoRA ``.safetensors`` files.

Files are written under a temporary name and renamed, so the WebUI never lists a half-written LoRA.
``sshs_model_hash`` is computed as sd-scripts does it: SHA-256 of the bytes after the safetensors header,
which the header's own metadata cannot change, so it can be stored in that header. ``sshs_legacy_hash`` is
sd-scripts' too: the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB of the file serialised
with its ``ss_*`` keys only (empty, and so a fixed value, for files under 1 MiB).
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, safe_open, save

from lora_trainer.errors import ModelLoadError
from lora_trainer.io.atomic import atomic_path

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def safetensors_data_hash(blob: bytes) -> str:
    """sd-scripts' model hash: SHA-256 of everything after the 8-byte length and the JSON header."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len :]).hexdigest()


def legacy_addnet_hash(blob: bytes) -> str:
    """sd-scripts' ``addnet_hash_legacy``: SHA-256 of bytes [1 MiB, 1 MiB + 64 KiB) of the file, 8 hex digits."""
    return hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def serialize_lora(
    tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], prefixes: Tuple[str, ...] = KOHYA_PREFIXES
) -> bytes:
    """The file's bytes with ``sshs_model_hash`` and ``sshs_legacy_hash`` added; every key must start with one of
    ``prefixes`` (the family's LoRA key prefixes)."""
    for key in tensors:
        if not key.startswith(prefixes):
            raise ValueError(f"refusing to write non-kohya key {key!r}: diffusers' loader rejects such files")
    metadata = {k: str(v) for k, v in metadata.items()}
    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    metadata["sshs_model_hash"] = safetensors_data_hash(blob)
    metadata["sshs_legacy_hash"] = legacy_addnet_hash(blob)
    return save(tensors, metadata=metadata)


def save_lora_file(
    path: str,
    tensors: Dict[str, torch.Tensor],
    metadata: Dict[str, str],
    prefixes: Tuple[str, ...] = KOHYA_PREFIXES,
) -> None:
    """Write a kohya LoRA file atomically, with the ss_* metadata and sshs_model_hash."""
    blob = serialize_lora(tensors, metadata, prefixes)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(blob)


def load_lora_file(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    if not os.path.isfile(path):
        raise ModelLoadError(f"LoRA file not found: {path}")
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as fh:
            metadata: Optional[Dict[str, str]] = fh.metadata()
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable .safetensors LoRA ({exc}).") from None
    if not any(k.startswith(KOHYA_PREFIXES + ("diffusion_model.",)) for k in tensors):
        raise ModelLoadError(f"{path} has no kohya LoRA keys (lora_unet_*/lora_te_*); convert it to kohya format.")
    return tensors, metadata or {}
