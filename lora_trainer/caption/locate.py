"""Finding a captioner's weights: an explicit local folder, or a Hugging Face Hub repository (the captioner's
default one, or another given as ``--model-path owner/name``), downloaded into the standard cache on first
use and read from there afterwards (``lora_trainer.hub``).

Errors are one line, so that the command line can print them as they are: missing files named with the
folder to put them in, and the Hub's offline, gated and not-found cases with what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from lora_trainer.caption.base import CaptionerUnavailable
from lora_trainer.hub.files import ListedFiles, describe_alternatives
from lora_trainer.hub.progress import DownloadCallback


@dataclass(frozen=True)
class WeightsSpec:
    """What one captioner needs on disk, and where its default weights live on the Hub."""

    label: str  # shown to the user, e.g. "BLIP"
    repo_id: str  # the Hugging Face repository of the default weights
    required: Sequence[Tuple[str, ...]]  # each entry lists alternatives; one must exist. Weights last.
    suggested_folder: str  # where we tell users to put the files when they bring their own
    optional: Tuple[str, ...] = ()  # small files fetched too when the repository has them (tokenizer settings)
    name: str = ""  # the captioner's name: `python -m lora_trainer download NAME` fetches the default weights

    def repo_files(self) -> ListedFiles:
        return ListedFiles(f"{self.label} weights", tuple(self.required), self.optional)


def missing_files(folder: str, required: Sequence[Tuple[str, ...]]) -> List[str]:
    """The entries of ``required`` with no file in ``folder``, each written as ``a (or b)``."""
    missing = []
    for alternatives in required:
        if not any(os.path.isfile(os.path.join(folder, name)) for name in alternatives):
            missing.append(describe_alternatives(alternatives))
    return missing


def hf_cache_snapshot(repo_id: str) -> Optional[str]:
    """The cached snapshot folder of ``repo_id``'s main branch, whatever it holds, or None. Offline only."""
    from lora_trainer.hub.cache import cached_commit, hub_cache_dir, snapshot_folder

    cache_dir = hub_cache_dir()
    commit = cached_commit(repo_id, "main", cache_dir)
    folder = snapshot_folder(repo_id, commit, cache_dir) if commit else None
    return folder if folder and os.path.isdir(folder) else None


def _file_list(spec: WeightsSpec) -> str:
    return ", ".join(describe_alternatives(alternatives) for alternatives in spec.required)


def resolve_weights_folder(
    spec: WeightsSpec,
    model_path: Optional[str],
    option: str = "--model-path",
    *,
    on_download: Optional[DownloadCallback] = None,
    log: Optional[Callable[[str], None]] = None,
) -> str:
    """The folder holding every file ``spec`` requires: ``model_path`` when it is a local folder; else the
    Hub repository it names (``owner/name[@revision]``), or with no ``model_path`` the default repository,
    downloaded into the Hugging Face cache on first use (``on_download`` sees the progress).

    Raises CaptionerUnavailable naming the missing files and where to put them, or the Hub's problem.
    """
    if model_path:
        folder = os.path.abspath(model_path)
        if os.path.isdir(folder):
            missing = missing_files(folder, spec.required)
            if missing:
                raise CaptionerUnavailable(
                    f"{spec.label} weights are incomplete in {folder}: missing {', '.join(missing)}. Put them in "
                    f"that folder (from https://huggingface.co/{spec.repo_id})."
                )
            return folder
        from lora_trainer.hub.reference import as_hub_reference

        ref = as_hub_reference(model_path)
        if ref is None or ref.filename:
            raise CaptionerUnavailable(
                f"{spec.label} weights folder not found: {folder}. Create it and put {_file_list(spec)} in it "
                f"(from https://huggingface.co/{spec.repo_id}), or give a Hub repository as {option} owner/name."
            )
        return _fetch(spec, ref, model_path, option, on_download, log)
    from lora_trainer.hub.reference import HubReference

    return _fetch(spec, HubReference(spec.repo_id), spec.repo_id, option, on_download, log)


def _fetch(spec: WeightsSpec, ref, as_given: str, option: str, on_download, log) -> str:
    from lora_trainer.hub.errors import HubError
    from lora_trainer.hub.fetch import fetch_repo_files

    is_default = ref.repo_id == spec.repo_id and not ref.revision
    try:
        return fetch_repo_files(
            ref,
            spec.repo_files(),
            as_given=as_given,
            place_hint=(
                f"put {_file_list(spec)} in a folder such as {spec.suggested_folder} and pass "
                f"{option} {spec.suggested_folder}"
            ),
            download_command=f"python -m lora_trainer download {spec.name}" if is_default and spec.name else "",
            on_progress=on_download,
            log=log,
        )
    except HubError as exc:
        raise CaptionerUnavailable(str(exc)) from None
