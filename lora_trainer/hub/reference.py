"""What a model reference names: a local path, or a repository (or one file of it) on the Hugging Face Hub.

Accepted Hub spellings (the first is the usual one):

- ``owner/name``, ``owner/name@revision`` (a branch, tag or commit),
- ``owner/name/path/in/repo.safetensors`` and ``owner/name@revision/path/in/repo.safetensors``,
- the same behind ``hf://``, and the browser's ``https://huggingface.co/owner/name[/blob|resolve|tree/REV/path]``.

A reference is local when it exists on disk or is written as a path (``/``, ``./``, ``../``, ``~``, a drive
letter or a backslash); a missing ``folder/file.safetensors`` with one slash is a local path too. Only
``owner/name`` ids are Hub references: bare legacy ids (``gpt2``) would make every typo a network lookup.
Pure string handling, no imports beyond the standard library: the config module reads this.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional, Tuple

DEFAULT_REVISION = "main"
URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "https://hf.co/", "hf://")
# The Hub's rule for owner and repository names: letters, digits, '-', '_', '.', not starting or ending with
# '-' or '.', no '--' or '..'.
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
# Files that, written as ``folder/file.ext`` with one slash, are far more likely a local path than a repo id.
LOCAL_FILE_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".gguf", ".yaml", ".json", ".csv")
_URL_KINDS = ("blob", "resolve", "tree")


@dataclass(frozen=True)
class HubReference:
    """A repository on the Hub (``repo_id`` = ``owner/name``), at ``revision`` (None: ``main``), and optionally
    one file in it (``filename``, a path inside the repository with forward slashes)."""

    repo_id: str
    revision: Optional[str] = None
    filename: Optional[str] = None

    @property
    def revision_or_default(self) -> str:
        return self.revision or DEFAULT_REVISION

    def repo_text(self) -> str:
        """``owner/name`` or ``owner/name@revision``."""
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def __str__(self) -> str:
        return self.repo_text() + (f"/{self.filename}" if self.filename else "")


def looks_like_local_path(text: str) -> bool:
    """True when ``text`` is written the way paths are, whether or not it exists."""
    text = text.strip()
    if text in (".", "..") or text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text:
        return True
    if re.match(r"^[A-Za-z]:", text):  # a Windows drive
        return True
    parts = text.split("/")
    return len(parts) == 2 and parts[1].lower().endswith(LOCAL_FILE_EXTENSIONS)


def _valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and "--" not in name and ".." not in name


def _valid_path(parts) -> bool:
    return all(part and part not in (".", "..") for part in parts)


def _split_revision(name_and_revision: str, rest: Tuple[str, ...]) -> Tuple[str, Optional[str], Tuple[str, ...]]:
    """``name@rev`` followed by path parts -> (name, rev, path parts); ``refs/pr/N`` revisions span 3 parts."""
    if "@" not in name_and_revision:
        return name_and_revision, None, rest
    name, revision = name_and_revision.split("@", 1)
    if revision == "refs" and len(rest) >= 2:  # refs/pr/12, refs/convert/parquet
        revision, rest = "/".join((revision, *rest[:2])), rest[2:]
    return name, revision, rest


def parse_hub_reference(text: str) -> Optional[HubReference]:
    """The Hub reference ``text`` spells (see the module doc), or None when it is not one.

    Says nothing about whether the repository exists; ``fetch`` finds out.
    """
    text = (text or "").strip()
    from_url = text.startswith(URL_PREFIXES)
    if from_url:
        text = text[next(len(p) for p in URL_PREFIXES if text.startswith(p)) :].split("?", 1)[0].rstrip("/")
    elif looks_like_local_path(text):
        return None
    parts = tuple(text.split("/"))
    if len(parts) < 2:
        return None
    owner, name_part, rest = parts[0], parts[1], parts[2:]
    name, revision, rest = _split_revision(name_part, rest)
    if from_url and revision is None and len(rest) >= 2 and rest[0] in _URL_KINDS:
        revision, rest = rest[1], rest[2:]  # huggingface.co/owner/name/blob/main/file.safetensors
    if not (_valid_name(owner) and _valid_name(name)):
        return None
    if revision is not None and not _REVISION.fullmatch(revision):
        return None
    if not _valid_path(rest):
        return None
    return HubReference(f"{owner}/{name}", revision or None, "/".join(rest) or None)


def as_hub_reference(text: str, base_dir: Optional[str] = None) -> Optional[HubReference]:
    """The Hub reference ``text`` names, or None when it is a local path (it exists under ``base_dir``, the
    working directory when None, or it is written as a path)."""
    if not text or not text.strip():
        return None
    local = os.path.join(base_dir or os.getcwd(), os.path.expanduser(text.strip()))
    if os.path.exists(local):
        return None
    return parse_hub_reference(text)
