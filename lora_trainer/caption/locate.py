"""Finding a captioner's weights on disk: an explicit folder, or the local Hugging Face cache. Never downloads.

When files are missing the error names each one and the folder to put it in, in one line, so that the command
line can print it as is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from lora_trainer.caption.base import CaptionerUnavailable


@dataclass(frozen=True)
class WeightsSpec:
    """What one captioner needs on disk."""

    label: str  # shown to the user, e.g. "BLIP"
    repo_id: str  # the Hugging Face repository the files come from
    required: Sequence[Tuple[str, ...]]  # each entry lists alternatives; one of them must exist
    suggested_folder: str  # where we tell users to put the files when they have none


def missing_files(folder: str, required: Sequence[Tuple[str, ...]]) -> List[str]:
    """The entries of ``required`` with no file in ``folder``, each written as ``a (or b)``."""
    missing = []
    for alternatives in required:
        if not any(os.path.isfile(os.path.join(folder, name)) for name in alternatives):
            missing.append(_describe(alternatives))
    return missing


def hf_cache_snapshot(repo_id: str) -> Optional[str]:
    """The local snapshot folder of ``repo_id`` in the Hugging Face cache, or None. Offline only."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError) or a broken cache entry: treat both as absent
        return None


def hf_cache_root() -> str:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``), for messages."""
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def _describe(alternatives: Tuple[str, ...]) -> str:
    return alternatives[0] + "".join(f" (or {name})" for name in alternatives[1:])


def _file_list(spec: WeightsSpec) -> str:
    return ", ".join(_describe(alternatives) for alternatives in spec.required)


def resolve_weights_folder(spec: WeightsSpec, model_path: Optional[str], option: str = "--model-path") -> str:
    """The folder holding every file ``spec`` requires: ``model_path`` if given, else the HF cache snapshot.

    Raises CaptionerUnavailable naming the missing files and where to put them.
    """
    if model_path:
        folder = os.path.abspath(model_path)
        if not os.path.isdir(folder):
            raise CaptionerUnavailable(
                f"{spec.label} weights folder not found: {folder}. Create it and put {_file_list(spec)} in it "
                f"(from https://huggingface.co/{spec.repo_id})."
            )
        missing = missing_files(folder, spec.required)
        if missing:
            raise CaptionerUnavailable(
                f"{spec.label} weights are incomplete in {folder}: missing {', '.join(missing)}. Put them in that "
                f"folder (from https://huggingface.co/{spec.repo_id})."
            )
        return folder
    snapshot = hf_cache_snapshot(spec.repo_id)
    if snapshot and not missing_files(snapshot, spec.required):
        return snapshot
    where = (
        f"the cached copy at {snapshot} lacks {', '.join(missing_files(snapshot, spec.required))}"
        if snapshot
        else f"{spec.repo_id} is not in the local Hugging Face cache ({hf_cache_root()})"
    )
    raise CaptionerUnavailable(
        f"{spec.label} weights not found on disk: {where}. Nothing is downloaded at run time: put "
        f"{_file_list(spec)} from https://huggingface.co/{spec.repo_id} in a folder such as "
        f"{spec.suggested_folder} and pass {option} {spec.suggested_folder}, or fill the cache beforehand with "
        f"`hf download {spec.repo_id}`."
    )
