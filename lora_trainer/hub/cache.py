"""Reading (and, for refs, writing) the standard Hugging Face cache, the layout every HF tool shares:
``HF_HUB_CACHE/models--owner--name/{refs/<revision>, snapshots/<commit>/<path>, blobs/<hash>}``, where a
snapshot file is a link to its blob and a ref file holds the commit its branch or tag pointed to.

Local only; nothing here touches the network.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache_dir() -> str:
    """The cache folder huggingface_hub uses (``HF_HUB_CACHE``, default ``HF_HOME/hub``, default
    ``~/.cache/huggingface/hub``). Read from ``huggingface_hub.constants`` at each call: it resolved the
    environment variables when it was imported, and every HF tool in this process uses that value."""
    try:
        from huggingface_hub import constants
    except ImportError:  # messages only: without huggingface_hub nothing is downloaded anyway
        home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
        return os.environ.get("HF_HUB_CACHE") or os.path.join(home, "hub")
    return constants.HF_HUB_CACHE


def repo_folder(repo_id: str, cache_dir: str) -> str:
    """``cache_dir/models--owner--name``."""
    return os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))


def cached_commit(repo_id: str, revision: str, cache_dir: str) -> Optional[str]:
    """The commit ``revision`` resolved to when it was last downloaded (a commit id is its own), or None."""
    if COMMIT.fullmatch(revision):
        return revision
    ref = os.path.join(repo_folder(repo_id, cache_dir), "refs", *revision.split("/"))
    try:
        with open(ref, encoding="utf-8") as fh:
            commit = fh.read().strip()
    except OSError:
        return None
    return commit if COMMIT.fullmatch(commit) else None


def snapshot_folder(repo_id: str, commit: str, cache_dir: str) -> str:
    return os.path.join(repo_folder(repo_id, cache_dir), "snapshots", commit)


def blobs_folder(repo_id: str, cache_dir: str) -> str:
    return os.path.join(repo_folder(repo_id, cache_dir), "blobs")


def snapshot_files(folder: str) -> List[str]:
    """Repository paths (forward slashes) of the files in a snapshot folder whose content is there: a link
    whose blob was deleted does not count."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):  # follows the link to the blob
                found.append(os.path.relpath(path, folder).replace(os.sep, "/"))
    return sorted(found)


def record_ref(repo_id: str, revision: str, commit: str, cache_dir: str) -> None:
    """Point ``refs/<revision>`` at ``commit``, as huggingface_hub does after a download by branch name: later
    offline runs find the snapshot through it. Written atomically; a commit id needs no ref."""
    if revision == commit:
        return
    from lora_trainer.io.atomic import atomic_write_text

    atomic_write_text(os.path.join(repo_folder(repo_id, cache_dir), "refs", *revision.split("/")), commit)
